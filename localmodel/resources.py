"""Typed, frozen views of the three custom resources and of Nodes, parsed from and written to the
exact JSON Kubernetes stores.

``from_json`` validates and raises :class:`SpecError` naming the field (``spec.modelSize``);
``to_json`` writes the stored form back. KServe's field names are a strict subset: a LocalModelCache
written for KServe parses unchanged. The alias ``nodeGroup`` (a string or a list, as KServe's
announcement example spells it) is accepted and normalised to ``nodeGroups``. Which folder a node
group may name is :mod:`localmodel.folders`' rule; the kinds are in :mod:`localmodel.kinds`.

Over 600 lines because the four views share one set of field readers and shared pieces (metadata,
conditions, storage), and each view is one parse/write pair that reads best whole.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Self, TypeVar

from localmodel.errors import InvalidInput, SpecError
from localmodel.folders import cache_path_error
from localmodel.kinds import (
    API_VERSION,
    JSON,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
)
from localmodel.layout import STORAGE_KEY_RE, storage_key
from localmodel.quantity import Quantity
from localmodel.selectors import NodeSelector
from localmodel.uri import parse_uri

FINALIZER = "localmodel.kserve.io/finalizer"
# KServe's on a LocalModelNamespaceCache (pkg/controller/v1alpha1/localmodel/reconcilers/utils.go:53
# at KServe v0.20).
NAMESPACE_CACHE_FINALIZER = "localmodelnamespacecache.kserve.io/finalizer"
NODEGROUP_ANNOTATION = "serving.kserve.io/nodegroup"
LOCALMODEL_LABEL = "internal.serving.kserve.io/localmodel"
# Beside LOCALMODEL_LABEL on an InferenceService (and so its pods) that KServe's defaulter gave a
# LocalModelNamespaceCache: that cache's namespace (pkg/constants/constants.go:178,
# pkg/apis/serving/v1beta1/inference_service_defaults.go:537-538 at KServe v0.20).
LOCALMODEL_NAMESPACE_LABEL = "internal.serving.kserve.io/localmodel-namespace"


def cache_key(name: str, namespace: str | None = None) -> str:
    """How a cache is told apart everywhere a name alone is ambiguous: its name for a cluster
    LocalModelCache, ``<namespace>/<name>`` for a LocalModelNamespaceCache, the key KServe's agent
    writes in ``LocalModelNode.status.modelStatus`` (``LocalModelInfo.GetStatusKey``,
    pkg/apis/serving/v1alpha1/local_model_node_types.go:41-49 at KServe v0.20). Object names hold no
    ``/``, so the two never meet."""
    return f"{namespace}/{name}" if namespace else name


def split_key(key: str) -> tuple[str | None, str]:
    """(namespace or None, name) of a :func:`cache_key`."""
    namespace, sep, name = key.rpartition("/")
    return (namespace, name) if sep else (None, key)


class NodeState(enum.StrEnum):
    """A node's copy of a cache, as KServe names it (LocalModelCache.status.nodeStatus)."""

    NOT_READY = "NodeNotReady"
    DOWNLOAD_PENDING = "NodeDownloadPending"
    DOWNLOADING = "NodeDownloading"
    DOWNLOADED = "NodeDownloaded"
    DOWNLOAD_ERROR = "NodeDownloadError"


class ModelState(enum.StrEnum):
    """One model on one node, as KServe names it (LocalModelNode.status.modelStatus)."""

    PENDING = "ModelDownloadPending"
    DOWNLOADING = "ModelDownloading"
    DOWNLOADED = "ModelDownloaded"
    ERROR = "ModelDownloadError"


# -- field readers: each names the field it failed on ------------------------------------------

T = TypeVar("T")


def _obj(data: Any, path: str) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SpecError(f"expected an object, got {type(data).__name__}", field=path)
    return data


def _str(data: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        if required:
            raise SpecError("is required", field=f"{path}.{key}")
        return None
    if not isinstance(value, str):
        raise SpecError(f"expected a string, got {value!r}", field=f"{path}.{key}")
    return value


def _int(data: Mapping[str, Any], key: str, path: str, default: int = 0) -> int:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"expected a whole number ≥ 0, got {value!r}", field=f"{path}.{key}")
    return value


def _quantity(data: Mapping[str, Any], key: str, path: str, *, required: bool) -> Quantity | None:
    value = data.get(key)
    if value is None or value == "":
        if required:
            raise SpecError("is required (a quantity such as 10Gi)", field=f"{path}.{key}")
        return None
    try:
        return Quantity.parse(value, field=f"{path}.{key}")
    except InvalidInput as e:
        raise SpecError(str(e).split(": ", 1)[-1], field=f"{path}.{key}") from e


