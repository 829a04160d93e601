"""The controller's manifests render with kustomize and keep to least privilege."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "manifests" / "controller")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_renders_the_controller(rendered: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    assert ("Deployment", "modelcache-controller") in kinds
    assert ("ServiceAccount", "modelcache-controller") in kinds
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "modelcache-controller"
    (container,) = pod["containers"]
    assert container["command"] == ["modelcache", "controller"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_rbac_is_least_privilege(rendered: list[dict[str, Any]]) -> None:
    roles = [d for d in rendered if d["kind"] in ("ClusterRole", "Role")]
    writes = {"create", "update", "patch", "delete", "deletecollection"}
    # Secrets: only the peer-fill token, in the agents' namespace: read by its name, and created.
    token = next(d for d in roles if d["metadata"]["name"] == "modelcache-controller-peer-token")
    assert token["kind"] == "Role" and token["metadata"]["namespace"] == "modelcache-agent"
    assert token["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["modelcache-peer-token"],
            "verbs": ["get"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    rules = [r for d in roles if d is not token for r in d["rules"]]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "secrets" not in rule["resources"]
        if writes & set(rule["verbs"]):
            own = all(r.startswith("localmodel") for r in rule["resources"])
            if rule["resources"] == ["localmodelnodegroups"]:
                raise AssertionError(f"the controller never writes a group's spec: {rule}")
            if rule["resources"] == ["nodes"]:
                assert rule["verbs"] == ["patch"], rule  # its model labels, nothing else
            elif rule["resources"] in (["persistentvolumes"], ["persistentvolumeclaims"]):
                assert writes & set(rule["verbs"]) == {"create", "delete"}, rule  # never update others'
            else:
                assert own or rule["resources"] in (["events"], ["leases"]), rule
    namespaced_writes = {
        (d["metadata"]["namespace"], r["resources"][0])
        for d in rendered
        if d["kind"] == "Role"
        for r in d["rules"]
    }
    assert namespaced_writes == {
        ("default", "events"),
        ("modelcache-system", "leases"),
        ("modelcache-agent", "secrets"),
    }


def test_webhooks_are_wired_to_the_service_and_certificate(rendered: list[dict[str, Any]]) -> None:
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in rendered}
    service = by_kind[("Service", "modelcache-webhook")]
    deployment = by_kind[("Deployment", "modelcache-controller")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (port,) = [p for p in container["ports"] if p["name"] == "webhook"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert f"--webhook-addr=:{port['containerPort']}" in container["args"]
    cert_dir = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--webhook-cert-dir="))
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == cert_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    certificate = by_kind[("Certificate", "modelcache-webhook")]
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    ns = service["metadata"]["namespace"]
    assert f"modelcache-webhook.{ns}.svc" in certificate["spec"]["dnsNames"]
    assert ("Issuer", certificate["spec"]["issuerRef"]["name"]) in by_kind
    paths = set()
    for d in rendered:
        if d["kind"] not in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            continue
        assert d["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{ns}/modelcache-webhook"
        for hook in d["webhooks"]:
            svc = hook["clientConfig"]["service"]
            assert (svc["name"], svc["namespace"]) == ("modelcache-webhook", ns)
            assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
            paths.add((d["kind"], svc["path"], tuple(hook["rules"][0]["resources"])))
    assert paths == {
        ("MutatingWebhookConfiguration", "/mutate/pods", ("pods",)),
        ("MutatingWebhookConfiguration", "/mutate/localmodelcaches", ("localmodelcaches",)),
        ("ValidatingWebhookConfiguration", "/validate/localmodelcaches", ("localmodelcaches",)),
        ("ValidatingWebhookConfiguration", "/validate/localmodelnodegroups", ("localmodelnodegroups",)),
    }
    # The routes exist in the server.
    from controller.webhook import MUTATE_CACHES, MUTATE_PODS, VALIDATE_CACHES, VALIDATE_GROUPS

    assert {p for _, p, _ in paths} == {MUTATE_PODS, MUTATE_CACHES, VALIDATE_CACHES, VALIDATE_GROUPS}
    # Reinvoked after KServe's pod mutator, so its subPath mount is narrowed whatever the order.
    pods = by_kind[("MutatingWebhookConfiguration", "modelcache-pod-placement")]
    assert pods["webhooks"][0]["reinvocationPolicy"] == "IfNeeded"


def test_only_pods_that_ask_are_sent_to_the_pod_webhook(rendered: list[dict[str, Any]]) -> None:
    """All match conditions must hold for a pod to be sent (Kubernetes ANDs them)."""
    celpy = pytest.importorskip("celpy")
    from celpy import celtypes

    (config,) = [d for d in rendered if d["metadata"]["name"] == "modelcache-pod-placement"]
    conditions = config["webhooks"][0]["matchConditions"]
    assert [c["name"] for c in conditions] == ["has-not-opted-out", "asks-for-a-node-group-or-a-cached-model"]
    env = celpy.Environment()
    # Kubernetes' CEL strings library (lowerAscii) is not in cel-python: the same function here.
    functions = {"lowerAscii": lambda s: celtypes.StringType(s.lower())}
    programs = [env.program(env.compile(c["expression"]), functions=functions) for c in conditions]
    off = "serving.kserve.io/disable-localmodel"
    cases = [
        ({}, False),
        ({"labels": {"app": "x"}, "annotations": {"other": "y"}}, False),
        ({"annotations": {"serving.kserve.io/nodegroup": "a100"}}, True),
        ({"annotations": {"modelcache.io/model": "m"}}, True),
        ({"labels": {"internal.serving.kserve.io/localmodel": "m"}}, True),
        # Opted out: never sent, so never held up while the controller is down.
        ({"labels": {"internal.serving.kserve.io/localmodel": "m"}, "annotations": {off: "true"}}, False),
        ({"annotations": {"serving.kserve.io/nodegroup": "a100", off: "True"}}, False),
        ({"annotations": {"serving.kserve.io/nodegroup": "a100", off: "false"}}, True),
    ]
    for meta, sent in cases:
        activation = {"object": celpy.json_to_cel({"metadata": meta})}
        assert all(bool(p.evaluate(activation)) for p in programs) is sent, meta


def test_what_rbac_cannot_narrow_an_admission_policy_does(rendered: list[dict[str, Any]]) -> None:
    """Node patches and PV/PVC writes are cluster-wide in RBAC: a ValidatingAdmissionPolicy bound with
    Deny narrows each to the controller's own (tests/test_admission_policies.py evaluates them)."""
    sa = next(d for d in rendered if d["kind"] == "ServiceAccount")
    user = f"system:serviceaccount:{sa['metadata']['namespace']}:{sa['metadata']['name']}"
    every = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ValidatingAdmissionPolicy"}
    policies = {n: d for n, d in every.items() if n.startswith("modelcache-controller-")}
    covered = set()
    for policy in policies.values():
        (condition,) = policy["spec"]["matchConditions"]
        assert f"'{user}'" in condition["expression"]
        for rule in policy["spec"]["matchConstraints"]["resourceRules"]:
            covered |= set(rule["resources"])
    assert {"nodes", "persistentvolumes", "persistentvolumeclaims"} <= covered
    bindings = [d for d in rendered if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert {b["spec"]["policyName"] for b in bindings} == set(every)
