"""The admission webhooks' decisions, pure: from an AdmissionReview's object and the cluster objects
it concerns to a verdict (allowed or not, why, and a JSON Patch). ``controller.webhook`` reads the
cluster, calls these and serves them over HTTPS.

Over 600 lines because the pod and cache verdicts share their shape checks, messages and KServe's
rules, each split into named steps beside the verdict it serves.

Pods. A pod annotated ``serving.kserve.io/nodegroup: G`` gets a required node affinity for the
members of G (the terms of G's PV ``nodeAffinity.required``, ANDed with any the pod has). When the
pod names its cache (KServe's ``internal.serving.kserve.io/localmodel`` label, or our
``modelcache.io/model`` annotation) each term also requires the node label
``modelcache.io/model.<storage key>=ready`` that the controller keeps on nodes holding that model
downloaded, so the pod never starts on an empty or half-written copy. Every mount of a serving
claim of ours is made read-only and whole (:func:`serving_mounts`). A pod that names a cache and
no group goes to the cache's first group, as KServe does. Refused, with a message that says which,
only for a pod that names a cache: a group that does not exist or selects no nodes, a cache that does
not exist or does not list the group or was refused by it, a model that no node of the group holds
yet; and any pod with a mount of a serving claim with a ``subPath`` or ``subPathExpr`` it cannot
rewrite. A pod that names only a group that does not exist (or selects no nodes) is allowed
untouched with an admission Warning: KServe serves such a pod uncached (an InferenceService whose
node group no cache lists gets no localmodel label, pkg/apis/serving/v1beta1/
inference_service_defaults.go:556-579 at v0.20).

KServe's LocalModelNamespaceCache (v0.18+) is named by the pod's ``localmodel`` label with its
``localmodel-namespace`` label beside it (what KServe's InferenceService defaulter writes,
pkg/apis/serving/v1beta1/inference_service_defaults.go:537-538 at KServe v0.20); it serves pods of
its own namespace only (a pod of another namespace naming it is refused), and is judged as a
cluster cache is.

LocalModelCaches and LocalModelNamespaceCaches. Refused at create or spec update: a bad
``sourceModelUri`` or any other invalid field, a ``file://`` source, an http(s) host that is the
node or the cluster (:func:`localmodel.hosts.internal_host_error`), a ``modelcache.io/serving-
namespaces`` entry that is not a namespace it may serve in (also on an update of that annotation
alone), a serving claim name ``<cache>-<group>`` another cache already has, a node group that does
not exist or is invalid, a cache that no listed group can admit (the same admission the controller
runs, with the caches of both kinds already there, so with ``--admission warn`` a lack of room
alone refuses nothing: a warning says it), a second cache of the same URI in the same scope
(cluster caches among themselves; a LocalModelNamespaceCache among those of its namespace: beside a
cluster cache of the same model it is KServe's way to give one namespace its own, preferred copy). A
group that admits it while another does not is a warning. Updates that leave the spec alone
(finalizers, labels, status) and deletions are always allowed, so the controller's own writes never
bounce.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from controller.labels import MODEL_LABEL_VALUE, model_label
from controller.serving import (
    NAME_COLLISION,
    SERVING,
    SERVING_NAMESPACES_ANNOTATION,
    claim_name,
    serving_namespaces,
)
from controller.status import ADMITTED
from controller.views import named_cache, named_group
from localmodel.errors import InvalidInput, SpecError
from localmodel.hosts import internal_host_error
from localmodel.k8snames import config_key_error, subdomain_error
from localmodel.layout import model_subpath
from localmodel.placement import admit
from localmodel.resources import (
    CACHE_VOLUME_SOURCES,
    NO_FOLDER,
    NODEGROUP_ANNOTATION,
    LocalModelCache,
    LocalModelNodeGroup,
    Node,
    cluster_group,
    parse_cache,
    split_key,
)
from localmodel.uri import SourceURI, parse_uri

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
    """What the pod asks (nothing for a pod whose metadata is not well formed: ``place_pod``
    refuses those by field)."""
    meta = pod.get("metadata") if isinstance(pod, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    if not isinstance(annotations, Mapping) or not isinstance(labels, Mapping):
        return PodAsk(None, None)
    return PodAsk(named_group(annotations), named_cache(labels, annotations))


def cache_title(key: str) -> str:
    """How a refusal names the cache a pod asks for by key: ``LocalModelCache 'x'`` or
    ``LocalModelNamespaceCache 'ns/x'``."""
    namespace, _ = split_key(key)
    return f"{'LocalModelCache' if namespace is None else 'LocalModelNamespaceCache'} {key!r}"


def foreign_cache_error(key: str, namespace: str) -> str | None:
    """Why a pod of ``namespace`` may not use the cache of key ``key``: a LocalModelNamespaceCache
    of another namespace (KServe uses one only for InferenceServices of its own namespace,
    localmodelnamespacecache_reconciler.go:159-162 at KServe v0.20); None when it may."""
    owner, _ = split_key(key)
    if owner is None or owner == namespace:
        return None
    return (
        f"{cache_title(key)} serves namespace {owner!r} only; this pod is in {namespace!r} "
        "(use a LocalModelCache, or a LocalModelNamespaceCache of this namespace)"
    )


def place_pod(
    pod: Mapping[str, Any],
    *,
    cache: LocalModelCache | None,
    group: LocalModelNodeGroup | None,
    ready_nodes: Iterable[Node] = (),
    our_claims: AbstractSet[str] = frozenset(),
    namespace: str | None = None,
    foreign_claims: AbstractSet[str] = frozenset(),
) -> Verdict:
    """The verdict on a pod at create. ``cache`` and ``group`` are the objects the pod's ask names
    (None: not found; the group is the cache's first when the pod names none); ``ready_nodes`` are
    nodes whose labels mark the cache's model ready (others are ignored); ``our_claims`` are the
    serving claims the controller made in the pod's namespace and ``foreign_claims`` the claims of
    the cache's names there that it did not make (their mounts: :func:`serving_mounts`);
    ``namespace`` is the pod's (the AdmissionReview's; its metadata's, else ``default``, when None).
    A pod whose metadata,
    labels, annotations or spec are not objects is refused naming the field."""
    if (shape := shape_error(pod) or _pod_spec_error(pod)) is not None:
        return shape
    ask = pod_ask(pod)
    if not ask.any:
        return Verdict(True)
    group_name = _asked_group(pod, ask, cache, namespace)
    if isinstance(group_name, Verdict):
        return group_name
    terms = _group_placement(ask, group, group_name)
    if isinstance(terms, Verdict):
        return terms
    if cache is not None:
        assert group is not None  # _group_placement refuses a pod whose group is missing
        terms = _ready_terms(cache, group, ready_nodes, terms)
        if isinstance(terms, Verdict):
            return terms
    affinity = _with_required(pod, terms)
    mounts, error = serving_mounts(pod, our_claims, cache, foreign_claims)
    if error is not None:
        return Verdict.refuse(error, code=422)
    return Verdict(True, patch=({"op": "add", "path": "/spec/affinity", "value": affinity}, *mounts))


def _asked_group(
    pod: Mapping[str, Any], ask: PodAsk, cache: LocalModelCache | None, namespace: str | None
) -> str | Verdict:
    """The node group the pod is placed in (the cache's first when it names none), or the refusal
    of a pod naming a cache of another namespace, a cache that does not exist, or a group its cache
    does not list."""
    group_name = ask.group
    if ask.cache is not None:
        ns = namespace or str((pod.get("metadata") or {}).get("namespace") or "default")
        if (foreign := foreign_cache_error(ask.cache, ns)) is not None:
            return Verdict.refuse(foreign)
        if cache is None:
            return Verdict.refuse(f"{cache_title(ask.cache)} does not exist")
        if group_name is None:
            group_name = cache.spec.node_groups[0]
        elif group_name not in cache.spec.node_groups:
            listed = ", ".join(cache.spec.node_groups)
            return Verdict.refuse(
                f"{cache.title} does not list node group {group_name!r} (it lists {listed})"
            )
    assert group_name is not None
    return group_name


def _group_placement(
    ask: PodAsk, group: LocalModelNodeGroup | None, group_name: str
) -> list[dict[str, Any]] | Verdict:
    """The group's node affinity terms; a group missing or selecting no nodes refuses a pod that
    names a cache and admits one that names only the group, with a warning."""
    if group is None or group.name != group_name:
        missing = f"node group {group_name!r} ({NODEGROUP_ANNOTATION}) does not exist"
        if ask.cache is None:
            return Verdict(True, warnings=(f"{missing}: the pod is placed and served without the cache",))
        return Verdict.refuse(missing)
    terms = group_terms(group)
    if not terms:
        empty = (
            f"node group {group_name!r} has no persistentVolumeSpec.nodeAffinity.required: "
            "it selects no nodes"
        )
        if ask.cache is None:
            return Verdict(True, warnings=(f"{empty}; the pod is placed without it",))
        return Verdict.refuse(empty)
    return terms


def _ready_terms(
    cache: LocalModelCache,
    group: LocalModelNodeGroup,
    ready_nodes: Iterable[Node],
    terms: list[dict[str, Any]],
) -> list[dict[str, Any]] | Verdict:
    """``terms`` each narrowed to nodes labelled ready for the cache's model; a refusal when the cache
    is not admitted to or not served from the group, or no node of the group holds the model yet."""
    group_name = group.name
    for c in cache.status.conditions:
        if c.type == ADMITTED and c.node_group == group_name and c.status == "False":
            return Verdict.refuse(f"{cache.title} is not admitted to node group {group_name!r}: " + c.message)
        # Its claim name is another cache's: a pod would mount that cache's model.
        if c.type == SERVING and c.node_group == group_name and c.reason == NAME_COLLISION:
            return Verdict.refuse(f"{cache.title} is not served from node group {group_name!r}: " + c.message)
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
            f"no node of node group {group_name!r} holds {cache.title} downloaded yet "
            f"({copies.available} of {copies.total} copies available); retry when one does"
        )
    requirement = {"key": label, "operator": "In", "values": [MODEL_LABEL_VALUE]}
    return [_and_term(t, {"matchExpressions": [requirement]}) for t in terms]


def _pod_spec_error(pod: Mapping[str, Any]) -> Verdict | None:
    """A refusal naming the field when the pod's affinity is not an object or its volumes or
    containers not lists."""
    for part in ("affinity", "volumes", "containers", "initContainers"):
        value = (pod.get("spec") or {}).get(part)
        kind = Mapping if part == "affinity" else list
        if value is not None and not isinstance(value, kind):
            return Verdict.refuse(
                f"spec.{part}: expected {'an object' if kind is Mapping else 'a list'}", code=400
            )
    return None


def serving_mounts(
    pod: Mapping[str, Any],
    ours: AbstractSet[str],
    cache: LocalModelCache | None = None,
    foreign: AbstractSet[str] = frozenset(),
) -> tuple[list[dict[str, Any]], str | None]:
    """JSON Patch operations that make the pod's mounts of our serving claims (``ours``: the names of
    the claims the controller made in the pod's namespace, with the ``cache``'s own ``<cache>-<group>``
    for any group it lists unless that claim is in ``foreign``) fit the serving volume, which is the
    model's folder itself, and an error (naming the field) when one cannot be made to fit.

    ``foreign``: claims in the pod's namespace that exist without our ``MANAGED_BY_LABEL``. A claim
    ``<cache>-<group>`` that KServe's localmodel controller made (bound to a PV whose spec is the
    node group's own, so its root is the node's whole ``/models`` folder:
    pkg/controller/v1alpha1/localmodel/reconcilers/utils.go:603-624 at v0.20) needs KServe's
    ``subPath: models/<key>``: its mounts are left exactly as KServe wrote them (the reconcile loop
    leaves such claims alone too), and a claim the controller has not made yet is taken as one it
    will make (it does so when the pod asks).

    Every such claim volume and every mount of it is made read-only (a pod running as the agent's
    UID could otherwise change the published files). A ``subPath`` of ``models/<key>`` of ``cache``
    (what KServe's pod mutator writes, pkg/webhook/admission/pod/storage_initializer_injector.go:744-746
    at v0.20) is removed: the volume's root is that folder. Any other ``subPath`` and any
    ``subPathExpr`` on our claims is an error: the kubelet creates a missing subPath folder, as root,
    inside the published model (a path below the model, ``models/<key>/<path>``, included: serve it
    through a LocalModelCache of its own URI). Idempotent: a mount already rewritten yields no
    operation, so a reinvocation changes nothing."""
    own = {claim_name(cache.name, g) for g in cache.spec.node_groups} if cache is not None else set()
    own = {c for c in own if c in ours or c not in foreign}
    prefix = model_subpath(cache.spec.storage_key) if cache is not None else None
    spec = pod.get("spec") or {}
    names, ops = _claim_volumes(spec, set(ours) | own)
    for part in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(part) or []):
            if not isinstance(container, Mapping):
                continue
            for k, mount in enumerate(container.get("volumeMounts") or []):
                if not isinstance(mount, Mapping) or mount.get("name") not in names:
                    continue
                claim = names[str(mount.get("name"))]
                strip = prefix is not None and claim in own
                mount_ops, error = _mount_ops(mount, claim, (part, i, k), prefix if strip else None)
                if error is not None:
                    return [], error
                ops += mount_ops
    return ops, None


def _claim_volumes(
    spec: Mapping[str, Any], claims: AbstractSet[str]
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The pod's volumes of ``claims`` (volume name -> claim) and the operations that make each
    read-only."""
    names: dict[str, str] = {}
    ops: list[dict[str, Any]] = []
    for j, volume in enumerate(spec.get("volumes") or []):
        source = volume.get("persistentVolumeClaim") if isinstance(volume, Mapping) else None
        if isinstance(source, Mapping) and source.get("claimName") in claims:
            names[str(volume.get("name"))] = str(source.get("claimName"))
            if source.get("readOnly") is not True:
                ops.append(
                    {"op": "add", "path": f"/spec/volumes/{j}/persistentVolumeClaim/readOnly", "value": True}
                )
    return names, ops