def _str_map(data: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
    raw = _obj(data.get(key), f"{path}.{key}")
    out = {}
    for k, v in raw.items():
        if not isinstance(v, str):
            raise SpecError(f"expected a string, got {v!r}", field=f"{path}.{key}.{k}")
        out[str(k)] = v
    return out


def _enum(cls: type[T], value: Any, path: str) -> T:
    try:
        return cls(value)  # type: ignore[call-arg]
    except ValueError:
        choices = ", ".join(m.value for m in cls)  # type: ignore[attr-defined]
        raise SpecError(f"{value!r} is not one of {choices}", field=path) from None


def _drop_none(d: JSON) -> JSON:
    return {k: v for k, v in d.items() if v is not None and v != {} and v != []}


# -- shared pieces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectMeta:
    name: str
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    finalizers: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Any) -> ObjectMeta:
        meta = _obj(data, "metadata")
        name = _str(meta, "name", "metadata", required=True)
        assert name is not None
        generation = meta.get("generation")
        finalizers = meta.get("finalizers") or []
        if not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers):
            raise SpecError("expected a list of strings", field="metadata.finalizers")
        return cls(
            name=name,
            namespace=_str(meta, "namespace", "metadata"),
            uid=_str(meta, "uid", "metadata"),
            resource_version=_str(meta, "resourceVersion", "metadata"),
            generation=generation if isinstance(generation, int) else None,
            creation_timestamp=_str(meta, "creationTimestamp", "metadata"),
            deletion_timestamp=_str(meta, "deletionTimestamp", "metadata"),
            labels=_str_map(meta, "labels", "metadata"),
            annotations=_str_map(meta, "annotations", "metadata"),
            finalizers=tuple(finalizers),
            raw=dict(meta),
        )

    def to_json(self) -> JSON:
        out = dict(self.raw)
        out.update(
            _drop_none(
                {
                    "name": self.name,
                    "namespace": self.namespace,
                    "labels": dict(self.labels) or None,
                    "annotations": dict(self.annotations) or None,
                    "finalizers": list(self.finalizers) or None,
                }
            )
        )
        return out


@dataclass(frozen=True)
class StorageSpec:
    """Credentials reference (KServe's ``storage``): a key in the storage-config secret."""

    key: str | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, path: str) -> StorageSpec | None:
        if data is None:
            return None
        raw = _obj(data, path)
        return cls(key=_str(raw, "key", path), parameters=_str_map(raw, "parameters", path))

    def to_json(self) -> JSON:
        return _drop_none({"key": self.key, "parameters": dict(self.parameters) or None})


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    node_group: str | None = None

    @classmethod
    def from_json(cls, data: Any, path: str) -> Condition:
        raw = _obj(data, path)
        ctype = _str(raw, "type", path, required=True)
        status = raw.get("status")
        if status not in ("True", "False", "Unknown"):
            raise SpecError(f"{status!r} is not one of True, False, Unknown", field=f"{path}.status")
        assert ctype is not None
        return cls(
            type=ctype,
            status=status,
            reason=_str(raw, "reason", path) or "",
            message=_str(raw, "message", path) or "",
            last_transition_time=_str(raw, "lastTransitionTime", path),
            node_group=_str(raw, "nodeGroup", path),
        )

    def to_json(self) -> JSON:
        return _drop_none(
            {
                "type": self.type,
                "status": self.status,
                "reason": self.reason or None,
                "message": self.message or None,
                "lastTransitionTime": self.last_transition_time,
                "nodeGroup": self.node_group,
            }
        )


def _conditions(data: Mapping[str, Any], path: str) -> tuple[Condition, ...]:
    raw = data.get("conditions") or []
    if not isinstance(raw, list):
        raise SpecError("expected a list", field=f"{path}.conditions")
    return tuple(Condition.from_json(c, f"{path}.conditions[{i}]") for i, c in enumerate(raw))


def _check_kind(data: Any, kind: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise SpecError(f"expected a {kind} object, got {type(data).__name__}")
    if data.get("kind") not in (None, kind):
        raise SpecError(f"expected kind {kind}, got {data.get('kind')!r}", field="kind")
    if data.get("apiVersion") not in (None, API_VERSION):
        raise SpecError(
            f"expected apiVersion {API_VERSION}, got {data.get('apiVersion')!r}", field="apiVersion"
        )
    return data


def _header(kind: str, meta: ObjectMeta) -> JSON:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta.to_json()}


