"""Peer fill in the controller (issue 18): the peer list of each node's spec entry, the fan-out
pacing, status.originBytes, the token Secret, and that none of it rewrites a spec on progress.

Pure rules first (:mod:`controller.peers` and :func:`controller.plan.plan` walked with ``settle``),
then the controller against the Kubernetes API emulator (tests/support/kubeapi.py), where agents'
reports go in as status patches and the writes the controller makes are counted at the server."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from controller import cli
from controller.peers import (
    ZONE_LABEL,
    Candidate,
    Fill,
    Ranking,
    fill_of,
    origin_bytes,
    peer_address_ok,
    peer_facts_changed,
    peer_list,
    seed_slots,
)
from controller.peertoken import PEER_TOKEN_NAMESPACE, PEER_TOKEN_SECRET, TOKEN_KEY
from controller.plan import plan
from controller.reconcile import Controller, Settings
from controller.snapshot import Options, Scope, Snapshot
from localmodel.kinds import LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE, LOCAL_MODEL_NODE_GROUP, NODE, SECRET
from localmodel.placement import layout
from localmodel.resources import (
    LocalModelInfo,
    LocalModelNodeStatus,
    ModelProgress,
    ModelState,
    Node,
    PeerRef,
)
from localmodel.state.kube import KubeState
from localmodel.state.memory import MemoryState
from modelcache.cli import main as modelcache_main
from tests.support.kubeapi import KubeAPI, load_crds, path
from tests.test_controller_plan import cache, group, settle, snap
from tests.test_controller_reconcile import group as group_json

ROOT = Path(__file__).resolve().parents[1]
DL = ModelState.DOWNLOADED
ING = ModelState.DOWNLOADING


def gnode(name: str, gpu: str = "g", zone: str | None = None) -> Node:
    labels = {"gpu": gpu, **({ZONE_LABEL: zone} if zone else {})}
    return Node(name, labels, uid=f"uid-{name}")


def agents(s: Snapshot, reports: Mapping[str, Mapping[str, Any]], *, address: bool = True) -> Snapshot:
    """Agents report: node -> modelName -> (state, bytes done, bytes from origin, manifest digest),
    each agent with a peer address (``address``) as the DaemonSet's do."""
    lmns = dict(s.local_model_nodes)
    for n, models in reports.items():
        old = lmns[n]
        states = dict(old.status.model_status)
        progress = dict(old.status.models)
        for m, (state, done, origin, digest) in models.items():
            states[m] = state
            progress[m] = ModelProgress(
                state, bytes_done=done, bytes_from_origin=origin, manifest_sha256=digest
            )
        status = LocalModelNodeStatus(
            model_status=states, models=progress, peer_address=f"{n}:7071" if address else None
        )
        lmns[n] = dataclasses.replace(old, status=status)
    return dataclasses.replace(s, local_model_nodes=lmns)


def entry(s: Snapshot, n: str, c: str = "m") -> LocalModelInfo | None:
    lmn = s.local_model_nodes.get(n)
    return None if lmn is None else next((m for m in lmn.local_models if m.model_name == c), None)


def listed(s: Snapshot, c: str = "m") -> set[str]:
    return {n for n in s.local_model_nodes if entry(s, n, c) is not None}


def run(s: Snapshot, options: Options, scope: Scope | None = None) -> tuple[Snapshot, Any]:
    p = plan(s, options, scope=scope)
    return settle(s, p), p


def cand(
    node: str, state: ModelState, group: str | None = "g", zone: str | None = None, digest: str | None = None
) -> Candidate:
    return Candidate(node, f"{node}:7071", state, group, zone, digest)


# -- pure: the peer list ----------------------------------------------------------------------------


