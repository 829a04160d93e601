"""Every kustomization under manifests/ renders with `kubectl kustomize`, and what it renders is valid:
built-in kinds against the Kubernetes OpenAPI schemas of the supported versions (the
`kubernetes-validate` package's bundled schemas, strict: unknown fields are errors), the
cert-manager and Prometheus Operator kinds against minimal embedded schemas of the fields used here
(their CRDs are not bundled offline). Then the properties the install depends on: the cache folder
named once, the agent's downward-API node name, probes, ports, RBAC, the overlays' contents."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = [
    "base",
    "overlays/kserve",
    "overlays/kserve/enforce",
    "overlays/standalone-prometheus",
    "overlays/custom-cache-dir",
    "agent",
    "monitoring",
]
# The overlays that render the agent, and the cache folder each names.
AGENT_OVERLAYS = {
    "base": "/var/lib/modelcache",
    "overlays/kserve": "/models",  # KServe's node folder (tests/test_kserve_overlay.py)
    "overlays/kserve/enforce": "/models",
    "overlays/standalone-prometheus": "/var/lib/modelcache",
    "overlays/custom-cache-dir": "/mnt/models",
    "agent": "/var/lib/modelcache",
}
# Kubernetes minor versions the manifests are checked against: 1.30 is the oldest, the first with
# ValidatingAdmissionPolicy in admissionregistration.k8s.io/v1 (and webhook matchConditions GA).
K8S_VERSIONS = ["1.30.0", "1.31.0", "1.33.0"]

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
    rule: dict[str, Any] = {
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
    assert ports == {"health": 8081, "metrics": 9090, "peer": 7071}
    assert "--peer-addr=0.0.0.0:7071" in c["args"]
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in pod["tolerations"])
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= c["resources"].keys(), "resources-patch.yaml is applied"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert ds["metadata"]["namespace"] == "modelcache-agent"


@needs_kubectl
def test_agent_secrets_reach_only_the_container_that_uses_them() -> None:
    """The API token is mounted in the agent container only (not the root init container), as a
    projected, expiring token; the Hugging Face token is a file (HF_TOKEN_PATH), not an environment
    variable that /proc/<pid>/environ would show."""
    docs = render("base")
    ds, c = _agent(docs)
    pod = ds["spec"]["template"]["spec"]
    sa = find(docs, "ServiceAccount", "modelcache-agent")
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    token_mounts = [
        m for m in c["volumeMounts"] if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    ]
    (mount,) = token_mounts
    assert mount["readOnly"] is True
    sources = volumes[mount["name"]]["projected"]["sources"]
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert token["path"] == "token" and token["expirationSeconds"] <= 3607
    assert any(s.get("configMap", {}).get("name") == "kube-root-ca.crt" for s in sources)
    for init in pod["initContainers"]:
        assert all(m["name"] != mount["name"] for m in init.get("volumeMounts", [])), init["name"]
    env = {e["name"]: e for e in c["env"]}
    assert "HF_TOKEN" not in env and not any("secretKeyRef" in e.get("valueFrom", {}) for e in c["env"])
    path = env["HF_TOKEN_PATH"]["value"]
    (hf,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    secret = volumes[hf["name"]]["secret"]
    assert secret["secretName"] == "modelcache-hf" and secret["optional"] is True
    assert secret["items"] == [{"key": "token", "path": path.rsplit("/", 1)[1]}]
    assert secret["defaultMode"] & 0o007 == 0, "not readable by others"
    # The peer token: a file read again when the Secret is replaced, mounted read-only.
    (flag,) = [a for a in c["args"] if a.startswith("--peer-token-file=")]
    peer_path = flag.split("=", 1)[1]
    (peer,) = [m for m in c["volumeMounts"] if peer_path.startswith(m["mountPath"] + "/")]
    assert peer["readOnly"] is True
    peer_secret = volumes[peer["name"]]["secret"]
    assert peer_secret["secretName"] == "modelcache-peer-token"
    assert peer_secret["items"] == [{"key": "token", "path": peer_path.rsplit("/", 1)[1]}]
    assert peer_secret["defaultMode"] & 0o007 == 0, "not readable by others"
    for init in pod["initContainers"]:
        assert all(m["name"] != peer["name"] for m in init.get("volumeMounts", [])), init["name"]
    assert pod["securityContext"]["fsGroup"] == c["securityContext"]["runAsGroup"]


def _cache_paths(docs: tuple[dict[str, Any], ...]) -> set[str]:
    """Every place the DaemonSet names the cache folder: the hostPath, each container's mount of
    it and each CACHE_DIR value (the agent's --cache-dir and the init container's check)."""
    ds, c = _agent(docs)
    pod = ds["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "cache"]
    found = {volume["hostPath"]["path"]}
    for ctr in [*pod["containers"], *pod.get("initContainers", [])]:
        found |= {m["mountPath"] for m in ctr.get("volumeMounts", []) if m["name"] == "cache"}
        (env,) = [e for e in ctr["env"] if e["name"] == "CACHE_DIR"]
        found.add(env["value"])  # a literal: no ConfigMap in the cluster can move one without the other
    assert "--cache-dir=$(CACHE_DIR)" in c["args"]
    return found


@needs_kubectl
@pytest.mark.parametrize(("path", "folder"), AGENT_OVERLAYS.items())
def test_agent_cache_path_is_one_value_in_every_overlay(path: str, folder: str) -> None:
    docs = render(path)
    assert _cache_paths(docs) == {folder}
    assert not [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "modelcache-agent"
    ], "the settings ConfigMap is local to kustomize"


@needs_kubectl
def test_every_overlay_that_renders_the_agent_is_checked() -> None:
    for path in OVERLAYS:
        if any(d["kind"] == "DaemonSet" for d in render(path)):
            assert path in AGENT_OVERLAYS, path


@needs_kubectl
def test_agent_cache_path_moves_with_config_yaml(tmp_path: Path) -> None:
    """The ConfigMap's cacheDir alone moves the hostPath, both mounts and both CACHE_DIR values; a
    patch of the ConfigMap in a plain overlay (after the copy) is caught by the test above."""
    assert kubectl is not None
    agent = tmp_path / "agent"
    shutil.copytree(MANIFESTS / "agent", agent)
    config = agent / "config.yaml"
    config.write_text(config.read_text().replace("cacheDir: /var/lib/modelcache", "cacheDir: /srv/models"))
    done = subprocess.run([kubectl, "kustomize", str(agent)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _cache_paths(tuple(d for d in yaml.safe_load_all(done.stdout) if d)) == {"/srv/models"}


def _init_script(docs: tuple[dict[str, Any], ...]) -> str:
    ds, _ = _agent(docs)
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][:2] == ["sh", "-c"]
    return str(init["command"][2])


def _run_init(script: str, cache_dir: str, bin_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"CACHE_DIR": cache_dir, "PATH": (f"{bin_dir}:" if bin_dir else "") + "/usr/bin:/bin"}
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)


SYSTEM_CACHE_DIRS = [
    "/",
    "/etc",
    "/etc/modelcache",
    "/var",
    "/var/lib",
    "/var/lib/kubelet",
    "/var/lib/kubelet/pods",
    "/usr/local/models",
    "/lib64",
    "/root/models",
    "/proc/1",
    "/run/containerd",
    "/var/run",
    "relative/models",
    "/models/../etc",
    "/models/",
]


@needs_kubectl
@pytest.mark.parametrize("cache_dir", SYSTEM_CACHE_DIRS)
def test_init_container_refuses_system_folders(cache_dir: str, tmp_path: Path) -> None:
    """The rendered init container's own script, run here: / and the node's system folders are refused
    with exit 2 and a line naming cacheDir, before anything is looked at or changed (chown, stat and
    ls are replaced by recorders, so a bug could not touch this machine's folders)."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("chown", "stat", "ls"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho {tool} "$@" >> {calls}\nexit 99\n')
        (bin_dir / tool).chmod(0o755)
    done = _run_init(_init_script(render("base")), cache_dir, bin_dir)
    assert done.returncode == 2, done
    assert done.stderr.startswith(f"cacheDir {cache_dir} ") and done.stderr.count("\n") == 1, done.stderr
    assert not calls.exists(), calls.read_text()