# -- LocalModelCache ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalModelCacheSpec:
    source_model_uri: str
    model_size: Quantity
    node_groups: tuple[str, ...]
    service_account_name: str | None = None
    storage: StorageSpec | None = None

    @property
    def storage_key(self) -> str:
        return storage_key(self.source_model_uri)

    @classmethod
    def from_json(cls, data: Any) -> LocalModelCacheSpec:
        spec = _obj(data, "spec")
        if not spec:
            raise SpecError("is required", field="spec")
        uri = _str(spec, "sourceModelUri", "spec", required=True)
        assert uri is not None
        try:
            parse_uri(uri, field="spec.sourceModelUri")
        except InvalidInput as e:
            raise SpecError(str(e).split(": ", 1)[-1], field="spec.sourceModelUri") from e
        size = _quantity(spec, "modelSize", "spec", required=True)
        assert size is not None
        if size.value <= 0:
            raise SpecError("must be greater than zero", field="spec.modelSize")
        groups = _node_groups(spec)
        return cls(
            source_model_uri=uri,
            model_size=size,
            node_groups=groups,
            service_account_name=_str(spec, "serviceAccountName", "spec"),
            storage=StorageSpec.from_json(spec.get("storage"), "spec.storage"),
        )

    def to_json(self) -> JSON:
        return _drop_none(
            {
                "sourceModelUri": self.source_model_uri,
                "modelSize": self.model_size.to_json(),
                "nodeGroups": list(self.node_groups),
                "serviceAccountName": self.service_account_name,
                "storage": self.storage.to_json() if self.storage else None,
            }
        )


def _node_groups(spec: Mapping[str, Any]) -> tuple[str, ...]:
    primary, alias = spec.get("nodeGroups"), spec.get("nodeGroup")
    if primary is not None and alias is not None:
        raise SpecError("give either nodeGroups or its alias nodeGroup, not both", field="spec.nodeGroup")
    name = "nodeGroups" if alias is None else "nodeGroup"
    value = primary if alias is None else alias
    if isinstance(value, str):
        value = [value]
    if value is None or value == []:
        raise SpecError("needs at least one node group", field="spec.nodeGroups")
    if not isinstance(value, list):
        raise SpecError("expected a list of node group names", field=f"spec.{name}")
    for i, g in enumerate(value):
        if not isinstance(g, str) or not g:
            raise SpecError(f"expected a node group name, got {g!r}", field=f"spec.{name}[{i}]")
    if len(set(value)) != len(value):
        raise SpecError("lists a node group twice", field=f"spec.{name}")
    return tuple(value)


@dataclass(frozen=True)
class Copies:
    available: int = 0
    total: int = 0
    failed: int = 0


@dataclass(frozen=True)
class InferenceServiceRef:
    name: str
    namespace: str


@dataclass(frozen=True)
class LocalModelCacheStatus:
    node_status: Mapping[str, NodeState] = field(default_factory=dict)
    copies: Copies = Copies()
    inference_services: tuple[InferenceServiceRef, ...] = ()
    # KServe v0.19+: the LLMInferenceServices that use the cache (its status.llmInferenceServices)
    llm_inference_services: tuple[InferenceServiceRef, ...] = ()
    observed_generation: int | None = None
    conditions: tuple[Condition, ...] = ()
    # Our addition (peer fill): bytes all nodes together fetched from the model's origin (the sum of
    # each LocalModelNode's models[...].bytesFromOrigin); None until a node reports it.
    origin_bytes: int | None = None

    @classmethod
    def from_json(cls, data: Any) -> LocalModelCacheStatus:
        st = _obj(data, "status")
        ns = _obj(st.get("nodeStatus"), "status.nodeStatus")
        copies = _obj(st.get("copies"), "status.copies")
        return cls(
            # "" is the zero value KServe's CRD allows (its Go type's default): no state, left out.
            node_status={
                str(k): _enum(NodeState, v, f"status.nodeStatus.{k}") for k, v in ns.items() if v != ""
            },
            copies=Copies(
                available=_int(copies, "available", "status.copies"),
                total=_int(copies, "total", "status.copies"),
                failed=_int(copies, "failed", "status.copies"),
            ),
            inference_services=_refs(st, "inferenceServices"),
            llm_inference_services=_refs(st, "llmInferenceServices"),
            observed_generation=st.get("observedGeneration"),
            conditions=_conditions(st, "status"),
            origin_bytes=_int(st, "originBytes", "status") if "originBytes" in st else None,
        )

    def to_json(self) -> JSON:
        return _drop_none(
            {
                "nodeStatus": {k: v.value for k, v in sorted(self.node_status.items())},
                "copies": {
                    "available": self.copies.available,
                    "total": self.copies.total,
                    "failed": self.copies.failed,
                },
                "inferenceServices": [
                    {"name": r.name, "namespace": r.namespace} for r in self.inference_services
                ],
                "llmInferenceServices": [
                    {"name": r.name, "namespace": r.namespace} for r in self.llm_inference_services
                ],
                "observedGeneration": self.observed_generation,
                "conditions": [c.to_json() for c in self.conditions],
                "originBytes": self.origin_bytes,
            }
        )