def test_peer_list_holders_first_then_nearest_then_a_ring_of_names() -> None:
    fill_ = (
        cand("a", DL, "g", "z1", "sha-a"),
        cand("e", DL, "h", "z2", "sha-e"),
        cand("f", DL, "g", "z2", None),
        cand("b", ING, "g", "z1"),
        cand("c", ING, "g", "z1"),
        cand("d", ING, "h", "z1"),
    )
    ranking = Ranking(tuple(sorted(fill_[:3]) + sorted(fill_[3:])), "g", "z1")
    peers, digest = peer_list("c", ranking, 10)
    # Holders: same group and zone (a), same group other zone (f), other group (e); then fetchers:
    # same group and zone after c's own name in a ring (b, c left out), other group same zone (d).
    assert [p.node for p in peers] == ["a", "f", "e", "b", "d"]
    assert peers[0] == PeerRef("a", "a:7071", DL) and peers[3].state is ING
    assert digest == "sha-a"
    assert [p.node for p in peer_list("c", ranking, 2)[0]] == ["a", "f"]
    # Three fetchers of one tier: each starts after its own name, so the first asked differ.
    ring = Ranking((cand("p1", ING), cand("p2", ING), cand("p3", ING)), "g", None)
    assert [peer_list(n, ring, 1)[0][0].node for n in ("p1", "p2", "p3")] == ["p2", "p3", "p1"]
    # The first holder without a digest does not hide the next one's; fetchers give none.
    no_digest = Ranking((cand("x", DL), cand("y", DL, digest="sha-y"), cand("z", ING)), "g", None)
    assert peer_list("w", no_digest, 4)[1] == "sha-y"
    assert peer_list("w", Ranking((cand("z", ING),), "g", None), 4) == ((PeerRef("z", "z:7071", ING),), None)
    # A node without a zone label is in no zone: an unlabelled peer is not "near" it.
    unzoned = Ranking((cand("q", DL, zone=None), cand("r", DL, "h", None)), "h", None)
    assert [p.node for p in peer_list("s", unzoned, 4)[0]] == ["r", "q"]


def test_fill_takes_ready_addressed_holders_and_fetchers_only() -> None:
    s = snap(
        [cache("m", "10Gi", ["g"])],
        [group("g", "100Gi")],
        [gnode(n, zone="z1") for n in ("n1", "n2", "n3", "n4", "n5", "n6")],
        not_ready=frozenset({"n5"}),
    )
    s, _ = run(s, Options(max_concurrent_downloads=0))
    s = agents(
        s,
        {
            "n1": {"m": (DL, 10, 10, "sha1")},
            "n2": {"m": (ING, 0, 0, None)},
            "n3": {"m": (ModelState.ERROR, 5, 5, None)},
            "n4": {"m": (ModelState.PENDING, 0, None, None)},
            "n5": {"m": (DL, 10, 10, "sha5")},  # NotReady
        },
    )
    s = agents(s, {"n6": {"m": (ING, 3, 3, None)}}, address=False)
    placed = layout(s.caches.values(), s.groups.values(), s.nodes.values())
    fill = fill_of(s, placed, "m", placed.holders["m"])
    assert [(c.node, c.state, c.group, c.zone, c.manifest_sha256) for c in fill.candidates] == [
        ("n1", DL, "g", "z1", "sha1"),
        ("n2", ING, "g", "z1", None),
    ]
    assert fill.seeded  # n1 holds it
    without_holder = fill_of(s, placed, "m", ["n2", "n3", "n4"])
    assert not without_holder.seeded  # n2 fetches but has no bytes yet; n6's bytes serve no one
    assert fill_of(agents(s, {"n2": {"m": (ING, 1, 1, None)}}), placed, "m", ["n2"]).seeded


def test_a_garbage_peer_address_lists_that_node_to_no_one() -> None:
    """An agent's status.peerAddress that is not HOST:PORT (a URL, a blank, a space, port 0) is
    never handed to other nodes as a peer."""
    s = snap([cache("m", "10Gi", ["g"])], [group("g", "100Gi")], [gnode(n) for n in ("n1", "n2", "n3")])
    s, _ = run(s, Options(max_concurrent_downloads=0))
    s = agents(s, {"n1": {"m": (DL, 10, 10, "sha1")}, "n2": {"m": (DL, 10, 10, "sha2")}})
    placed = layout(s.caches.values(), s.groups.values(), s.nodes.values())
    for garbage in (
        "http://10.0.0.7:7071",
        "bad host:7071",
        "10.0.0.7:0",
        "10.0.0.7",
        " :7071",
        "0.0.0.0:7071",
    ):
        lmns = dict(s.local_model_nodes)
        old = lmns["n2"]
        lmns["n2"] = dataclasses.replace(old, status=dataclasses.replace(old.status, peer_address=garbage))
        bad = dataclasses.replace(s, local_model_nodes=lmns)
        fill = fill_of(bad, placed, "m", placed.holders["m"])
        assert [c.node for c in fill.candidates] == ["n1"], garbage
    for good in ("10.0.0.7:7071", "[fd00::7]:7071", "node-2.example:7071"):
        assert peer_address_ok(good), good