def test_init_container_and_the_group_rules_refuse_the_same_system_folders() -> None:
    """The init container's pattern is the one generated from localmodel/resources.py's list."""
    from localmodel.folders import system_folder_case

    script = (MANIFESTS / "agent" / "daemonset.yaml").read_text()
    joined = re.sub(r"\\\n\s*", "", script)  # the pattern's shell line continuations
    assert system_folder_case() + ")" in joined


CACHE_DIR_CASES = [
    "/var/lib/containers",
    "/var/lib/crio/x",
    "/var/lib/rancher",
    "/var/lib/cni",
    "/opt/cni/bin",
    "/var/log",
    "/var/log/pods",
    "/tmp",
    "/var/snap/microk8s",
    "/var/tmp",
    "/srv",
    "/media",
    "/mnt",
    "/opt",
    "/home",
    "/models\nx",
    "/models\tx",
    "/mnt/disks/ssd0",
    "/srv/modelcache",
    "/models",
    "/var/lib/modelcache",
    "/home/ml/cache",
]


@needs_kubectl
def test_init_container_refuses_what_the_group_rules_refuse(tmp_path: Path) -> None:
    """Run against the parser's rule (cache_path_error): the script refuses (exit 2, one line, nothing
    looked at) exactly the paths the parser refuses, and goes on to look at the others."""
    from localmodel.folders import cache_path_error

    script = _init_script(render("base"))
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("chown", "stat", "ls"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} >> {calls}\nexit 99\n")
        (bin_dir / tool).chmod(0o755)
    for path in CACHE_DIR_CASES:
        calls.unlink(missing_ok=True)
        done = _run_init(script, path, bin_dir)
        if cache_path_error(path) is not None:
            assert done.returncode == 2 and done.stderr.count("\n") == 1, (path, done)
            assert not calls.exists(), path
        else:
            assert done.returncode == 99 and calls.read_text() == "stat\n", (path, done)