def _mount_ops(
    mount: Mapping[str, Any], claim: str, where: tuple[str, int, int], prefix: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """The operations for one mount of our ``claim`` at ``spec.<part>[i].volumeMounts[k]`` (``where``):
    a ``subPath`` equal to ``prefix`` (None: none may be removed) removed, ``readOnly`` set; or the
    error naming the field for a ``subPathExpr`` or any other ``subPath`` (rules in
    :func:`serving_mounts`)."""
    part, i, k = where
    field = f"spec.{part}[{i}].volumeMounts[{k}]"
    at = f"/spec/{part}/{i}/volumeMounts/{k}"
    if mount.get("subPathExpr"):
        return [], (
            f"{field}.subPathExpr: not allowed on the modelcache serving claim {claim!r} "
            "(the claim is the model's folder itself: mount it whole)"
        )
    ops: list[dict[str, Any]] = []
    sub = mount.get("subPath")
    if sub:
        if prefix is not None and str(sub).strip("/") == prefix:
            ops.append({"op": "remove", "path": f"{at}/subPath"})
        else:
            return [], (
                f"{field}.subPath: {str(sub)[:300]!r} is not allowed on the modelcache serving "
                f"claim {claim!r}: the claim is the model's folder itself; mount it whole, "
                "without subPath (a folder below the model: cache its own URI)"
            )
    if mount.get("readOnly") is not True:
        ops.append({"op": "add", "path": f"{at}/readOnly", "value": True})
    return ops, None


def group_terms(group: LocalModelNodeGroup) -> list[dict[str, Any]]:
    """The group's PV node affinity terms, as the pod's node affinity takes them."""
    affinity = group.spec.persistent_volume_spec.get("nodeAffinity") or {}
    terms = (affinity.get("required") or {}).get("nodeSelectorTerms") or []
    return [dict(t) for t in terms if isinstance(t, Mapping)]


def _and_term(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Both terms' requirements (a requirement already in ``a`` is not repeated: a reinvoked
    webhook leaves the pod as it was)."""
    out: dict[str, Any] = {}
    for part in ("matchExpressions", "matchFields"):
        items = list(a.get(part) or [])
        items += [x for x in b.get(part) or [] if x not in items]
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
    merged: list[dict[str, Any]] = []
    for term in [_and_term(o, t) for o in own for t in terms] if own else [dict(t) for t in terms]:
        if term not in merged:
            merged.append(term)
    node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": merged}
    return affinity


# -- LocalModelCaches ------------------------------------------------------------------------------


def credentials_error(cache: LocalModelCache) -> None:
    """SpecError naming ``spec.serviceAccountName`` when it is no ServiceAccount name, or
    ``spec.storage.key`` when it is no Secret key (:mod:`localmodel.k8snames`): KServe's schema
    takes any string there, and the agent would refuse to read it at every download."""
    account = cache.spec.service_account_name
    if account and (why := subdomain_error(account)) is not None:
        raise SpecError(why, field="spec.serviceAccountName")
    key = cache.spec.storage.key if cache.spec.storage is not None else None
    if key and (why := config_key_error(key)) is not None:
        raise SpecError(why, field="spec.storage.key")


def validate_cache(
    operation: str,
    obj: Mapping[str, Any] | None,
    old: Mapping[str, Any] | None,
    *,
    caches: Iterable[LocalModelCache],
    groups: Iterable[LocalModelNodeGroup],
    invalid_groups: Mapping[str, str] | None = None,
    overcommit: bool = False,
) -> Verdict:
    """The verdict on a LocalModelCache or LocalModelNamespaceCache, by the object's ``kind`` (the
    module's rules); ``caches``: those of both kinds there are; ``invalid_groups``: stored groups
    whose spec is refused, name -> why (a cache listing one is told so). ``overcommit``
    (``--admission warn``): a group without room admits it anyway, with a warning naming the need
    and the free space (:func:`localmodel.placement.admit`)."""
    if operation not in ("CREATE", "UPDATE") or obj is None:
        return Verdict(True)
    if (shape := shape_error(obj)) is not None:
        return shape
    if obj["metadata"].get("deletionTimestamp"):
        return Verdict(True)
    annotation_changed = _annotation(obj) != _annotation(old)
    if (
        operation == "UPDATE"
        and isinstance(old, Mapping)
        and old.get("spec") == obj.get("spec")
        and not annotation_changed
    ):
        return Verdict(True)  # finalizers, labels, status: not ours to judge
    spec = obj.get("spec")
    try:
        if not isinstance(spec, Mapping):
            raise SpecError(f"expected an object, got {type(spec).__name__}", field="spec")
        uri = parse_uri(spec.get("sourceModelUri"), field="spec.sourceModelUri")
        cache = parse_cache(obj)
        credentials_error(cache)
    except (InvalidInput, SpecError) as e:
        return Verdict.refuse(str(e), code=422)
    bad_namespaces = serving_namespaces(cache)[1]
    if bad_namespaces:
        return Verdict.refuse("; ".join(bad_namespaces), code=422)
    if (refused := _source_error(uri)) is not None:
        return refused
    by_name = {g.name: g for g in groups}
    before = _groups_before(operation, old)
    if (refused := _listed_groups_error(cache, by_name, before, invalid_groups or {})) is not None:
        return refused
    others = [c for c in caches if c.key != cache.key and not c.metadata.deletion_timestamp]
    # Uniqueness and claim names hold within one scope: cluster caches, or one namespace's caches.
    peers = [o for o in others if o.namespace == cache.namespace]
    if (refused := _peer_error(cache, peers, before)) is not None:
        return refused
    return _admission_verdict(cache, others, by_name, overcommit=overcommit)


def _listed_groups_error(
    cache: LocalModelCache,
    by_name: Mapping[str, LocalModelNodeGroup],
    before: tuple[str, ...],
    invalid: Mapping[str, str],
) -> Verdict | None:
    """The refusal of a cache newly listing a group whose spec is refused, or one that does not exist
    (groups it listed before are let be)."""
    broken = [g for g in cache.spec.node_groups if g in invalid and g not in before]
    if broken:
        return Verdict.refuse(
            f"node group {broken[0]!r} is invalid: {invalid[broken[0]]}; fix its spec first"
        )
    missing = [g for g in cache.spec.node_groups if g not in by_name and g not in before]
    if missing:
        known = ", ".join(sorted(by_name)) or "none"
        names = ", ".join(repr(g) for g in missing)
        return Verdict.refuse(f"node group {names} does not exist (node groups: {known})")
    return None


def _peer_error(
    cache: LocalModelCache, peers: Sequence[LocalModelCache], before: tuple[str, ...]
) -> Verdict | None:
    """The refusal of a cache whose URI a peer (same scope) already caches, or whose serving claim
    name in a newly listed group is a peer's."""
    for other in peers:
        if other.spec.source_model_uri == cache.spec.source_model_uri:
            return Verdict.refuse(
                f"{other.title} already caches {parse_uri(cache.spec.source_model_uri)}; "
                "one URI is cached once (serve it through that cache)"
            )
    theirs = {claim_name(o.name, g): (o.key, g) for o in peers for g in o.spec.node_groups}
    for g in cache.spec.node_groups:
        name = claim_name(cache.name, g)
        if name in theirs and g not in before:
            owner, owner_group = theirs[name]
            return Verdict.refuse(
                f"spec.nodeGroups: the serving claim {name!r} (<cache>-<group>) of node group {g} is "
                f"already that of {cache.kind.kind} {owner!r} from node group {owner_group}; "
                "rename the cache or the group"
            )
    return None


def _admission_verdict(
    cache: LocalModelCache,
    others: Sequence[LocalModelCache],
    by_name: Mapping[str, LocalModelNodeGroup],
    *,
    overcommit: bool,
) -> Verdict:
    """Refused when no listed group that exists can admit the cache; else admitted, warning of the
    groups that refuse it and (``overcommit``) of those that admit it over their storageLimit."""
    admission = admit([*others, cache], by_name.values(), overcommit=overcommit)
    refusals = [r for r in admission.refused if r.cache == cache.key]
    existing = [g for g in cache.spec.node_groups if g in by_name]
    if existing and not admission.groups_of(cache.key):
        return Verdict.refuse(
            "no listed node group can admit it: " + "; ".join(r.message for r in refusals), code=403
        )
    over = [
        f"admitted over the storageLimit (--admission warn): {r.message}"
        for r in admission.overcommitted
        if r.cache == cache.key
    ]
    return Verdict(True, warnings=(*(r.message for r in refusals), *over))


def _groups_before(operation: str, old: object) -> tuple[str, ...]:
    """The node groups an updated cache listed before (none at create, or when unreadable)."""
    if operation != "UPDATE" or old is None:
        return ()
    try:
        return parse_cache(old).spec.node_groups
    except SpecError:
        return ()


def _source_error(uri: SourceURI) -> Verdict | None:
    """A refusal of a source a cluster may not cache: a file or a path on the node, or an http(s)
    host that is the node or the cluster; None for the others."""
    if uri.scheme == "file":
        # In a cluster a file source would copy whatever folder of the node the agent can read into
        # a served model; standalone mode (the user's own machine) keeps them.
        return Verdict.refuse(
            "spec.sourceModelUri: file:// sources and paths on the node are not allowed in a cluster; "
            "use hf://, s3://, gs://, Azure Blob or http(s)://",
            code=422,
        )
    host = urlsplit(uri.url).hostname if uri.scheme in ("http", "https") else None
    if host is not None and (why := internal_host_error(host)) is not None:
        return Verdict.refuse(
            f"spec.sourceModelUri: host {why}: the agent fetches from the node's network, so a "
            "cluster's source names a host outside the node and the cluster",
            code=422,
        )
    return None


def _annotation(obj: object) -> object:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    return annotations.get(SERVING_NAMESPACES_ANNOTATION) if isinstance(annotations, Mapping) else None


# -- LocalModelNodeGroups --------------------------------------------------------------------------


def validate_group(operation: str, obj: object, old: object) -> Verdict:
    """Refused at create or spec update: whatever :class:`LocalModelNodeGroupSpec` refuses, above
    all a volume source other than one ``hostPath`` or ``local`` folder, and a path that is ``/``, a
    system folder or under one. The CRD has no such rule: KServe's CRD takes any volume source and
    path, and ours applied over it must keep every group KServe stored valid, so refusing is this
    webhook's (an update that leaves the spec alone is always allowed)."""
    if operation not in ("CREATE", "UPDATE"):
        return Verdict(True)
    if (shape := shape_error(obj)) is not None:
        return shape
    assert isinstance(obj, Mapping)
    if operation == "UPDATE" and isinstance(old, Mapping) and old.get("spec") == obj.get("spec"):
        return Verdict(True)  # status, labels, finalizers
    try:
        group = cluster_group(obj)  # the parser's rules and, in a cluster, no scratch folder
    except SpecError as e:
        return Verdict.refuse(str(e), code=422)
    if group.spec.cache_path is None:  # {} or hostPath: {}: no serving volume could be made
        named = [s for s in CACHE_VOLUME_SOURCES if s in group.spec.persistent_volume_spec]
        where = f"spec.persistentVolumeSpec.{named[0]}.path" if named else "spec.persistentVolumeSpec"
        return Verdict.refuse(f"{where}: {NO_FOLDER}", code=422)
    return Verdict(True)


# -- any object ------------------------------------------------------------------------------------


def shape_error(obj: object) -> Verdict | None:
    """A refusal naming the field when the object, its metadata, labels or annotations are not the
    JSON objects (and string values) every Kubernetes object has; None when they are."""
    if not isinstance(obj, Mapping):
        return Verdict.refuse(f"request.object: expected an object, got {type(obj).__name__}", code=400)
    meta = obj.get("metadata")
    if meta is None or not isinstance(meta, Mapping):
        return Verdict.refuse(f"metadata: expected an object, got {type(meta).__name__}", code=400)
    for part in ("labels", "annotations"):
        value = meta.get(part)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            return Verdict.refuse(
                f"metadata.{part}: expected an object, got {type(value).__name__}", code=400
            )
        bad = [k for k, v in value.items() if not isinstance(v, str)]
        if bad:
            return Verdict.refuse(f"metadata.{part}.{bad[0]}: expected a string", code=400)
    spec = obj.get("spec")
    if spec is not None and not isinstance(spec, Mapping):
        return Verdict.refuse(f"spec: expected an object, got {type(spec).__name__}", code=400)
    return None