@pytest.mark.parametrize(
    ("fill", "slots", "active", "seeds", "expected"),
    [
        (None, 5, 2, 1, 5),  # peer fill off: the usual bound
        (Fill((), seeded=True), 5, 2, 1, 5),  # a peer has bytes: the usual bound
        (Fill((), seeded=False), 5, 0, 1, 1),  # not seeded: origin_seeds at once
        (Fill((), seeded=False), 5, 1, 1, 0),
        (Fill((), seeded=False), 5, 1, 3, 2),
        (Fill((), seeded=False), 1, 0, 3, 1),  # and never more than the usual bound
    ],
)
def test_seed_slots(fill: Fill | None, slots: int, active: int, seeds: int, expected: int) -> None:
    assert seed_slots(fill, slots, active, seeds) == expected


def test_peer_facts_that_re_plan_a_cache() -> None:
    def st(address: str | None = "a:1", **models: ModelProgress) -> LocalModelNodeStatus:
        return LocalModelNodeStatus(
            model_status={k: v.state for k, v in models.items()}, models=models, peer_address=address
        )

    base = ModelProgress(ING, bytes_done=0, bytes_from_origin=0)
    assert peer_facts_changed(st(m=base), st(m=base)) == set()
    assert peer_facts_changed(st(m=base), st(m=dataclasses.replace(base, bytes_done=1))) == {"m"}
    ticking = dataclasses.replace(base, bytes_done=1, bytes_from_origin=1)
    # Progress alone (more bytes, more origin bytes while downloading) re-plans nothing.
    assert (
        peer_facts_changed(
            st(m=ticking), st(m=dataclasses.replace(ticking, bytes_done=9, bytes_from_origin=9))
        )
        == set()
    )
    done = ModelProgress(DL, bytes_done=9, bytes_from_origin=9, manifest_sha256="d")
    assert peer_facts_changed(st(m=done), st(m=dataclasses.replace(done, bytes_from_origin=4))) == {"m"}
    assert peer_facts_changed(st(m=done), st(m=dataclasses.replace(done, manifest_sha256="e"))) == {"m"}
    assert peer_facts_changed(st(m=done, k=base), st(None, m=done, k=base)) == {"m", "k"}


def test_origin_bytes_sums_what_nodes_report() -> None:
    s = snap([cache("m", "10Gi", ["g"])], [group("g", "100Gi")], [gnode(n) for n in ("n1", "n2", "n3")])
    s, _ = run(s, Options(max_concurrent_downloads=0))
    assert origin_bytes(s, "m", ["n1", "n2", "n3"]) is None
    s = agents(
        s,
        {"n1": {"m": (DL, 10, 10, None)}, "n2": {"m": (DL, 10, 2, None)}, "n3": {"m": (ING, 0, None, None)}},
    )
    assert origin_bytes(s, "m", ["n1", "n2", "n3", "n1"]) == 12


# -- pure: the plan, step by step -------------------------------------------------------------------


SIX = ("n1", "n2", "n3", "n4", "n5", "n6")


def six_nodes(**kw: Any) -> Snapshot:
    return snap([cache("m", "10Gi", ["g"])], [group("g", "100Gi")], [gnode(n) for n in SIX], **kw)


def with_agents(s: Snapshot, nodes: tuple[str, ...] = SIX) -> Snapshot:
    """Every node's LocalModelNode exists and its agent reports a peer address, nothing held."""
    lmns = dict(s.local_model_nodes)
    for n in nodes:
        old = lmns[n]
        lmns[n] = dataclasses.replace(old, status=dataclasses.replace(old.status, peer_address=f"{n}:7071"))
    return dataclasses.replace(s, local_model_nodes=lmns)