@needs_kubectl
@pytest.mark.skipif(os.geteuid() != 0, reason="changing a folder's owner needs root")
def test_init_container_owns_only_a_new_or_empty_folder() -> None:
    # Not under /tmp (pytest's tmp_path, and maybe the checkout itself): the script refuses /tmp as
    # a cache folder in a cluster. /var/lib (below it is allowed) where we may write, else the checkout.
    from localmodel.folders import cache_path_error

    base = next(
        (d for d in ("/var/lib", str(ROOT)) if os.access(d, os.W_OK) and cache_path_error(f"{d}/x") is None),
        None,
    )
    if base is None:
        pytest.skip("no writable folder outside /tmp and the system folders to run the script in")
    with tempfile.TemporaryDirectory(dir=base, prefix=".modelcache-init-test-") as where:
        _owns_only_a_new_or_empty_folder(Path(where))


def _owns_only_a_new_or_empty_folder(tmp_path: Path) -> None:
    script = _init_script(render("base"))
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _run_init(script, str(empty))
    assert done.returncode == 0, done
    assert (empty.stat().st_uid, empty.stat().st_gid) == (65532, 65532)
    # Someone's files: left as they are, and the reason on one line.
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    os.chown(full, 1234, 1234)
    done = _run_init(script, str(full))
    assert done.returncode == 1
    assert "is not empty and belongs to uid 1234" in done.stderr and done.stderr.count("\n") == 1
    assert full.stat().st_uid == 1234 and (full / "notes.txt").stat().st_uid == 0
    # The agent's already (a restart, an upgrade): nothing to do.
    (empty / "models").mkdir()
    assert _run_init(script, str(empty)).returncode == 0


