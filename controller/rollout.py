"""Rollout, pure: which LocalModelNode specs list which models after a plan.

- Rollout pacing (:func:`pace`): a model is added to at most ``max_concurrent_downloads`` node specs
  that are still fetching it (pending or downloading) at any time; the other nodes that must hold it
  wait as NodeDownloadPending. A failed or NotReady node does not hold a slot, so a broken node
  never stalls a rollout. Removals are never paced. With peer fill on, a cache no peer can give
  bytes of yet starts on ``origin_seeds`` nodes only (:func:`controller.peers.seed_slots`).
- Each listed entry carries the peer hints of :func:`controller.peers.peer_entries` where peer fill
  is on; a cache out of a plan's scope keeps the node's entry as it is, hints included.
- A model leaves a node's spec when the node left the group, the cache dropped the group, the group
  is gone, the cache is refused or deleted, unless a running pod on that node uses it
  (:func:`models_in_use`): then it stays, listed in the ``RETAINED_ANNOTATION`` of the
  LocalModelNode, and goes once the pod is gone (:func:`node_writes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet

from controller.peers import Fill, fill_of, seed_slots, spec_entry
from controller.snapshot import RETAINED_ANNOTATION, NodeWrite, Options, Snapshot
from controller.views import Pod
from localmodel.layout import node_model_folder
from localmodel.placement import Layout
from localmodel.resources import (
    LocalModelCache,
    LocalModelInfo,
    LocalModelNode,
    LocalModelNodeGroup,
    ModelState,
)


def pace(
    snapshot: Snapshot,
    placed: Layout,
    listed_now: Mapping[str, AbstractSet[str]],
    cache_scope: Iterable[str],
    options: Options,
) -> tuple[dict[str, set[str]], set[str], dict[str, Fill]]:
    """Per cache in ``cache_scope``: which nodes' specs list it after this plan (the module's pacing
    rule, by ``options.max_concurrent_downloads``, 0: no limit, and ``options.origin_seeds``), the
    nodes whose spec gains or loses a placed cache that way, and the :class:`controller.peers.Fill`
    of each cache with peer fill on."""
    limit, origin_seeds = options.max_concurrent_downloads, options.origin_seeds
    nobody: frozenset[str] = frozenset()
    listed_next: dict[str, set[str]] = {}
    moved: set[str] = set()
    fills: dict[str, Fill] = {}
    lmns = snapshot.local_model_nodes
    for c in sorted(cache_scope):
        cache = snapshot.caches.get(c)
        holders = placed.holders.get(c, ())
        if cache is None or not holders:
            listed_next[c] = set()
            continue
        current = listed_now.get(c, nobody)
        keep: set[str] = set()
        active = 0
        candidates: list[str] = []
        addressed: list[str] = []  # holders whose agent serves peers
        for n in holders:
            lmn = lmns.get(n)
            state = None
            if lmn is not None:
                state = lmn.status.model_status.get(c)  # controller.snapshot.model_state, inlined
                if lmn.status.peer_address:
                    addressed.append(n)
            if n in current:
                keep.add(n)
                if n not in snapshot.not_ready and state not in (ModelState.DOWNLOADED, ModelState.ERROR):
                    active += 1
            elif state is ModelState.DOWNLOADED:
                keep.add(n)  # already on disk (another cache with this URI): costs the origin nothing
            elif n not in snapshot.not_ready:
                candidates.append(n)
        slots = len(candidates) if limit <= 0 else max(0, limit - active)
        fill = fill_of(snapshot, placed, c, addressed) if addressed else None
        if fill is not None:
            fills[c] = fill
        keep.update(candidates[: seed_slots(fill, slots, active, origin_seeds)])
        listed_next[c] = keep
        moved.update(current ^ keep)
    return listed_next, moved, fills


def node_writes(
    snapshot: Snapshot,
    placed: Layout,
    listed_next: Mapping[str, set[str]],
    node_scope: set[str],
    hinted: Mapping[str, Mapping[str, LocalModelInfo]] | None = None,
) -> tuple[list[NodeWrite], dict[str, set[str]], dict[str, set[str]]]:
    """Per node in scope, its spec after this plan, with the entries of ``hinted`` (node -> cache
    -> entry with peer hints, :func:`controller.peers.peer_entries`) in place of the placed ones.
    Returns the writes, cache -> nodes listing it (nodes in scope only), and cache -> nodes that
    newly retain it for a pod."""
    hinted = hinted or {}
    writes: list[NodeWrite] = []
    listed_after: dict[str, set[str]] = {}
    retained_new: dict[str, set[str]] = {}
    lmns = snapshot.local_model_nodes
    for n in sorted(node_scope):
        lmn = lmns.get(n)
        node = snapshot.nodes.get(n)
        if node is None:
            if lmn is not None:
                # The owner reference makes the API server's garbage collector do this too; the
                # embedded backend has none, and a pod cannot run on a deleted node anyway.
                writes.append(NodeWrite(n, "delete"))
            continue
        models = _listed_models(n, placed.wanted.get(n, {}), listed_next, lmn)
        if n in hinted:
            models.update((c, m) for c, m in hinted[n].items() if c in models)
        kept = _retained_for_pods(lmn, models, snapshot.in_use.get(n, frozenset()))
        models.update(kept)
        previously = retained_of(lmn)
        for key in kept:
            if key not in previously:
                retained_new.setdefault(key, set()).add(n)
        for c in models:
            listed_after.setdefault(c, set()).add(n)
        final = tuple(models[k] for k in sorted(models))
        retained = tuple(sorted(kept))
        if lmn is None:
            if n in placed.node_groups or final:
                writes.append(NodeWrite(n, "create", final, retained, node.uid))
        elif final != lmn.local_models or retained != previously:
            writes.append(NodeWrite(n, "patch", final, retained))
    return writes, listed_after, retained_new


def _listed_models(
    node: str,
    wanted: Mapping[str, LocalModelInfo],
    listed_next: Mapping[str, set[str]],
    lmn: LocalModelNode | None,
) -> dict[str, LocalModelInfo]:
    """cache -> model the node lists after this plan: each cache placed there that the next listing
    names on it; a cache out of scope (not in ``listed_next``) only when the node lists it now, and
    then as it lists it (peer hints included) when that is the same model."""
    models: dict[str, LocalModelInfo] = {}
    for c, info in wanted.items():
        nodes = listed_next.get(c)
        if nodes is None:  # out of scope: keep what the node lists now
            current = spec_entry(lmn, c)
            if current is not None:
                models[c] = current if current is info or current.without_peering() == info else info
        elif node in nodes:
            models[c] = info
    return models


def _retained_for_pods(
    lmn: LocalModelNode | None, models: Mapping[str, LocalModelInfo], in_use: AbstractSet[str]
) -> dict[str, LocalModelInfo]:
    """cache -> model the node lists now that the plan drops from ``models`` but a pod on the node
    uses: kept, as it is, while the pod runs."""
    if lmn is None:
        return {}
    kept: dict[str, LocalModelInfo] = {}
    for m in lmn.local_models:
        if m.status_key not in models and m.status_key not in kept and m.status_key in in_use:
            kept[m.status_key] = m
    return kept


def retained_of(lmn: LocalModelNode | None) -> tuple[str, ...]:
    if lmn is None:
        return ()
    raw = lmn.metadata.annotations.get(RETAINED_ANNOTATION, "")
    return tuple(sorted(x for x in raw.split(",") if x))


def models_in_use(
    pods: Iterable[Pod],
    caches: Iterable[LocalModelCache],
    groups: Iterable[LocalModelNodeGroup],
) -> dict[str, frozenset[str]]:
    """node -> cache keys that a pod on it uses: a pod that is not finished, bound to a node, and
    that names the cache (:func:`controller.views.named_cache`), mounts its PVC (``<cache>-<group>``,
    KServe's name; a LocalModelNamespaceCache's only in its namespace, where it wins over a cluster
    cache's claim of that name) or mounts its folder on the node."""
    by_claim, own_claim, by_path = _claim_and_path_owners(caches, groups)
    used: dict[str, set[str]] = {}
    for pod in pods:
        if pod.node is None or pod.finished:
            continue
        found = _pod_caches(pod, by_claim, own_claim, by_path)
        if found:
            used.setdefault(pod.node, set()).update(found)
    return {n: frozenset(c) for n, c in used.items()}


def _claim_and_path_owners(
    caches: Iterable[LocalModelCache], groups: Iterable[LocalModelNodeGroup]
) -> tuple[dict[str, str], dict[tuple[str, str], str], dict[str, str]]:
    """Cache keys by what names them in a pod: a cluster cache's claim ``<cache>-<group>``,
    a namespace cache's (namespace, claim), and the model's folder on a group's nodes."""
    by_claim: dict[str, str] = {}
    own_claim: dict[tuple[str, str], str] = {}  # (namespace, claim) -> a namespace cache's key
    by_path: dict[str, str] = {}
    paths = {g.name: g.spec.cache_path for g in groups}
    for c in caches:
        for g in c.spec.node_groups:
            if c.namespace is None:
                by_claim[f"{c.name}-{g}"] = c.key
            else:
                own_claim[(c.namespace, f"{c.name}-{g}")] = c.key
            if (root := paths.get(g)) is not None:
                by_path[node_model_folder(root, c.spec.storage_key)] = c.key
    return by_claim, own_claim, by_path


def _pod_caches(
    pod: Pod,
    by_claim: Mapping[str, str],
    own_claim: Mapping[tuple[str, str], str],
    by_path: Mapping[str, str],
) -> set[str]:
    """The cache keys one pod uses (rules in :func:`models_in_use`)."""
    found: set[str] = set()
    if pod.cache is not None:
        found.add(pod.cache)  # even for a cache already deleted: its copy stays while the pod runs
    for claim in pod.claims:
        owner = own_claim.get((pod.namespace, claim)) or by_claim.get(claim)
        if owner is not None:
            found.add(owner)
    for path in pod.host_paths:
        path = path.rstrip("/")
        for prefix, owner in by_path.items():
            if path == prefix or path.startswith(prefix + "/"):
                found.add(owner)
    return found
