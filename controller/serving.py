"""Serving, pure: KServe's PersistentVolumes and PersistentVolumeClaims for the models the nodes hold.

For each namespace that serves a cache from a group that admits it, a PersistentVolumeClaim
``<cache>-<group>`` in that namespace bound to a PersistentVolume :func:`volume_name`
(``<cache>-<group>-<namespace>`` where unambiguous) built from a fixed template: that model's folder
only (``<cache>/models/<key>``), ReadOnlyMany, reclaim policy Retain; no volume source is copied. A
namespace serves a cache when a pod there names it (:func:`controller.views.named_cache`) or mounts
that claim, when the cache's ``SERVING_NAMESPACES_ANNOTATION`` lists it, or once its claim exists;
both go when the cache, the group, or the cache's use of the group goes. A claim name two caches
share is the older's (:func:`serving_owners`); namespaces that are not names or are Kubernetes' or
modelcache's are never served in (:func:`namespace_error`); both show as a ``SERVING`` condition on
the cache and a Warning Event (:mod:`controller.status`).

A LocalModelNamespaceCache (KServe v0.18+) is served only in its own namespace, under the same
names KServe gives it (claim ``<cache>-<group>``, PV ``<cache>-<group>-<namespace>``:
pkg/controller/v1alpha1/localmodel/reconcilers/utils.go:603-626 at KServe v0.20); there its claim
wins over a cluster cache's claim of the same name, as KServe's defaulter prefers it
(inference_service_defaults.go:504-546). Its PV has no owner reference (a cluster-scoped object
cannot be owned by a namespaced one, utils.go:385-391): the controller deletes it when the cache goes.
Caches are named by their key (:attr:`LocalModelCache.key`) throughout.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.snapshot import ServingDemand, Snapshot, VolumeRef, VolumeWrite
from controller.views import Pod
from localmodel.layout import node_model_folder
from localmodel.placement import age_key
from localmodel.resources import NO_FOLDER, LocalModelCache, LocalModelNodeGroup

# On a LocalModelCache: namespaces (comma-separated) to create its serving PVCs in before any pod.
SERVING_NAMESPACES_ANNOTATION = "modelcache.io/serving-namespaces"
# On the PVs and PVCs the controller creates: the selector it watches them by, and what each is for.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "modelcache-controller"
VOLUME_CACHE_ANNOTATION = "modelcache.io/cache"
VOLUME_GROUP_ANNOTATION = "modelcache.io/node-group"
VOLUME_NAMESPACE_ANNOTATION = "modelcache.io/namespace"
# A digest of the group's volume specs it was made from: when they change, it is made again.
VOLUME_SPEC_ANNOTATION = "modelcache.io/spec-digest"

# A cache condition, present only while something keeps it from being served (nodeGroup: which group's
# claim; none: the whole cache): a claim name another cache has, one that is too long, an invalid
# serving namespace in its annotation.
SERVING = "Serving"
NAME_COLLISION = "ServingNameCollision"
NAME_TOO_LONG = "ServingNameTooLong"
INVALID_NAMESPACE = "InvalidServingNamespace"
NO_CACHE_FOLDER = "NoCacheFolder"
# Namespaces the controller never serves in: Kubernetes' own and modelcache's.
RESERVED_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
RESERVED_NAMESPACE_PREFIX = "modelcache-"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
MAX_NAME = 253  # a PV's or PVC's name: a DNS subdomain (RFC 1123)


def claim_name(cache: str, group: str) -> str:
    """KServe's PVC name for a cached model served from a node group (in each serving namespace)."""
    return f"{cache}-{group}"