def _refs(status: Mapping[str, Any], name: str) -> tuple[InferenceServiceRef, ...]:
    """A status list of ``{name, namespace}`` (KServe's ``[]NamespacedName``)."""
    items = status.get(name) or []
    if not isinstance(items, list):
        raise SpecError("expected a list", field=f"status.{name}")
    refs = []
    for i, ref in enumerate(items):
        raw = _obj(ref, f"status.{name}[{i}]")
        refs.append(
            InferenceServiceRef(
                _str(raw, "name", f"status.{name}[{i}]") or "",
                _str(raw, "namespace", f"status.{name}[{i}]") or "",
            )
        )
    return tuple(refs)


@dataclass(frozen=True)
class LocalModelCache:
    metadata: ObjectMeta
    spec: LocalModelCacheSpec
    status: LocalModelCacheStatus = LocalModelCacheStatus()

    kind = LOCAL_MODEL_CACHE
    finalizer = FINALIZER

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str | None:
        """The namespace of a LocalModelNamespaceCache; None for a cluster LocalModelCache."""
        return None

    @functools.cached_property
    def key(self) -> str:
        """:func:`cache_key`: the name, or ``<namespace>/<name>`` for a namespace cache (computed
        once: the planners ask it about half a million times a full reconcile of 5,000 nodes)."""
        return cache_key(self.name, self.namespace)

    @property
    def title(self) -> str:
        """How messages name it: ``LocalModelCache 'x'`` or ``LocalModelNamespaceCache 'ns/x'``."""
        return f"{self.kind.kind} {self.key!r}"

    @classmethod
    def from_json(cls, data: Any) -> Self:
        data = _check_kind(data, cls.kind.kind)
        return cls(
            metadata=cls._metadata(data.get("metadata")),
            spec=LocalModelCacheSpec.from_json(data.get("spec")),
            status=LocalModelCacheStatus.from_json(data.get("status")),
        )

    @classmethod
    def _metadata(cls, data: Any) -> ObjectMeta:
        return ObjectMeta.from_json(data)

    def to_json(self) -> JSON:
        out = _header(self.kind.kind, self.metadata)
        out["spec"] = self.spec.to_json()
        status = self.status.to_json()
        if status != LocalModelCacheStatus().to_json():
            out["status"] = status
        return out


@dataclass(frozen=True)
class LocalModelNamespaceCache(LocalModelCache):
    """KServe's namespaced LocalModelCache (v0.18+): the same spec and status, usable only by
    InferenceServices and pods in its namespace, and preferred there over a cluster cache of the
    same model (pkg/apis/serving/v1alpha1/local_model_namespace_cache_types.go:24-55,
    pkg/apis/serving/v1beta1/inference_service_defaults.go:504-546 at KServe v0.20). Its
    LocalModelNode entries carry its ``namespace`` and its state there is keyed ``<ns>/<name>``;
    its finalizer is :data:`NAMESPACE_CACHE_FINALIZER`. A document without a namespace is in
    ``default``, as ``kubectl apply`` puts it."""

    kind = LOCAL_MODEL_NAMESPACE_CACHE
    finalizer = NAMESPACE_CACHE_FINALIZER

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @classmethod
    def _metadata(cls, data: Any) -> ObjectMeta:
        meta = ObjectMeta.from_json(data)
        if not meta.namespace:
            meta = replace(meta, namespace="default")
        return meta


def parse_cache(data: Any) -> LocalModelCache:
    """A LocalModelCache or a LocalModelNamespaceCache, by its ``kind`` (a LocalModelCache when it
    names none). Raises SpecError."""
    if isinstance(data, Mapping) and data.get("kind") == LOCAL_MODEL_NAMESPACE_CACHE.kind:
        return LocalModelNamespaceCache.from_json(data)
    return LocalModelCache.from_json(data)


# -- LocalModelNodeGroup ------------------------------------------------------------------------


# -- what a node group may point at ----------------------------------------------------------------

# The two volume sources a node group's persistentVolumeSpec may name: a folder on the node.
CACHE_VOLUME_SOURCES = ("hostPath", "local")
# The other fields of a core/v1 PersistentVolumeSpec (Kubernetes API reference, PersistentVolumeSpec):
# anything else is another volume source (nfs, csi, iscsi, ...) or a typo, and is refused.
PV_SPEC_FIELDS = frozenset(
    {
        "accessModes",
        "capacity",
        "claimRef",
        "mountOptions",
        "nodeAffinity",
        "persistentVolumeReclaimPolicy",
        "storageClassName",
        "volumeAttributesClassName",
        "volumeMode",
    }
)