def test_fan_out_starts_one_seed_then_the_rest_from_peers() -> None:
    options = Options(max_concurrent_downloads=4)
    # The agents run before the cache comes (a group member's LocalModelNode is made empty).
    s, _ = run(snap([], [group("g", "100Gi")], [gnode(n) for n in SIX]), options)
    s = with_agents(dataclasses.replace(s, caches=six_nodes().caches))
    s, _ = run(s, options)
    assert listed(s) == {"n1"}  # one origin seed, not four
    first = entry(s, "n1")
    assert first is not None and first.peers == () and first.manifest_sha256 is None
    s, _ = run(agents(s, {"n1": {"m": (ING, 0, 0, None)}}), options)
    assert listed(s) == {"n1"}  # the seed has nothing to give yet
    s = agents(s, {"n1": {"m": (ING, 100, 100, None)}})
    s, p = run(s, options)
    assert listed(s) == {"n1", "n2", "n3", "n4"}  # within max_concurrent_downloads
    for n in ("n2", "n3", "n4"):
        info = entry(s, n)
        assert info is not None and info.peers == (PeerRef("n1", "n1:7071", ING),)
        assert info.manifest_sha256 is None
    assert "n1" not in {w.name for w in p.nodes}  # the seed's entry is not touched
    # n2 starts: the others that fetch now list it after the seed; n2 never lists itself.
    s, p = run(agents(s, {"n2": {"m": (ING, 0, 0, None)}}), options)
    assert {w.name for w in p.nodes} == {"n1", "n3", "n4"}
    assert [x.node for x in entry(s, "n3").peers] == ["n1", "n2"]  # type: ignore[union-attr]
    assert [x.node for x in entry(s, "n2").peers] == ["n1"]  # type: ignore[union-attr]
    # The seed finishes: holders first, its digest passed along; its own entry left as it was.
    before = entry(s, "n1")
    s, p = run(agents(s, {"n1": {"m": (DL, 100, 100, "sha-n1")}}), options)
    assert entry(s, "n1") is before or entry(s, "n1") == before
    assert entry(s, "n3").peers[0] == PeerRef("n1", "n1:7071", DL)  # type: ignore[union-attr]
    assert entry(s, "n3").manifest_sha256 == "sha-n1"  # type: ignore[union-attr]
    assert listed(s) == set(SIX[:5])  # n1 holds it: its slot goes to n5
    assert entry(s, "n5") is not None and entry(s, "n5").peers[0].node == "n1"  # type: ignore[union-attr]
    # Converged: planning again writes nothing.
    assert not plan(s, options).nodes


def test_progress_and_a_holder_s_peers_changing_write_nothing() -> None:
    options = Options(max_concurrent_downloads=0)
    s = with_agents(run(six_nodes(), options)[0])
    s, _ = run(agents(s, {"n1": {"m": (ING, 5, 5, None)}}), options)
    s, _ = run(agents(s, {n: {"m": (ING, 1, 1, None)} for n in SIX[1:]}), options)
    assert not plan(s, options).nodes
    # Progress ticks (bytes, bytes from origin) change no entry.
    ticked = agents(s, {n: {"m": (ING, 50, 40, None)} for n in SIX})
    assert not plan(ticked, options).nodes
    # n6 finishes: its entry stays as it was; the others learn it holds it now.
    before = entry(s, "n6")
    s, p = run(agents(s, {"n6": {"m": (DL, 100, 10, "sha6")}}), options)
    assert entry(s, "n6") == before
    assert "n6" not in {w.name for w in p.nodes}
    assert {w.name for w in p.nodes} <= set(SIX[:5])
    # Then n5 finishes too: n6's entry still names n5 fetching; nothing is written for n6.
    s, p = run(agents(s, {"n5": {"m": (DL, 100, 10, "sha6")}}), options)
    assert "n6" not in {w.name for w in p.nodes} and entry(s, "n6") == before


def test_without_peer_fill_the_rollout_is_today_s() -> None:
    options = Options(max_concurrent_downloads=2)
    s, _ = run(six_nodes(), options)
    assert listed(s) == {"n1", "n2"}  # max_concurrent_downloads, no seeds
    s, _ = run(agents(s, {"n1": {"m": (ING, 5, 5, None)}}, address=False), options)
    assert listed(s) == {"n1", "n2"} and all(entry(s, n).peers == () for n in listed(s))  # type: ignore[union-attr]
    s, _ = run(agents(s, {"n1": {"m": (DL, 5, 5, "d")}}, address=False), options)
    assert listed(s) == {"n1", "n2", "n3"}
    assert all(entry(s, n).manifest_sha256 is None for n in listed(s))  # type: ignore[union-attr]