def volume_name(cache: str, group: str, namespace: str) -> str:
    """The PV behind claim ``<cache>-<group>`` in ``namespace`` (PVs are cluster-wide: one per
    namespace), unique for every (claim, namespace) and at most 253 characters: KServe's
    ``<cache>-<group>-<namespace>`` when the namespace has no ``-`` and the name fits (then the last
    ``-`` separates the namespace, so no two claims and namespaces share it), else
    ``<cache>-<group>-<namespace>`` cut to fit, ``.`` and 10 hex digits of a SHA-256 of claim and
    namespace (after its last ``.`` such a name has no ``-``, which a plain one always has: the two
    forms never meet)."""
    plain = f"{claim_name(cache, group)}-{namespace}"
    if "-" not in namespace and len(plain) <= MAX_NAME:
        return plain
    digest = hashlib.sha256(f"{claim_name(cache, group)}/{namespace}".encode()).hexdigest()[:10]
    return f"{plain[: MAX_NAME - 11].rstrip('-.')}.{digest}"


@dataclass(frozen=True)
class ServingProblem:
    """Why a cache is not served from a group (``group``) or in a namespace (``group`` None)."""

    cache: str
    group: str | None
    reason: str
    message: str


Owners = dict[tuple[str | None, str], tuple[str, str]]


def claim_owner(owners: Owners, namespace: str, claim: str) -> tuple[str, str] | None:
    """The (cache key, group) claim ``claim`` serves in ``namespace``: a LocalModelNamespaceCache of
    that namespace first, else a cluster cache; None for no cache's claim."""
    return owners.get((namespace, claim)) or owners.get((None, claim))


def serving_owners(
    caches: Iterable[LocalModelCache],
) -> tuple[Owners, list[ServingProblem]]:
    """(namespace or None, claim name) -> the (cache key, group) it serves (None: a cluster cache's,
    in any namespace; a namespace: a LocalModelNamespaceCache's, there only; read them with
    :func:`claim_owner`), and the pairs that get none. Claim names are
    KServe's ``<cache>-<group>`` (KServe's InferenceService webhook mounts that name), so cache ``a-b``
    in group ``c`` and cache ``a`` in group ``b-c`` would share ``a-b-c``: the older cache (creation
    time, then name) keeps it, the other is not served from that group (``NAME_COLLISION``, naming
    both). A name over 253 characters cannot be a claim's (``NAME_TOO_LONG``). Caches being deleted
    hold their names until they are gone."""
    owners: Owners = {}
    problems: list[ServingProblem] = []
    for cache in sorted(caches, key=age_key):
        for g in cache.spec.node_groups:
            name = claim_name(cache.name, g)
            slot = (cache.namespace, name)
            if len(name) > MAX_NAME:
                problems.append(
                    ServingProblem(
                        cache.key,
                        g,
                        NAME_TOO_LONG,
                        f"its serving claim name {name[:60]!r}... is {len(name)} characters, over "
                        f"{MAX_NAME}: shorten the cache's or node group {g}'s name",
                    )
                )
            elif slot in owners:
                other, other_group = owners[slot]
                problems.append(
                    ServingProblem(
                        cache.key,
                        g,
                        NAME_COLLISION,
                        f"its serving claim {name!r} (<cache>-<group>) from node group {g} is already "
                        f"that of {cache.kind.kind} {other!r} from node group {other_group}, which is older: "
                        f"{cache.key!r} is not served from {g}; rename one of the caches or groups",
                    )
                )
            else:
                owners[slot] = (cache.key, g)
    return owners, problems


def namespace_error(namespace: str) -> str | None:
    """Why the controller does not serve in ``namespace`` (a namespace name: a DNS-1123 label of at
    most 63 characters, not Kubernetes' own ``kube-system``, ``kube-public``, ``kube-node-lease``
    nor modelcache's ``modelcache-*``), or None when it does."""
    if not _DNS_LABEL.fullmatch(namespace):
        return (
            f"{namespace[:80]!r} is not a namespace name (lowercase letters, digits and '-', "
            "at most 63, starting and ending with a letter or digit)"
        )
    if namespace in RESERVED_NAMESPACES or namespace.startswith(RESERVED_NAMESPACE_PREFIX):
        return f"{namespace!r} is a namespace of Kubernetes or modelcache, never served in"
    return None