@dataclass(frozen=True)
class LocalModelNodeGroupSpec:
    storage_limit: Quantity
    persistent_volume_spec: Mapping[str, Any] = field(default_factory=dict)
    persistent_volume_claim_spec: Mapping[str, Any] = field(default_factory=dict)
    node_selector: NodeSelector | None = None

    @property
    def cache_path(self) -> str | None:
        """The folder on the node: the PV's hostPath or local path (one source of truth)."""
        source = self.volume_source
        return None if source is None else str(self.persistent_volume_spec[source]["path"])

    @property
    def volume_source(self) -> str | None:
        """``hostPath`` or ``local``: the one volume source the group names (None: none)."""
        for source in CACHE_VOLUME_SOURCES:
            path = (self.persistent_volume_spec.get(source) or {}).get("path")
            if isinstance(path, str) and path:
                return source
        return None

    @classmethod
    def from_json(cls, data: Any) -> LocalModelNodeGroupSpec:
        """Refused (SpecError naming the field): a volume source other than ``hostPath``/``local``
        or both at once, a path that :func:`cache_path_error`
        refuses, and the usual shape errors."""
        spec = _obj(data, "spec")
        if not spec:
            raise SpecError("is required", field="spec")
        limit = _quantity(spec, "storageLimit", "spec", required=True)
        assert limit is not None
        if limit.value <= 0:
            raise SpecError(
                f"{limit.to_json()!r} leaves no room for any model; give the per-node size of "
                "the cache, e.g. 500Gi",
                field="spec.storageLimit",
            )
        pv = dict(_obj(spec.get("persistentVolumeSpec"), "spec.persistentVolumeSpec"))
        pvc = dict(_obj(spec.get("persistentVolumeClaimSpec"), "spec.persistentVolumeClaimSpec"))
        affinity = _obj(pv.get("nodeAffinity"), "spec.persistentVolumeSpec.nodeAffinity")
        selector = None
        if affinity.get("required") is not None:
            try:
                selector = NodeSelector.from_json(affinity["required"])
            except SpecError as e:
                raise e.nested("spec.persistentVolumeSpec.nodeAffinity.required") from None
        others = sorted(k for k in pv if k not in PV_SPEC_FIELDS and k not in CACHE_VOLUME_SOURCES)
        if others:
            raise SpecError(
                f"{', '.join(others)}: only a hostPath or local folder on the node can hold a cache",
                field=f"spec.persistentVolumeSpec.{others[0]}",
            )
        named = [s for s in CACHE_VOLUME_SOURCES if pv.get(s) is not None]
        if len(named) > 1:
            raise SpecError("give hostPath or local, not both", field="spec.persistentVolumeSpec")
        for source in named:
            path = _obj(pv.get(source), f"spec.persistentVolumeSpec.{source}").get("path")
            # Scratch folders are the cluster's to refuse (CRD, webhook): standalone mode may use them.
            if path is not None and (why := cache_path_error(path, cluster=False)) is not None:
                raise SpecError(why, field=f"spec.persistentVolumeSpec.{source}.path")
        return cls(limit, pv, pvc, selector)

    def to_json(self) -> JSON:
        return _drop_none(
            {
                "storageLimit": self.storage_limit.to_json(),
                "persistentVolumeSpec": dict(self.persistent_volume_spec) or None,
                "persistentVolumeClaimSpec": dict(self.persistent_volume_claim_spec) or None,
            }
        )


NO_FOLDER = "names no cache folder: give hostPath.path or local.path (e.g. /var/lib/modelcache)"


def cluster_group(data: Any, *, cluster: bool = True) -> LocalModelNodeGroup:
    """A node group as a cluster takes it: :meth:`LocalModelNodeGroup.from_json`, and its folder
    not a scratch folder either (:func:`cache_path_error` with ``cluster``; off for the controller's
    standalone mode, the user's own machine, as for the agent's). Raises SpecError. A
    group without a folder is taken (its nodes still hold models; only serving volumes need the
    folder): the group webhook and the CRD refuse it, the controller says so on its caches."""
    group = LocalModelNodeGroup.from_json(data)
    source, path = group.spec.volume_source, group.spec.cache_path
    if source is not None and (why := cache_path_error(path, cluster=cluster)) is not None:
        raise SpecError(why, field=f"spec.persistentVolumeSpec.{source}.path")
    return group


