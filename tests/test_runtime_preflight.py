"""Preflight on fabricated model folders (sparse files): what vLLM refuses late or never, refused now."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import google_crc32c
import pytest

from localmodel.errors import InvalidInput
from localmodel.layout import CacheLayout, storage_key
from localmodel.manifest import HASH_NAMES, FileEntry, Manifest
from runtime.preflight import manifest_path, preflight

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 4,
}


def write_safetensors(path: Path, tensors: dict[str, int]) -> int:
    """A safetensors file whose header names ``tensors`` (name -> byte size), the data left sparse."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, size in tensors.items():
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def make_model(
    folder: Path, shards: int = 3, tensor_bytes: int = 1000, per_shard: int = 2
) -> dict[str, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    layout: dict[str, list[str]] = {}
    weight_map = {}
    for s in range(1, shards + 1):
        name = f"model-{s:05d}-of-{shards:05d}.safetensors"
        tensors = [f"layers.{s}.w{t}" for t in range(per_shard)]
        write_safetensors(folder / name, dict.fromkeys(tensors, tensor_bytes))
        layout[name] = tensors
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": shards * per_shard * tensor_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return layout


def write_manifest(folder: Path, target: Path, *, hashes: bool = False) -> Manifest:
    entries = []
    for p in sorted(x for x in folder.rglob("*") if x.is_file()):
        rel = p.relative_to(folder).as_posix()
        data = p.read_bytes() if hashes else b""
        sha256 = hashlib.sha256(data).hexdigest() if hashes and p.suffix == ".safetensors" else None
        sha1 = None
        if hashes and p.suffix != ".safetensors":
            sha1 = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        entries.append(FileEntry(rel, p.stat().st_size, sha256, sha1))
    manifest = Manifest("hf://org/model", "0" * 16, "abc", tuple(entries))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(manifest.to_json()))
    return manifest


def refused(folder: Path, **kwargs: object) -> str:
    with pytest.raises(InvalidInput) as e:
        preflight(folder, **kwargs)  # type: ignore[arg-type]
    message = str(e.value)
    assert "\n" not in message
    return message


