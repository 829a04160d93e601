"""The admission webhooks' decisions, pure: from an AdmissionReview's object and the cluster objects
it concerns to a verdict (allowed or not, why, and a JSON Patch). ``controller.webhook`` reads the
cluster, calls these and serves them over HTTPS.

Pods. A pod annotated ``serving.kserve.io/nodegroup: G`` gets a required node affinity for the
members of G (the terms of G's PV ``nodeAffinity.required``, ANDed with any the pod has). When the
pod names its cache (KServe's ``internal.serving.kserve.io/localmodel`` label, or our
``modelcache.io/model`` annotation) each term also requires the node label
``modelcache.io/model.<storage key>=ready`` that the controller keeps on nodes holding that model
downloaded, so the pod never starts on an empty or half-written copy. A pod that names a cache and
no group goes to the cache's first group, as KServe does. Refused, with a message that says which:
a group that does not exist, a cache that does not exist or does not list the group or was refused
by it, and a model that no node of the group holds yet.

LocalModelCaches. Refused at create or spec update: a bad ``sourceModelUri`` or any other invalid
field, a node group that does not exist, a cache that no listed group can admit (the same admission
the controller runs, with the caches already there), a second cache of the same URI. A group that
admits it while another does not is a warning. Updates that leave the spec alone (finalizers,
labels, status) and deletions are always allowed, so the controller's own writes never bounce.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.plan import ADMITTED, MODEL_ANNOTATION, MODEL_LABEL_VALUE, model_label
from localmodel.errors import InvalidInput, SpecError
from localmodel.placement import admit
from localmodel.resources import (
    LOCALMODEL_LABEL,
    NODEGROUP_ANNOTATION,
    LocalModelCache,
    LocalModelNodeGroup,
    Node,
)
from localmodel.uri import parse_uri

DISABLE_ANNOTATION = "serving.kserve.io/disable-localmodel"
ADMISSION_API_VERSION = "admission.k8s.io/v1"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str = ""
    patch: tuple[Mapping[str, Any], ...] = ()  # JSON Patch (RFC 6902) operations
    warnings: tuple[str, ...] = ()
    code: int = 200  # HTTP-style code the API server shows with a refusal

    @classmethod
    def refuse(cls, message: str, code: int = 403) -> Verdict:
        return cls(False, message, code=code)


def review_response(uid: str, verdict: Verdict) -> dict[str, Any]:
    """The AdmissionReview v1 the API server expects back."""
    response: dict[str, Any] = {"uid": uid, "allowed": verdict.allowed}
    if not verdict.allowed:
        response["status"] = {"code": verdict.code, "message": verdict.message}
    if verdict.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(list(verdict.patch)).encode()).decode()
    if verdict.warnings:
        response["warnings"] = list(verdict.warnings)
    return {"apiVersion": ADMISSION_API_VERSION, "kind": "AdmissionReview", "response": response}


# -- pods ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodAsk:
    """What a pod asks of the cache: a node group and/or the cache it serves."""

    group: str | None
    cache: str | None

    @property
    def any(self) -> bool:
        return self.group is not None or self.cache is not None


def pod_ask(pod: Mapping[str, Any]) -> PodAsk:
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    if str(annotations.get(DISABLE_ANNOTATION, "")).lower() == "true":
        return PodAsk(None, None)
    group = annotations.get(NODEGROUP_ANNOTATION)
    cache = labels.get(LOCALMODEL_LABEL) or annotations.get(MODEL_ANNOTATION)
    return PodAsk(
        group if isinstance(group, str) and group else None,
        cache if isinstance(cache, str) and cache else None,
    )


def place_pod(
    pod: Mapping[str, Any],
    *,
    cache: LocalModelCache | None,
    group: LocalModelNodeGroup | None,
    ready_nodes: Iterable[Node] = (),
) -> Verdict:
    """The verdict on a pod at create. ``cache`` and ``group`` are the objects the pod's ask names
    (None: not found; the group is the cache's first when the pod names none); ``ready_nodes`` are
    nodes whose labels mark the cache's model ready (others are ignored)."""
    ask = pod_ask(pod)
    if not ask.any:
        return Verdict(True)
    group_name = ask.group
    if ask.cache is not None:
        if cache is None:
            return Verdict.refuse(f"LocalModelCache {ask.cache!r} does not exist")
        if group_name is None:
            group_name = cache.spec.node_groups[0]
        elif group_name not in cache.spec.node_groups:
            listed = ", ".join(cache.spec.node_groups)
            return Verdict.refuse(
                f"LocalModelCache {cache.name!r} does not list node group {group_name!r} (it lists {listed})"
            )
    assert group_name is not None
    if group is None or group.name != group_name:
        return Verdict.refuse(f"node group {group_name!r} ({NODEGROUP_ANNOTATION}) does not exist")
    terms = group_terms(group)
    if not terms:
        return Verdict.refuse(
            f"node group {group_name!r} has no persistentVolumeSpec.nodeAffinity.required: "
            "it selects no nodes"
        )
    if cache is not None:
        for c in cache.status.conditions:
            if c.type == ADMITTED and c.node_group == group_name and c.status == "False":
                return Verdict.refuse(
                    f"LocalModelCache {cache.name!r} is not admitted to node group {group_name!r}: "
                    + c.message
                )
        key = cache.spec.storage_key
        label = model_label(key)
        selector = group.spec.node_selector
        ready = sorted(
            n.name
            for n in ready_nodes
            if n.labels.get(label) == MODEL_LABEL_VALUE
            and selector is not None
            and selector.matches(n.name, n.labels)
        )
        if not ready:
            copies = cache.status.copies
            return Verdict.refuse(
                f"no node of node group {group_name!r} holds LocalModelCache {cache.name!r} downloaded yet "
                f"({copies.available} of {copies.total} copies available); retry when one does"
            )
        requirement = {"key": label, "operator": "In", "values": [MODEL_LABEL_VALUE]}
        terms = [_and_term(t, {"matchExpressions": [requirement]}) for t in terms]
    affinity = _with_required(pod, terms)
    return Verdict(True, patch=({"op": "add", "path": "/spec/affinity", "value": affinity},))


def group_terms(group: LocalModelNodeGroup) -> list[dict[str, Any]]:
    """The group's PV node affinity terms, as the pod's node affinity takes them."""
    affinity = group.spec.persistent_volume_spec.get("nodeAffinity") or {}
    terms = (affinity.get("required") or {}).get("nodeSelectorTerms") or []
    return [dict(t) for t in terms if isinstance(t, Mapping)]


def _and_term(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in ("matchExpressions", "matchFields"):
        items = [*(a.get(part) or []), *(b.get(part) or [])]
        if items:
            out[part] = items
    return out


def _with_required(pod: Mapping[str, Any], terms: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The pod's affinity with its required node affinity ANDed with ``terms`` (terms are ORed, so
    ANDing two lists is every pair of terms merged)."""
    affinity: dict[str, Any] = json.loads(json.dumps((pod.get("spec") or {}).get("affinity") or {}))
    node_affinity = affinity.setdefault("nodeAffinity", {})
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    own = [t for t in required.get("nodeSelectorTerms") or [] if isinstance(t, Mapping)]
    merged = [_and_term(o, t) for o in own for t in terms] if own else [dict(t) for t in terms]
    node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": merged}
    return affinity


# -- LocalModelCaches ------------------------------------------------------------------------------


def validate_cache(
    operation: str,
    obj: Mapping[str, Any] | None,
    old: Mapping[str, Any] | None,
    *,
    caches: Iterable[LocalModelCache],
    groups: Iterable[LocalModelNodeGroup],
) -> Verdict:
    if operation not in ("CREATE", "UPDATE") or obj is None:
        return Verdict(True)
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Verdict(True)
    if operation == "UPDATE" and old is not None and old.get("spec") == obj.get("spec"):
        return Verdict(True)  # finalizers, labels, status: not ours to judge
    spec = obj.get("spec") or {}
    try:
        parse_uri(spec.get("sourceModelUri"), field="spec.sourceModelUri")
        cache = LocalModelCache.from_json(obj)
    except (InvalidInput, SpecError) as e:
        return Verdict.refuse(str(e), code=422)
    by_name = {g.name: g for g in groups}
    before: tuple[str, ...] = ()
    if operation == "UPDATE" and old is not None:
        try:
            before = LocalModelCache.from_json(old).spec.node_groups
        except SpecError:
            before = ()
    missing = [g for g in cache.spec.node_groups if g not in by_name and g not in before]
    if missing:
        known = ", ".join(sorted(by_name)) or "none"
        names = ", ".join(repr(g) for g in missing)
        return Verdict.refuse(f"node group {names} does not exist (node groups: {known})")
    others = [c for c in caches if c.name != cache.name and not c.metadata.deletion_timestamp]
    for other in others:
        if other.spec.source_model_uri == cache.spec.source_model_uri:
            return Verdict.refuse(
                f"LocalModelCache {other.name!r} already caches {parse_uri(cache.spec.source_model_uri)}; "
                "one URI is cached once (serve it through that cache)"
            )
    admission = admit([*others, cache], by_name.values())
    refusals = [r for r in admission.refused if r.cache == cache.name]
    existing = [g for g in cache.spec.node_groups if g in by_name]
    if existing and not admission.groups_of(cache.name):
        return Verdict.refuse(
            "no listed node group can admit it: " + "; ".join(r.message for r in refusals), code=403
        )
    return Verdict(True, warnings=tuple(r.message for r in refusals))