@dataclass(frozen=True)
class LocalModelNodeGroupStatus:
    used: Quantity | None = None
    available: Quantity | None = None
    nodes: int | None = None
    observed_generation: int | None = None
    conditions: tuple[Condition, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> LocalModelNodeGroupStatus:
        st = _obj(data, "status")
        return cls(
            used=_quantity(st, "used", "status", required=False),
            available=_quantity(st, "available", "status", required=False),
            nodes=st.get("nodes"),
            observed_generation=st.get("observedGeneration"),
            conditions=_conditions(st, "status"),
        )

    def to_json(self) -> JSON:
        return _drop_none(
            {
                "used": self.used.to_json() if self.used else None,
                "available": self.available.to_json() if self.available else None,
                "nodes": self.nodes,
                "observedGeneration": self.observed_generation,
                "conditions": [c.to_json() for c in self.conditions],
            }
        )


@dataclass(frozen=True)
class LocalModelNodeGroup:
    metadata: ObjectMeta
    spec: LocalModelNodeGroupSpec
    status: LocalModelNodeGroupStatus = LocalModelNodeGroupStatus()

    kind = LOCAL_MODEL_NODE_GROUP

    @property
    def name(self) -> str:
        return self.metadata.name

    @classmethod
    def from_json(cls, data: Any) -> LocalModelNodeGroup:
        data = _check_kind(data, "LocalModelNodeGroup")
        return cls(
            metadata=ObjectMeta.from_json(data.get("metadata")),
            spec=LocalModelNodeGroupSpec.from_json(data.get("spec")),
            status=LocalModelNodeGroupStatus.from_json(data.get("status")),
        )

    def to_json(self) -> JSON:
        out = _header("LocalModelNodeGroup", self.metadata)
        out["spec"] = self.spec.to_json()
        if status := self.status.to_json():
            out["status"] = status
        return out


# -- LocalModelNode -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerRef:
    """Our addition (peer fill): one node to try before the origin for a model, as the controller
    lists it in ``spec.localModels[].peers`` (nearest first). ``address`` is the node agent's peer
    server, ``host:port``; ``state`` is that node's ModelState for the model (ModelDownloaded: it
    holds all of it; ModelDownloading: it may hold durable chunks)."""

    node: str
    address: str
    state: ModelState

    @classmethod
    def from_json(cls, data: Any, path: str) -> PeerRef:
        raw = _obj(data, path)
        node = _str(raw, "node", path, required=True)
        address = _str(raw, "address", path, required=True)
        assert node is not None and address is not None
        return cls(node=node, address=address, state=_enum(ModelState, raw.get("state"), f"{path}.state"))

    def to_json(self) -> JSON:
        return {"node": self.node, "address": self.address, "state": self.state.value}


@dataclass(frozen=True)
class LocalModelInfo:
    source_model_uri: str
    model_name: str
    namespace: str | None = None
    node_group: str | None = None
    service_account_name: str | None = None
    storage: StorageSpec | None = None
    model_size: Quantity | None = None
    # Our additions (peer fill), written by the controller; KServe's schema has neither (its CRD
    # prunes them, and the agent then fetches from the origin alone). Not part of what the model IS:
    # compare models with :meth:`without_peering`.
    peers: tuple[PeerRef, ...] = ()
    # sha256 of the first holder's manifest (localmodel.peering.manifest_digest): files the origin
    # gives no hash for take their sha256 from a peer's manifest that matches it.
    manifest_sha256: str | None = None

    def without_peering(self) -> LocalModelInfo:
        """The model with the peer-fill hints cleared: what decides whether a copy is the same."""
        if not self.peers and self.manifest_sha256 is None:
            return self
        return replace(self, peers=(), manifest_sha256=None)

    @property
    def storage_key(self) -> str:
        return storage_key(self.source_model_uri)

    @property
    def status_key(self) -> str:
        """Its key in ``status.modelStatus``: ``modelName``, or ``<namespace>/<modelName>`` for a
        LocalModelNamespaceCache's entry (KServe's ``GetStatusKey``, :func:`cache_key`)."""
        return cache_key(self.model_name, self.namespace)

    @classmethod
    def from_json(cls, data: Any, path: str) -> LocalModelInfo:
        raw = _obj(data, path)
        uri = _str(raw, "sourceModelUri", path, required=True)
        name = _str(raw, "modelName", path, required=True)
        assert uri is not None and name is not None
        key = _str(raw, "storageKey", path)
        if key is not None and (not STORAGE_KEY_RE.fullmatch(key) or key != storage_key(uri)):
            raise SpecError(
                f"{key!r} is not the storage key of {uri!r} ({storage_key(uri)})",
                field=f"{path}.storageKey",
            )
        return cls(
            source_model_uri=uri,
            model_name=name,
            namespace=_str(raw, "namespace", path),
            node_group=_str(raw, "nodeGroup", path),
            service_account_name=_str(raw, "serviceAccountName", path),
            storage=StorageSpec.from_json(raw.get("storage"), f"{path}.storage"),
            model_size=_quantity(raw, "modelSize", path, required=False),
            peers=_peers(raw, path),
            manifest_sha256=_str(raw, "manifestSha256", path),
        )

    def to_json(self) -> JSON:
        return _drop_none(
            {
                "sourceModelUri": self.source_model_uri,
                "modelName": self.model_name,
                "namespace": self.namespace,
                "nodeGroup": self.node_group,
                "serviceAccountName": self.service_account_name,
                "storage": self.storage.to_json() if self.storage else None,
                "modelSize": self.model_size.to_json() if self.model_size else None,
                "storageKey": self.storage_key,
                "peers": [p.to_json() for p in self.peers] or None,
                "manifestSha256": self.manifest_sha256,
            }
        )


def _peers(raw: Mapping[str, Any], path: str) -> tuple[PeerRef, ...]:
    items = raw.get("peers") or []
    if not isinstance(items, list):
        raise SpecError("expected a list", field=f"{path}.peers")
    return tuple(PeerRef.from_json(p, f"{path}.peers[{i}]") for i, p in enumerate(items))


@dataclass(frozen=True)
class DroppedPeer:
    """A peer a download stopped using (peer fill), and why, in one line."""

    address: str
    reason: str


@dataclass(frozen=True)
class ModelProgress:
    """Our addition to KServe's per-model state: what a user needs to see a download's health."""

    state: ModelState
    storage_key: str | None = None
    source_model_uri: str | None = None
    revision: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    reason: str | None = None
    message: str | None = None
    retry_after: str | None = None
    # How the published files were checked (the pull's result): content against a hash the source
    # gave, or by size alone (no hash offered, or verify off). None until a download has finished.
    files_verified: int | None = None
    files_size_only: int | None = None
    # Peer fill: where this node's bytes came from (None: not reported), the sha256 of the published
    # manifest (localmodel.peering.manifest_digest), and the peers this download dropped.
    bytes_from_origin: int | None = None
    bytes_from_peers: int | None = None
    manifest_sha256: str | None = None
    peers_dropped: tuple[DroppedPeer, ...] = ()

    @classmethod
    def from_json(cls, data: Any, path: str) -> ModelProgress:
        raw = _obj(data, path)
        return cls(
            state=_enum(ModelState, raw.get("state"), f"{path}.state"),
            storage_key=_str(raw, "storageKey", path),
            source_model_uri=_str(raw, "sourceModelUri", path),
            revision=_str(raw, "revision", path),
            bytes_done=_int(raw, "bytesDone", path),
            bytes_total=_int(raw, "bytesTotal", path),
            files_done=_int(raw, "filesDone", path),
            files_total=_int(raw, "filesTotal", path),
            start_time=_str(raw, "startTime", path),
            completion_time=_str(raw, "completionTime", path),
            reason=_str(raw, "reason", path),
            message=_str(raw, "message", path),
            retry_after=_str(raw, "retryAfter", path),
            files_verified=_int(raw, "filesVerified", path) if "filesVerified" in raw else None,
            files_size_only=_int(raw, "filesSizeOnly", path) if "filesSizeOnly" in raw else None,
            bytes_from_origin=_int(raw, "bytesFromOrigin", path) if "bytesFromOrigin" in raw else None,
            bytes_from_peers=_int(raw, "bytesFromPeers", path) if "bytesFromPeers" in raw else None,
            manifest_sha256=_str(raw, "manifestSha256", path),
            peers_dropped=_dropped(raw, path),
        )

    def to_json(self) -> JSON:
        return _drop_none(
            {
                "state": self.state.value,
                "storageKey": self.storage_key,
                "sourceModelUri": self.source_model_uri,
                "revision": self.revision,
                "bytesDone": self.bytes_done,
                "bytesTotal": self.bytes_total,
                "filesDone": self.files_done,
                "filesTotal": self.files_total,
                "startTime": self.start_time,
                "completionTime": self.completion_time,
                "reason": self.reason,
                "message": self.message,
                "retryAfter": self.retry_after,
                "filesVerified": self.files_verified,
                "filesSizeOnly": self.files_size_only,
                "bytesFromOrigin": self.bytes_from_origin,
                "bytesFromPeers": self.bytes_from_peers,
                "manifestSha256": self.manifest_sha256,
                "peersDropped": [{"address": d.address, "reason": d.reason} for d in self.peers_dropped]
                or None,
            }
        )


def _dropped(raw: Mapping[str, Any], path: str) -> tuple[DroppedPeer, ...]:
    items = raw.get("peersDropped") or []
    if not isinstance(items, list):
        raise SpecError("expected a list", field=f"{path}.peersDropped")
    out = []
    for i, item in enumerate(items):
        one = _obj(item, f"{path}.peersDropped[{i}]")
        address = _str(one, "address", f"{path}.peersDropped[{i}]", required=True)
        assert address is not None
        out.append(DroppedPeer(address, _str(one, "reason", f"{path}.peersDropped[{i}]") or ""))
    return tuple(out)


@dataclass(frozen=True)
class Capacity:
    limit: Quantity | None = None
    used: Quantity | None = None
    available: Quantity | None = None


@dataclass(frozen=True)
class LocalModelNodeStatus:
    model_status: Mapping[str, ModelState] = field(default_factory=dict)
    models: Mapping[str, ModelProgress] = field(default_factory=dict)
    capacity: Capacity = Capacity()
    summary: str | None = None
    observed_generation: int | None = None
    conditions: tuple[Condition, ...] = ()
    # Peer fill: where this node's agent serves what it holds (host:port); None: it serves nothing.
    peer_address: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> LocalModelNodeStatus:
        st = _obj(data, "status")
        ms = _obj(st.get("modelStatus"), "status.modelStatus")
        models = _obj(st.get("models"), "status.models")
        cap = _obj(st.get("capacity"), "status.capacity")
        return cls(
            model_status={  # "" (KServe's zero value) is no state: left out
                str(k): _enum(ModelState, v, f"status.modelStatus.{k}") for k, v in ms.items() if v != ""
            },
            models={str(k): ModelProgress.from_json(v, f"status.models.{k}") for k, v in models.items()},
            capacity=Capacity(
                limit=_quantity(cap, "limit", "status.capacity", required=False),
                used=_quantity(cap, "used", "status.capacity", required=False),
                available=_quantity(cap, "available", "status.capacity", required=False),
            ),
            summary=_str(st, "summary", "status"),
            observed_generation=st.get("observedGeneration"),
            conditions=_conditions(st, "status"),
            peer_address=_str(st, "peerAddress", "status"),
        )

    def to_json(self) -> JSON:
        cap = _drop_none(
            {
                "limit": self.capacity.limit.to_json() if self.capacity.limit else None,
                "used": self.capacity.used.to_json() if self.capacity.used else None,
                "available": self.capacity.available.to_json() if self.capacity.available else None,
            }
        )
        return _drop_none(
            {
                "modelStatus": {k: v.value for k, v in sorted(self.model_status.items())},
                "models": {k: v.to_json() for k, v in sorted(self.models.items())},
                "capacity": cap,
                "summary": self.summary,
                "observedGeneration": self.observed_generation,
                "conditions": [c.to_json() for c in self.conditions],
                "peerAddress": self.peer_address,
            }
        )


@dataclass(frozen=True)
class LocalModelNode:
    metadata: ObjectMeta
    local_models: tuple[LocalModelInfo, ...] = ()
    status: LocalModelNodeStatus = LocalModelNodeStatus()

    kind = LOCAL_MODEL_NODE

    @property
    def name(self) -> str:
        return self.metadata.name

    @classmethod
    def from_json(cls, data: Any) -> LocalModelNode:
        data = _check_kind(data, "LocalModelNode")
        spec = _obj(data.get("spec"), "spec")
        raw_models = spec.get("localModels") or []
        if not isinstance(raw_models, list):
            raise SpecError("expected a list", field="spec.localModels")
        models = tuple(
            LocalModelInfo.from_json(m, f"spec.localModels[{i}]") for i, m in enumerate(raw_models)
        )
        # A namespace cache and a cluster cache may share a modelName (KServe keys entries by
        # namespace and modelName, reconcilers/utils.go:650 at KServe v0.20).
        keys = [m.status_key for m in models]
        if len(set(keys)) != len(keys):
            raise SpecError("lists a modelName twice in one namespace", field="spec.localModels")
        return cls(
            metadata=ObjectMeta.from_json(data.get("metadata")),
            local_models=models,
            status=LocalModelNodeStatus.from_json(data.get("status")),
        )

    def to_json(self) -> JSON:
        out = _header("LocalModelNode", self.metadata)
        out["spec"] = {"localModels": [m.to_json() for m in self.local_models]}
        if status := self.status.to_json():
            out["status"] = status
        return out


# -- Node (core/v1): only what placement reads ----------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    uid: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> Node:
        if not isinstance(data, Mapping):
            raise SpecError("expected a Node object")
        meta = ObjectMeta.from_json(data.get("metadata"))
        return cls(name=meta.name, labels=dict(meta.labels), uid=meta.uid)