def test_complete_sharded_model_passes(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    report = preflight(tmp_path / "m")
    assert report.config == CONFIG
    assert report.files_checked == 3
    assert report.manifest is None
    assert report.bytes_checked == sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors"))


def test_missing_folder(tmp_path: Path) -> None:
    assert "does not exist" in refused(tmp_path / "absent")


def test_missing_config(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    message = refused(tmp_path / "m")
    assert "config.json is missing" in message


def test_config_not_json(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    assert "config.json is not readable JSON" in refused(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    assert "not a JSON object" in refused(tmp_path / "m")


def test_missing_shard_is_named(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00003.safetensors").unlink()
    message = refused(tmp_path / "m")
    assert (
        "shard model-00002-of-00003.safetensors named in model.safetensors.index.json is missing" in message
    )
    assert "3 shards" in message


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    shard = tmp_path / "m" / "model-00003-of-00003.safetensors"
    full = shard.stat().st_size
    os.truncate(shard, full - 1)
    message = refused(tmp_path / "m")
    assert f"{shard} is {full - 1} bytes but its header describes {full}: the file is truncated" in message


def test_shard_cut_inside_its_header(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    shard = tmp_path / "m" / "model-00001-of-00003.safetensors"
    os.truncate(shard, 20)
    assert "truncated or not safetensors" in refused(tmp_path / "m")
    os.truncate(shard, 3)
    assert "too short for a safetensors file" in refused(tmp_path / "m")


def test_shard_longer_than_its_header(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    shard = tmp_path / "m" / "model-00001-of-00003.safetensors"
    os.truncate(shard, shard.stat().st_size + 10)
    assert "longer than its header says" in refused(tmp_path / "m")


def test_shard_lacking_tensors_the_index_places_in_it(tmp_path: Path) -> None:
    layout = make_model(tmp_path / "m")
    name = "model-00002-of-00003.safetensors"
    write_safetensors(tmp_path / "m" / name, {layout[name][0]: 1000})  # the second tensor is gone
    message = refused(tmp_path / "m")
    assert f"shard {name} lacks 1 tensors" in message
    assert layout[name][1] in message


def test_index_without_weight_map(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "no weight_map" in refused(tmp_path / "m")


def test_index_naming_a_path_outside(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x.safetensors"}}')
    assert "is not a file name" in refused(tmp_path / "m")


def test_single_file_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer.model").write_bytes(b"sentencepiece")
    size = write_safetensors(folder / "model.safetensors", {"a": 64, "b": 64})
    assert preflight(folder).files_checked == 1
    os.truncate(folder / "model.safetensors", size - 64)
    assert "model.safetensors is" in refused(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "not safetensors" in refused(folder)


def test_header_not_json(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    assert "header is not JSON" in refused(folder)


def test_no_weights_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    assert refused(folder) == (
        f"{folder} has config.json but no weights (*.safetensors, *.bin, *.pt, *.pth); the folder is "
        "incomplete: the cache agent re-fetches a model whose folder is removed; or run `modelcache "
        "pull` again"
    )
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 16)
    assert preflight(folder).files_checked == 0


def test_no_tokenizer_is_refused_unless_one_is_given(tmp_path: Path) -> None:
    # Field case 16 (vLLM #31444): weights and config from a weights-only prefix, no tokenizer.
    folder = tmp_path / "notok"
    make_model(folder)
    (folder / "tokenizer.json").unlink()
    message = refused(folder)
    assert message.startswith(f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model, ")
    assert message.endswith("re-pull the whole repository, or pass --tokenizer (or --skip-tokenizer-init)")
    assert preflight(folder, tokenizer_given=True).files_checked == 3  # the three shards
    # A GPT-2 style BPE tokenizer is the pair vocab.json + merges.txt; one alone is not enough.
    (folder / "vocab.json").write_text("{}")
    assert "no tokenizer files" in refused(folder)
    (folder / "merges.txt").write_text("#version: 0.2\n")
    preflight(folder)


def cached_model(tmp_path: Path, *, hashes: bool = False) -> tuple[Path, Path]:
    layout = CacheLayout(tmp_path / "cache")
    key = storage_key("hf://org/model")
    folder = layout.model_dir(key)
    make_model(folder)
    manifest = layout.manifest_file(key)
    write_manifest(folder, manifest, hashes=hashes)
    return folder, manifest


def test_manifest_found_beside_the_cache_layout(tmp_path: Path) -> None:
    folder, manifest = cached_model(tmp_path)
    assert manifest_path(folder) == manifest
    report = preflight(folder)
    assert report.manifest == manifest
    assert report.files_checked == 6  # 3 shards, index, config, tokenizer
    assert report.bytes_checked == sum(p.stat().st_size for p in folder.iterdir())


def test_manifest_size_mismatch_is_named(tmp_path: Path) -> None:
    folder, _ = cached_model(tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "cut": ')
    message = refused(folder)
    assert "tokenizer.json is 26 bytes, the cache's manifest says 18" in message


def test_manifest_missing_file_is_named(tmp_path: Path) -> None:
    folder, _ = cached_model(tmp_path)
    (folder / "tokenizer.json").unlink()
    assert "tokenizer.json is listed in the cache's manifest but missing" in refused(folder)


def test_unreadable_manifest(tmp_path: Path) -> None:
    folder, manifest = cached_model(tmp_path)
    manifest.write_text("{")
    assert "manifest is unreadable" in refused(folder)


def test_explicit_manifest_path(tmp_path: Path) -> None:
    folder = tmp_path / "mnt" / "models"
    make_model(folder)
    manifest = tmp_path / "elsewhere.json"
    write_manifest(folder, manifest)
    assert preflight(folder).manifest is None
    assert preflight(folder, manifest=manifest).manifest == manifest
    (folder / "tokenizer.json").write_text("{}")
    assert "tokenizer.json is 2 bytes" in refused(folder, manifest=manifest)


def test_verify_checks_sha256_and_git_sha1(tmp_path: Path) -> None:
    folder, _ = cached_model(tmp_path, hashes=True)
    report = preflight(folder, verify=True)
    assert report.hashed == 6
    # Same size, different bytes: only a hash sees it.
    shard = folder / "model-00002-of-00003.safetensors"
    with shard.open("r+b") as f:
        f.seek(shard.stat().st_size - 1)
        f.write(b"\x01")
    assert preflight(folder).hashed == 0  # sizes still match
    assert "model-00002-of-00003.safetensors does not match the cache's manifest" in refused(
        folder, verify=True
    )


def test_verify_git_sha1_of_small_file(tmp_path: Path) -> None:
    folder, _ = cached_model(tmp_path, hashes=True)
    (folder / "tokenizer.json").write_text('{"version": "2.0"}')  # same length
    assert "tokenizer.json does not match" in refused(folder, verify=True)


def test_verify_without_manifest_says_so(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    assert any("no manifest" in n for n in preflight(tmp_path / "m", verify=True).notes)


def test_large_sparse_layout(tmp_path: Path) -> None:
    # 30 shards, 140 GB in all: only headers and sizes are read, so this takes milliseconds.
    make_model(tmp_path / "m", shards=30, tensor_bytes=140 * 10**9 // 60, per_shard=2)
    report = preflight(tmp_path / "m")
    assert report.files_checked == 30
    assert report.bytes_checked > 139 * 10**9


def _hashed_by(folder: Path, target: Path, name: str) -> None:
    """A manifest whose every file carries one hash, ``name``, as each source gives it."""
    entries = []
    for p in sorted(x for x in folder.rglob("*") if x.is_file()):
        data = p.read_bytes()
        digest = {
            "sha256": lambda: hashlib.sha256(data).hexdigest(),
            "sha1": lambda: hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest(),
            "md5": lambda: hashlib.md5(data).hexdigest(),
            "crc32c": lambda: f"{google_crc32c.value(data):08x}",
        }[name]()
        entries.append(FileEntry(p.relative_to(folder).as_posix(), len(data), **{name: digest}))
    target.write_text(json.dumps(Manifest("hf://org/model", "0" * 16, "abc", tuple(entries)).to_json()))


@pytest.mark.parametrize("name", HASH_NAMES)
def test_verify_checks_every_hash_the_agent_publishes(name: str, tmp_path: Path) -> None:
    # Before the agent's rule (entry_check) was used here, md5 and crc32c files were checked by size.
    folder, manifest = cached_model(tmp_path)
    _hashed_by(folder, manifest, name)
    assert preflight(folder, verify=True).hashed == 6
    (folder / "tokenizer.json").write_text('{"version": "2.0"}')  # same length
    assert "tokenizer.json does not match the cache's manifest" in refused(folder, verify=True)


def test_verify_without_google_crc32c_checks_crc32c_files_by_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, manifest = cached_model(tmp_path)
    _hashed_by(folder, manifest, "crc32c")
    monkeypatch.setitem(sys.modules, "google_crc32c", None)  # as in vLLM's image (installed --no-deps)
    report = preflight(folder, verify=True)
    assert report.hashed == 0
    assert any("6 file(s) have only a CRC32C" in n and "checked by size" in n for n in report.notes)
