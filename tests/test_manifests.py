"""Every kustomization under manifests/ renders with `kubectl kustomize`, and what it renders is valid:
built-in kinds against the Kubernetes OpenAPI schemas of the supported versions (the
`kubernetes-validate` package's bundled schemas, strict: unknown fields are errors), the
cert-manager and Prometheus Operator kinds against minimal embedded schemas of the fields used here
(their CRDs are not bundled offline). Then the properties the install depends on: the cache folder
named once, the agent's downward-API node name, probes, ports, RBAC, the overlays' contents."""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ["base", "overlays/kserve", "overlays/standalone-prometheus", "agent", "monitoring"]
# Kubernetes minor versions the manifests are checked against (policy/v1 PDBs, apps/v1, and
# admissionregistration v1 are all GA well before the oldest).
K8S_VERSIONS = ["1.29.0", "1.31.0", "1.33.0"]

kubectl = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(kubectl is None, reason="kubectl is not installed")

_STR = {"type": "string"}
_OBJ = {"type": "object"}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _OBJ, "annotations": _OBJ},
    "additionalProperties": False,
}


def _doc(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": _STR, "kind": _STR, "metadata": _META, "spec": spec},
        "additionalProperties": False,
    }


_RULE = {
    "type": "object",
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": _STR,
        "record": _STR,
        "expr": _STR,
        "for": {"type": "string", "pattern": r"^\d+[smhdwy]$"},
        "labels": {"type": "object", "additionalProperties": _STR},
        "annotations": {"type": "object", "additionalProperties": _STR},
    },
    "additionalProperties": False,
}
_ENDPOINT = {
    "type": "object",
    "properties": {
        "port": _STR,
        "path": _STR,
        "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
        "relabelings": {"type": "array", "items": _OBJ},
    },
    "additionalProperties": False,
}
_SELECTOR = {"type": "object", "properties": {"matchLabels": _OBJ, "matchExpressions": {"type": "array"}}}
# Minimal schemas of the custom kinds used (monitoring.coreos.com/v1, cert-manager.io/v1), written
# from their CRDs' field names; fields not listed are errors, as in strict validation.
CUSTOM_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): _doc(
        {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": _STR,
                            "interval": _STR,
                            "rules": {"type": "array", "items": _RULE},
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        }
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _doc(
        {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _OBJ,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
            "additionalProperties": False,
        }
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _doc(
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _OBJ,
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
            "additionalProperties": False,
        }
    ),
    ("cert-manager.io/v1", "Issuer"): _doc(
        {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {"selfSigned": _OBJ, "ca": _OBJ},
        }
    ),
    ("cert-manager.io/v1", "Certificate"): _doc(
        {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": _STR,
                "dnsNames": {"type": "array", "items": _STR},
                "issuerRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": _STR, "kind": _STR, "group": _STR},
                    "additionalProperties": False,
                },
                "duration": _STR,
                "renewBefore": _STR,
                "privateKey": _OBJ,
            },
            "additionalProperties": False,
        }
    ),
}


@cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    assert kubectl is not None
    done = subprocess.run([kubectl, "kustomize", str(MANIFESTS / path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def kinds(docs: tuple[dict[str, Any], ...]) -> set[str]:
    return {d["kind"] for d in docs}


@needs_kubectl
@pytest.mark.parametrize("path", OVERLAYS)
def test_renders_and_validates(path: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    docs = render(path)
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CUSTOM_SCHEMAS:
            jsonschema.validate(doc, CUSTOM_SCHEMAS[key])
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                raise AssertionError(
                    f"{path}: {doc['kind']}/{doc['metadata']['name']} on {version}: {e}"
                ) from e


def test_custom_schemas_catch_mistakes() -> None:
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "x"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up", "for": "10 minutes"}]}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, CUSTOM_SCHEMAS[("monitoring.coreos.com/v1", "PrometheusRule")])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "10m"
    jsonschema.validate(rule, CUSTOM_SCHEMAS[("monitoring.coreos.com/v1", "PrometheusRule")])


@needs_kubectl
def test_overlay_contents() -> None:
    base = render("base")
    assert "CustomResourceDefinition" in kinds(base)
    assert {"DaemonSet", "Deployment", "PodDisruptionBudget"} <= kinds(base)
    kserve = render("overlays/kserve")
    assert "CustomResourceDefinition" not in kinds(kserve), "KServe installs the CRDs"
    assert {"DaemonSet", "Deployment", "PodDisruptionBudget"} <= kinds(kserve)
    prom = render("overlays/standalone-prometheus")
    assert {
        "PodMonitor",
        "ServiceMonitor",
        "PrometheusRule",
        "CustomResourceDefinition",
        "DaemonSet",
    } <= kinds(prom)
    _controller_metrics_are_scraped(prom)
    dashboard = find(prom, "ConfigMap", "modelcache-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["dashboard.json"])["uid"] == "modelcache"
    pdb = find(base, "PodDisruptionBudget", "modelcache-controller")
    controller = find(base, "Deployment", "modelcache-controller")
    assert pdb["spec"]["minAvailable"] < controller["spec"]["replicas"]
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= controller["spec"]["template"]["metadata"]["labels"].items()
    )


def _controller_metrics_are_scraped(docs: tuple[dict[str, Any], ...]) -> None:
    """The ServiceMonitor selects the metrics Service, whose port reaches --metrics-addr's."""
    monitor = find(docs, "ServiceMonitor", "modelcache-controller")
    service = find(docs, "Service", "modelcache-controller-metrics")
    deployment = find(docs, "Deployment", "modelcache-controller")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert endpoint["path"] == "/metrics"
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert f"--metrics-addr=:{port['targetPort']}" in container["args"]


def _agent(docs: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    ds = find(docs, "DaemonSet", "modelcache-agent")
    (container,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    return ds, container


@needs_kubectl
def test_agent_daemonset() -> None:
    docs = render("base")
    ds, c = _agent(docs)
    pod = ds["spec"]["template"]["spec"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert c["args"][0] == "agent"
    assert "--health-addr=:8081" in c["args"] and "--metrics-addr=:9090" in c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8081, "metrics": 9090}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in pod["tolerations"])
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= c["resources"].keys(), "resources-patch.yaml is applied"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]


@needs_kubectl
def test_agent_cache_path_is_one_setting(tmp_path: Path) -> None:
    """The ConfigMap's cacheDir alone moves the hostPath, both mounts and the agent's --cache-dir."""

    def paths(docs: tuple[dict[str, Any], ...]) -> set[str]:
        assert kubectl is not None
        ds, c = _agent(docs)
        pod = ds["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "cache"]
        mounts = [
            m["mountPath"]
            for ctr in [*pod["containers"], *pod.get("initContainers", [])]
            for m in ctr.get("volumeMounts", [])
            if m["name"] == "cache"
        ]
        cm = find(docs, "ConfigMap", "modelcache-agent")
        ref = {e["name"]: e for e in c["env"]}["CACHE_DIR"]["valueFrom"]["configMapKeyRef"]
        assert ref == {"name": "modelcache-agent", "key": "cacheDir"}
        assert "--cache-dir=$(CACHE_DIR)" in c["args"]
        return {volume["hostPath"]["path"], *mounts, cm["data"]["cacheDir"]}

    assert paths(render("base")) == {"/var/lib/modelcache"}
    agent = tmp_path / "agent"
    shutil.copytree(MANIFESTS / "agent", agent)
    config = agent / "config.yaml"
    config.write_text(config.read_text().replace("cacheDir: /var/lib/modelcache", "cacheDir: /mnt/models"))
    done = subprocess.run([kubectl, "kustomize", str(agent)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert paths(tuple(d for d in yaml.safe_load_all(done.stdout) if d)) == {"/mnt/models"}


@needs_kubectl
def test_agent_rbac_is_least_privilege() -> None:
    docs = render("base")
    role = find(docs, "ClusterRole", "modelcache-agent")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    k = "serving.kserve.io"
    assert granted == {
        (k, "localmodelnodes", "get"),
        (k, "localmodelnodes", "list"),
        (k, "localmodelnodes", "watch"),
        (k, "localmodelnodes/status", "patch"),
        (k, "localmodelnodegroups", "get"),
        (k, "localmodelnodegroups", "list"),
        (k, "localmodelnodegroups", "watch"),
        ("", "events", "create"),
    }
    binding = find(docs, "ClusterRoleBinding", "modelcache-agent")
    ds, _ = _agent(docs)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": ds["spec"]["template"]["spec"]["serviceAccountName"],
         "namespace": ds["metadata"]["namespace"]}
    ]  # fmt: skip