def serving_namespaces(cache: LocalModelCache) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The namespaces the cache's ``SERVING_NAMESPACES_ANNOTATION`` lists (comma-separated, spaces
    around names ignored), and one message per entry that is not a namespace it may serve in (an
    empty entry, as in ``a,,b``, included; for a LocalModelNamespaceCache, any namespace but its
    own); an absent or empty annotation lists none."""
    raw = cache.metadata.annotations.get(SERVING_NAMESPACES_ANNOTATION, "")
    if not raw.strip():
        return (), ()
    good: list[str] = []
    bad: list[str] = []
    for i, entry in enumerate(x.strip() for x in raw.split(",")):
        why = "an empty entry" if not entry else namespace_error(entry)
        if why is None and cache.namespace is not None and entry != cache.namespace:
            why = f"{entry!r} is not the namespace of this LocalModelNamespaceCache ({cache.namespace})"
        if why is None:
            good.append(entry)
        else:
            bad.append(f"metadata.annotations[{SERVING_NAMESPACES_ANNOTATION}] entry {i + 1}: {why}")
    return tuple(dict.fromkeys(good)), tuple(bad)


def serving_problems(
    caches: Mapping[str, LocalModelCache], groups: Mapping[str, LocalModelNodeGroup]
) -> dict[str, list[ServingProblem]]:
    """cache -> what keeps it from being served (:func:`serving_owners`, :func:`serving_namespaces`,
    a group that names no folder: its nodes hold the model, but no serving volume can be made)."""
    out: dict[str, list[ServingProblem]] = {}
    for problem in serving_owners(caches.values())[1]:
        out.setdefault(problem.cache, []).append(problem)
    for cache in caches.values():
        for g in cache.spec.node_groups:
            group = groups.get(g)
            if group is not None and group.spec.cache_path is None:
                message = (
                    f"node group {g} {NO_FOLDER}; its nodes hold the model, but no serving volume is made"
                )
                out.setdefault(cache.key, []).append(ServingProblem(cache.key, g, NO_CACHE_FOLDER, message))
    for cache in caches.values():
        bad = serving_namespaces(cache)[1]
        if bad:
            message = "; ".join(bad) + " (skipped; the others are served)"
            out.setdefault(cache.key, []).append(ServingProblem(cache.key, None, INVALID_NAMESPACE, message))
    return out


def serving_demands(pods: Iterable[Pod], caches: Mapping[str, LocalModelCache]) -> set[ServingDemand]:
    """What pods ask to be served: a pod not finished that names a cache (:func:`named_cache`; its
    group from ``serving.kserve.io/nodegroup``), or mounts a claim named ``<cache>-<group>`` of a
    cache that lists that group (:func:`claim_owner` in the pod's namespace)."""
    by_claim = serving_owners(caches.values())[0]
    out: set[ServingDemand] = set()
    for pod in pods:
        if pod.finished:
            continue
        if pod.cache is not None:
            out.add(ServingDemand(pod.cache, pod.group, pod.namespace))
        for claim in pod.claims:
            if (owner := claim_owner(by_claim, pod.namespace, claim)) is not None:
                c, g = owner
                out.add(ServingDemand(c, g, pod.namespace))
    return out


def _taken(snapshot: Snapshot, cache: str, group: str, namespace: str) -> bool:
    return (namespace, claim_name(cache, group)) in snapshot.taken_claims or volume_name(
        cache, group, namespace
    ) in snapshot.taken_volumes


def _served_key(
    snapshot: Snapshot,
    admitted: Mapping[str, tuple[str, ...]],
    owners: Owners,
    demand: tuple[str, str | None, str],
) -> tuple[str, str, str] | None:
    """The (cache, group, namespace) a demand for ``key`` in ``group`` (None: the cache's first)
    and ``namespace`` serves, or None where it is not served (rules in :func:`volume_writes`)."""
    key, group, namespace = demand
    cache = snapshot.caches.get(key)
    if cache is None or cache.metadata.deletion_timestamp:
        return None
    if cache.namespace is not None and cache.namespace != namespace:
        return None  # a LocalModelNamespaceCache serves its own namespace only
    if group is None:
        group = cache.spec.node_groups[0]
    if claim_owner(owners, namespace, claim_name(cache.name, group)) != (key, group):
        return None  # a name another cache holds there (a namespace cache's wins in its namespace)
    if namespace_error(namespace):
        return None  # a namespace never served in
    folder = snapshot.groups.get(group)
    if folder is None or folder.spec.cache_path is None:
        return None  # no folder on the node to serve from
    if _taken(snapshot, cache.name, group, namespace):
        return None  # another party's claim or volume holds the name: theirs serves
    if group in cache.spec.node_groups and key in admitted.get(group, ()):
        return (key, group, namespace)
    return None


def _wanted_volumes(
    snapshot: Snapshot, admitted: Mapping[str, tuple[str, ...]]
) -> dict[tuple[str, str, str], None]:
    """Every (cache, group, namespace) served: asked for by a pod, already made and not going, or
    listed by the cache's serving namespaces; filtered by :func:`_served_key`."""
    owners = serving_owners(snapshot.caches.values())[0]
    demands: list[tuple[str, str | None, str]] = [(d.cache, d.group, d.namespace) for d in snapshot.serving]
    demands += [
        (ref.cache, ref.group, ref.namespace)
        for ref in (*snapshot.claims.values(), *snapshot.volumes.values())
        if not ref.deleting  # once made, kept while the cache is admitted to that group
    ]
    demands += [
        (cache.key, g, ns)
        for cache in snapshot.caches.values()
        for ns in serving_namespaces(cache)[0]
        for g in cache.spec.node_groups
    ]
    wanted: dict[tuple[str, str, str], None] = {}
    for demand in demands:
        if (served := _served_key(snapshot, admitted, owners, demand)) is not None:
            wanted[served] = None
    return wanted


def _unwanted_deletes(snapshot: Snapshot, wanted: Iterable[tuple[str, str, str]]) -> list[VolumeWrite]:
    """The controller's claims, then volumes, that no wanted pair names and that are not already going."""
    names = {(c, g, ns): snapshot.caches[c].name for c, g, ns in wanted}
    wanted_claims = {(ns, claim_name(n, g)) for (_, g, ns), n in names.items()}
    wanted_volumes = {volume_name(n, g, ns) for (_, g, ns), n in names.items()}
    out: list[VolumeWrite] = []
    for (ns, name), ref in sorted(snapshot.claims.items()):
        if (ns, name) not in wanted_claims and not ref.deleting:
            out.append(VolumeWrite("PersistentVolumeClaim", "delete", name, ns))
    for name, ref in sorted(snapshot.volumes.items()):
        if name not in wanted_volumes and not ref.deleting:
            out.append(VolumeWrite("PersistentVolume", "delete", name))
    return out


def _stale_deletes(snapshot: Snapshot, wanted: Iterable[tuple[str, str, str]]) -> list[VolumeWrite]:
    """The wanted pairs to make again (the claim first, then the volume).

    A pair made from a group's volume specs that have changed since (its path, its affinity) is made
    again: the claim and the volume go (the claim first), then the wanted ones are created anew.
    Kubernetes keeps a claim that pods mount until they are gone, so this waits for them."""
    wanted = sorted(wanted)
    digests = {g: _volume_digest(snapshot.groups[g]) for g in {g for _, g, _ in wanted}}
    out: list[VolumeWrite] = []
    for key, g, ns in wanted:
        c = snapshot.caches[key].name
        pv = snapshot.volumes.get(volume_name(c, g, ns))
        pvc = snapshot.claims.get((ns, claim_name(c, g)))
        # A pair without a digest predates the fixed template (the group's whole folder, as KServe
        # makes it): made again too.
        # A claim bound to a volume of another name (made before PV names were unique) too.
        stale_claim = pvc is not None and pvc.volume is not None and pvc.volume != volume_name(c, g, ns)
        if stale_claim or any(ref is not None and ref.digest != digests[g] for ref in (pv, pvc)):
            if pvc is not None and not pvc.deleting:
                out.append(VolumeWrite("PersistentVolumeClaim", "delete", claim_name(c, g), ns))
            if pv is not None and not pv.deleting:
                out.append(VolumeWrite("PersistentVolume", "delete", volume_name(c, g, ns)))
    return out


def _missing_creates(snapshot: Snapshot, wanted: Iterable[tuple[str, str, str]]) -> list[VolumeWrite]:
    """The PV, then the PVC, of each wanted pair not yet made."""
    out: list[VolumeWrite] = []
    for key, g, ns in sorted(wanted):
        cache, group = snapshot.caches[key], snapshot.groups[g]
        c = cache.name
        pv_name = volume_name(c, g, ns)
        if pv_name not in snapshot.volumes:
            out.append(VolumeWrite("PersistentVolume", "create", pv_name, body=volume_body(cache, group, ns)))
        if (ns, claim_name(c, g)) not in snapshot.claims:
            out.append(
                VolumeWrite(
                    "PersistentVolumeClaim",
                    "create",
                    claim_name(c, g),
                    ns,
                    body=claim_body(cache, group, ns),
                )
            )
    return out


def volume_writes(snapshot: Snapshot, admitted: Mapping[str, tuple[str, ...]]) -> list[VolumeWrite]:
    """Create the serving PV and PVC of every (cache, group, namespace) that is served and whose
    group admits the cache; delete the controller's others (claims first).

    Served: the cache exists and is not being deleted; a namespace cache serves its own namespace
    only; no group named means the cache's first; the claim name there is this cache's (a namespace
    cache's wins in its namespace); the namespace may be served in; the group has a folder on the node;
    the cache lists the group and the group admits it; no other party's object holds the PV or PVC
    name (``snapshot.taken_*``: KServe's own serving claim, which serves the pods as KServe made it:
    neither half is made, so no PV of ours is left unbound). Asked for by a pod, by a PV or PVC already made
    and not going (kept while admitted), or by the cache's serving namespaces (each of its groups).
    Writes in order: unwanted deletes, deletes of stale pairs (made again), then creates."""
    wanted = _wanted_volumes(snapshot, admitted)
    return [
        *_unwanted_deletes(snapshot, wanted),
        *_stale_deletes(snapshot, wanted),
        *_missing_creates(snapshot, wanted),
    ]


def _volume_meta(
    cache: LocalModelCache, group: LocalModelNodeGroup, namespace: str, name: str, *, namespaced: bool
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {MANAGED_BY_LABEL: MANAGED_BY},
        "annotations": {
            VOLUME_CACHE_ANNOTATION: cache.key,
            VOLUME_GROUP_ANNOTATION: group.name,
            VOLUME_NAMESPACE_ANNOTATION: namespace,
            VOLUME_SPEC_ANNOTATION: _volume_digest(group),
        },
    }
    if cache.metadata.uid and (cache.namespace is None or namespaced):
        # Collected with the cache on a real cluster, as KServe's are; the controller also deletes
        # them itself when the group goes (a second owner would keep them alive, not end them). A
        # namespace cache owns only its claim: a PV cannot have a namespaced owner.
        meta["ownerReferences"] = [
            {
                "apiVersion": cache.kind.api_version,
                "kind": cache.kind.kind,
                "name": cache.name,
                "uid": cache.metadata.uid,
                "blockOwnerDeletion": False,
            }
        ]
    return meta


# The serving PV's template: bump when it changes, so pairs made from an older one are made again.
VOLUME_TEMPLATE = "2"


def volume_body(cache: LocalModelCache, group: LocalModelNodeGroup, namespace: str) -> dict[str, Any]:
    """The serving PV ``<cache>-<group>-<namespace>``, from a fixed template: nothing of the group's
    ``persistentVolumeSpec`` is copied but the kind of folder (``hostPath`` or ``local``, checked by
    :class:`LocalModelNodeGroupSpec`), its path, which the volume narrows to this one model's folder
    ``<path>/models/<key>`` (``type: Directory``: never created by the kubelet), and the node
    affinity that places pods on the group's nodes. ``ReadOnlyMany``, reclaim policy Retain (the agent
    owns the folder), pre-bound to its claim.

    KServe's pod mutator mounts the claim with ``subPath: models/<key>[/<path>]``
    (pkg/webhook/admission/pod/storage_initializer_injector.go:744-746 and :551 at KServe v0.20),
    which under this volume's root would name ``<path>/models/<key>/models/<key>``: the pod webhook
    rewrites such a mount to the volume's root (:func:`controller.admission.serving_mounts`).

    Raises ValueError for a group without a folder (the plan never asks for one).
    """
    source, root = group.spec.volume_source, group.spec.cache_path
    if source is None or root is None:
        raise ValueError(f"node group {group.name!r} names no hostPath or local folder")
    path = node_model_folder(root, cache.spec.storage_key)
    spec: dict[str, Any] = {
        "capacity": {"storage": group.spec.storage_limit.to_json()},
        "accessModes": ["ReadOnlyMany"],
        "volumeMode": "Filesystem",
        "storageClassName": _storage_class(group),
        "persistentVolumeReclaimPolicy": "Retain",
        source: {"path": path, "type": "Directory"} if source == "hostPath" else {"path": path},
        "claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": namespace,
            "name": claim_name(cache.name, group.name),
        },
    }
    required = (group.spec.persistent_volume_spec.get("nodeAffinity") or {}).get("required")
    if required is not None:
        spec["nodeAffinity"] = {"required": copy.deepcopy(required)}
    meta = _volume_meta(
        cache, group, namespace, volume_name(cache.name, group.name, namespace), namespaced=False
    )
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": meta, "spec": spec}


