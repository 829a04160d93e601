"""Placement and admission, pure: which nodes form each group, which caches each group admits, which
models each node must hold. The controller runs it for the cluster; the agent in standalone mode
runs the same code for its own node, so both always agree.

Admission: a group admits a cache only if the ``modelSize`` of the caches it already admitted plus
this one fits the group's per-node ``storageLimit``. Caches are considered oldest first (creation
time, then name), so the outcome is stable and a new cache never pushes out an old one. Caches of
one URI share one folder on the node (its storage key): a second one costs only what its
``modelSize`` declares beyond the largest already admitted for that key (a LocalModelNamespaceCache
beside a LocalModelCache of the same model, KServe v0.18+).

Caches are told apart by :attr:`LocalModelCache.key` (the name, or ``<namespace>/<name>`` for a
LocalModelNamespaceCache): that is what :class:`Refusal`, :class:`Admission` and :class:`Layout`
name them by.

Overcommit (the controller's ``--admission warn``): a cache refused for capacity alone
(InsufficientStorage) is admitted anyway and listed in :attr:`Admission.overcommitted` with the
refusal it would have had; its size counts in the group's usage, which may then exceed the limit.
Every other refusal (a group that does not exist or is invalid) stands.

A node is told what it was refused too (:attr:`NodePlacement.refused`): a cache one of its groups
would hold but had no room for, and a cache naming a group that does not exist (no node can be told
apart for it, so every node hears of it), unless the node holds that cache through another group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from localmodel.quantity import format_quantity
from localmodel.resources import LocalModelCache, LocalModelInfo, LocalModelNodeGroup, Node

INSUFFICIENT_STORAGE = "InsufficientStorage"
NODE_GROUP_NOT_FOUND = "NodeGroupNotFound"
NODE_GROUP_INVALID = "NodeGroupInvalid"


@dataclass(frozen=True)
class Refusal:
    cache: str
    group: str
    reason: str  # InsufficientStorage | NodeGroupNotFound | NodeGroupInvalid
    message: str  # InsufficientStorage: the bytes needed and the group's free bytes and limit
    source_model_uri: str = ""


@dataclass(frozen=True)
class GroupUsage:
    limit: int
    used: int  # sum of the admitted caches' modelSize

    @property
    def available(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class Admission:
    admitted: Mapping[str, tuple[str, ...]]  # group -> cache names, in admission order
    refused: tuple[Refusal, ...]
    usage: Mapping[str, GroupUsage]  # group -> limit and admitted bytes
    # admitted over the limit (overcommit): the InsufficientStorage refusal each would have had
    overcommitted: tuple[Refusal, ...] = ()

    def groups_of(self, cache: str) -> tuple[str, ...]:
        return tuple(g for g, caches in sorted(self.admitted.items()) if cache in caches)


def human(n: int) -> str:
    """Bytes as a Kubernetes quantity, binary units where exact ("140Gi", "60Gi")."""
    return format_quantity(n, "BinarySI")


def age_key(cache: LocalModelCache) -> tuple[str, str]:
    """Oldest first: creation time, then name (what admission and serving names go by)."""
    # RFC 3339 timestamps in UTC sort as strings; objects without one (not yet stored) go last.
    return (cache.metadata.creation_timestamp or "9999", cache.key)


def admit(
    caches: Iterable[LocalModelCache],
    groups: Iterable[LocalModelNodeGroup],
    invalid: Mapping[str, str] | None = None,
    *,
    overcommit: bool = False,
) -> Admission:
    """Which caches each group admits (the module's rule). ``invalid``: group name -> why, for groups
    that exist but whose spec is refused (stored past admission): a cache listing one is refused
    naming the reason, not told the group does not exist. ``overcommit``: capacity refusals are
    admitted and listed in ``overcommitted`` (the module's rule)."""
    invalid = invalid or {}
    by_name = {g.name: g for g in groups}
    used = dict.fromkeys(by_name, 0)
    charged: dict[tuple[str, str], int] = {}  # (group, storage key) -> bytes charged for that folder
    admitted: dict[str, list[str]] = {g: [] for g in by_name}
    refused: list[Refusal] = []
    over: list[Refusal] = []
    for cache in sorted(caches, key=age_key):
        if cache.metadata.deletion_timestamp:
            continue  # a cache being deleted holds no capacity and gets no new copies
        declared = cache.spec.model_size.bytes
        key = cache.spec.storage_key
        for group_name in cache.spec.node_groups:
            group = by_name.get(group_name)
            if group is None and group_name in invalid:
                refused.append(
                    Refusal(
                        cache.key,
                        group_name,
                        NODE_GROUP_INVALID,
                        f"node group {group_name!r} is invalid and ignored: {invalid[group_name]}; "
                        "fix its spec",
                    )
                )
                continue
            if group is None:
                refused.append(
                    Refusal(
                        cache.key,
                        group_name,
                        NODE_GROUP_NOT_FOUND,
                        f"node group {group_name!r} does not exist; create it or remove it from "
                        "spec.nodeGroups",
                        cache.spec.source_model_uri,
                    )
                )
                continue
            limit = group.spec.storage_limit.bytes
            before = charged.get((group_name, key), 0)
            size = max(0, declared - before)
            if used[group_name] + size > limit:
                free = max(0, limit - used[group_name])
                refusal = Refusal(
                    cache.key,
                    group_name,
                    INSUFFICIENT_STORAGE,
                    f"needs {human(size)}, group {group_name} has {human(free)} of {human(limit)} free",
                    cache.spec.source_model_uri,
                )
                if not overcommit:
                    refused.append(refusal)
                    continue
                over.append(refusal)
            used[group_name] += size
            charged[(group_name, key)] = max(before, declared)
            admitted[group_name].append(cache.key)
    return Admission(
        admitted={g: tuple(c) for g, c in admitted.items()},
        refused=tuple(refused),
        usage={g: GroupUsage(by_name[g].spec.storage_limit.bytes, used[g]) for g in by_name},
        overcommitted=tuple(over),
    )


def members(group: LocalModelNodeGroup, nodes: Iterable[Node]) -> tuple[str, ...]:
    """The nodes a group's PV node affinity selects (none when it has no affinity)."""
    selector = group.spec.node_selector
    if selector is None:
        return ()
    return tuple(sorted(n.name for n in nodes if selector.matches(n.name, n.labels)))


def groups_of_node(node: Node, groups: Iterable[LocalModelNodeGroup]) -> tuple[str, ...]:
    return tuple(
        sorted(
            g.name
            for g in groups
            if g.spec.node_selector is not None and g.spec.node_selector.matches(node.name, node.labels)
        )
    )


@dataclass(frozen=True)
class NodePlacement:
    """What one node must hold: its groups and one entry per model (a model listed by two of its
    groups is held once, for the first group by name)."""

    node: str
    groups: tuple[str, ...]
    models: tuple[LocalModelInfo, ...] = field(default=())
    refused: tuple[Refusal, ...] = field(default=())  # one per cache, first group by name


def model_info(cache: LocalModelCache, group: str) -> LocalModelInfo:
    """The LocalModelNode spec entry of ``cache`` held for ``group``."""
    return LocalModelInfo(
        source_model_uri=cache.spec.source_model_uri,
        model_name=cache.name,
        namespace=cache.namespace,
        node_group=group,
        service_account_name=cache.spec.service_account_name,
        storage=cache.spec.storage,
        model_size=cache.spec.model_size,
    )


def held_models(
    mine: Iterable[str], admission: Admission, caches: Mapping[str, LocalModelCache]
) -> dict[str, LocalModelInfo]:
    """cache key -> entry, sorted by key, for a node in groups ``mine`` (sorted by name: a model two
    of them list is held once, for the first)."""
    found: dict[str, LocalModelInfo] = {}
    for group in mine:
        for cache_name in admission.admitted.get(group, ()):
            if cache_name not in found:
                found[cache_name] = model_info(caches[cache_name], group)
    return {k: found[k] for k in sorted(found)}


def place_node(
    node: Node,
    caches: Iterable[LocalModelCache],
    groups: Iterable[LocalModelNodeGroup],
    admission: Admission | None = None,
) -> NodePlacement:
    caches = list(caches)
    groups = list(groups)
    admission = admission or admit(caches, groups)
    mine = groups_of_node(node, groups)
    models = held_models(mine, admission, {c.key: c for c in caches})
    refused: dict[str, Refusal] = {}
    for r in sorted(admission.refused, key=lambda r: (r.cache, r.group)):
        if r.cache in models or r.cache in refused:
            continue
        if r.reason == NODE_GROUP_NOT_FOUND or r.group in mine:
            refused[r.cache] = r
    return NodePlacement(
        node.name,
        mine,
        tuple(models.values()),
        tuple(refused[k] for k in sorted(refused)),
    )


@dataclass(frozen=True)
class Layout:
    """Placement of the whole cluster: depends on caches, groups and nodes only."""

    admission: Admission
    members: Mapping[str, tuple[str, ...]]  # group -> member node names, sorted
    node_groups: Mapping[str, tuple[str, ...]]  # node -> its groups, sorted (only nodes in a group)
    wanted: Mapping[str, Mapping[str, LocalModelInfo]]  # node -> cache name -> what it must hold
    holders: Mapping[str, tuple[str, ...]]  # cache -> nodes that must hold it, sorted


def layout(
    caches: Iterable[LocalModelCache],
    groups: Iterable[LocalModelNodeGroup],
    nodes: Iterable[Node],
    invalid_groups: Mapping[str, str] | None = None,
    *,
    overcommit: bool = False,
) -> Layout:
    """What :func:`place_node` gives for every node (its models, through :func:`held_models`),
    computed once per combination of groups instead of per node: 5,000 nodes share a handful of
    combinations. ``invalid_groups``: stored groups whose spec is refused, name -> why (they hold
    nothing). ``overcommit``: as :func:`admit`'s."""
    caches = list(caches)
    groups = sorted(groups, key=lambda g: g.name)
    admission = admit(caches, groups, invalid_groups, overcommit=overcommit)
    by_name = {c.key: c for c in caches}
    members: dict[str, list[str]] = {g.name: [] for g in groups}
    node_groups: dict[str, tuple[str, ...]] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        mine = groups_of_node(node, groups)
        if mine:
            node_groups[node.name] = mine
            for g in mine:
                members[g].append(node.name)
    per_combination: dict[tuple[str, ...], Mapping[str, LocalModelInfo]] = {}  # the memo
    wanted: dict[str, Mapping[str, LocalModelInfo]] = {}
    holders: dict[str, list[str]] = {}
    for node_name, mine in node_groups.items():
        models = per_combination.get(mine)
        if models is None:
            models = per_combination[mine] = held_models(mine, admission, by_name)
        wanted[node_name] = models
        for cache_name in models:
            holders.setdefault(cache_name, []).append(node_name)
    return Layout(
        admission=admission,
        members={g: tuple(m) for g, m in members.items()},
        node_groups=node_groups,
        wanted=wanted,
        holders={c: tuple(n) for c, n in holders.items()},
    )
