"""The kserve overlays (manifests/overlays/kserve, kserve/enforce) match KServe v0.20's defaults, so a
migrated node's folder, its LocalModelNodeGroups and our agent name one path, and the migration
starts in warn mode. KServe's facts are cited from its repository at tag v0.20.0 (1fb7810), as in
docs/migrate-from-kserve.md."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import cli as agent_cli
from agent.desired import desired
from controller import cli as controller_cli
from controller.admission import validate_group
from localmodel.errors import SpecError
from localmodel.folders import cache_path_error
from localmodel.resources import LocalModelNode, LocalModelNodeGroup
from tests.support.agents import node_doc
from tests.test_crds import validate as crd_errors
from tests.test_manifests import (
    MANIFESTS,
    _agent,
    _cache_paths,
    _init_script,
    _run_init,
    find,
    needs_kubectl,
    render,
)

# KServe's node agent DaemonSet: hostPath /models (charts/kserve-localmodel-resources/files/
# resources.yaml:384-386, config/localmodelnodes/manager.yaml:66-69), mounted at /mnt/models, models
# in /mnt/models/models/<key> (pkg/controller/v1alpha1/localmodelnode/controller.go:87); its
# nodeSelector kserve/localmodel: worker (resources.yaml:375-376).
KSERVE_NODE_FOLDER = "/models"
KSERVE_AGENT_NODES = {"kserve/localmodel": "worker"}
WARN = "--admission=warn"
OVERLAYS = ("overlays/kserve", "overlays/kserve/enforce")
# What KServe installs for its localmodel feature (charts/kserve-localmodel-resources/files/
# resources.yaml): ours must not share a name, or the guide's removal of KServe's would remove ours.
KSERVE_LOCALMODEL_OBJECTS = {
    ("Deployment", "kserve-localmodel-controller-manager"),
    ("DaemonSet", "kserve-localmodelnode-agent"),
    ("ServiceAccount", "kserve-localmodel-controller-manager"),
    ("ServiceAccount", "kserve-localmodelnode-agent"),
    ("ClusterRole", "kserve-localmodel-manager-role"),
    ("ClusterRole", "kserve-localmodelnode-agent-role"),
    ("ClusterRoleBinding", "kserve-localmodel-manager-rolebinding"),
    ("ClusterRoleBinding", "kserve-localmodelnode-agent-rolebinding"),
    ("Service", "localmodel-webhook-server-service"),
    ("Certificate", "localmodel-serving-cert"),
    ("ValidatingWebhookConfiguration", "localmodelcache.serving.kserve.io"),
}


def _controller_args(docs: tuple[dict[str, Any], ...]) -> list[str]:
    deployment = find(docs, "Deployment", "modelcache-controller")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["modelcache", "controller"]
    return list(container["args"])


@needs_kubectl
@pytest.mark.parametrize("path", OVERLAYS)
def test_agent_uses_kserves_node_folder(path: str) -> None:
    """hostPath, the mounts and --cache-dir (through $(CACHE_DIR)) are all KServe's /models, and the
    agent runs on the nodes KServe's agent ran on."""
    docs = render(path)
    assert _cache_paths(docs) == {KSERVE_NODE_FOLDER}
    ds, agent = _agent(docs)
    pod = ds["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "cache"]
    assert volume["hostPath"] == {"path": KSERVE_NODE_FOLDER, "type": "DirectoryOrCreate"}
    assert "--cache-dir=$(CACHE_DIR)" in agent["args"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["CACHE_DIR"] == KSERVE_NODE_FOLDER
    assert pod["nodeSelector"] == KSERVE_AGENT_NODES


def test_kserves_node_folder_is_a_valid_cache_folder() -> None:
    """A KServe LocalModelNodeGroup's /models passes the rule our group webhook, CRD and agent use."""
    assert cache_path_error(KSERVE_NODE_FOLDER) is None


@needs_kubectl
def test_a_kserve_node_group_is_taken_by_the_overlays_agent() -> None:
    """The overlay's example group (as KServe's e2e test writes one: local /models) passes our group
    webhook, and the agent, run with the overlay's --cache-dir, takes a LocalModelNode of that group;
    with our base's folder it refuses it (every migrated node would say ConfigurationValid=False)."""
    doc = yaml.safe_load((MANIFESTS / "overlays/kserve/nodegroup-example.yaml").read_text())
    assert doc["spec"]["persistentVolumeSpec"]["local"]["path"] == KSERVE_NODE_FOLDER
    assert validate_group("CREATE", doc, None).allowed
    assert crd_errors(doc) == [], "our CRD's schema and CEL rules take it too"
    group = LocalModelNodeGroup.from_json(doc)
    (cache_dir,) = _cache_paths(render("overlays/kserve"))
    node = LocalModelNode.from_json(
        node_doc("n1", [("qwen", "hf://Qwen/Qwen2-0.5B-Instruct", "1Gi")], group="workers")
    )
    wanted = desired(node, {"workers": group}, cache_dir=Path(cache_dir))
    assert [m.model_name for m in wanted.models] == ["qwen"]
    assert wanted.limit == 200 << 30
    (base_dir,) = _cache_paths(render("base"))
    with pytest.raises(SpecError, match="--cache-dir /models"):
        desired(node, {"workers": group}, cache_dir=Path(base_dir))


@needs_kubectl
def test_init_container_leaves_kserves_filled_folder_and_names_the_fix(tmp_path: Path) -> None:
    """On a node KServe's agent filled, /models is not the agent's: the init container changes
    nothing and says what to run (the guide quotes this line). chown, stat and ls are recorders."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"stat": "echo 0", "ls": "echo models", "chown": "exit 99"}
    for tool, body in fakes.items():
        (bin_dir / tool).write_text(f'#!/bin/sh\necho {tool} "$@" >> {calls}\n{body}\n')
        (bin_dir / tool).chmod(0o755)
    done = _run_init(_init_script(render("overlays/kserve")), KSERVE_NODE_FOLDER, bin_dir)
    assert done.returncode == 1, done
    assert done.stderr == (
        "cacheDir /models is not empty and belongs to uid 0, not the agent (65532): nothing was "
        "changed; if it is the cache, run chown -R 65532:65532 /models on the node\n"
    )
    assert "chown" not in calls.read_text()


@needs_kubectl
def test_migration_overlay_is_the_enforcing_one_in_warn_mode() -> None:
    """overlays/kserve is overlays/kserve/enforce plus --admission=warn on the controller and on the
    agent (which would otherwise refuse, against the same storageLimit, what the controller placed),
    nothing else, so switching to enforce after the checks changes those arguments."""
    warn, enforce = render("overlays/kserve"), render("overlays/kserve/enforce")
    assert _controller_args(warn).count(WARN) == 1
    assert _agent(warn)[1]["args"].count(WARN) == 1
    assert not [a for a in _controller_args(enforce) if a.startswith("--admission")]
    assert not [a for a in _agent(enforce)[1]["args"] if a.startswith("--admission")]
    without = copy.deepcopy(list(warn))
    for doc in without:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "modelcache-controller":
            doc["spec"]["template"]["spec"]["containers"][0]["args"].remove(WARN)
        if doc["kind"] == "DaemonSet" and doc["metadata"]["name"] == "modelcache-agent":
            doc["spec"]["template"]["spec"]["containers"][0]["args"].remove(WARN)
    assert without == list(enforce)


@needs_kubectl
@pytest.mark.parametrize("path", OVERLAYS)
def test_controller_args_parse(path: str) -> None:
    """The controller and the agent take every argument the overlay gives them."""
    docs = render(path)
    args = _controller_args(docs)
    parsed = controller_cli._parser().parse_args(args)
    assert parsed.admission == ("warn" if path == "overlays/kserve" else "enforce")
    (agent_args,) = [c["args"] for c in _agent(docs)[0]["spec"]["template"]["spec"]["containers"]]
    assert agent_args[0] == "agent"
    agent = agent_cli.build_parser().parse_args(agent_args[1:])
    assert agent.admission == parsed.admission


@needs_kubectl
@pytest.mark.parametrize("path", OVERLAYS)
def test_no_crds_and_no_kserve_names(path: str) -> None:
    """KServe's CRDs stay (its kserve-localmodel-crd chart); none of our objects takes the name of
    one of KServe's localmodel objects, which the guide deletes by name."""
    docs = render(path)
    assert not [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    ours = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not ours & KSERVE_LOCALMODEL_OBJECTS
    assert {"DaemonSet", "Deployment", "PodDisruptionBudget"} <= {d["kind"] for d in docs}
