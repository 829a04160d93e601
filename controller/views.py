"""Typed views of the Kubernetes objects the controller reads but does not own (Pods, Nodes,
InferenceServices and LLMInferenceServices), parsed once at the edge: the reconcile loop and the
webhook parse each object into one of these frozen types on arrival, and the pure planners read only
the fields here.

Rules taken from KServe:

- A pod names the cache it serves by KServe's ``internal.serving.kserve.io/localmodel`` label (our
  ``modelcache.io/model`` annotation when the label is absent or empty); with KServe's
  ``internal.serving.kserve.io/localmodel-namespace`` label beside it, the LocalModelNamespaceCache
  of that name in that namespace (key ``<namespace>/<name>``, as KServe's defaulter labels an
  InferenceService that uses one: inference_service_defaults.go:537-538 at KServe v0.20), and its
  node group by
  ``serving.kserve.io/nodegroup``; ``serving.kserve.io/disable-localmodel: "true"`` (any case) turns
  both off, as KServe's InferenceService webhook does (:func:`named_cache`, the one rule for all).
- A Node whose ``Ready`` condition is not ``True`` is not ready; one with no conditions at all (a
  standalone document) is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.labels import MODEL_LABEL_PREFIX, model_labels
from localmodel.resources import (
    LOCALMODEL_LABEL,
    LOCALMODEL_NAMESPACE_LABEL,
    NODEGROUP_ANNOTATION,
    Node,
    cache_key,
)

MODEL_ANNOTATION = "modelcache.io/model"  # on a pod: the LocalModelCache it serves
DISABLE_ANNOTATION = "serving.kserve.io/disable-localmodel"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def localmodel_disabled(annotations: Mapping[str, Any]) -> bool:
    """Whether the pod opts out of the local model cache (``DISABLE_ANNOTATION`` is ``true``)."""
    return str(annotations.get(DISABLE_ANNOTATION, "")).lower() == "true"


def named_cache(labels: Mapping[str, Any], annotations: Mapping[str, Any]) -> str | None:
    """The key (:func:`localmodel.resources.cache_key`) of the cache a pod names (the module's
    rule), or None: none, or opted out."""
    if localmodel_disabled(annotations):
        return None
    label = labels.get(LOCALMODEL_LABEL)
    if isinstance(label, str) and label:
        namespace = labels.get(LOCALMODEL_NAMESPACE_LABEL)
        return cache_key(label, namespace if isinstance(namespace, str) and namespace else None)
    named = annotations.get(MODEL_ANNOTATION)
    return named if isinstance(named, str) and named else None


def named_group(annotations: Mapping[str, Any]) -> str | None:
    """The node group a pod names (``serving.kserve.io/nodegroup``), or None: none, or opted out."""
    if localmodel_disabled(annotations):
        return None
    group = annotations.get(NODEGROUP_ANNOTATION)
    return group if isinstance(group, str) and group else None


@dataclass(frozen=True)
class Pod:
    """What the planners read of a Pod."""

    namespace: str
    name: str
    node: str | None  # spec.nodeName: None until scheduled
    finished: bool  # phase Succeeded or Failed
    cache: str | None  # the cache it names (:func:`named_cache`)
    group: str | None  # the node group it names (:func:`named_group`)
    claims: tuple[str, ...] = ()  # the PVC names its volumes mount
    host_paths: tuple[str, ...] = ()  # the hostPath folders its volumes mount

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Pod:
        meta = _mapping(obj.get("metadata"))
        spec = _mapping(obj.get("spec"))
        labels, annotations = _mapping(meta.get("labels")), _mapping(meta.get("annotations"))
        claims: list[str] = []
        paths: list[str] = []
        for volume in spec.get("volumes") or []:
            volume = _mapping(volume)
            claim = _mapping(volume.get("persistentVolumeClaim")).get("claimName")
            if isinstance(claim, str):
                claims.append(claim)
            path = _mapping(volume.get("hostPath")).get("path")
            if isinstance(path, str):
                paths.append(path)
        node = spec.get("nodeName")
        return cls(
            namespace=meta.get("namespace") or "default",
            name=str(meta.get("name") or ""),
            node=node if isinstance(node, str) and node else None,
            finished=_mapping(obj.get("status")).get("phase") in ("Succeeded", "Failed"),
            cache=named_cache(labels, annotations),
            group=named_group(annotations),
            claims=tuple(claims),
            host_paths=tuple(paths),
        )


def node_ready(node: Mapping[str, Any]) -> bool:
    """A Node's Ready condition; a Node with no conditions at all (a standalone document) is ready."""
    for c in _mapping(node.get("status")).get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == "Ready":
            return c.get("status") == "True"
    return True


@dataclass(frozen=True)
class NodeView:
    """A Node as placement sees it (``node``: without our model labels, which are the controller's
    output, so writing them re-plans nothing and a group cannot select nodes by them), the storage
    keys those labels mark ready, and its readiness."""

    node: Node
    models: frozenset[str]
    ready: bool

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NodeView:
        """Raises SpecError as :meth:`Node.from_json` does."""
        parsed = Node.from_json(obj)
        node = Node(
            parsed.name,
            {k: v for k, v in parsed.labels.items() if not k.startswith(MODEL_LABEL_PREFIX)},
            parsed.uid,
        )
        return cls(node, model_labels(parsed.labels), node_ready(obj))


@dataclass(frozen=True)
class InferenceService:
    """What matching reads of a KServe InferenceService (its status is large and changes often)."""

    namespace: str
    name: str
    named: str | None  # the cache (key) KServe's webhook names in its localmodel labels
    storage_uris: tuple[str, ...]  # the predictor's storageUri and those of its parts
    group: str | None = None  # its serving.kserve.io/nodegroup annotation

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> InferenceService:
        meta = _mapping(obj.get("metadata"))
        predictor = _mapping(_mapping(obj.get("spec")).get("predictor"))
        uris = [predictor.get("storageUri")] + [
            part.get("storageUri") for part in predictor.values() if isinstance(part, Mapping)
        ]
        return cls._of(meta, tuple(u for u in uris if isinstance(u, str) and u))

    @classmethod
    def from_llm_json(cls, obj: Mapping[str, Any]) -> InferenceService:
        """An LLMInferenceService (KServe v0.19+), matched by its localmodel label alone, as KServe
        fills a cache's status.llmInferenceServices (pkg/controller/v1alpha1/localmodel/reconcilers/
        localmodelcache_reconciler.go:288-296, utils.go:505-523 at v0.20): no URIs."""
        return cls._of(_mapping(obj.get("metadata")), ())

    @classmethod
    def _of(cls, meta: Mapping[str, Any], uris: tuple[str, ...]) -> InferenceService:
        # The cache's key: KServe's localmodel label, with its localmodel-namespace label for a
        # LocalModelNamespaceCache.
        named = named_cache(_mapping(meta.get("labels")), {})
        group = _mapping(meta.get("annotations")).get(NODEGROUP_ANNOTATION)
        return cls(
            namespace=meta.get("namespace") or "default",
            name=str(meta.get("name") or ""),
            named=named if isinstance(named, str) and named else None,
            storage_uris=uris,
            group=group if isinstance(group, str) and group else None,
        )
