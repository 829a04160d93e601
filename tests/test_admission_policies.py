"""The ValidatingAdmissionPolicies shipped in manifests/ (the controller's Node labels and serving
volumes, an agent's own LocalModelNode), evaluated with cel-python as the API server evaluates them
(https://kubernetes.io/docs/reference/access-authn-authz/validating-admission-policy/): the request
matches the policy's resource rules, then every match condition must hold, then the variables are
computed in order and every validation must hold; an expression that errors counts as a denial
(failurePolicy: Fail). Requests are shaped as kube-apiserver builds them, and the controller's
serving volumes are the very bodies its plan builds."""

from __future__ import annotations

import copy
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError, CELFunction

from controller.labels import model_label
from controller.serving import claim_body, volume_body
from localmodel.layout import storage_key
from localmodel.resources import LocalModelCache, LocalModelNodeGroup
from tests.test_controller_reconcile import cache as cache_doc
from tests.test_controller_reconcile import group as group_doc

ROOT = Path(__file__).resolve().parents[1]
CONTROLLER = "system:serviceaccount:modelcache-system:modelcache-controller"
AGENT = "system:serviceaccount:modelcache-agent:modelcache-agent"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
KEY = storage_key("hf://org/m")

kubectl = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(kubectl is None, reason="kubectl is not installed")


@cache
def policies() -> dict[str, dict[str, Any]]:
    """Every ValidatingAdmissionPolicy the base renders, by name, with a binding that names it."""
    assert kubectl is not None
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "manifests" / "base")], capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    found = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    bound = {d["spec"]["policyName"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"}
    assert set(found) == set(bound), "every policy has a binding"
    assert all(b["spec"]["validationActions"] == ["Deny"] for b in bound.values())
    assert all(p["spec"]["failurePolicy"] == "Fail" for p in found.values())
    return found


# Kubernetes' CEL strings library (ext.Strings) functions the policies use that cel-python lacks.
def _substring(
    s: celtypes.StringType, start: celtypes.IntType, end: celtypes.IntType | None = None
) -> celtypes.StringType:
    return celtypes.StringType(s[int(start) :] if end is None else s[int(start) : int(end)])


FUNCTIONS: dict[str, CELFunction] = {"substring": _substring}


def _eval(expression: str, activation: dict[str, Any]) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expression), functions=FUNCTIONS).evaluate(activation)


def admit(
    policy: dict[str, Any], request: dict[str, Any], params: list[dict[str, Any]] | None = None
) -> list[str]:
    """The denial messages for ``request`` (an AdmissionRequest plus ``object``/``oldObject``);
    [] when the policy does not apply or every validation holds. A policy with a ``paramKind`` is
    evaluated once per param (the objects its binding's paramRef selects, all of which must pass);
    none (``parameterNotFoundAction: Allow``, as the bindings say): allowed."""
    if "paramKind" in policy["spec"]:
        return [d for param in params or [] for d in _admit(policy, request, param)]
    return _admit(policy, request, None)


def _admit(policy: dict[str, Any], request: dict[str, Any], param: dict[str, Any] | None) -> list[str]:
    spec = policy["spec"]
    resource = request["resource"]["resource"] + (
        f"/{request['subResource']}" if request["subResource"] else ""
    )
    rules = spec["matchConstraints"]["resourceRules"]
    if not any(
        request["resource"]["group"] in r["apiGroups"]
        and resource in r["resources"]
        and request["operation"] in r["operations"]
        for r in rules
    ):
        return []
    activation: dict[str, Any] = {
        "request": json_to_cel(request),
        "object": json_to_cel(request.get("object")),
        "oldObject": json_to_cel(request.get("oldObject")),
        "params": json_to_cel(param),
    }
    for condition in spec.get("matchConditions", []):
        if not bool(_eval(condition["expression"], activation)):
            return []
    variables: dict[str, Any] = {}
    for variable in spec.get("variables", []):
        activation["variables"] = celtypes.MapType(variables)
        try:
            variables[celtypes.StringType(variable["name"])] = _eval(variable["expression"], activation)
        except CELEvalError:
            return [f"variables.{variable['name']}: error"]
    activation["variables"] = celtypes.MapType(variables)
    denied = []
    for validation in spec["validations"]:
        try:
            ok = _eval(validation["expression"], activation)
        except CELEvalError:
            ok = None
        message = validation.get("message")
        if message is None:
            message = str(_eval(validation["messageExpression"], activation))
        if ok is None or isinstance(ok, CELEvalError):
            denied.append("error: " + message)  # denied too (failurePolicy: Fail)
        elif not bool(ok):
            denied.append(message)
    return denied


