"""Which folder ``modelcache serve`` serves: KServe's ``--model_dir`` / ``--model_id`` (and MODEL_DIR /
MODEL_ID), or ``--model-uri`` in the node's cache (``--cache-dir``). A model is never downloaded here:
a folder the cache does not hold is InvalidInput saying how to see what the node holds.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from localmodel.errors import InvalidInput
from localmodel.layout import CacheLayout, model_subpath, storage_key
from localmodel.uri import redact as redact_uri
from runtime import args as vargs
from runtime.env import RuntimeEnv

DEFAULT_MODEL_DIR = "/mnt/models"


def resolve_model_dir(ns: argparse.Namespace) -> Path:
    if ns.model_uri:
        if ns.model_dir:
            raise InvalidInput("--model_dir and --model-uri both given; name the model one way")
        if not ns.cache_dir:
            raise InvalidInput("--model-uri needs --cache-dir: the node's cache folder holding models/<key>")
        cache_dir = Path(ns.cache_dir)
        key = storage_key(ns.model_uri)
        folder = CacheLayout(cache_dir).model_dir(key)
        if not cache_dir.is_dir():
            raise InvalidInput(
                f"--cache-dir: {cache_dir} does not exist or is not a folder; name the node's cache folder "
                "(the agent's --cache-dir)"
            )
        if not folder.is_dir():
            raise InvalidInput(
                f"--model-uri: {redact_uri(ns.model_uri)} is not cached in {cache_dir} (no "
                f"{model_subpath(key)}); this runtime does not download: see what the node holds with "
                f"`modelcache status --cache-dir {cache_dir}`"
            )
        return folder
    if ns.cache_dir:
        raise InvalidInput(
            "--cache-dir goes with --model-uri or --model_id (the model to find in it); name the model "
            "with one of them" + ("; with --model_dir the folder is given already" if ns.model_dir else "")
        )
    return Path(ns.model_dir or DEFAULT_MODEL_DIR)


def resolve_model(
    ns: argparse.Namespace, flags: Sequence[vargs.Flag], env: RuntimeEnv
) -> tuple[Path, list[str]]:
    """The model folder, with KServe's precedence (its multi-node runtime's script and
    huggingfaceserver's ``get_model_id_or_path``): ``--model_id`` over ``--model_dir``; the command line
    over the environment; ``MODEL_DIR`` over ``MODEL_ID``. A model id is never downloaded: it is the
    folder of ``hf://ID`` (``hf://ID:REV`` with ``--model_revision``) in ``--cache-dir``, or, without a
    cache, the ``--model_dir`` given (a storageUri's mount) with a note; otherwise exit 2 saying how."""
    notes: list[str] = []
    model_id, id_source = ns.model_id, "--model_id"
    if model_id is not None and not model_id.strip():
        raise InvalidInput("--model_id is empty: give the model's id (org/name), or drop the flag")
    if model_id is None and not ns.model_dir and not ns.model_uri:
        if env_dir := env.model_dir:
            notes.append(f"model folder from MODEL_DIR={env_dir}")
            return resolve_model_dir(argparse.Namespace(**{**vars(ns), "model_dir": env_dir})), notes
        if env_id := env.model_id:
            model_id, id_source = env_id, "MODEL_ID"
    if not model_id:
        return resolve_model_dir(ns), notes
    if ns.model_uri:
        raise InvalidInput(f"{id_source} and --model-uri both given; name the model one way")
    model_id = model_id.strip()
    revision = vargs.value(flags, "--model-revision") or vargs.value(flags, "--revision")
    # An id written as a URI (hf://org/name) is taken as is.
    bare = model_id[len("hf://") :] if model_id.startswith("hf://") else model_id
    uri = f"hf://{bare}" + (f":{revision}" if revision and ":" not in bare else "")
    cache_dir = Path(ns.cache_dir) if ns.cache_dir else None
    if cache_dir is None and ns.model_dir and (beside := CacheLayout.of_model_dir(Path(ns.model_dir))):
        cache_dir = beside[0].root  # --model_dir is a folder of a cache: the id is looked up there
    if cache_dir is not None:
        key = storage_key(uri)
        folder = CacheLayout(cache_dir).model_dir(key)
        if folder.is_dir():
            notes.append(f"{id_source} {model_id}: the cached folder of {uri} ({folder})")
            return folder, notes
        raise InvalidInput(
            f"{id_source} {model_id}: {uri} is not cached in {cache_dir} (no {model_subpath(key)}); this "
            f"runtime does not download. Cache it (a LocalModelCache with sourceModelUri {uri}) and check "
            f"what the node holds with `modelcache status --cache-dir {cache_dir}`"
        )
    if ns.model_dir and Path(ns.model_dir).is_dir():
        notes.append(
            f"{id_source} {model_id}: served from --model_dir {ns.model_dir} (this runtime loads the cached "
            "folder and does not download; pass --cache-dir to pick the model by id)"
        )
        return Path(ns.model_dir), notes
    raise InvalidInput(
        f"{id_source} {model_id}: this runtime serves cached models and does not download; pass --cache-dir "
        f"D (the node's cache holding {uri}; `modelcache status --cache-dir D` lists it), or give the "
        "InferenceService a storageUri the cache holds"
    )
