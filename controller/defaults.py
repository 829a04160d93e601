"""The LocalModelCache defaulting webhook's decision, pure: what is stored is always what KServe reads.

Rule: a spec that gives the alias ``nodeGroup`` (a name or a list of names) and no ``nodeGroups`` is
rewritten to ``nodeGroups`` (a list) and the alias removed. KServe's InferenceService defaulter reads
``spec.nodeGroups[0]`` of every cache whose URI matches
(pkg/apis/serving/v1beta1/inference_service_defaults.go:569 at v0.20) and its localmodel controller
``NodeGroups[0]`` of every cache (pkg/controller/v1alpha1/localmodel/reconcilers/
localmodelcache_reconciler.go:208): a stored cache without ``nodeGroups`` would stop both. An alias
that is not a name or a non-empty list of names, or given beside ``nodeGroups``, is left as it is:
the validating webhook and the CRD's rules refuse it naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping

from controller.admission import Verdict, shape_error

ALIAS = "nodeGroup"
PRIMARY = "nodeGroups"


def default_cache(operation: str, obj: object) -> Verdict:
    """The verdict on a LocalModelCache at CREATE or UPDATE: always allowed, with the JSON Patch
    (RFC 6902) of the module's rule when it applies; other operations and objects whose shape is
    wrong are let through unchanged (the validating webhook names the field)."""
    if operation not in ("CREATE", "UPDATE") or shape_error(obj) is not None:
        return Verdict(True)
    assert isinstance(obj, Mapping)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping) or ALIAS not in spec or PRIMARY in spec:
        return Verdict(True)
    alias = spec[ALIAS]
    groups = [alias] if isinstance(alias, str) else alias
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) and g for g in groups):
        return Verdict(True)
    return Verdict(
        True,
        patch=(
            {"op": "add", "path": f"/spec/{PRIMARY}", "value": list(groups)},
            {"op": "remove", "path": f"/spec/{ALIAS}"},
        ),
    )