def test_origin_bytes_reach_the_cache_status_once() -> None:
    options = Options(max_concurrent_downloads=0)
    s = with_agents(run(six_nodes(), options)[0])
    s, _ = run(agents(s, {"n1": {"m": (DL, 100, 100, "d")}, "n2": {"m": (DL, 100, 3, "d")}}), options)
    assert s.caches["m"].status.origin_bytes == 103
    assert not plan(s, options).statuses  # written once
    plain = run(six_nodes(), options)[0]
    assert plain.caches["m"].status.origin_bytes is None
    assert "originBytes" not in plain.caches["m"].status.to_json()


def test_an_incremental_plan_rewrites_the_peer_lists_that_change() -> None:
    options = Options(max_concurrent_downloads=0)
    s = with_agents(run(six_nodes(), options)[0])
    s, _ = run(agents(s, {"n1": {"m": (ING, 5, 5, None)}}), options)
    s, _ = run(agents(s, {n: {"m": (ING, 1, 1, None)} for n in SIX[1:]}), options)
    # n1 finishes; the view marks node n1 and cache m (controller.view): the plan of that scope
    # must reach the other nodes, whose lists name n1's new state.
    s2 = agents(s, {"n1": {"m": (DL, 100, 100, "d1")}})
    p = plan(s2, options, scope=Scope(caches=frozenset({"m"}), nodes=frozenset({"n1"})))
    assert {w.name for w in p.nodes} == set(SIX[1:])
    for w in p.nodes:
        (m,) = w.models
        assert m.peers[0] == PeerRef("n1", "n1:7071", DL) and m.manifest_sha256 == "d1"


def test_a_node_moved_for_one_cache_keeps_the_peer_hints_of_another() -> None:
    options = Options(max_concurrent_downloads=0)
    both = [cache("m", "10Gi", ["g"]), cache("k", "10Gi", ["g"])]
    s = with_agents(
        run(snap(both, [group("g", "100Gi")], [gnode(n) for n in ("n1", "n2")]), options)[0], ("n1", "n2")
    )
    s, _ = run(agents(s, {"n1": {"m": (ING, 5, 5, None), "k": (ING, 5, 5, None)}}), options)
    hinted = entry(s, "n2", "m")
    assert hinted is not None and [x.node for x in hinted.peers] == ["n1"]
    # Only cache k is in scope, n2 comes in for it (its k entry changes): its m entry stays hinted.
    s2 = agents(s, {"n1": {"k": (DL, 5, 5, "dk")}})
    p = plan(s2, options, scope=Scope(caches=frozenset({"k"})))
    (w,) = [w for w in p.nodes if w.name == "n2"]
    by_name = {m.model_name: m for m in w.models}
    assert by_name["m"] == hinted and by_name["k"].peers == (PeerRef("n1", "n1:7071", DL),)


# -- the controller against the Kubernetes API emulator --------------------------------------------


@pytest_asyncio.fixture(params=["lenient", "our-crds"])
async def api(request: pytest.FixtureRequest) -> AsyncIterator[KubeAPI]:
    # our-crds: the API server prunes what manifests/crds does not name (peers, originBytes, ...).
    server = KubeAPI(crds=load_crds(ROOT / "manifests" / "crds") if request.param == "our-crds" else ())
    server.store = MemoryState()
    await server.start()
    try:
        yield server
    finally:
        server.expire_watches()
        await server.close()


