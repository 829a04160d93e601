"""`.modelcache/compile-cache` (``modelcache serve``'s compile caches, deleted with their model) is a
folder of the layout like the others: a link there stops the agent at start, and one that appears
while it runs never makes a deleted model look kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.disk import CacheDir, CacheUnsafe
from localmodel.kinds import EVENT, LOCAL_MODEL_NODE
from localmodel.layout import storage_key
from tests.support.agents import Cluster, eventually, group_doc, node_doc, running_agent, seed
from tests.support.hfhub import Hub


def test_a_compile_cache_link_refuses_the_start(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    cache_dir = tmp_path / "cache"
    (cache_dir / ".modelcache").mkdir(parents=True)
    (cache_dir / ".modelcache" / "compile-cache").symlink_to(victim)
    with pytest.raises(CacheUnsafe, match="compile-cache is a symbolic link"):
        CacheDir(cache_dir).open()
    assert [p.name for p in victim.iterdir()] == ["precious.txt"]


async def test_a_model_deleted_with_its_compile_cache_behind_a_link_is_reported_as_deleted(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    victim = tmp_path / "victim"
    victim.mkdir()
    hf_hub.add_repo("org/a", {"config.json": b"{}", "w.bin": os.urandom(4096)})
    key = storage_key("hf://org/a")
    (victim / key).mkdir()
    (victim / key / "precious.txt").write_text("keep")
    await seed(cluster.store, group_doc("g", path=cache), node_doc("n1", [("a", "hf://org/a", "1Mi")]))
    async with running_agent(cluster.state, cache, store=cluster.store) as run:

        async def done() -> bool:
            st = await run.status()
            return (st.get("modelStatus") or {}).get("a") == "ModelDownloaded"

        await eventually(done, what="a downloaded")
        (cache / ".modelcache" / "compile-cache").symlink_to(victim)  # after the start's check
        await cluster.store.patch(LOCAL_MODEL_NODE, "n1", {"spec": node_doc("n1", [])["spec"]})
        await eventually(lambda: not run.model_dir("hf://org/a").exists(), what="a deleted")

        async def condition() -> dict[str, str] | None:
            st = await run.status()
            found = [c for c in st.get("conditions", []) if c["type"] == "CacheFolderClean"]
            return found[0] if found and found[0]["status"] == "False" else None

        clean = await eventually(condition, what="CacheFolderClean=False")
        assert f".modelcache/compile-cache/{key} was not deleted" in clean["message"]
        assert "the model itself was deleted" in clean["message"]
        assert f"models/{key} was not deleted" not in clean["message"]
        assert run.metric("modelcache_evictions_total") == 1
        # Once the link is removed, the report goes without a restart.
        (cache / ".modelcache" / "compile-cache").unlink()

        async def clean_again() -> bool:
            st = await run.status()
            found = [c for c in st.get("conditions", []) if c["type"] == "CacheFolderClean"]
            return bool(found) and found[0]["status"] == "True"

        await eventually(clean_again, what="CacheFolderClean=True")
    reasons = [e["reason"] for e in (await cluster.store.list(EVENT)).items]
    assert "Deleted" in reasons
    assert (victim / key / "precious.txt").read_text() == "keep"
