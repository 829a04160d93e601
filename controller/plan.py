"""The controller's decision, pure: from frozen inputs (caches, groups, nodes, the LocalModelNodes as
they are, the pods that use models: a :class:`controller.snapshot.Snapshot`) to a frozen
:class:`controller.snapshot.Plan` of writes. No I/O; ``controller.reconcile`` reads the cluster,
runs :func:`plan` and applies what it returns.

Each decision lives in its own module, and :func:`plan` runs them in order:

- Placement and admission come from :mod:`localmodel.placement` (the agent in standalone mode runs
  the same code, so both agree); :func:`localmodel.placement.layout` computes them once per change
  of caches, groups or nodes, and :func:`plan` reuses that while only LocalModelNodes or pods change.
- Which node specs list which models, paced, and what a running pod retains: :mod:`controller.rollout`.
- Peer fill: the peers each entry names, the fan-out of the pacing, the origin bytes of each cache:
  :mod:`controller.peers`.
- Cache and group status with their Events: :mod:`controller.status`.
- Node labels of the models each node holds ready: :mod:`controller.labels`.
- Serving PVs and PVCs (KServe's names): :mod:`controller.serving`.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet

from controller.labels import label_writes
from controller.peers import origin_totals, peer_entries
from controller.rollout import node_writes, pace
from controller.serving import serving_problems, volume_writes
from controller.snapshot import (
    Event,
    FinalizerWrite,
    Options,
    Plan,
    Scope,
    Snapshot,
    StatusWrite,
    listing,
)
from controller.status import cache_status, group_status, node_states
from localmodel.placement import Layout, layout
from localmodel.resources import NodeState

_DEFAULTS = Options()


def plan(
    snapshot: Snapshot,
    options: Options = _DEFAULTS,
    *,
    placed: Layout | None = None,
    scope: Scope | None = None,
) -> Plan:
    """The writes that bring the cluster to the module's rules: everything when ``scope`` is None,
    else the caches and nodes in scope. ``placed``: :func:`localmodel.placement.layout` of the
    snapshot, when the caller keeps it (recomputed otherwise)."""
    placed = placed or layout(
        snapshot.caches.values(), snapshot.groups.values(), snapshot.nodes.values(), snapshot.invalid_groups
    )
    lmns = snapshot.local_model_nodes
    listed_now = snapshot.listed if snapshot.listed is not None else listing(lmns.values())
    nobody: frozenset[str] = frozenset()

    cache_scope, node_scope = _in_scope(snapshot, placed, listed_now, scope)

    listed_next, moved, fills = pace(snapshot, placed, listed_now, cache_scope, options)
    hinted, rehinted = peer_entries(snapshot, placed, listed_next, fills, options.peers_per_model)
    node_scope |= moved | rehinted
    origins = origin_totals(snapshot, cache_scope, fills, listed_now, listed_next)

    writes, listed_after, retained_new = node_writes(snapshot, placed, listed_next, node_scope, hinted)

    statuses: list[StatusWrite] = []
    finalizers: list[FinalizerWrite] = []
    events: list[Event] = []
    node_status: dict[str, Mapping[str, NodeState]] = {}
    problems = serving_problems(snapshot.caches, snapshot.groups)
    for c in sorted(cache_scope):
        cache = snapshot.caches.get(c)
        if cache is None:
            continue
        events.extend(
            Event(
                cache.kind.kind,  # type: ignore[arg-type]  # one of the two cache kinds
                cache.name,
                cache.metadata.uid,
                "Normal",
                "RetainedInUse",
                f"kept on node {n}: a running pod there uses it; removed once the pod is gone",
                cache.namespace,
            )
            for n in sorted(retained_new.get(c, ()))
        )
        if cache.metadata.deletion_timestamp:
            # Who lists it after the writes: nodes out of scope keep what they list now.
            after = (set(listed_now.get(c, nobody)) - node_scope) | listed_after.get(c, set())
            if cache.finalizer in cache.metadata.finalizers and not after:
                finalizers.append(FinalizerWrite(c, add=False))
            continue
        if cache.finalizer not in cache.metadata.finalizers:
            finalizers.append(FinalizerWrite(c, add=True))
        states = node_states(snapshot, placed, cache, listed_next.get(c, set()))
        node_status[c] = states
        write, evs = cache_status(
            snapshot, placed, cache, states, options.now, problems.get(c, ()), origin_bytes=origins.get(c)
        )
        if write is not None:
            statuses.append(write)
        events.extend(evs)

    if scope is None:  # group status changes only with caches, groups or nodes: full reconciles
        for g in sorted(snapshot.groups):
            write = group_status(snapshot.groups[g], placed)
            if write is not None:
                statuses.append(write)

    label_scope = (set(snapshot.nodes) | set(lmns)) if scope is None else node_scope | set(scope.labels)
    return Plan(
        nodes=tuple(writes),
        statuses=tuple(statuses),
        finalizers=tuple(finalizers),
        events=tuple(events),
        node_status=node_status,
        labels=tuple(label_writes(snapshot, label_scope, writes)),
        volumes=tuple(volume_writes(snapshot, placed.admission.admitted)),
    )


def _in_scope(
    snapshot: Snapshot, placed: Layout, listed_now: Mapping[str, AbstractSet[str]], scope: Scope | None
) -> tuple[set[str], set[str]]:
    """The caches and nodes a plan looks at: all without a scope, else the scope's, where a node in
    scope brings every model it holds or must hold."""
    lmns = snapshot.local_model_nodes
    if scope is None:
        return set(snapshot.caches) | set(listed_now), set(snapshot.nodes) | set(lmns)
    node_scope = set(scope.nodes)
    cache_scope = set(scope.caches)
    for n in scope.nodes:
        cache_scope.update(placed.wanted.get(n, {}))
        if n in lmns:
            cache_scope.update(m.status_key for m in lmns[n].local_models)
    return cache_scope, node_scope