async def _eventually(check: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the controller did not converge")
        await asyncio.sleep(0.05)


async def _spec(kube: KubeState, n: str) -> list[dict[str, Any]]:
    try:
        return list((await kube.get(LOCAL_MODEL_NODE, n))["spec"].get("localModels") or [])
    except Exception:
        return []


async def _report(
    kube: KubeState, n: str, state: str, done: int, origin: int | None, digest: str | None = None
) -> None:
    model: dict[str, Any] = {"state": state, "bytesDone": done}
    if origin is not None:
        model["bytesFromOrigin"] = origin
    if digest is not None:
        model["manifestSha256"] = digest
    await kube.patch_status(
        LOCAL_MODEL_NODE,
        n,
        {"peerAddress": f"10.0.0.{n[-1]}:7071", "modelStatus": {"m": state}, "models": {"m": model}},
    )


async def test_peer_fill_through_the_api(api: KubeAPI) -> None:
    kube = KubeState.for_url(api.url, watch_timeout=5)
    names = ["n1", "n2", "n3"]
    try:
        await kube.create(LOCAL_MODEL_NODE_GROUP, _group_json())
        for n in names:
            await kube.create(
                NODE, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": n, "labels": {"gpu": "g"}}}
            )
        controller = Controller(kube, Settings(max_concurrent_downloads=0, peer_token_secret=None))
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(resync=60, retry_delay=0.05, stop=stop))
        try:
            # The agents start (empty LocalModelNodes made for the group), with their peer addresses.
            async def made() -> bool:
                return all([await _exists(kube, n) for n in names])

            await _eventually(made)
            for n in names:
                await kube.patch_status(LOCAL_MODEL_NODE, n, {"peerAddress": f"10.0.0.{n[-1]}:7071"})
            await kube.create(LOCAL_MODEL_CACHE, _cache_json())

            async def only_seed() -> bool:
                return [bool(await _spec(kube, n)) for n in names] == [True, False, False]

            await _eventually(only_seed)
            await _report(kube, "n1", "ModelDownloading", 0, 0)
            await asyncio.sleep(0.3)
            assert not await _spec(kube, "n2")  # no bytes at the seed yet: the others wait
            await _report(kube, "n1", "ModelDownloading", 4096, 4096)

            async def spread() -> bool:
                specs = [await _spec(kube, n) for n in ("n2", "n3")]
                return all(s and s[0].get("peers") for s in specs)

            await _eventually(spread)
            (m2,) = await _spec(kube, "n2")
            assert m2["peers"] == [{"node": "n1", "address": "10.0.0.1:7071", "state": "ModelDownloading"}]
            # Progress ticks from every agent: no spec is written for them.
            await _report(kube, "n2", "ModelDownloading", 1, 0)
            await _report(kube, "n3", "ModelDownloading", 1, 0)
            await _eventually(lambda: _peers_of(kube, "n3", ["n1", "n2"]))
            await asyncio.sleep(0.3)
            specs_before = api.write_counts()
            for tick in range(2, 6):
                for n in names:
                    await _report(kube, n, "ModelDownloading", 4096 * tick, 1000 * tick)
            await asyncio.sleep(0.5)
            assert _spec_writes(api.write_counts()) == _spec_writes(specs_before)
            # All finish; the cache's status carries the bytes all nodes took from the origin.
            await _report(kube, "n1", "ModelDownloaded", 10000, 10000, "d")
            await _report(kube, "n2", "ModelDownloaded", 10000, 0, "d")
            await _report(kube, "n3", "ModelDownloaded", 10000, 500, "d")

            async def origin() -> bool:
                status = (await kube.get(LOCAL_MODEL_CACHE, "m")).get("status") or {}
                return bool(status.get("originBytes") == 10500)

            await _eventually(origin)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    finally:
        await kube.close()


def _spec_writes(counts: Any) -> dict[Any, int]:
    return {k: v for k, v in counts.items() if k[1] == "localmodelnodes"}


async def _peers_of(kube: KubeState, n: str, expected: list[str]) -> bool:
    spec = await _spec(kube, n)
    return bool(spec) and [p["node"] for p in spec[0].get("peers") or []] == expected


async def _exists(kube: KubeState, n: str) -> bool:
    try:
        await kube.get(LOCAL_MODEL_NODE, n)
    except Exception:
        return False
    return True


def _group_json() -> dict[str, Any]:
    return group_json("g", "100Gi")


def _cache_json() -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelCache",
        "metadata": {"name": "m"},
        "spec": {"sourceModelUri": "hf://org/m", "modelSize": "10Gi", "nodeGroups": ["g"]},
    }


# -- the token Secret -------------------------------------------------------------------------------


