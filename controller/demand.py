"""What KServe's InferenceServices and LLMInferenceServices ask of caches, pure: serving claims, and
that a cache they use is not deleted.

Rule (KServe's, pkg/controller/v1alpha1/localmodel/reconcilers/utils.go:482-540 at v0.20): an
InferenceService or LLMInferenceService whose ``internal.serving.kserve.io/localmodel`` label names
a cache asks for that cache's serving claim ``<cache>-<group>`` in its namespace: ``group`` is its
``serving.kserve.io/nodegroup`` annotation when the cache lists that group (none when it does not:
KServe skips it), else the cache's first group. KServe's InferenceService webhook sets the label
when the service is created (pkg/apis/serving/v1beta1/inference_service_defaults.go:586), before
any pod exists, so the claim is made before the first pod asks and that pod does not wait Pending
for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from controller.admission import Verdict
from controller.snapshot import ServingDemand
from controller.views import InferenceService
from localmodel.resources import LocalModelCache


def service_demands(
    services: Iterable[InferenceService], caches: Mapping[str, LocalModelCache]
) -> set[ServingDemand]:
    """The serving demands of ``services`` (the module's rule); a label naming no cache asks nothing."""
    out: set[ServingDemand] = set()
    for svc in services:
        cache = caches.get(svc.named) if svc.named is not None else None
        if cache is None:
            continue
        if svc.group is not None and svc.group not in cache.spec.node_groups:
            continue
        out.add(ServingDemand(cache.name, svc.group, svc.namespace))
    return out


def deletion_verdict(cache: str, services: Iterable[tuple[str, str, str, str | None]]) -> Verdict:
    """The verdict on deleting the cache of key ``cache`` (:func:`localmodel.resources.cache_key`:
    ``<name>``, or ``<namespace>/<name>`` for a LocalModelNamespaceCache) given the services
    carrying its name in their localmodel label, as ``(kind, namespace, name, key they name)``
    (:func:`controller.views.named_cache`). Refused while any of them uses it, naming the first
    (sorted) and how many more. Who uses it, as KServe's validating webhooks decide at v0.20:

    - a LocalModelNamespaceCache ``ns/n``: a service in ``ns`` labelled ``n`` whose
      ``localmodel-namespace`` label is ``ns``
      (pkg/webhook/admission/localmodelnamespacecache/local_model_namespace_cache_validation.go:
      99-136, over status filled from the index at
      pkg/controller/v1alpha1/localmodel/reconcilers/localmodelnamespacecache_reconciler.go:281-291);
    - a LocalModelCache ``n``: a service labelled ``n`` without a ``localmodel-namespace`` label
      (pkg/webhook/admission/localmodelcache/localmodelcache_validator.go:96-140). KServe's status
      there lists every service labelled ``n`` (localmodelcache_reconciler.go:272-277), but one with
      the namespace label is served from its namespace's cache (KServe's defaulter writes both labels
      only for a LocalModelNamespaceCache), so keeping the cluster cache for it would block a
      deletion nothing depends on."""
    namespace, _, _ = cache.rpartition("/")
    found = sorted(
        {
            (kind, ns, name)
            for kind, ns, name, named in services
            if named == cache and (not namespace or ns == namespace)
        }
    )
    if not found:
        return Verdict(True)
    kind, ns, name = found[0]
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    what = f"LocalModelNamespaceCache {cache}" if namespace else f"LocalModelCache {cache!r}"
    return Verdict.refuse(
        f"{what} is being used by {kind} {ns}/{name}{more}; "
        'delete those first (or set serving.kserve.io/disable-localmodel: "true" on them)',
        code=403,
    )