def refused_for(denied: list[str], message: str) -> bool:
    """A validation whose message holds ``message`` evaluated to false (not merely errored)."""
    return any(message in d and not d.startswith("error: ") for d in denied)


def request(
    operation: str,
    resource: str,
    *,
    user: str,
    name: str,
    namespace: str = "",
    group: str = "",
    sub: str = "",
    obj: Any = None,
    old: Any = None,
    extra: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    user_info: dict[str, Any] = {
        "username": user,
        "groups": ["system:serviceaccounts", "system:authenticated"],
    }
    if extra is not None:
        user_info["extra"] = extra
    return {
        "uid": "u",
        "kind": {"group": group, "version": "v1", "kind": resource},
        "resource": {"group": group, "version": "v1", "resource": resource},
        "subResource": sub,
        "name": name,
        "namespace": namespace,
        "operation": operation,
        "userInfo": user_info,
        "object": obj,
        "oldObject": old,
    }


# -- the controller and Nodes ------------------------------------------------------------------------


def node(labels: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": labels}, "spec": spec}


def node_update(new: dict[str, Any], old: dict[str, Any], **kw: Any) -> dict[str, Any]:
    kw.setdefault("user", CONTROLLER)
    return request("UPDATE", "nodes", name="n1", obj=new, old=old, **kw)


NODE_POLICY = "modelcache-controller-node-labels"
BASE_LABELS = {"kubernetes.io/hostname": "n1", "gpu": "a100"}


def test_the_controller_may_add_and_remove_its_model_labels() -> None:
    p = policies()[NODE_POLICY]
    old = node(BASE_LABELS, podCIDR="10.0.0.0/24")
    added = node({**BASE_LABELS, model_label(KEY): "ready"}, podCIDR="10.0.0.0/24")
    assert admit(p, node_update(added, old)) == []
    assert admit(p, node_update(old, added)) == []  # removed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda n: n["metadata"]["labels"].update(gpu="h100"), "only modelcache.io/model.* labels"),
        (lambda n: n["metadata"]["labels"].pop("gpu"), "only modelcache.io/model.* labels"),
        (
            lambda n: n["metadata"]["labels"].update({"node-role.kubernetes.io/control-plane": ""}),
            "only modelcache.io/model.*",
        ),
        (lambda n: n["metadata"]["labels"].update({model_label(KEY): "yes"}), "<16 hex digits>=ready"),
        (
            lambda n: n["metadata"]["labels"].update({"modelcache.io/model.x": "ready"}),
            "<16 hex digits>=ready",
        ),
        (lambda n: n["spec"].update(unschedulable=True), "never changes a Node's spec"),
        (
            lambda n: n["spec"].update(taints=[{"key": "x", "effect": "NoSchedule"}]),
            "never changes a Node's spec",
        ),
        (lambda n: n["metadata"].update(annotations={"a": "b"}), "never changes a Node's spec"),
        (lambda n: n["metadata"].update(finalizers=["x"]), "never changes a Node's spec"),
    ],
)
def test_the_controller_may_change_nothing_else_on_a_node(change: Any, message: str) -> None:
    p = policies()[NODE_POLICY]
    old = node(BASE_LABELS, podCIDR="10.0.0.0/24")
    new = copy.deepcopy(old)
    change(new)
    denied = admit(p, node_update(new, old))
    assert refused_for(denied, message), denied
    # Anyone else (the kubelet, an admin) is not this policy's business.
    assert admit(p, node_update(new, old, user="system:node:n1")) == []


