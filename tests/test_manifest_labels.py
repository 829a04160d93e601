"""Every object the kustomizations ship carries the recommended labels (app.kubernetes.io/name,
part-of: modelcache, component, version), so `kubectl delete -l app.kubernetes.io/part-of=modelcache`
removes all of it, webhooks included; and no selector changed, since a Deployment's or DaemonSet's
selector is immutable and a label added there would make an upgrade fail."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/component")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# The selectors as every release so far has shipped them (immutable on Deployments and DaemonSets).
SELECTORS = {
    ("Deployment", "modelcache-controller"): {"app.kubernetes.io/name": "modelcache-controller"},
    ("DaemonSet", "modelcache-agent"): {"app.kubernetes.io/name": "modelcache-agent"},
}


def roots() -> list[Path]:
    """Every kustomization a user applies (Components are applied through them)."""
    found = []
    for path in sorted((ROOT / "manifests").rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


def render(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_every_overlay_is_found() -> None:
    names = {str(p.relative_to(ROOT / "manifests")) for p in roots()}
    assert {"base", "crds", "controller", "agent", "monitoring", "runtime"} <= names
    assert {"overlays/kserve", "overlays/kserve/enforce", "overlays/standalone-prometheus"} <= names


@pytest.mark.parametrize("folder", roots(), ids=lambda p: str(p.relative_to(ROOT / "manifests")))
def test_every_object_carries_the_recommended_labels(folder: Path) -> None:
    docs = render(folder)
    assert docs
    for d in docs:
        labels = d["metadata"].get("labels") or {}
        what = f"{d['kind']} {d['metadata']['name']}"
        missing = [k for k in LABELS if not labels.get(k)]
        assert not missing, f"{what} lacks {missing}"
        assert labels["app.kubernetes.io/part-of"] == "modelcache", what
        assert labels.get("app.kubernetes.io/version") == VERSION, what
        # Selectors and pod templates keep only what they had: no version, no part-of.
        spec = d.get("spec") or {}
        selector = spec.get("selector")
        match = (selector.get("matchLabels") or selector) if isinstance(selector, dict) else {}
        if (d["kind"], d["metadata"]["name"]) in SELECTORS:
            assert match == SELECTORS[(d["kind"], d["metadata"]["name"])], what
        assert "app.kubernetes.io/version" not in (match or {}), what
        template = (spec.get("template") or {}).get("metadata", {}).get("labels") or {}
        assert "app.kubernetes.io/version" not in template, what


def test_the_service_monitor_selects_the_metrics_service_only() -> None:
    docs = render(ROOT / "manifests" / "overlays" / "standalone-prometheus")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    want = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [
        s["metadata"]["name"]
        for s in services
        if all((s["metadata"].get("labels") or {}).get(k) == v for k, v in want.items())
    ]
    assert selected == ["modelcache-controller-metrics"]
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    (agent,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod_labels = agent["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
