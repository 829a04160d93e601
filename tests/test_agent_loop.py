"""The agent's reconcile loop, in-process, against both backends (embedded state and the Kubernetes
API emulator) and the local Hugging Face-compatible hub: download, status, events, metrics,
capacity refusals, removal (while downloading too), retries with backoff, and what must never be
deleted."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from localmodel.kinds import EVENT, LOCAL_MODEL_NODE
from localmodel.layout import storage_key
from tests.support.agents import Cluster, eventually, group_doc, node_doc, running_agent, seed
from tests.support.hfhub import Hub

KiB = 1024
MiB = 1 << 20


def model_state(status: dict[str, Any], name: str) -> str | None:
    return (status.get("modelStatus") or {}).get(name)


async def test_downloads_reports_then_deletes_what_is_no_longer_wanted(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    sha_a = hf_hub.add_repo("org/a", {"config.json": b"{}", "w/model.safetensors": os.urandom(300 * KiB)})
    hf_hub.add_repo("org/b", {"config.json": b"{}", "model.bin": os.urandom(200 * KiB)})
    await seed(
        cluster.store,
        group_doc("g", path=cache),
        node_doc("n1", [("a", "hf://org/a", "1Mi"), ("b", "hf://org/b", "1Mi")]),
    )
    async with running_agent(cluster.state, cache, store=cluster.store) as run:

        async def both_done() -> bool:
            st = await run.status()
            return model_state(st, "a") == model_state(st, "b") == "ModelDownloaded"

        await eventually(both_done, what="both models downloaded")
        status = await run.status()
        a = status["models"]["a"]
        assert a["storageKey"] == storage_key("hf://org/a")
        assert a["bytesDone"] == a["bytesTotal"] == 300 * KiB + 2
        assert a["revision"] == sha_a
        assert a["startTime"] and a["completionTime"]
        assert status["capacity"]["limit"] == "1Gi"
        assert (run.model_dir("hf://org/a") / "w" / "model.safetensors").stat().st_size == 300 * KiB
        assert run.metric("modelcache_models_cached") == 2
        assert run.metric("modelcache_downloads_completed_total") == 2
        assert run.metric("modelcache_downloaded_bytes_total") >= 500 * KiB

        # Drop b from the spec: its folder goes, its status entry goes, a is untouched.
        await cluster.store.patch(
            LOCAL_MODEL_NODE,
            "n1",
            {"spec": node_doc("n1", [("a", "hf://org/a", "1Mi")])["spec"]},
        )
        await eventually(lambda: not run.model_dir("hf://org/b").exists(), what="b deleted")

        async def b_gone_from_status() -> bool:
            st = await run.status()
            return "b" not in st.get("modelStatus", {}) and "b" not in st.get("models", {})

        await eventually(b_gone_from_status, what="b removed from the status")
        assert run.model_dir("hf://org/a").is_dir()
        assert run.metric("modelcache_evictions_total") == 1
    events = (await cluster.store.list(EVENT)).items
    reasons = sorted(e["reason"] for e in events)
    assert reasons.count("DownloadCompleted") == 2 and "Deleted" in reasons
    assert all(e["involvedObject"]["kind"] == "LocalModelNode" for e in events)


async def test_refuses_what_does_not_fit_with_the_numbers(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    hf_hub.add_repo("org/a", {"w.bin": os.urandom(20 * KiB)})
    hf_hub.add_repo("org/b", {"w.bin": os.urandom(20 * KiB)})
    await seed(
        cluster.store,
        group_doc("g", limit="48Ki", path=cache),
        node_doc("n1", [("a", "hf://org/a", "32Ki"), ("b", "hf://org/b", "32Ki")]),
    )
    async with running_agent(cluster.state, cache, store=cluster.store) as run:

        async def settled() -> dict[str, Any] | None:
            st = await run.status()
            ok = model_state(st, "a") == "ModelDownloaded" and model_state(st, "b") == "ModelDownloadError"
            # Once a is published its real size (20Ki) counts, not its declared 32Ki.
            return st if ok and "28Ki" in st["models"]["b"].get("message", "") else None

        status = await eventually(settled, what="a downloaded, b refused")
        b = status["models"]["b"]
        assert b["reason"] == "InsufficientStorage"
        assert b["message"] == "needs 32Ki, 28Ki of the node group's 48Ki limit is available"
        assert not run.model_dir("hf://org/b").exists()
        assert run.metric("modelcache_refusals_total", {"reason": "InsufficientStorage"}) == 1


async def test_real_size_over_declared_refused_unless_it_still_fits(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    hf_hub.add_repo("org/small", {"w.bin": os.urandom(10 * KiB)})
    hf_hub.add_repo("org/huge", {"w.bin": os.urandom(200 * KiB)})
    await seed(
        cluster.store,
        group_doc("g", limit="100Ki", path=cache),
        # Both declare 1Ki: small is really 10Ki (fits: warning), huge 200Ki (does not: refused).
        node_doc("n1", [("small", "hf://org/small", "1Ki"), ("huge", "hf://org/huge", "1Ki")]),
    )
    async with running_agent(cluster.state, cache, store=cluster.store) as run:

        async def settled() -> dict[str, Any] | None:
            st = await run.status()
            states = (model_state(st, "small"), model_state(st, "huge"))
            return st if states == ("ModelDownloaded", "ModelDownloadError") else None

        status = await eventually(settled, what="small downloaded, huge refused")
        assert status["models"]["huge"]["reason"] == "SizeExceedsDeclared"
        assert "more than the declared modelSize 1Ki" in status["models"]["huge"]["message"]
        assert "still fits" in status["models"]["small"]["message"]
        # Refused before any byte of it was fetched: the listing was enough.
        assert hf_hub.count("GET", "org/huge/resolve") == 0
        assert not run.model_dir("hf://org/huge").exists()


async def test_source_error_is_reported_and_retried_with_backoff(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    await seed(cluster.store, group_doc("g", path=cache), node_doc("n1", [("m", "hf://org/later", "1Mi")]))
    async with running_agent(cluster.state, cache, store=cluster.store, retry_base=1.5, retry_cap=1.5) as run:

        async def failed() -> dict[str, Any] | None:
            st = await run.status()
            return st if model_state(st, "m") == "ModelDownloadError" else None

        status = await eventually(failed, what="a download error")
        m = status["models"]["m"]
        assert m["reason"] == "AccessDenied"  # the hub answers 401 for a repo it does not show
        assert "org/later" in m["message"] and m["retryAfter"]
        assert run.metric("modelcache_download_failures_total", {"reason": "AccessDenied"}) >= 1
        calls = hf_hub.count("GET", "/api/models/org/later")
        await asyncio.sleep(0.3)
        # Not hammered: within the backoff no new attempt is made.
        assert hf_hub.count("GET", "/api/models/org/later") == calls
        hf_hub.add_repo("org/later", {"w.bin": os.urandom(KiB)})

        async def recovered() -> bool:
            return model_state(await run.status(), "m") == "ModelDownloaded"

        await eventually(recovered, timeout=10, what="the retry to succeed")
    reasons = [e["reason"] for e in (await cluster.store.list(EVENT)).items]
    assert "DownloadFailed" in reasons and "DownloadCompleted" in reasons


async def test_removed_while_downloading_is_cancelled_and_its_staging_removed(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    hf_hub.add_repo("org/slow", {"big.bin": os.urandom(8 * MiB)})
    hf_hub.file("org/slow", "big.bin").rate = 1 * MiB
    await seed(cluster.store, group_doc("g", path=cache), node_doc("n1", [("slow", "hf://org/slow", "10Mi")]))
    key = storage_key("hf://org/slow")
    staging = cache / ".modelcache" / "staging" / key
    async with running_agent(cluster.state, cache, store=cluster.store) as run:

        async def downloading() -> bool:
            st = await run.status()
            return model_state(st, "slow") == "ModelDownloading" and st["models"]["slow"]["bytesDone"] > 0

        await eventually(downloading, what="the download to start")
        assert staging.is_dir()
        await cluster.store.patch(LOCAL_MODEL_NODE, "n1", {"spec": {"localModels": []}})
        await eventually(lambda: not staging.exists() and not run.agent.tasks, what="cancel and cleanup")
        assert not run.model_dir("hf://org/slow").exists()

        async def cleared() -> bool:
            return not (await run.status()).get("modelStatus")

        await eventually(cleared, what="the status to forget it")


async def test_nothing_is_deleted_before_the_node_object_exists(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    hf_hub.add_repo("org/a", {"w.bin": os.urandom(KiB)})
    await seed(cluster.store, group_doc("g", path=cache), node_doc("n1", [("a", "hf://org/a", "1Mi")]))
    async with running_agent(cluster.state, cache, store=cluster.store) as run:
        await eventually(lambda: run.model_dir("hf://org/a").is_dir(), what="a published")
    # A restart with no LocalModelNode (e.g. the controller is not running yet) keeps everything,
    # and an untrusted folder and a folder that is not ours are left alone too.
    await cluster.store.delete(LOCAL_MODEL_NODE, "n1")
    foreign = cache / "models" / "not-a-key"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    async with running_agent(cluster.state, cache, store=cluster.store) as run:
        await eventually(lambda: run.agent.ready, what="ready")
        await asyncio.sleep(0.5)
        assert run.model_dir("hf://org/a").is_dir()
        # An explicit empty list is "hold nothing": now it goes, and only it.
        await seed(cluster.store, node_doc("n1", []))
        await eventually(lambda: not run.model_dir("hf://org/a").exists(), what="a deleted")
    assert (foreign / "keep.txt").read_text() == "mine"


async def test_cache_dir_mismatch_is_a_clear_error_and_changes_nothing(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    hf_hub.add_repo("org/a", {"w.bin": os.urandom(KiB)})
    await seed(
        cluster.store,
        group_doc("g", path=tmp_path / "elsewhere"),
        node_doc("n1", [("a", "hf://org/a", "1Mi")]),
    )
    async with running_agent(cluster.state, cache, store=cluster.store) as run:

        async def invalid() -> dict[str, Any] | None:
            for c in (await run.status()).get("conditions") or []:
                if c["type"] == "ConfigurationValid" and c["status"] == "False":
                    return dict(c)
            return None

        cond = await eventually(invalid, what="the configuration error in the status")
        assert f"--cache-dir {tmp_path / 'elsewhere'}" in cond["message"]
        assert hf_hub.count("GET", "org/a") == 0
        assert not any((cache / "models").iterdir())


async def test_orphaned_staging_is_cleaned_at_start(cluster: Cluster, hf_hub: Hub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    orphan = cache / ".modelcache" / "staging" / ("0" * 16)
    (orphan / "files").mkdir(parents=True)
    (orphan / "files" / "w.bin").write_bytes(b"x" * 100)
    await seed(cluster.store, group_doc("g", path=cache), node_doc("n1", []))
    async with running_agent(cluster.state, cache, store=cluster.store):
        await eventually(lambda: not orphan.exists(), what="the orphan removed")


async def test_a_second_agent_on_the_same_folder_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    from agent.disk import CacheLocked

    cache = tmp_path / "cache"
    await seed(cluster.store, group_doc("g", path=cache), node_doc("n1", []))
    async with running_agent(cluster.state, cache, store=cluster.store) as first:
        await eventually(lambda: first.agent.ready, what="the first agent ready")
        async with running_agent(cluster.state, cache, store=cluster.store) as second:
            try:
                await asyncio.wait_for(second.task, 10)
            except CacheLocked as e:
                assert "in use by another modelcache agent" in str(e)
            else:
                raise AssertionError("the second agent was not refused")
        assert not first.task.done()


async def test_verify_on_start_refetches_a_tampered_model(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    body = os.urandom(64 * KiB)
    hf_hub.add_repo("org/a", {"w.bin": body})
    await seed(cluster.store, group_doc("g", path=cache), node_doc("n1", [("a", "hf://org/a", "1Mi")]))
    async with running_agent(cluster.state, cache, store=cluster.store) as run:
        await eventually(lambda: run.model_dir("hf://org/a").is_dir(), what="a published")
    target = cache / "models" / storage_key("hf://org/a") / "w.bin"
    target.write_bytes(b"\0" * len(body))  # same size: only a re-hash can tell
    async with running_agent(cluster.state, cache, store=cluster.store) as run:
        await eventually(lambda: run.agent.ready, what="ready")
        await asyncio.sleep(0.3)
        assert target.read_bytes() != body  # trusted by size, as the default start-up is cheap
    async with running_agent(cluster.state, cache, store=cluster.store, verify_on_start=True) as run:
        await eventually(lambda: target.exists() and target.read_bytes() == body, what="a fetched again")