def test_the_controller_may_not_create_delete_or_patch_node_status() -> None:
    p = policies()[NODE_POLICY]
    n = node(BASE_LABELS)
    assert admit(p, request("CREATE", "nodes", user=CONTROLLER, name="n1", obj=n))
    assert admit(p, request("DELETE", "nodes", user=CONTROLLER, name="n1", old=n))
    assert admit(p, node_update(n, n, sub="status"))


# -- the controller and serving volumes ----------------------------------------------------------------


VOLUME_POLICY = "modelcache-controller-volumes"


def made() -> tuple[dict[str, Any], dict[str, Any]]:
    """The PV and PVC the controller's plan builds for a cache served from a group in "team"."""
    g = LocalModelNodeGroup.from_json(group_doc("a100", "100Gi"))
    c = LocalModelCache.from_json(cache_doc("m", "10Gi", ["a100"]))
    return volume_body(c, g, "team"), claim_body(c, g, "team")


def pv_create(obj: dict[str, Any], user: str = CONTROLLER) -> dict[str, Any]:
    return request("CREATE", "persistentvolumes", user=user, name=obj["metadata"]["name"], obj=obj)


def pvc_create(obj: dict[str, Any]) -> dict[str, Any]:
    md = obj["metadata"]
    return request(
        "CREATE",
        "persistentvolumeclaims",
        user=CONTROLLER,
        name=md["name"],
        namespace=md["namespace"],
        obj=obj,
    )


def test_the_controller_s_own_volumes_pass() -> None:
    p = policies()[VOLUME_POLICY]
    pv, pvc = made()
    assert admit(p, pv_create(pv)) == []
    assert admit(p, pvc_create(pvc)) == []
    local = copy.deepcopy(pv)
    local["spec"]["local"] = {"path": local["spec"].pop("hostPath")["path"]}
    assert admit(p, pv_create(local)) == []
    delete = request("DELETE", "persistentvolumes", user=CONTROLLER, name=pv["metadata"]["name"], old=pv)
    assert admit(p, delete) == []


def _path(path: str) -> Any:
    return lambda pv: pv["spec"]["hostPath"].update(path=path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda pv: pv["metadata"]["labels"].clear(), "labelled app.kubernetes.io/managed-by"),
        (_path("/"), "<cache>/models/<storage key>"),
        (_path("/models"), "<cache>/models/<storage key>"),
        (_path(f"/etc/models/{KEY}"), "under no system folder"),
        (_path(f"/var/lib/kubelet/models/{KEY}"), "under no system folder"),
        (_path(f"/lib64/models/{KEY}"), "under no system folder"),
        (_path(f"/models/../etc/models/{KEY}"), "under no system folder"),
        (_path(f"/models/models/{KEY}/.."), "<cache>/models/<storage key>"),
        (lambda pv: pv["spec"]["hostPath"].pop("type"), "type Directory"),
        (lambda pv: pv["spec"]["hostPath"].update(type="DirectoryOrCreate"), "type Directory"),
        (lambda pv: pv["spec"].update(nfs={"server": "x", "path": "/"}), "no other volume source"),
        (
            lambda pv: pv["spec"].update(local={"path": pv["spec"]["hostPath"]["path"]}),
            "no other volume source",
        ),
        (lambda pv: pv["spec"].update(accessModes=["ReadWriteMany"]), "ReadOnlyMany, Retain"),
        (lambda pv: pv["spec"].update(persistentVolumeReclaimPolicy="Delete"), "ReadOnlyMany, Retain"),
        (lambda pv: pv["spec"].update(mountOptions=["rw"]), "without mount options"),
        (lambda pv: pv["spec"]["claimRef"].update(namespace="kube-system"), "pre-bound to its claim"),
    ],
)
def test_other_volumes_are_refused(change: Any, message: str) -> None:
    p = policies()[VOLUME_POLICY]
    pv, _ = made()
    change(pv)
    denied = admit(p, pv_create(pv))
    assert refused_for(denied, message), denied
    assert admit(p, pv_create(pv, user="alice")) == []  # not the controller: not this policy's


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["spec"].update(accessModes=["ReadWriteOnce"]), "a serving claim is ReadOnlyMany"),
        (lambda c: c["spec"].update(volumeName="someone-elses"), "a serving claim is ReadOnlyMany"),
        (
            lambda c: c["spec"].update(dataSource={"kind": "PersistentVolumeClaim", "name": "x"}),
            "without a data source",
        ),
        (lambda c: c["spec"].update(selector={"matchLabels": {"a": "b"}}), "without a data source"),
        (lambda c: c["metadata"]["labels"].clear(), "labelled app.kubernetes.io/managed-by"),
    ],
)
def test_other_claims_are_refused(change: Any, message: str) -> None:
    p = policies()[VOLUME_POLICY]
    _, pvc = made()
    change(pvc)
    assert refused_for(admit(p, pvc_create(pvc)), message)


