"""Standalone mode: the agent reads LocalModelCache and LocalModelNodeGroup documents from a file,
decides with the shared placement code what this node holds, and follows edits of the file within
seconds; a file that fails to parse leaves the last good state in force and says why."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.standalone import StandaloneSource
from localmodel.kinds import LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE
from localmodel.state.memory import MemoryState
from tests.support.agents import Running, cache_doc, eventually, group_doc, running_agent
from tests.support.hfhub import Hub


def write_docs(path: Path, *docs: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    # A new mtime even within the same clock tick: the poller compares (mtime, size).
    st = path.stat() if path.exists() else None
    tmp.replace(path)
    if st is not None:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


@contextlib.asynccontextmanager
async def standalone(path: Path, cache: Path, labels: dict[str, str]) -> AsyncIterator[Running]:
    state = MemoryState()
    source = StandaloneSource(path, node_name="box", labels=labels, state=state, interval=0.1)
    await source.load()
    poller = asyncio.create_task(source.run())
    try:
        async with running_agent(
            state, cache, store=state, node="box", source_error=lambda: source.error
        ) as run:
            yield run
    finally:
        poller.cancel()


def states(status: dict[str, Any]) -> dict[str, str]:
    return dict(status.get("modelStatus") or {})


async def test_follows_edits_and_keeps_the_last_good_documents(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/a", {"config.json": b"{}", "w.bin": os.urandom(50_000)})
    hf_hub.add_repo("org/b", {"config.json": b"{}", "w.bin": os.urandom(50_000)})
    cache = tmp_path / "cache"
    docs = tmp_path / "models.yaml"
    group = group_doc("h100", limit="10Mi", path=cache)
    write_docs(docs, group, cache_doc("a", "hf://org/a", "1Mi", ["h100"]))
    async with standalone(docs, cache, {"gpu": "h100"}) as run:

        async def only_a() -> bool:
            return states(await run.status()) == {"a": "ModelDownloaded"}

        await eventually(only_a, what="a downloaded")

        # A cache added: picked up within seconds.
        write_docs(
            docs,
            group,
            cache_doc("a", "hf://org/a", "1Mi", ["h100"]),
            cache_doc("b", "hf://org/b", "1Mi", ["h100"]),
        )

        async def both() -> bool:
            return states(await run.status()) == {"a": "ModelDownloaded", "b": "ModelDownloaded"}

        await eventually(both, timeout=10, what="b added")

        # A broken file: nothing changes, and the status says why.
        docs.write_text(
            "apiVersion: serving.kserve.io/v1alpha1\nkind: LocalModelCache\nmetadata: {name: x}\nspec: [\n"
        )

        async def complains() -> str | None:
            for c in (await run.status()).get("conditions") or []:
                if c["type"] == "ConfigurationValid" and c["status"] == "False":
                    return str(c["message"])
            return None

        message = await eventually(complains, timeout=10, what="the parse error in the status")
        assert "models.yaml" in message and "last good" in message
        assert run.model_dir("hf://org/a").is_dir() and run.model_dir("hf://org/b").is_dir()

        # Fixed, with a removed: a goes, b stays, the error clears.
        write_docs(docs, group, cache_doc("b", "hf://org/b", "1Mi", ["h100"]))
        await eventually(lambda: not run.model_dir("hf://org/a").exists(), timeout=10, what="a removed")

        async def clean() -> bool:
            st = await run.status()
            ok = all(c["status"] == "True" for c in st.get("conditions") or [])
            return ok and states(st) == {"b": "ModelDownloaded"}

        await eventually(clean, timeout=10, what="the error cleared")
        assert run.model_dir("hf://org/b").is_dir()


async def test_a_node_outside_every_group_holds_nothing(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/a", {"w.bin": b"x" * 10})
    cache = tmp_path / "cache"
    docs = tmp_path / "models.yaml"
    write_docs(
        docs, group_doc("h100", limit="10Mi", path=cache), cache_doc("a", "hf://org/a", "1Mi", ["h100"])
    )
    async with standalone(docs, cache, {"gpu": "a100"}) as run:
        await eventually(lambda: run.agent.ready and run.agent.desired.known, what="ready")
        await asyncio.sleep(0.3)
        assert states(await run.status()) == {}
        assert hf_hub.count("GET", "org/a") == 0


async def test_a_bad_file_at_start_deletes_nothing(hf_hub: Hub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    key_dir = cache / "models" / ("a" * 16)
    key_dir.mkdir(parents=True)
    (key_dir / "w.bin").write_bytes(b"precious")
    docs = tmp_path / "models.yaml"
    docs.write_text("kind: LocalModelCache\n: :\n")
    async with standalone(docs, cache, {"gpu": "h100"}) as run:
        await eventually(lambda: run.agent.scanned, what="scanned")
        await asyncio.sleep(0.5)
        assert run.agent.desired.known is False
    assert (key_dir / "w.bin").read_bytes() == b"precious"


async def test_a_cache_folder_inside_the_documents_folder_is_not_read_as_documents(
    hf_hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The model's own config.json lands under the documents' folder: it is no document, and the
    # agent's writes there are no edits (they made it reload and log every second).
    hf_hub.add_repo("org/a", {"config.json": b'{"kind": "LocalModelCache"}', "w.bin": os.urandom(50_000)})
    folder = tmp_path / "docs"
    folder.mkdir()
    cache = folder / "cache"
    write_docs(
        folder / "models.yaml",
        group_doc("h100", limit="10Mi", path=cache),
        cache_doc("a", "hf://org/a", "1Mi", ["h100"]),
    )
    caplog.set_level(logging.INFO, logger="modelcache.agent")
    state = MemoryState()
    source = StandaloneSource(
        folder, node_name="box", labels={"gpu": "h100"}, state=state, interval=0.05, exclude=(cache,)
    )
    assert await source.load()
    poller = asyncio.create_task(source.run())
    try:
        async with running_agent(
            state, cache, store=state, node="box", source_error=lambda: source.error
        ) as run:

            async def downloaded() -> bool:
                return states(await run.status()) == {"a": "ModelDownloaded"}

            await eventually(downloaded, what="a downloaded")
            await asyncio.sleep(0.5)  # ten polls after the agent's last writes
    finally:
        poller.cancel()
    loads = [r for r in caplog.records if r.getMessage().startswith("standalone:")]
    assert [r.getMessage() for r in loads] == [
        "standalone: 1 cache(s), 1 group(s); this node holds 1 model(s)"
    ]
    assert source.error is None


async def test_documents_creation_times_decide_who_is_admitted(tmp_path: Path) -> None:
    """Oldest first, by the documents' metadata.creationTimestamp (kept, as the controller's
    standalone mode keeps it): b (2024) fits, a (2025) does not, whatever their names' order."""
    a = cache_doc("a", "hf://org/a", "8Mi", ["h100"])
    a["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z"
    b = cache_doc("b", "hf://org/b", "8Mi", ["h100"])
    b["metadata"]["creationTimestamp"] = "2024-01-01T00:00:00Z"
    docs = tmp_path / "models.yaml"
    write_docs(docs, group_doc("h100", limit="10Mi", path=tmp_path / "cache"), a, b)
    state = MemoryState()
    source = StandaloneSource(docs, node_name="box", labels={"gpu": "h100"}, state=state, interval=0.1)
    assert await source.load()
    node = await state.get(LOCAL_MODEL_NODE, "box")
    assert [m["modelName"] for m in node["spec"]["localModels"]] == ["b"]
    assert [r.cache for r in source.refused] == ["a"]
    stored = await state.get(LOCAL_MODEL_CACHE, "b")
    assert stored["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"
