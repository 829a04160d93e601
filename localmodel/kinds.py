"""The catalogue of API kinds modelcache reads and writes, and the shape objects cross it in.

Pure data, imported by the typed views (:mod:`localmodel.resources`), the pure planners and both
state backends (:mod:`localmodel.state`) alike, so a pure module naming a kind imports no I/O.
Objects are the plain JSON dicts Kubernetes stores (``apiVersion``, ``kind``, ``metadata``,
``spec``, ``status``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]

GROUP = "serving.kserve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class ResourceKind:
    """Where a kind lives in the API: enough to build URLs and to key an in-memory store."""

    group: str  # "" for the core group
    version: str
    kind: str
    plural: str
    namespaced: bool
    has_status: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


LOCAL_MODEL_CACHE = ResourceKind(GROUP, VERSION, "LocalModelCache", "localmodelcaches", False)
# KServe v0.18+: a namespaced LocalModelCache, usable only in its namespace
# (pkg/apis/serving/v1alpha1/local_model_namespace_cache_types.go:42-55 at KServe v0.20).
LOCAL_MODEL_NAMESPACE_CACHE = ResourceKind(
    GROUP, VERSION, "LocalModelNamespaceCache", "localmodelnamespacecaches", True
)
LOCAL_MODEL_NODE_GROUP = ResourceKind(GROUP, VERSION, "LocalModelNodeGroup", "localmodelnodegroups", False)
LOCAL_MODEL_NODE = ResourceKind(GROUP, VERSION, "LocalModelNode", "localmodelnodes", False)
NODE = ResourceKind("", "v1", "Node", "nodes", False)
POD = ResourceKind("", "v1", "Pod", "pods", True)
EVENT = ResourceKind("", "v1", "Event", "events", True, has_status=False)
PERSISTENT_VOLUME = ResourceKind("", "v1", "PersistentVolume", "persistentvolumes", False)
PERSISTENT_VOLUME_CLAIM = ResourceKind("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", True)
LEASE = ResourceKind("coordination.k8s.io", "v1", "Lease", "leases", True, has_status=False)
# Read only, by the agent, in one namespace (KServe's jobNamespace): a cache's own credentials.
SECRET = ResourceKind("", "v1", "Secret", "secrets", True, has_status=False)
SERVICE_ACCOUNT = ResourceKind("", "v1", "ServiceAccount", "serviceaccounts", True, has_status=False)
# KServe's; read only, and only where KServe is installed (the controller fills caches' status from it).
INFERENCE_SERVICE = ResourceKind(
    "serving.kserve.io", "v1beta1", "InferenceService", "inferenceservices", True
)

# KServe v0.19+ (pkg/apis/serving/v1alpha2/llm_inference_service_types.go at v0.20): read only, where
# installed; the controller fills caches' status.llmInferenceServices and serves their namespaces.
LLM_INFERENCE_SERVICE = ResourceKind(
    "serving.kserve.io", "v1alpha2", "LLMInferenceService", "llminferenceservices", True
)

KINDS: tuple[ResourceKind, ...] = (
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE_GROUP,
    LOCAL_MODEL_NODE,
    NODE,
    POD,
    EVENT,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    LEASE,
    INFERENCE_SERVICE,
    SECRET,
    SERVICE_ACCOUNT,
    LLM_INFERENCE_SERVICE,
)
KINDS_BY_NAME: dict[str, ResourceKind] = {k.kind: k for k in KINDS}
