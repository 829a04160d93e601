"""Preflight: refuse an incomplete model folder in well under a second, before vLLM starts.

vLLM notices a shard missing from ``model.safetensors.index.json`` only after ~28 s of start-up, names
only some missing tensors when the index is gone too, and serves garbage from a single-file checkpoint
that lacks tensors; a truncated file is not checked at all. Here, from metadata only (docs/runtime.md):

- ``config.json`` is present and a JSON object, with weights and a tokenizer beside it;
- every shard an index names is present, and every tensor the index places in a shard is in that
  shard's header;
- every ``*.safetensors`` file is exactly as long as its own header says (8 + header + data), which
  catches a truncated or zero-filled tail without reading the data;
- with the agent's manifest (``.modelcache/manifests/<key>.json``), every file has the published size,
  and with ``verify`` its published hash (:func:`localmodel.manifest.entry_check`'s rule, the agent's).

Everything wrong is raised as one InvalidInput naming the file and what to do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmodel.errors import InvalidInput, SpecError
from localmodel.layout import CacheLayout, model_subpath, storage_key
from localmodel.manifest import FileEntry, HashCheck, Manifest, entry_check

# A safetensors header is JSON of a few KiB to a few MiB; a larger length means the file is not one.
_MAX_HEADER = 100 * 1024 * 1024
_HASH_BLOCK = 8 * 1024 * 1024
_REFETCH = "the cache agent re-fetches a model whose folder is removed; or run `modelcache pull` again"


@dataclass(frozen=True)
class PreflightReport:
    model_dir: Path
    config: dict[str, Any]
    files_checked: int
    bytes_checked: int
    manifest: Path | None
    hashed: int
    notes: tuple[str, ...] = ()


def manifest_path(model_dir: Path) -> Path | None:
    """The agent's manifest for a model folder that sits in a cache layout, when one is there."""
    found = CacheLayout.of_model_dir(model_dir)
    if found is None:
        return None
    layout, key = found
    path = layout.manifest_file(key)
    return path if path.is_file() else None


def preflight(
    model_dir: Path, *, verify: bool = False, manifest: Path | None = None, tokenizer_given: bool = False
) -> PreflightReport:
    """Check the folder; ``manifest`` overrides the one found beside a cache layout;
    ``tokenizer_given`` (``--tokenizer`` or ``--skip-tokenizer-init``) lifts the tokenizer check."""
    if not model_dir.is_dir():
        raise InvalidInput(
            f"model folder {model_dir} does not exist or is not a folder; pass --model_dir or "
            "--model-uri with --cache-dir"
        )
    config = _read_config(model_dir)
    notes: list[str] = []
    checked: set[str] = set()

    shard_bytes = 0
    indexes = sorted(model_dir.glob("*.safetensors.index.json"))
    for index in indexes:
        shard_bytes += _check_index(model_dir, index, checked)
    for single in sorted(model_dir.glob("*.safetensors")):
        if single.name not in checked:
            _header_tensors(single)
            checked.add(single.name)
            shard_bytes += single.stat().st_size
    manifest_file = manifest if manifest is not None else manifest_path(model_dir)
    hashed = 0
    total = shard_bytes
    if manifest_file is not None:
        try:
            published = Manifest.read(manifest_file)
        except SpecError as e:
            raise InvalidInput(f"the cache's manifest is unreadable: {e}") from e
        total = _check_manifest(model_dir, published.files)
        checked.update(f.path for f in published.files)
        if verify:
            hashed = _verify_hashes(model_dir, published.files, notes)
    elif verify:
        notes.append(
            "--verify: no manifest beside this folder, so sizes and headers were checked, not hashes"
        )
    if not any(any(model_dir.glob(pattern)) for pattern in _WEIGHTS):
        raise InvalidInput(
            f"{model_dir} has config.json but no weights (*.safetensors, *.bin, *.pt, *.pth); "
            f"the folder is incomplete: {_REFETCH}"
        )
    if not tokenizer_given and not any(_tokenizer_files(model_dir)):
        raise InvalidInput(
            f"{model_dir} has no tokenizer files ({', '.join(_TOKENIZER_NAMES[:4])}, ...) and vLLM, "
            "offline, cannot fetch one; re-pull the whole repository, or pass --tokenizer "
            "(or --skip-tokenizer-init)"
        )

    return PreflightReport(model_dir, config, len(checked), total, manifest_file, hashed, tuple(notes))