@needs_kubectl
def test_agent_rbac_is_least_privilege() -> None:
    docs = render("base")

    def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
        return {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }

    k = "serving.kserve.io"
    assert granted(find(docs, "ClusterRole", "modelcache-agent")) == {
        (k, "localmodelnodes", "get"),
        (k, "localmodelnodes", "list"),
        (k, "localmodelnodes", "watch"),
        (k, "localmodelnodes/status", "patch"),
        (k, "localmodelnodegroups", "get"),
        (k, "localmodelnodegroups", "list"),
        (k, "localmodelnodegroups", "watch"),
    }
    # Events only where it writes them: "default" (localmodel/events.py EVENT_NAMESPACE).
    from localmodel.events import EVENT_NAMESPACE

    events = find(docs, "Role", "modelcache-agent-events")
    assert events["metadata"]["namespace"] == EVENT_NAMESPACE
    assert granted(events) == {("", "events", "create"), ("", "events", "patch")}
    ds, _ = _agent(docs)
    subject = {
        "kind": "ServiceAccount",
        "name": ds["spec"]["template"]["spec"]["serviceAccountName"],
        "namespace": ds["metadata"]["namespace"],
    }
    assert find(docs, "ClusterRoleBinding", "modelcache-agent")["subjects"] == [subject]
    events_binding = find(docs, "RoleBinding", "modelcache-agent-events")
    assert (
        events_binding["subjects"] == [subject] and events_binding["metadata"]["namespace"] == EVENT_NAMESPACE
    )
    # The admission policy that narrows its writes names this very service account.
    policy = find(docs, "ValidatingAdmissionPolicy", "modelcache-agent-own-node")
    (condition,) = policy["spec"]["matchConditions"]
    assert f"system:serviceaccount:{subject['namespace']}:{subject['name']}" in condition["expression"]


@needs_kubectl
def test_namespaces_carry_pod_security_labels() -> None:
    docs = render("base")
    agent = find(docs, "Namespace", "modelcache-agent")["metadata"]["labels"]
    system = find(docs, "Namespace", "modelcache-system")["metadata"]["labels"]
    assert agent["pod-security.kubernetes.io/enforce"] == "privileged"  # the hostPath
    assert agent["pod-security.kubernetes.io/warn"] == agent["pod-security.kubernetes.io/audit"] == "baseline"
    for mode in ("enforce", "warn", "audit"):
        assert system[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    # Only the agent's DaemonSet lives in the privileged namespace.
    in_agent_ns = [
        d
        for d in docs
        if d["metadata"].get("namespace") == "modelcache-agent" and "template" in d.get("spec", {})
    ]
    assert [(d["kind"], d["metadata"]["name"]) for d in in_agent_ns] == [("DaemonSet", "modelcache-agent")]


def _ports(pod: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}


@needs_kubectl
def test_network_policies_admit_only_what_is_needed() -> None:
    """Agent: metrics from the monitoring namespace only (probes come from the node, which a
    NetworkPolicy always allows), the peer port from the other agents only; controller: the webhook
    port from anywhere (the API server is not a pod), metrics from the monitoring namespace. Every
    policy selects the pods it is for and names ports they have."""
    docs = render("base")
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    agents = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "modelcache-agent"}}}
    for kind, name, expected in (
        ("DaemonSet", "modelcache-agent", [([monitoring], ["metrics"]), ([agents], ["peer"])]),
        ("Deployment", "modelcache-controller", [(None, ["webhook"]), ([monitoring], ["metrics"])]),
    ):
        workload = find(docs, kind, name)
        policy = find(docs, "NetworkPolicy", name)
        assert policy["metadata"]["namespace"] == workload["metadata"]["namespace"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        rules = [(r.get("from"), [p["port"] for p in r["ports"]]) for r in policy["spec"]["ingress"]]
        assert rules == expected
        ports = _ports(workload["spec"]["template"])
        assert all(p in ports for _, names in rules for p in names), ports
    # The health port has no rule: only the node's kubelet reaches it.
    agent_rules = find(docs, "NetworkPolicy", "modelcache-agent")["spec"]["ingress"]
    assert all(p["port"] != "health" for r in agent_rules for p in r["ports"])