async def test_the_token_secret_is_made_once_and_never_overwritten(
    api: KubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    kube = KubeState.for_url(api.url, watch_timeout=5)
    where = (PEER_TOKEN_NAMESPACE, PEER_TOKEN_SECRET)
    try:
        controller = Controller(kube, Settings(peer_token_secret=where, peer_token_recheck=0.0))
        await controller.load()
        await controller.reconcile(full=True)
        made = await kube.get(SECRET, PEER_TOKEN_SECRET, namespace=PEER_TOKEN_NAMESPACE)
        token = base64.b64decode(made["data"][TOKEN_KEY]).decode()
        assert len(token) == 64 and int(token, 16) >= 0  # 32 random bytes, hex
        assert made["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "modelcache-controller"}
        assert token not in caplog.text
        # Someone replaces it with their own (a rotation): the controller leaves theirs alone.
        await kube.delete(SECRET, PEER_TOKEN_SECRET, namespace=PEER_TOKEN_NAMESPACE)
        theirs = base64.b64encode(b"theirs").decode()
        own: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": PEER_TOKEN_SECRET, "namespace": PEER_TOKEN_NAMESPACE},
            "data": {TOKEN_KEY: theirs},
        }
        await kube.create(SECRET, own)
        await controller.reconcile(full=True)
        kept = await kube.get(SECRET, PEER_TOKEN_SECRET, namespace=PEER_TOKEN_NAMESPACE)
        assert kept["data"] == own["data"]
        # Deleted: made again, with a new token.
        await kube.delete(SECRET, PEER_TOKEN_SECRET, namespace=PEER_TOKEN_NAMESPACE)
        await controller.reconcile(full=True)
        again = await kube.get(SECRET, PEER_TOKEN_SECRET, namespace=PEER_TOKEN_NAMESPACE)
        assert again["data"][TOKEN_KEY] not in (made["data"][TOKEN_KEY], theirs)
    finally:
        await kube.close()


async def test_a_refused_token_secret_does_not_stop_the_reconcile(
    api: KubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    kube = KubeState.for_url(api.url, watch_timeout=5)
    try:
        await kube.create(LOCAL_MODEL_NODE_GROUP, _group_json())
        await kube.create(
            NODE, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"gpu": "g"}}}
        )
        await kube.create(LOCAL_MODEL_CACHE, _cache_json())
        fault = api.inject(path("/secrets"), status=403)
        settings = Settings(
            peer_token_secret=(PEER_TOKEN_NAMESPACE, PEER_TOKEN_SECRET), peer_token_recheck=0.0
        )
        controller = Controller(kube, settings)
        await controller.load()
        await controller.reconcile(full=True)  # no exception
        assert await _spec(kube, "n1")  # the rest of the reconcile happened
        assert "cannot make the peer token Secret modelcache-agent/modelcache-peer-token" in caplog.text
        api.heal(fault)
        await controller.reconcile(full=True)  # tried again once the cause is gone
        assert await kube.get(SECRET, PEER_TOKEN_SECRET, namespace=PEER_TOKEN_NAMESPACE)
    finally:
        await kube.close()


# -- flags ------------------------------------------------------------------------------------------


def test_flags_reach_the_reconcile_settings() -> None:
    args = cli._parser().parse_args(
        ["--origin-seeds", "2", "--peers-per-model", "6", "--peer-token-secret", "ns/tok"]
    )
    settings = cli.ControllerSettings.from_args(args, {}).reconcile()
    assert (settings.origin_seeds, settings.peers_per_model, settings.peer_token_secret) == (
        2,
        6,
        ("ns", "tok"),
    )
    defaults = cli.ControllerSettings.from_args(cli._parser().parse_args([]), {}).reconcile()
    assert (defaults.origin_seeds, defaults.peers_per_model) == (1, 4)
    assert defaults.peer_token_secret == (PEER_TOKEN_NAMESPACE, PEER_TOKEN_SECRET)
    off = cli._parser().parse_args(["--peer-token-secret", "off"])
    assert cli.ControllerSettings.from_args(off, {}).reconcile().peer_token_secret is None
    standalone = cli._parser().parse_args(["--standalone", "/tmp"])
    assert cli.ControllerSettings.from_args(standalone, {}).reconcile().peer_token_secret is None


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--origin-seeds", "0"], "--origin-seeds"),
        (["--peers-per-model", "0"], "--peers-per-model"),
        (["--peer-token-secret", "no-slash"], "--peer-token-secret"),
        (["--peer-token-secret", "ns/Bad_Name"], "--peer-token-secret"),
    ],
)
def test_bad_peer_flags_are_one_line_and_exit_2(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert modelcache_main(["controller", "--once", *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