_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
# The files transformers' and vLLM's tokenizer loaders read (a folder needs one of these, or the
# vocab.json + merges.txt pair of a GPT-2 style BPE): a folder filled from a weights-only prefix has none
# and vLLM then fails at start-up, minutes later (field case 16; vLLM #31444).
_TOKENIZER_NAMES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "tekken.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "qwen.tiktoken",
)


def check_tokenizer(value: str, *, cache_dir: Path | None, hub_cache: str) -> tuple[str, str | None]:
    """``--tokenizer`` as vLLM will load it offline (the launcher sets HF_HUB_OFFLINE=1): the value to
    pass and a note. A local path must be a folder with tokenizer files. A repo id (``org/name``) is
    served from its folder in the modelcache cache (``hf://org/name`` in ``cache_dir``; the value
    becomes that folder) or, as vLLM would find it, from the Hugging Face cache ``hub_cache``
    (:attr:`runtime.env.RuntimeEnv.hf_hub_cache`); otherwise InvalidInput saying so."""
    looks_local = value.startswith(("/", "./", "../", "~")) or Path(value).exists()
    if looks_local:
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise InvalidInput(f"--tokenizer {value}: no such folder; pass the folder holding the tokenizer")
        if not _tokenizer_files(folder):
            raise InvalidInput(
                f"--tokenizer {value}: no tokenizer files there ({', '.join(_TOKENIZER_NAMES[:4])}, ...)"
            )
        return value, None
    repo = value[len("hf://") :] if value.startswith("hf://") else value
    if cache_dir is not None:
        cached = CacheLayout(cache_dir).model_dir(storage_key(f"hf://{repo}"))
        if cached.is_dir() and _tokenizer_files(cached):
            return str(cached), f"--tokenizer {value}: the cached folder of hf://{repo} ({cached})"
    hub = hub_cache
    snapshots = Path(hub).expanduser() / ("models--" + repo.replace("/", "--")) / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return value, f"--tokenizer {value}: found in the Hugging Face cache {hub}"
    key = storage_key(f"hf://{repo}")
    where = f"no {model_subpath(key)} in {cache_dir}" if cache_dir is not None else "no --cache-dir"
    raise InvalidInput(
        f"--tokenizer {value}: a Hugging Face repo id, but vLLM runs offline here (HF_HUB_OFFLINE=1) and it "
        f"is not cached ({where}; not in {hub}); cache hf://{repo} and pass its folder, or drop --tokenizer"
    )


def _tokenizer_files(model_dir: Path) -> list[str]:
    found = [name for name in _TOKENIZER_NAMES if (model_dir / name).is_file()]
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        found.append("vocab.json")
    return found


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InvalidInput(f"{path} is missing: the model folder is incomplete; {_REFETCH}") from None
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{path} is not readable JSON ({e}); {_REFETCH}") from e
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} is not a JSON object; {_REFETCH}")
    return data


