"""Node labels, pure: which models each node holds ready. ``MODEL_LABEL_PREFIX + <storage key>`` =
``ready`` on each node whose LocalModelNode lists the model and reports it ModelDownloaded; removed
otherwise. The scheduler reads it through the node affinity the pod webhook adds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet

from controller.snapshot import LabelWrite, NodeWrite, Snapshot
from localmodel.resources import LocalModelInfo, LocalModelNode, ModelState

# On a Node: "modelcache.io/model.<storage key>: ready" while the node holds that model, downloaded.
# The name part ("model." + 16 hex digits) keeps within a label name's 63 characters for any URI.
MODEL_LABEL_PREFIX = "modelcache.io/model."
MODEL_LABEL_VALUE = "ready"


def model_label(key: str) -> str:
    """The Node label that marks the model with storage key ``key`` downloaded on that node."""
    return MODEL_LABEL_PREFIX + key


def model_labels(labels: Mapping[str, str]) -> frozenset[str]:
    """The storage keys a Node's labels mark ready."""
    n = len(MODEL_LABEL_PREFIX)
    return frozenset(k[n:] for k, v in labels.items() if k.startswith(MODEL_LABEL_PREFIX) and v)


def ready_keys(lmn: LocalModelNode | None, models: Iterable[LocalModelInfo] | None = None) -> frozenset[str]:
    """Storage keys a node holds ready: listed in its spec (``models``, when a plan changes it) and
    reported ModelDownloaded by its agent."""
    if lmn is None:
        return frozenset()
    listed = lmn.local_models if models is None else models
    status = lmn.status.model_status
    return frozenset(m.storage_key for m in listed if status.get(m.status_key) is ModelState.DOWNLOADED)


def label_writes(
    snapshot: Snapshot, nodes: AbstractSet[str], node_writes: Iterable[NodeWrite] = ()
) -> list[LabelWrite]:
    """For each node in ``nodes`` that exists: the label changes that make its model labels equal
    to what it holds ready (after ``node_writes``: a model leaving a spec loses its label now)."""
    next_models = {w.name: w.models for w in node_writes if w.action != "delete"}
    out: list[LabelWrite] = []
    for n in sorted(nodes):
        if n not in snapshot.nodes:
            continue
        want = ready_keys(snapshot.local_model_nodes.get(n), next_models.get(n))
        have = snapshot.node_models.get(n, frozenset())
        if want != have:
            changes = {k: True for k in want - have} | {k: False for k in have - want}
            out.append(LabelWrite(n, {k: changes[k] for k in sorted(changes)}))
    return out