def test_the_controller_deletes_only_its_own_and_never_updates() -> None:
    p = policies()[VOLUME_POLICY]
    pv, _ = made()
    foreign = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "data"}, "spec": {}}
    assert admit(p, request("DELETE", "persistentvolumes", user=CONTROLLER, name="data", old=foreign))
    update = request("UPDATE", "persistentvolumes", user=CONTROLLER, name="x", obj=pv, old=pv)
    assert refused_for(admit(p, update), "never updates")


# -- an agent and its own LocalModelNode ---------------------------------------------------------------


AGENT_POLICY = "modelcache-agent-own-node"


def lmn_patch(name: str, extra: dict[str, list[str]] | None) -> dict[str, Any]:
    obj = {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LocalModelNode", "metadata": {"name": name}}
    return request(
        "UPDATE",
        "localmodelnodes",
        group="serving.kserve.io",
        sub="status",
        user=AGENT,
        name=name,
        obj=obj,
        old=obj,
        extra=extra,
    )


def event(about_kind: str, about: str, extra: dict[str, list[str]] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{about}.abc", "namespace": "default"},
        "involvedObject": {"apiVersion": "serving.kserve.io/v1alpha1", "kind": about_kind, "name": about},
    }
    return request(
        "CREATE",
        "events",
        user=AGENT,
        name=obj["metadata"]["name"],
        namespace="default",
        obj=obj,
        extra=extra,
    )


def test_an_agent_writes_only_its_own_node_s_object() -> None:
    p = policies()[AGENT_POLICY]
    mine = {NODE_NAME_EXTRA: ["gpu-1"], "authentication.kubernetes.io/pod-name": ["modelcache-agent-x"]}
    assert admit(p, lmn_patch("gpu-1", mine)) == []
    assert admit(p, event("LocalModelNode", "gpu-1", mine)) == []
    assert admit(p, lmn_patch("gpu-2", mine)) == ["an agent writes only its own node's LocalModelNode"]
    assert admit(p, event("LocalModelNode", "gpu-2", mine)) == [
        "an agent records Events only about its own node's LocalModelNode"
    ]
    assert admit(p, event("Pod", "gpu-1", mine)) == [
        "an agent records Events only about its own node's LocalModelNode"
    ]
    # A token that names no node (a legacy Secret token, or an older API server): refused.
    extras: list[dict[str, list[str]] | None] = [None, {}, {NODE_NAME_EXTRA: []}]
    for extra in extras:
        assert refused_for(admit(p, lmn_patch("gpu-1", extra)), "names no node")
    # Someone else's writes (the controller's spec writes) are not this policy's business.
    other = lmn_patch("gpu-2", None)
    other["userInfo"]["username"] = CONTROLLER
    assert admit(p, other) == []


# -- any pod: no mount of models/<key> under a claim --------------------------------------------------


MOUNTS_POLICY = "modelcache-serving-mounts"


def pod_create(pod: dict[str, Any]) -> dict[str, Any]:
    return request(
        "CREATE",
        "pods",
        user="system:serviceaccount:kube-system:replicaset-controller",
        name="p",
        namespace="team",
        obj=pod,
    )


def our_claims() -> list[dict[str, Any]]:
    """The params the binding selects in the pod's namespace: the controller's claims there."""
    _, pvc = made()
    other = copy.deepcopy(pvc)
    other["metadata"]["name"] = "other-a100"
    return [pvc, other]


def test_the_binding_selects_our_claims_as_params() -> None:
    out = subprocess.run(
        [str(kubectl), "kustomize", str(ROOT / "manifests" / "base")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (binding,) = [
        d
        for d in yaml.safe_load_all(out)
        if d and d["kind"] == "ValidatingAdmissionPolicyBinding" and d["spec"]["policyName"] == MOUNTS_POLICY
    ]
    assert binding["spec"]["paramRef"] == {
        "selector": {"matchLabels": {"app.kubernetes.io/managed-by": "modelcache-controller"}},
        "parameterNotFoundAction": "Allow",
    }
    assert policies()[MOUNTS_POLICY]["spec"]["paramKind"] == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
    }
    _, pvc = made()
    assert pvc["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "modelcache-controller"}


def test_a_legacy_subpath_mount_is_refused_and_the_webhook_s_rewrite_passes() -> None:
    import jsonpatch

    from controller.admission import serving_mounts
    from tests.test_controller_security import kserve_pod

    p = policies()[MOUNTS_POLICY]
    req = kserve_pod("m-a100")
    pod = req["object"]
    denied = admit(p, pod_create(pod), our_claims())
    assert refused_for(denied, "mount it without subPath"), denied
    # What the pod webhook makes of it (KServe's label names the cache): allowed.
    c = LocalModelCache.from_json(cache_doc("m", "10Gi", ["a100"]))
    ops, error = serving_mounts(pod, frozenset(), c)
    assert error is None
    rewritten = jsonpatch.apply_patch(pod, ops)
    assert admit(p, pod_create(rewritten), our_claims()) == []
    # No claim of ours in the namespace: nothing to judge.
    assert admit(p, pod_create(pod), []) == []
    # The same subPath on an emptyDir: not ours.
    scratch = copy.deepcopy(pod)
    scratch["spec"]["volumes"][0] = {"name": "kserve-pvc-source", "emptyDir": {}}
    assert admit(p, pod_create(scratch), our_claims()) == []
    bare = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c"}]},
    }
    assert admit(p, pod_create(bare), our_claims()) == []


def mounting(claim: str, volume: dict[str, Any] | None = None, **mount: Any) -> dict[str, Any]:
    """A pod that mounts ``claim`` read-only, whole, in one container, with ``mount``'s changes."""
    source = {"claimName": claim, "readOnly": True, **(volume or {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "team"},
        "spec": {
            "volumes": [{"name": "model", "persistentVolumeClaim": source}],
            "containers": [
                {
                    "name": "c",
                    "volumeMounts": [{"name": "model", "mountPath": "/m", "readOnly": True, **mount}],
                }
            ],
        },
    }


ATTACKS = [
    # 2: a writable mount (the pod runs as the agent's UID 65532 and could chmod and rewrite files)
    (mounting("m-a100", {"readOnly": False}), "is mounted read-only"),
    (mounting("m-a100", {"readOnly": None}), "is mounted read-only"),
    (mounting("m-a100", readOnly=False), "is mounted read-only"),
    (mounting("m-a100", readOnly=None), "is mounted read-only"),
    # 5: every way around the subPath rule
    (mounting("m-a100", subPath=f"./models/{KEY}"), "mount it without subPath"),
    (mounting("m-a100", subPath=f"models//{KEY}"), "mount it without subPath"),
    (mounting("m-a100", subPath=f"models/./{KEY}"), "mount it without subPath"),
    (mounting("m-a100", subPath="foo/bar"), "mount it without subPath"),
    (mounting("m-a100", subPath="tokenizer"), "mount it without subPath"),
    (mounting("m-a100", subPathExpr=f"models/{KEY}"), "without subPathExpr"),
    (mounting("m-a100", subPathExpr="models/$(K)"), "without subPathExpr"),
]


@pytest.mark.parametrize(("pod", "message"), ATTACKS)
def test_our_claims_are_mounted_read_only_and_whole(pod: dict[str, Any], message: str) -> None:
    pod = copy.deepcopy(pod)
    for m in pod["spec"]["containers"][0]["volumeMounts"]:
        if m.get("readOnly") is None:
            m.pop("readOnly", None)
    source = pod["spec"]["volumes"][0]["persistentVolumeClaim"]
    if source.get("readOnly") is None:
        source.pop("readOnly")
    p = policies()[MOUNTS_POLICY]
    assert refused_for(admit(p, pod_create(pod), our_claims()), message)
    # In an init container, and in an ephemeral container added later: judged alike.
    init = copy.deepcopy(pod)
    init["spec"]["initContainers"] = init["spec"].pop("containers")
    init["spec"]["containers"] = [{"name": "c"}]
    assert refused_for(admit(p, pod_create(init), our_claims()), message)
    if "subPath" not in str(pod):  # the API server allows no subPath in an ephemeral container
        debug = copy.deepcopy(pod)
        debug["spec"]["ephemeralContainers"] = debug["spec"].pop("containers")
        debug["spec"]["containers"] = [{"name": "c"}]
        update = request(
            "UPDATE",
            "pods",
            user="alice",
            name="p",
            namespace="team",
            sub="ephemeralcontainers",
            obj=debug,
            old=pod,
        )
        assert refused_for(admit(p, update, our_claims()), message)
    # The same mount of a claim that is not ours (no param names it): not judged.
    assert admit(p, pod_create(pod), []) == []
    other = copy.deepcopy(pod)
    other["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "scratch"
    assert admit(p, pod_create(other), our_claims()) == []


def test_a_read_only_whole_mount_of_our_claim_passes() -> None:
    p = policies()[MOUNTS_POLICY]
    assert admit(p, pod_create(mounting("m-a100")), our_claims()) == []
    assert admit(p, pod_create(mounting("m-a100", subPath="")), our_claims()) == []


def test_the_volume_policy_s_system_folders_are_the_one_list() -> None:
    from localmodel.folders import system_folder_cel

    rules = [v["expression"] for v in policies()["modelcache-controller-volumes"]["spec"]["validations"]]
    assert sum(system_folder_cel("variables.path") in r for r in rules) == 1
    for folder in ("/var/lib/containers", "/opt/cni", "/var/log", "/tmp", "/var/snap", "/var/lib/rancher"):
        pv, _ = made()
        pv["spec"]["hostPath"]["path"] = f"{folder}/c/models/{KEY}"
        assert refused_for(
            admit(policies()["modelcache-controller-volumes"], pv_create(pv)), "under no system folder"
        )


def test_hashed_volume_names_pass_and_others_do_not() -> None:
    """Where ``<claim>-<namespace>`` would be ambiguous (a namespace with '-') or too long, the PV's name
    is its start and a hash (plan.volume_name): the controller's own pair passes, a name that is not
    the claim's and namespace's does not."""
    p = policies()[VOLUME_POLICY]
    g = LocalModelNodeGroup.from_json(group_doc("a100", "100Gi"))
    for name, ns in (("m", "team-a"), ("c" * 245, "team")):
        doc = cache_doc(name, "10Gi", ["a100"])
        doc["spec"]["sourceModelUri"] = "hf://org/m"
        c = LocalModelCache.from_json(doc)
        pv, pvc = volume_body(c, g, ns), claim_body(c, g, ns)
        assert pv["metadata"]["name"] != f"{pvc['metadata']['name']}-{ns}"
        assert admit(p, pv_create(pv)) == [] and admit(p, pvc_create(pvc)) == []
        for bad in ("zz" + pv["metadata"]["name"][2:], pv["metadata"]["name"][:-1] + "x"):
            wrong = copy.deepcopy(pvc)
            wrong["spec"]["volumeName"] = bad
            assert refused_for(admit(p, pvc_create(wrong)), "bound to the volume <claim>-<namespace>"), bad
            moved = copy.deepcopy(pv)
            moved["metadata"]["name"] = bad
            assert refused_for(admit(p, pv_create(moved)), "pre-bound to its claim"), bad
