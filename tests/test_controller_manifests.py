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
            assert own or rule["resources"] in (["events"], ["leases"]), rule
    namespaced_writes = {
        (d["metadata"]["namespace"], r["resources"][0])
        for d in rendered
        if d["kind"] == "Role"
        for r in d["rules"]
    }
    assert namespaced_writes == {("default", "events"), ("modelcache-system", "leases")}