def _check_index(model_dir: Path, index: Path, checked: set[str]) -> int:
    try:
        data = json.loads(index.read_bytes())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{index} is not readable JSON ({e}); {_REFETCH}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidInput(f"{index}: no weight_map naming the shards; {_REFETCH}")
    wanted: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or shard in ("", ".", ".."):
            raise InvalidInput(f"{index}: weight_map[{tensor!r}] = {shard!r} is not a file name")
        wanted.setdefault(shard, []).append(tensor)
    total = 0
    for shard, tensors in sorted(wanted.items()):
        path = model_dir / shard
        if not path.is_file():
            raise InvalidInput(
                f"shard {shard} named in {index.name} is missing ({len(tensors)} tensors, "
                f"{len(wanted)} shards in all); {_REFETCH}"
            )
        present = _header_tensors(path)
        lost = [t for t in tensors if t not in present]
        if lost:
            raise InvalidInput(
                f"shard {shard} lacks {len(lost)} tensors that {index.name} places in it "
                f"(first: {lost[0]}); {_REFETCH}"
            )
        checked.add(shard)
        total += path.stat().st_size
    return total


def _header_tensors(path: Path) -> set[str]:
    """The tensor names in a safetensors file's header, after checking the file's length against it."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise InvalidInput(f"{path} is {size} bytes, too short for a safetensors file; {_REFETCH}")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                raise InvalidInput(
                    f"{path} is {size} bytes but its header claims {length} bytes of metadata: the file "
                    f"is truncated or not safetensors; {_REFETCH}"
                )
            header = json.loads(f.read(length))
    except OSError as e:
        raise InvalidInput(f"{path} cannot be read ({e.strerror}); {_REFETCH}") from e
    except ValueError as e:
        raise InvalidInput(f"{path}: the safetensors header is not JSON ({e}); {_REFETCH}") from e
    if not isinstance(header, dict):
        raise InvalidInput(f"{path}: the safetensors header is not a JSON object; {_REFETCH}")
    end = 0
    names = set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InvalidInput(f"{path}: tensor {name!r} has no valid data_offsets; {_REFETCH}")
        end = max(end, offsets[1])
        names.add(name)
    expected = 8 + length + end
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise InvalidInput(
            f"{path} is {size} bytes but its header describes {expected}: the file is {what}; {_REFETCH}"
        )
    return names


def _check_manifest(model_dir: Path, files: tuple[FileEntry, ...]) -> int:
    total = 0
    for entry in files:
        path = model_dir / entry.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InvalidInput(
                f"{entry.path} is listed in the cache's manifest but missing from {model_dir}; {_REFETCH}"
            ) from None
        if size != entry.size:
            raise InvalidInput(
                f"{entry.path} is {size} bytes, the cache's manifest says {entry.size}; {_REFETCH}"
            )
        total += size
    return total


def _digest(path: Path, entry: FileEntry, check: HashCheck) -> tuple[str, str]:
    h = check.new(entry.size)
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest(), check.expected


def _verify_hashes(model_dir: Path, files: tuple[FileEntry, ...], notes: list[str]) -> int:
    # The agent's rule (entry_check: sha256, else git blob sha1, else md5, else crc32c), so whatever
    # the agent verified at publish is what is verified here.
    checks = [(f, c) for f in files if (c := entry_check(f)) is not None]
    if importlib.util.find_spec("google_crc32c") is None:
        # The runtime image installs this package without its dependencies (vLLM's environment).
        crc_only = [f.path for f, c in checks if c.name == "crc32c"]
        if crc_only:
            checks = [(f, c) for f, c in checks if c.name != "crc32c"]
            notes.append(
                f"--verify: {len(crc_only)} file(s) have only a CRC32C in the manifest and google-crc32c "
                "is not installed, so they were checked by size"
            )
    # hashlib releases the GIL on large updates, so threads hash shards on several cores at once.
    workers = max(1, min(8, os.cpu_count() or 1, len(checks)))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda ec: (ec[0], _digest(model_dir / ec[0].path, *ec)), checks))
    for entry, got in results:
        if got[0] != got[1]:
            raise InvalidInput(
                f"{entry.path} does not match the cache's manifest (hash {got[0][:16]}…, expected "
                f"{got[1][:16]}…); {_REFETCH}"
            )
    return len(checks)
