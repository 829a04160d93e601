"""What this node must hold, pure: from its LocalModelNode and node groups (either backend), or, in
standalone mode, from LocalModelCache and LocalModelNodeGroup documents and the node's labels.

Standalone mode computes the LocalModelNode the controller would write, with the same placement
code (:mod:`localmodel.placement`), so both modes feed one reconcile loop.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from localmodel.errors import SpecError
from localmodel.kinds import JSON, LOCAL_MODEL_NODE
from localmodel.placement import NodePlacement, admit, place_node
from localmodel.resources import LocalModelCache, LocalModelInfo, LocalModelNode, LocalModelNodeGroup, Node


@dataclass(frozen=True)
class Desired:
    """The models this node must hold (one per storage key) and the byte limit they share.

    ``known`` is False while no LocalModelNode exists for the node: the agent then keeps what it has
    and deletes nothing, since "no object yet" (a controller not running) is not "hold nothing".
    """

    models: tuple[LocalModelInfo, ...]
    limit: int | None
    known: bool
    # storage key -> the status key (modelName, or <namespace>/<modelName>) of every entry wanting it
    aliases: Mapping[str, tuple[str, ...]]


def desired(
    node: LocalModelNode | None,
    groups: Mapping[str, LocalModelNodeGroup],
    *,
    cache_dir: Path,
) -> Desired:
    """Raises SpecError when a group's PV path is not ``cache_dir`` (one path must hold everywhere)."""
    if node is None:
        return Desired((), None, False, {})
    by_key: dict[str, LocalModelInfo] = {}
    aliases: dict[str, list[str]] = {}
    used_groups: set[str] = set()
    for model in node.local_models:
        key = model.storage_key
        aliases.setdefault(key, []).append(model.status_key)
        by_key.setdefault(key, model)
        if model.node_group:
            used_groups.add(model.node_group)
    for name in sorted(used_groups):
        group = groups.get(name)
        if group is None:
            continue
        path = group.spec.cache_path
        if path is not None and Path(path) != cache_dir:
            raise SpecError(
                f"the node group's cache folder is {path} but the agent runs with --cache-dir "
                f"{cache_dir}; start the agent with --cache-dir {path} (mount the host folder at the same "
                "path in the container)",
                field=f"LocalModelNodeGroup {name}: spec.persistentVolumeSpec",
            )
    # Each group's limit is what the controller admitted that group's caches against; the node's
    # folder holds them all, so the node's limit is their sum.
    limits = [groups[g].spec.storage_limit.bytes for g in sorted(used_groups) if g in groups]
    return Desired(
        models=tuple(by_key[k] for k in sorted(by_key)),
        limit=sum(limits) if limits else None,
        known=True,
        aliases={k: tuple(v) for k, v in aliases.items()},
    )


def standalone_node(
    *,
    node_name: str,
    labels: Mapping[str, str],
    caches: Iterable[LocalModelCache],
    groups: Iterable[LocalModelNodeGroup],
) -> JSON:
    """The LocalModelNode the controller would write for this node, as a stored JSON object."""
    return node_object(standalone_placement(node_name=node_name, labels=labels, caches=caches, groups=groups))


def standalone_placement(
    *,
    node_name: str,
    labels: Mapping[str, str],
    caches: Iterable[LocalModelCache],
    groups: Iterable[LocalModelNodeGroup],
    overcommit: bool = False,
) -> NodePlacement:
    """What this node holds and what it was refused (see :mod:`localmodel.placement`;
    ``overcommit``: its rule for ``--admission warn``)."""
    groups = list(groups)
    caches = list(caches)
    admission = admit(caches, groups, overcommit=overcommit)
    return place_node(Node(node_name, dict(labels)), caches, groups, admission)


def node_object(placement: NodePlacement) -> JSON:
    """A placement as the stored LocalModelNode object the controller would write."""
    node_name = placement.node
    return {
        "apiVersion": LOCAL_MODEL_NODE.api_version,
        "kind": LOCAL_MODEL_NODE.kind,
        "metadata": {"name": node_name},
        "spec": {"localModels": [m.to_json() for m in placement.models]},
    }


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` as ``--node-labels`` takes it."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SpecError(f"{part!r} is not key=value; write e.g. gpu=h100,zone=a", field="--node-labels")
        labels[key] = value
    return labels


def retry_delay(failures: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before retrying a model that failed ``failures`` times in a row: doubling from
    ``base`` to ``cap``, with jitter so a fleet of nodes does not retry in step."""
    delay = min(cap, base * 2.0 ** max(0, failures - 1))
    jitter = rng.uniform(0.8, 1.0) if rng is not None else random.uniform(0.8, 1.0)  # noqa: S311
    return delay * jitter
