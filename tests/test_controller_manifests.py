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
    rules = [r for d in rendered if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
    writes = {"create", "update", "patch", "delete", "deletecollection"}
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "secrets" not in rule["resources"]
        if writes & set(rule["verbs"]):
            own = all(r.startswith("localmodel") for r in rule["resources"])
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
    assert namespaced_writes == {("default", "events"), ("modelcache-system", "leases")}


def test_webhooks_are_wired_to_the_service_and_certificate(rendered: list[dict[str, Any]]) -> None:
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in rendered}
    service = by_kind[("Service", "modelcache-webhook")]
    deployment = by_kind[("Deployment", "modelcache-controller")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (port,) = container["ports"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"] == "webhook"
    assert f"--webhook-addr=:{port['containerPort']}" in container["args"]
    cert_dir = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--webhook-cert-dir="))
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == cert_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    certificate = by_kind[("Certificate", "modelcache-webhook")]
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    ns = service["metadata"]["namespace"]
    assert f"modelcache-webhook.{ns}.svc" in certificate["spec"]["dnsNames"]
    assert ("Issuer", certificate["spec"]["issuerRef"]["name"]) in by_kind
    paths = {}
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        (config,) = [d for d in rendered if d["kind"] == kind]
        assert (
            config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{ns}/modelcache-webhook"
        )
        for hook in config["webhooks"]:
            svc = hook["clientConfig"]["service"]
            assert (svc["name"], svc["namespace"]) == ("modelcache-webhook", ns)
            assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
            paths[kind] = (svc["path"], hook["rules"][0]["resources"])
    assert paths == {
        "MutatingWebhookConfiguration": ("/mutate/pods", ["pods"]),
        "ValidatingWebhookConfiguration": ("/validate/localmodelcaches", ["localmodelcaches"]),
    }


def test_only_pods_that_ask_are_sent_to_the_pod_webhook(rendered: list[dict[str, Any]]) -> None:
    celpy = pytest.importorskip("celpy")
    (config,) = [d for d in rendered if d["kind"] == "MutatingWebhookConfiguration"]
    (condition,) = config["webhooks"][0]["matchConditions"]
    env = celpy.Environment()
    program = env.program(env.compile(condition["expression"]))
    cases = [
        ({}, False),
        ({"labels": {"app": "x"}, "annotations": {"other": "y"}}, False),
        ({"annotations": {"serving.kserve.io/nodegroup": "a100"}}, True),
        ({"annotations": {"modelcache.io/model": "m"}}, True),
        ({"labels": {"internal.serving.kserve.io/localmodel": "m"}}, True),
    ]
    for meta, sent in cases:
        assert bool(program.evaluate({"object": celpy.json_to_cel({"metadata": meta})})) is sent, meta
