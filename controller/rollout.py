"""Rollout, pure: which LocalModelNode specs list which models after a plan.

- Rollout pacing (:func:`pace`): a model is added to at most ``max_concurrent_downloads`` node specs
  that are still fetching it (pending or downloading) at any time; the other nodes that must hold it
  wait as NodeDownloadPending. A failed or NotReady node does not hold a slot, so a broken node
  never stalls a rollout. Removals are never paced.
- A model leaves a node's spec when the node left the group, the cache dropped the group, the group
  is gone, the cache is refused or deleted, unless a running pod on that node uses it
  (:func:`models_in_use`): then it stays, listed in the ``RETAINED_ANNOTATION`` of the
  LocalModelNode, and goes once the pod is gone (:func:`node_writes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet

from controller.serving import claim_name
from controller.snapshot import RETAINED_ANNOTATION, NodeWrite, Snapshot, model_state
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
    limit: int,
) -> tuple[dict[str, set[str]], set[str]]:
    """Per cache in ``cache_scope``: which nodes' specs list it after this plan (the module's pacing
    rule; ``limit`` is ``max_concurrent_downloads``, 0: no limit), and the nodes whose spec gains or
    loses a placed cache that way."""
    nobody: frozenset[str] = frozenset()
    listed_next: dict[str, set[str]] = {}
    moved: set[str] = set()
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
        for n in holders:
            state = model_state(snapshot.local_model_nodes.get(n), c)
            if n in current:
                keep.add(n)
                if n not in snapshot.not_ready and state not in (ModelState.DOWNLOADED, ModelState.ERROR):
                    active += 1
            elif state is ModelState.DOWNLOADED:
                keep.add(n)  # already on disk (another cache with this URI): costs the origin nothing
            elif n not in snapshot.not_ready:
                candidates.append(n)
        slots = len(candidates) if limit <= 0 else max(0, limit - active)
        keep.update(candidates[:slots])
        listed_next[c] = keep
        moved.update(current ^ keep)
    return listed_next, moved


def node_writes(
    snapshot: Snapshot,
    placed: Layout,
    listed_next: Mapping[str, set[str]],
    node_scope: set[str],
) -> tuple[list[NodeWrite], dict[str, set[str]], dict[str, set[str]]]:
    """Per node in scope, its spec after this plan. Returns the writes, cache -> nodes listing it
    (nodes in scope only), and cache -> nodes that newly retain it for a pod."""
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
        models = _listed_models(n, lmn, placed.wanted.get(n, {}), listed_next)
        previously = retained_of(lmn)
        retained = _retain_in_use(
            n, lmn, models, snapshot.in_use.get(n, frozenset()), previously, retained_new
        )
        final = tuple(models[k] for k in sorted(models))
        for c in models:
            listed_after.setdefault(c, set()).add(n)
        if lmn is None:
            if n in placed.node_groups or final:
                writes.append(NodeWrite(n, "create", final, tuple(sorted(retained)), node.uid))
        elif final != lmn.local_models or tuple(sorted(retained)) != previously:
            writes.append(NodeWrite(n, "patch", final, tuple(sorted(retained))))
    return writes, listed_after, retained_new


def _listed_models(
    n: str,
    lmn: LocalModelNode | None,
    wanted: Mapping[str, LocalModelInfo],
    listed_next: Mapping[str, set[str]],
) -> dict[str, LocalModelInfo]:
    """The caches node ``n`` is to list of those placement wants there: those the rollout lists it
    for, and for a cache out of scope, whatever the node lists now."""
    models: dict[str, LocalModelInfo] = {}
    for c, info in wanted.items():
        nodes = listed_next.get(c)
        if nodes is None:  # out of scope: keep what the node lists now
            if lmn is not None and any(m.model_name == c for m in lmn.local_models):
                models[c] = info
        elif n in nodes:
            models[c] = info
    return models


def _retain_in_use(
    n: str,
    lmn: LocalModelNode | None,
    models: dict[str, LocalModelInfo],
    in_use: AbstractSet[str],
    previously: tuple[str, ...],
    retained_new: dict[str, set[str]],
) -> list[str]:
    """Keep in ``models`` what node ``n`` lists now and a pod there uses; the names kept, and each
    newly kept one added to ``retained_new`` (cache -> nodes)."""
    retained: list[str] = []
    if lmn is None:
        return retained
    for m in lmn.local_models:
        if m.model_name not in models and m.model_name in in_use:
            models[m.model_name] = m
            retained.append(m.model_name)
            if m.model_name not in previously:
                retained_new.setdefault(m.model_name, set()).add(n)
    return retained


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
    """node -> caches that a pod on it uses: a pod that is not finished, bound to a node, and that
    names the cache (:func:`controller.views.named_cache`), mounts its PVC (``<cache>-<group>``,
    KServe's name) or mounts its folder on the node."""
    caches = list(caches)
    by_claim: dict[str, str] = {}
    by_path: dict[str, str] = {}
    paths = {g.name: g.spec.cache_path for g in groups}
    for c in caches:
        for g in c.spec.node_groups:
            by_claim[claim_name(c.name, g)] = c.name
            if (root := paths.get(g)) is not None:
                by_path[node_model_folder(root, c.spec.storage_key)] = c.name
    used: dict[str, set[str]] = {}
    for pod in pods:
        if pod.node is None or pod.finished:
            continue
        if found := _pod_uses(pod, by_claim, by_path):
            used.setdefault(pod.node, set()).update(found)
    return {n: frozenset(c) for n, c in used.items()}


def _pod_uses(pod: Pod, by_claim: Mapping[str, str], by_path: Mapping[str, str]) -> set[str]:
    """The caches one pod uses: the one it names, those whose claim (claim name -> cache) or node
    folder (path -> cache) it mounts."""
    found: set[str] = set()
    if pod.cache is not None:
        found.add(pod.cache)  # even for a cache already deleted: its copy stays while the pod runs
    for claim in pod.claims:
        if claim in by_claim:
            found.add(by_claim[claim])
    for path in pod.host_paths:
        path = path.rstrip("/")
        for prefix, owner in by_path.items():
            if path == prefix or path.startswith(prefix + "/"):
                found.add(owner)
    return found
