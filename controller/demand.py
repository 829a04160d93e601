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


def deletion_verdict(cache: str, users: Iterable[tuple[str, str, str]]) -> Verdict:
    """The verdict on deleting LocalModelCache ``cache`` given the services whose localmodel label
    names it, as ``(kind, namespace, name)``: refused while any exists, as KServe's validating
    webhook refuses it (pkg/webhook/admission/localmodelcache/localmodelcache_validator.go:96-140 at
    v0.20: an InferenceService or LLMInferenceService labelled with the cache's name), naming the
    first (sorted) and how many more."""
    found = sorted(set(users))
    if not found:
        return Verdict(True)
    kind, namespace, name = found[0]
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return Verdict.refuse(
        f"LocalModelCache {cache!r} is being used by {kind} {namespace}/{name}{more}; "
        'delete those first (or set serving.kserve.io/disable-localmodel: "true" on them)',
        code=403,
    )
