"""The Pod Security Standards applied to every pod template the manifests render: the controller's
Deployment and the runtimes' ServingRuntimes pass "restricted", the agent's DaemonSet passes
"baseline" but for its one hostPath volume (its namespace enforces "privileged" for that alone).

The checks are written from the standard's tables,
https://kubernetes.io/docs/concepts/security/pod-security-standards/ ("Baseline" and "Restricted",
policy version latest), field by field; Windows-only and annotation-only rules are checked where the
manifests could carry them. A ServingRuntime's spec is a pod spec without a pod-level
securityContext (KServe's ServingRuntimePodSpec), so its containers must carry everything."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
kubectl = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(kubectl is None, reason="kubectl is not installed")

# Baseline, "Capabilities": adding anything beyond this list is forbidden.
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
# Baseline, "Sysctls": the safe set.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
# Restricted, "Volume Types": only these.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for part in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(part) or []


def baseline(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Violations of the Baseline profile, each as 'field: why'."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    scs = [(c["name"], c.get("securityContext") or {}) for c in containers(pod)]
    # HostProcess
    for where, sc in [("pod", psc), *scs]:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}.windowsOptions.hostProcess: forbidden")
    # Host Namespaces
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"spec.{field}: forbidden")
    # Privileged Containers
    out += [f"{n}.privileged: forbidden" for n, sc in scs if sc.get("privileged")]
    # Capabilities
    for n, sc in scs:
        added = set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if added:
            out.append(f"{n}.capabilities.add: {sorted(added)} not in the baseline set")
    # HostPath Volumes
    out += [f"volumes.{v['name']}.hostPath: forbidden" for v in pod.get("volumes") or [] if "hostPath" in v]
    # Host Ports
    for c in containers(pod):
        out += [f"{c['name']}.ports.hostPort: forbidden" for p in c.get("ports") or [] if p.get("hostPort")]
    # AppArmor (fields, and the older annotations)
    for where, sc in [("pod", psc), *scs]:
        kind = (sc.get("appArmorProfile") or {}).get("type")
        if kind not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"{where}.appArmorProfile.type: {kind}")
    for key, value in (annotations or {}).items():
        if (
            key.startswith("container.apparmor.security.beta.kubernetes.io/")
            and value
            not in (
                "runtime/default",
                "",
            )
            and not value.startswith("localhost/")
        ):
            out.append(f"annotation {key}: {value}")
    # SELinux
    for where, sc in [("pod", psc), *scs]:
        opts = sc.get("seLinuxOptions") or {}
        if opts.get("type", "") not in SELINUX_TYPES or opts.get("user") or opts.get("role"):
            out.append(f"{where}.seLinuxOptions: {opts}")
    # /proc Mount Type
    out += [
        f"{n}.procMount: {sc['procMount']}" for n, sc in scs if sc.get("procMount", "Default") != "Default"
    ]
    # Seccomp
    for where, sc in [("pod", psc), *scs]:
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}.seccompProfile.type: Unconfined")
    # Sysctls
    out += [
        f"sysctls.{s['name']}: not safe" for s in psc.get("sysctls") or [] if s["name"] not in SAFE_SYSCTLS
    ]
    return out


def restricted(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Violations of the Restricted profile (Baseline's, and its own), each as 'field: why'."""
    out = baseline(pod, annotations)
    psc = pod.get("securityContext") or {}
    scs = [(c["name"], c.get("securityContext") or {}) for c in containers(pod)]
    # Volume Types
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volumes.{v['name']}: {sorted(kinds - RESTRICTED_VOLUMES)} not allowed")
    # Privilege Escalation
    out += [
        f"{n}.allowPrivilegeEscalation: must be false"
        for n, sc in scs
        if sc.get("allowPrivilegeEscalation") is not False
    ]
    # Running as Non-root: the pod sets true and no container sets false, or every container sets true
    for n, sc in scs:
        effective = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if effective is not True:
            out.append(f"{n}.runAsNonRoot: must be true")
    # Running as Non-root user
    for where, sc in [("pod", psc), *scs]:
        if sc.get("runAsUser") == 0:
            out.append(f"{where}.runAsUser: 0")
    # Seccomp: RuntimeDefault or Localhost, on the pod or on every container
    for n, sc in scs:
        kind = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if kind not in ("RuntimeDefault", "Localhost"):
            out.append(f"{n}.seccompProfile.type: must be RuntimeDefault or Localhost")
    # Capabilities: drop ALL, add at most NET_BIND_SERVICE
    for n, sc in scs:
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{n}.capabilities.drop: must include ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{n}.capabilities.add: only NET_BIND_SERVICE")
    return out


