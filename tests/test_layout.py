"""The cache folder's layout: one definition for the agent (writer), the runtime and the controller."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.disk import CacheDir
from localmodel.layout import CacheLayout, model_subpath, node_model_folder, storage_key
from runtime.launch import compile_cache_dir

KEY = storage_key("hf://org/model")


def test_the_runtime_writes_the_compile_cache_where_the_agent_deletes_it(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path / "cache")
    cache.open()
    try:
        model = cache.layout.model_dir(KEY)
        assert compile_cache_dir(model) == tmp_path / "cache" / ".modelcache" / "compile-cache" / KEY
        assert compile_cache_dir(model) == cache.layout.compile_cache_dir(KEY)
    finally:
        cache.close()


def test_a_model_folder_outside_a_cache_keeps_its_compile_cache_beside_it(tmp_path: Path) -> None:
    assert compile_cache_dir(tmp_path / "llama") == tmp_path / ".vllm-cache" / "llama"


def test_the_node_folder_of_a_model_is_the_agents_published_folder() -> None:
    assert model_subpath(KEY) == f"models/{KEY}"
    assert node_model_folder("/mnt/models/", KEY) == f"/mnt/models/models/{KEY}"
    assert node_model_folder("/", KEY) == f"/models/{KEY}"
    assert Path(node_model_folder("/var/cache", KEY)) == CacheLayout(Path("/var/cache")).model_dir(KEY)


@pytest.mark.parametrize("key", ["../../etc", "ABCDEF0123456789", "0123", ""])
def test_a_path_is_never_built_from_anything_but_a_storage_key(key: str) -> None:
    for build in (
        model_subpath,
        lambda k: node_model_folder("/cache", k),
        CacheLayout(Path("/cache")).compile_cache_dir,
    ):
        with pytest.raises(ValueError, match="not a storage key"):
            build(key)