def claim_body(cache: LocalModelCache, group: LocalModelNodeGroup, namespace: str) -> dict[str, Any]:
    """The PVC ``<cache>-<group>``, from a fixed template bound to its PV by name: ``ReadOnlyMany``,
    the PV's storage class and capacity (nothing else of the group's persistentVolumeClaimSpec: a
    ``dataSource`` or a ``selector`` there would ask for something the controller did not build)."""
    spec = {
        "accessModes": ["ReadOnlyMany"],
        "volumeMode": "Filesystem",
        "storageClassName": _storage_class(group),  # must equal the PV's for them to bind
        "resources": {"requests": {"storage": group.spec.storage_limit.to_json()}},
        "volumeName": volume_name(cache.name, group.name, namespace),
    }
    meta = _volume_meta(cache, group, namespace, claim_name(cache.name, group.name), namespaced=True)
    meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def _storage_class(group: LocalModelNodeGroup) -> str:
    pvc, pv = group.spec.persistent_volume_claim_spec, group.spec.persistent_volume_spec
    name = pvc.get("storageClassName") or pv.get("storageClassName") or ""
    return name if isinstance(name, str) else ""


def _volume_digest(group: LocalModelNodeGroup) -> str:
    """What a serving PV and PVC are made from on the group's side (the cache's name and the
    namespace are in their names), with the template's version: a change means they are made again."""
    spec = group.spec
    made_from = [
        VOLUME_TEMPLATE,
        spec.volume_source,
        spec.cache_path,
        (spec.persistent_volume_spec.get("nodeAffinity") or {}).get("required"),
        _storage_class(group),
        spec.storage_limit.to_json(),
    ]
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]


def volume_ref(obj: Mapping[str, Any]) -> VolumeRef | None:
    """What a PV or PVC the controller made serves; None for any other."""
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(MANAGED_BY_LABEL) != MANAGED_BY:
        return None
    a = meta.get("annotations") or {}
    cache, group, ns = (
        a.get(k) for k in (VOLUME_CACHE_ANNOTATION, VOLUME_GROUP_ANNOTATION, VOLUME_NAMESPACE_ANNOTATION)
    )
    if not (isinstance(cache, str) and isinstance(group, str) and isinstance(ns, str)):
        return None
    digest = a.get(VOLUME_SPEC_ANNOTATION)
    volume = (obj.get("spec") or {}).get("volumeName")  # claims only (list items carry no kind)
    return VolumeRef(
        cache,
        group,
        ns,
        deleting=bool(meta.get("deletionTimestamp")),
        digest=digest if isinstance(digest, str) else None,
        volume=volume if isinstance(volume, str) and volume else None,
    )
