"""Peer fill in the controller, pure: which peers each node's spec names for a model, when the
rollout lets more nodes start, and how many bytes a cache took from its origin (issue 18).

Rules:

- **Peer fill is on** for a cache when a node that must hold it (:attr:`Layout.holders`) reports a
  ``status.peerAddress`` (its agent serves peers). Off: everything below is skipped and the
  controller plans as without peer fill (no peer lists, today's pacing).
- **Candidates** (:func:`fill_of`): the nodes that must hold the cache, are Ready, report a peer
  address, and whose agent reports it ``ModelDownloaded`` (holders) or ``ModelDownloading``
  (fetchers). The cache is **seeded** when a holder exists or a fetcher has bytes
  (``status.models[<key>].bytesDone > 0``): a peer then has something to give.
- **Fan-out pacing** (:func:`seed_slots`): a cache that is not seeded is started on at most
  ``origin_seeds`` nodes at once (the others wait as NodeDownloadPending); once it is seeded, the
  others start within the usual ``max_concurrent_downloads`` bound, so the fill spreads from node to
  node instead of in waves of whole copies from the origin.
- **Peer list** of a node that must fetch the cache (:func:`peer_list`): never the node itself;
  holders before fetchers; within each, nearest first (the same node group, then the same
  ``topology.kubernetes.io/zone`` label; a node without the label is in no zone); within a tier of
  equal nearness, by name in a ring that starts after the node's own name, so nodes spread over
  their peers instead of all asking the first names; at most ``peers_per_model`` entries.
  ``manifestSha256`` is the one the first holder in that list reports (None without one).
- **No churn** (:func:`peer_entries`): a node whose agent reports the model ``ModelDownloaded``
  keeps its spec entry as it is (its peer hints do not matter any more), so progress and the peers'
  later changes never rewrite it; the other nodes' entries change only when a peer's node, address
  or state changes (a handful of times per node and model), never with progress. Peer hints are
  not part of what a model is (:meth:`localmodel.resources.LocalModelInfo.without_peering`).
- **Origin bytes** (:func:`origin_bytes`): a cache's ``status.originBytes`` is the sum of the
  ``bytesFromOrigin`` its nodes (those whose spec lists it) report for it (None until one reports),
  kept while peer fill is on or the status has it already (a cache never under peer fill has
  none: the sum is not worth its cost on every plan of a large cluster).
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace

from controller.snapshot import Snapshot
from localmodel.hosts import host_error, is_wildcard, port_number
from localmodel.placement import Layout
from localmodel.resources import (
    LocalModelInfo,
    LocalModelNode,
    LocalModelNodeStatus,
    ModelState,
    PeerRef,
)

ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True, order=True)
class Candidate:
    """A node that may serve a cache to the others (the module's rule)."""

    node: str
    address: str  # its agent's peer server, host:port
    state: ModelState  # ModelDownloaded or ModelDownloading
    group: str | None  # the node group it holds the cache for
    zone: str | None  # its topology.kubernetes.io/zone label
    manifest_sha256: str | None = None  # of its published manifest (holders)


@dataclass(frozen=True)
class Fill:
    """What peer fill sees of one cache: its candidates (holders first, then fetchers, each sorted
    by node name) and whether it is seeded (the module's rules)."""

    candidates: tuple[Candidate, ...] = ()
    seeded: bool = False


@functools.lru_cache(maxsize=4096)
def peer_address_ok(address: str | None) -> bool:
    """A node's ``status.peerAddress`` is one other agents can be sent to: ``HOST:PORT`` with an IP
    address or RFC 1123 name (:func:`localmodel.hosts.host_error`) and a port 1-65535. Anything else
    (an agent's bug, a hand-edited status: a URL, a blank, a space) lists that node to no one.
    Cached: a cluster has one address per node, asked on every plan."""
    if not address:
        return False
    host, sep, port = address.rpartition(":")
    if not sep or port_number(port) is None:
        return False
    return host_error(host) is None and not is_wildcard(host)


def fill_of(snapshot: Snapshot, placed: Layout, cache: str, addressed: Iterable[str]) -> Fill:
    """The :class:`Fill` of ``cache`` (a key) from the nodes among its holders that report a peer
    address (``addressed``)."""
    holders: list[Candidate] = []
    fetchers: list[Candidate] = []
    seeded = False
    lmns = snapshot.local_model_nodes
    for n in addressed:
        lmn = lmns.get(n)
        node = snapshot.nodes.get(n)
        if lmn is None or node is None or n in snapshot.not_ready:
            continue
        address = lmn.status.peer_address
        if address is None or not peer_address_ok(address):
            continue
        state = lmn.status.model_status.get(cache)
        if state is not ModelState.DOWNLOADED and state is not ModelState.DOWNLOADING:
            continue
        progress = lmn.status.models.get(cache)
        wanted = placed.wanted.get(n, {}).get(cache)
        candidate = Candidate(
            node=n,
            address=address,
            state=state,
            group=None if wanted is None else wanted.node_group,
            zone=node.labels.get(ZONE_LABEL) or None,
            manifest_sha256=None if progress is None else progress.manifest_sha256,
        )
        if state is ModelState.DOWNLOADED:
            holders.append(candidate)
            seeded = True
        else:
            fetchers.append(candidate)
            seeded = seeded or (progress is not None and progress.bytes_done > 0)
    return Fill(tuple(sorted(holders) + sorted(fetchers)), seeded)


def seed_slots(fill: Fill | None, slots: int, active: int, origin_seeds: int) -> int:
    """How many more nodes may start fetching the cache now: ``slots`` (what the
    ``max_concurrent_downloads`` bound allows), cut to ``origin_seeds`` nodes fetching at once
    (``active`` are) while peer fill is on (``fill`` not None) and the cache is not seeded."""
    if fill is None or fill.seeded:
        return slots
    return max(0, min(slots, origin_seeds - active))


class Ranking:
    """The candidates of one cache in peer-list order for a node of one (group, zone), built once
    per (group, zone) and shared by the nodes there: tiers of equal nearness, each sorted by name."""

    def __init__(self, candidates: tuple[Candidate, ...], group: str | None, zone: str | None) -> None:
        tiers: dict[tuple[bool, bool, bool], list[Candidate]] = {}
        for c in candidates:
            key = (
                c.state is not ModelState.DOWNLOADED,
                c.group != group,
                zone is None or c.zone != zone,
            )
            tiers.setdefault(key, []).append(c)
        # Within a tier the candidates keep the order of Fill.candidates: by node name.
        self.tiers = [tiers[k] for k in sorted(tiers)]
        self.names = [[c.node for c in tier] for tier in self.tiers]


def peer_list(node: str, ranking: Ranking, limit: int) -> tuple[tuple[PeerRef, ...], str | None]:
    """The peers ``node`` tries (the module's rule), and the manifest digest of the first holder
    among them that reports one (None: none does)."""
    chosen: list[Candidate] = []
    for tier, names in zip(ranking.tiers, ranking.names, strict=True):
        start = bisect.bisect_right(names, node)
        for c in tier[start:] + tier[:start]:
            if len(chosen) >= limit:
                break
            if c.node != node:
                chosen.append(c)
    digest = next(
        (c.manifest_sha256 for c in chosen if c.state is ModelState.DOWNLOADED and c.manifest_sha256),
        None,
    )
    return tuple(PeerRef(c.node, c.address, c.state) for c in chosen), digest


def peer_entries(
    snapshot: Snapshot,
    placed: Layout,
    listed_next: Mapping[str, AbstractSet[str]],
    fills: Mapping[str, Fill],
    limit: int,
) -> tuple[dict[str, dict[str, LocalModelInfo]], set[str]]:
    """For each cache with peer fill on (``fills``), each node that lists it after the plan: its
    spec entry with peer hints, where that is not the placed entry itself (node -> cache ->
    entry); and the nodes that list the cache now whose entry changes that way (so that an
    incremental plan writes them too). ``limit``: ``peers_per_model``."""
    entries: dict[str, dict[str, LocalModelInfo]] = {}
    changed: set[str] = set()
    lmns = snapshot.local_model_nodes
    for c, fill in fills.items():
        rankings: dict[tuple[str | None, str | None], Ranking] = {}
        for n in listed_next.get(c, ()):
            info = placed.wanted.get(n, {}).get(c)
            if info is None:
                continue
            lmn = lmns.get(n)
            current = spec_entry(lmn, c)
            if lmn is not None and lmn.status.model_status.get(c) is ModelState.DOWNLOADED:
                entry = current if current is not None and current.without_peering() == info else info
            else:
                node = snapshot.nodes.get(n)
                zone = None if node is None else node.labels.get(ZONE_LABEL) or None
                where = (info.node_group, zone)
                ranking = rankings.get(where)
                if ranking is None:
                    ranking = rankings[where] = Ranking(fill.candidates, *where)
                peers, digest = peer_list(n, ranking, limit)
                entry = replace(info, peers=peers, manifest_sha256=digest) if peers or digest else info
            if entry is not info:
                entries.setdefault(n, {})[c] = entry
            if current is not None and entry != current:
                changed.add(n)
    return entries, changed


def spec_entry(lmn: LocalModelNode | None, cache: str) -> LocalModelInfo | None:
    """The node's spec entry for ``cache`` (a key) as it is now, or None."""
    if lmn is None:
        return None
    return next((m for m in lmn.local_models if m.status_key == cache), None)


def origin_bytes(snapshot: Snapshot, cache: str, nodes: Iterable[str]) -> int | None:
    """The sum of ``status.models[<cache>].bytesFromOrigin`` over ``nodes`` (once each); None when
    none of them reports it."""
    total: int | None = None
    lmns = snapshot.local_model_nodes
    for n in set(nodes):
        lmn = lmns.get(n)
        progress = None if lmn is None else lmn.status.models.get(cache)
        if progress is not None and progress.bytes_from_origin is not None:
            total = (total or 0) + progress.bytes_from_origin
    return total


def origin_totals(
    snapshot: Snapshot,
    cache_scope: Iterable[str],
    fills: Mapping[str, Fill],
    listed_now: Mapping[str, AbstractSet[str]],
    listed_next: Mapping[str, AbstractSet[str]],
) -> dict[str, int]:
    """cache -> its ``status.originBytes`` (the module's rule: :func:`origin_bytes` over the nodes
    that list it now or after the plan), for the caches in scope under peer fill (``fills``) or
    whose status has it already; a cache left out has none."""
    totals: dict[str, int] = {}
    for c in cache_scope:
        cache = snapshot.caches.get(c)
        if cache is None or (c not in fills and cache.status.origin_bytes is None):
            continue  # never under peer fill: not worth a walk of its nodes on every plan
        total = origin_bytes(snapshot, c, (*listed_now.get(c, ()), *listed_next.get(c, ())))
        if total is not None:
            totals[c] = total
    return totals


def peer_facts_changed(old: LocalModelNodeStatus, new: LocalModelNodeStatus) -> set[str]:
    """The status keys whose peer-fill facts differ between two reports of one node: all of its
    models when its peer address changed; else each model whose bytes went from none to some (it
    can seed), whose manifest digest changed, or whose ``bytesFromOrigin`` changed while it is not
    downloading (a final figure: progress does not re-plan a cache)."""
    if old.peer_address != new.peer_address:
        return set(old.model_status) | set(new.model_status)
    if old.models is new.models or old.models == new.models:
        return set()
    changed: set[str] = set()
    for k in old.models.keys() | new.models.keys():
        a, b = old.models.get(k), new.models.get(k)
        if (
            a is None
            or b is None
            or (a.bytes_done > 0) != (b.bytes_done > 0)
            or a.manifest_sha256 != b.manifest_sha256
            or (a.bytes_from_origin != b.bytes_from_origin and b.state is not ModelState.DOWNLOADING)
        ):
            changed.add(k)
    return changed
