"""The agent's side of issue 21: a spec flapped by another writer is not deleted and fetched again,
/readyz follows the API server, and conditions the agent does not own survive its status writes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from agent.planner import Disk, Want, plan
from localmodel.state.kube import KubeState
from tests.support.agents import (
    LOCAL_MODEL_NODE,
    Cluster,
    eventually,
    group_doc,
    node_doc,
    running_agent,
    seed,
)
from tests.support.hfhub import Hub
from tests.support.kubeapi import KubeAPI, client, every, watches

URI = "hf://org/m"


def test_planner_holds_unwanted_models_in_their_grace() -> None:
    disk = Disk(published={"a" * 16: 100, "b" * 16: 50}, staged={"c" * 16: 10}, free=1000)
    wants = (Want("a", "a" * 16, 100),)
    held = plan(wants, disk, limit=1000, held=frozenset({"b" * 16, "c" * 16}))
    assert held.delete == ()
    assert held.used == 150  # the held model's bytes are still on disk
    gone = plan(wants, disk, limit=1000)
    assert gone.delete == ("b" * 16, "c" * 16)
    assert gone.used == 100


def _gets(hub: Hub) -> int:
    return sum(1 for r in hub.requests if r.method == "GET" and "/resolve/" in r.path)


async def test_a_flapping_spec_does_not_delete_and_fetch_again(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", {"config.json": b"{}", "w.bin": os.urandom(200_000)})
    cache = tmp_path / "cache"
    with_model = node_doc("n1", [("m", URI, "1Mi")])
    await seed(cluster.store, group_doc("g", path=cache), with_model)
    async with running_agent(cluster.state, cache, store=cluster.store, eviction_grace=3.0) as run:
        folder = run.model_dir(URI)
        await eventually(folder.is_dir, what="published")
        fetched = _gets(hf_hub)
        # Another writer takes the model out of the spec and puts it back, again and again.
        for _ in range(4):
            await cluster.store.patch(LOCAL_MODEL_NODE, "n1", {"spec": {"localModels": []}})
            await asyncio.sleep(0.3)
            assert folder.is_dir()
            await cluster.store.patch(LOCAL_MODEL_NODE, "n1", {"spec": with_model["spec"]})
            await asyncio.sleep(0.3)
        assert folder.is_dir() and _gets(hf_hub) == fetched  # never deleted, never fetched again
        # Out of the spec for longer than the grace: deleted.
        removed_at = time.monotonic()
        await cluster.store.patch(LOCAL_MODEL_NODE, "n1", {"spec": {"localModels": []}})
        await eventually(lambda: not folder.exists(), timeout=20, what="deleted after the grace")
        assert time.monotonic() - removed_at >= 2.9


async def test_conditions_of_other_writers_survive_the_agents_status(
    cluster: Cluster, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    await seed(cluster.store, group_doc("g", path=cache), node_doc("n1", []))
    contested = {"type": "SpecContested", "status": "True", "reason": "OtherWriter", "message": "kserve"}
    async with running_agent(cluster.state, cache, store=cluster.store) as run:

        async def agent_wrote() -> bool:
            return any(c["type"] == "ConfigurationValid" for c in (await run.status()).get("conditions", []))

        await eventually(agent_wrote, what="the agent's status")
        current = (await run.status())["conditions"]
        await cluster.store.patch_status(LOCAL_MODEL_NODE, "n1", {"conditions": [*current, contested]})
        await cluster.store.patch(LOCAL_MODEL_NODE, "n1", {"spec": {"localModels": []}})  # a reconcile
        await asyncio.sleep(1.0)  # 20 status intervals
        types = [c["type"] for c in (await run.status())["conditions"]]
        assert "SpecContested" in types and "ConfigurationValid" in types


async def test_readiness_follows_the_api_server(kube_api: KubeAPI, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    await seed(kube_api.store, group_doc("g", path=cache), node_doc("n1", []))
    state = KubeState.for_url(kube_api.url, watch_timeout=30, component="agent-under-test")
    try:
        async with running_agent(state, cache, store=kube_api.store, ready_window=2.0, resync=30.0) as run:
            await eventually(lambda: run.agent.readiness()[0], timeout=30, what="ready")
            kube_api.inject(client("agent-under-test"), refuse=True, seconds=15)

            def not_ready() -> str | None:
                ok, why = run.agent.readiness()
                return None if ok else why

            why = await eventually(not_ready, timeout=15, what="not ready")
            assert why.startswith("the API server has not answered for ")
            await eventually(lambda: run.agent.readiness()[0], timeout=40, what="ready again")
    finally:
        await state.close()


async def test_a_hung_list_makes_the_agent_unready_until_answered(kube_api: KubeAPI, tmp_path: Path) -> None:
    """Lists taken and never answered (its own LocalModelNode's GETs still answered): not ready
    from when they were sent; the list times out, is asked again and the agent is ready again."""
    cache = tmp_path / "cache"
    await seed(kube_api.store, group_doc("g", path=cache), node_doc("n1", []))
    state = KubeState.for_url(
        kube_api.url, watch_timeout=30, component="agent-under-test", request_timeout=3.0
    )
    try:
        async with running_agent(state, cache, store=kube_api.store, ready_window=2.0, resync=30.0) as run:
            await eventually(lambda: run.agent.readiness()[0], timeout=30, what="ready")
            me = client("agent-under-test")
            lists = every(me, lambda r: r.method == "GET" and r.query.get("watch") is None)
            hung = kube_api.inject(every(lists, lambda r: not r.path.endswith("/n1")), delay=3600, seconds=8)
            kube_api.inject(every(me, watches()), expire_watch=True, seconds=8)

            def not_ready() -> str | None:
                ok, why = run.agent.readiness()
                return None if ok else why

            why = await eventually(not_ready, timeout=15, what="not ready")
            assert hung.hits > 0 and why.startswith("the API server has not answered for ")
            await eventually(lambda: run.agent.readiness()[0], timeout=60, what="ready again")
    finally:
        await state.close()