def render(path: str) -> list[dict[str, Any]]:
    assert kubectl is not None
    done = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "manifests" / path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def pod_templates(path: str) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(what, pod spec, pod annotations) for every pod the rendered manifests would make."""
    out = []
    for d in render(path):
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            template = d["spec"]["template"]
            out.append((name, template["spec"], template["metadata"].get("annotations") or {}))
        elif d["kind"] in ("ClusterServingRuntime", "ServingRuntime"):
            spec = d["spec"]
            head = {"containers": spec["containers"], "volumes": spec.get("volumes") or []}
            out.append((name, head, spec.get("annotations") or {}))
            if "workerSpec" in spec:
                worker = {
                    "containers": spec["workerSpec"]["containers"],
                    "volumes": spec.get("volumes") or [],
                }
                out.append((name + "/worker", worker, {}))
    return out


def test_controller_passes_restricted() -> None:
    templates = [t for t in pod_templates("base") if t[0].startswith("Deployment/")]
    assert [t[0] for t in templates] == ["Deployment/modelcache-controller"]
    for name, pod, notes in templates:
        assert restricted(pod, notes) == [], name


def test_runtimes_pass_restricted() -> None:
    templates = pod_templates("runtime")
    assert {t[0] for t in templates} == {
        "ClusterServingRuntime/modelcache-vllm",
        "ClusterServingRuntime/modelcache-vllm-multinode",
        "ClusterServingRuntime/modelcache-vllm-multinode/worker",
    }
    for name, pod, notes in templates:
        assert restricted(pod, notes) == [], name


def test_agent_passes_baseline_but_for_its_cache_hostpath() -> None:
    (template,) = [t for t in pod_templates("base") if t[0].startswith("DaemonSet/")]
    name, pod, notes = template
    assert baseline(pod, notes) == ["volumes.cache.hostPath: forbidden"], name
    # The long-running agent container itself would pass restricted; only the init container that
    # hands the folder over runs as root (with CHOWN alone).
    (agent,) = pod["containers"]
    alone = {
        **pod,
        "initContainers": [],
        "containers": [agent],
        "volumes": [v for v in pod["volumes"] if v["name"] != "cache"],
    }
    assert restricted(alone) == []
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}


def test_the_checks_catch_what_they_name() -> None:
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "c",
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }
        ],
        "volumes": [{"name": "t", "emptyDir": {}}],
    }
    assert restricted(good) == []
    Check = Callable[[dict[str, Any]], list[str]]
    cases: list[tuple[Callable[[dict[str, Any]], object], Check, str]] = [
        (lambda p: p.update(hostNetwork=True), baseline, "spec.hostNetwork"),
        (lambda p: p["containers"][0]["securityContext"].update(privileged=True), baseline, "c.privileged"),
        (
            lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
            baseline,
            "c.capabilities.add",
        ),
        (
            lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
            baseline,
            "volumes.h.hostPath",
        ),
        (
            lambda p: p["containers"][0].update(ports=[{"containerPort": 1, "hostPort": 1}]),
            baseline,
            "c.ports.hostPort",
        ),
        (
            lambda p: p["securityContext"].update(seccompProfile={"type": "Unconfined"}),
            baseline,
            "pod.seccompProfile",
        ),
        (
            lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
            baseline,
            "sysctls",
        ),
        (
            lambda p: p["containers"][0]["securityContext"].update(procMount="Unmasked"),
            baseline,
            "c.procMount",
        ),
        (
            lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}),
            restricted,
            "volumes.n",
        ),
        (
            lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
            restricted,
            "c.allowPrivilegeEscalation",
        ),
        (lambda p: p["securityContext"].pop("runAsNonRoot"), restricted, "c.runAsNonRoot"),
        (
            lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False),
            restricted,
            "c.runAsNonRoot",
        ),
        (lambda p: p["securityContext"].update(runAsUser=0), restricted, "pod.runAsUser"),
        (lambda p: p["securityContext"].pop("seccompProfile"), restricted, "c.seccompProfile"),
        (
            lambda p: p["containers"][0]["securityContext"]["capabilities"].pop("drop"),
            restricted,
            "c.capabilities.drop",
        ),
        (
            lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["CHOWN"]),
            restricted,
            "c.capabilities.add",
        ),
    ]
    import copy

    for change, check, field in cases:
        pod = copy.deepcopy(good)
        change(pod)
        found = check(pod)
        assert any(v.startswith(field) for v in found), (field, found)
