"""The CRDs are structural and complete, and custom resources validate against them as the API
server would: OpenAPI schema (jsonschema) plus the CEL rules (cel-python), transition rules included.

Unknown fields: a real API server prunes them, but `kubectl apply` asks for strict field validation
by default (kubectl >= 1.27), which rejects them. These tests take the strict view: a misspelt field
is an error the user sees at apply time.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from celpy.adapter import json_to_cel

from localmodel.documents import parse_text
from localmodel.errors import SpecError
from localmodel.folders import SYSTEM_FOLDERS, SYSTEM_PARENTS, cache_path_error
from localmodel.resources import CACHE_VOLUME_SOURCES, PV_SPEC_FIELDS

ROOT = Path(__file__).resolve().parent.parent
CRDS = {
    doc["spec"]["names"]["kind"]: doc
    for path in sorted((ROOT / "manifests" / "crds").glob("localmodel*.yaml"))
    for doc in [yaml.safe_load(path.read_text())]
}
DATA = Path(__file__).parent / "data" / "crs"


def schema_of(kind: str) -> dict[str, Any]:
    (version,) = CRDS[kind]["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 (Kubernetes flavour) to JSON Schema, strict about unknown fields."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "format"):
            continue
        if key == "properties":
            out[key] = {k: to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        elif key == "anyOf":
            out[key] = [to_jsonschema(v) for v in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def cel_errors(node: dict[str, Any], value: Any, old: Any, path: str) -> list[str]:
    """Evaluate every x-kubernetes-validations rule that applies to ``value`` (and its children)."""
    errors = []
    env = celpy.Environment()
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"] and old is None:
            continue  # a transition rule only runs on update
        activation = {"self": json_to_cel(value)}
        if old is not None:
            activation["oldSelf"] = json_to_cel(old)
        program = env.program(env.compile(rule["rule"]))
        if not bool(program.evaluate(activation)):
            errors.append(f"{path}: {rule['message']}")
    for key, sub in (node.get("properties") or {}).items():
        if isinstance(value, dict) and key in value:
            old_sub = old.get(key) if isinstance(old, dict) else None
            errors += cel_errors(sub, value[key], old_sub, f"{path}.{key}" if path else key)
    return errors


def validate(doc: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Errors as 'field.path: message', as the API server reports them."""
    schema = to_jsonschema(schema_of(doc["kind"]))
    errors = [
        ".".join(str(p) for p in e.absolute_path) + f": {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]
    if not errors:
        errors = cel_errors(schema_of(doc["kind"]), doc, old, "")
    return errors


# -- the CRDs themselves --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["LocalModelCache", "LocalModelNodeGroup", "LocalModelNode"])
def test_crd_is_v1_cluster_scoped_with_status(kind: str) -> None:
    crd = CRDS[kind]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.serving.kserve.io"
    assert crd["spec"]["scope"] == "Cluster" and crd["spec"]["group"] == "serving.kserve.io"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, sub in (node.get("properties") or {}).items():
        found += _walk(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += _walk(node[key], f"{path}[]")
    return found


@pytest.mark.parametrize("kind", ["LocalModelCache", "LocalModelNodeGroup", "LocalModelNode"])
def test_schema_is_structural(kind: str) -> None:
    for path, node in _walk(schema_of(kind)):
        typed = (
            "type" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
            or node.get("x-kubernetes-int-or-string")
        )
        assert typed, f"{kind}{path} has no type"


@pytest.mark.parametrize("kind", ["LocalModelCache", "LocalModelNodeGroup", "LocalModelNode"])
def test_printer_columns_point_at_fields(kind: str) -> None:
    (version,) = CRDS[kind]["spec"]["versions"]
    paths = {p for p, _ in _walk(schema_of(kind))}
    for column in version["additionalPrinterColumns"]:
        jp = column["jsonPath"]
        assert jp == ".metadata.creationTimestamp" or jp in paths, f"{kind}: {column['name']} -> {jp}"


def test_every_state_field_has_the_full_enum() -> None:
    node_states = {
        "NodeNotReady",
        "NodeDownloadPending",
        "NodeDownloading",
        "NodeDownloaded",
        "NodeDownloadError",
    }
    model_states = {"ModelDownloadPending", "ModelDownloading", "ModelDownloaded", "ModelDownloadError"}
    cache = schema_of("LocalModelCache")["properties"]["status"]["properties"]
    # "" too, as KServe's CRDs allow (a status KServe wrote stays valid under ours).
    assert set(cache["nodeStatus"]["additionalProperties"]["enum"]) == node_states | {""}
    node = schema_of("LocalModelNode")["properties"]["status"]["properties"]
    assert set(node["modelStatus"]["additionalProperties"]["enum"]) == model_states | {""}
    assert set(node["models"]["additionalProperties"]["properties"]["state"]["enum"]) == model_states


def test_printer_columns_as_promised() -> None:
    names = [c["name"] for c in CRDS["LocalModelCache"]["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert names[:3] == ["Available", "Total", "Size"] and "Age" in names
    assert "Models" in [
        c["name"] for c in CRDS["LocalModelNode"]["spec"]["versions"][0]["additionalPrinterColumns"]
    ]


def test_kustomization_lists_all_crds() -> None:
    k = yaml.safe_load((ROOT / "manifests" / "crds" / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(
        p.name for p in (ROOT / "manifests" / "crds").glob("localmodel*.yaml")
    )


# -- custom resources ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((DATA / "valid").glob("*.yaml")), ids=lambda p: p.stem)
def test_valid_resources_pass_schema_cel_and_parser(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert validate(doc) == []
    assert validate(doc, old=copy.deepcopy(doc)) == []
    parse_text(path.read_text(), where=path.name)  # the project's own parser agrees


INVALID = [
    ("missing-uri", "spec: 'sourceModelUri' is a required property", "spec.sourceModelUri"),
    ("empty-nodegroups", "spec.nodeGroups: [] should be non-empty", "spec.nodeGroups"),
    ("no-group-at-all", "spec: give exactly one of nodeGroups or its alias nodeGroup", "spec.nodeGroups"),
    ("both-group-spellings", "spec: give exactly one of nodeGroups or its alias nodeGroup", "spec.nodeGroup"),
    ("alias-not-names", "spec: nodeGroup must be a node group name or a non-empty list", "spec.nodeGroup"),
    ("bad-model-size", "spec.modelSize: '10Gbytes' does not match", "spec.modelSize"),
    ("unknown-node-state", "status.nodeStatus.n1: 'Downloaded' is not one of", "status.nodeStatus.n1"),
    ("misspelt-field", "spec: Additional properties are not allowed ('sourceModelURI' was unexpected)", None),
    ("group-missing-limit", "spec: 'storageLimit' is a required property", "spec.storageLimit"),
    (
        "bad-storage-key",
        "spec.localModels.0.storageKey: 'NOTHEX' does not match",
        "spec.localModels[0].storageKey",
    ),
    ("unknown-model-state", "status.modelStatus.b: 'Done' is not one of", "status.modelStatus.b"),
]


@pytest.mark.parametrize(("name", "schema_error", "parser_field"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_resources_fail_on_the_named_field(
    name: str, schema_error: str, parser_field: str | None
) -> None:
    text = (DATA / "invalid" / f"{name}.yaml").read_text()
    errors = validate(yaml.safe_load(text))
    assert any(e.startswith(schema_error) for e in errors), errors
    if parser_field is not None:
        with pytest.raises(SpecError) as info:
            parse_text(text, where=name)
        assert info.value.field == parser_field


def test_source_uri_is_immutable() -> None:
    old = yaml.safe_load((DATA / "valid" / "kserve-docs-localmodelcache.yaml").read_text())
    new = copy.deepcopy(old)
    new["spec"]["modelSize"] = "12Gi"
    assert validate(new, old=old) == []
    new["spec"]["sourceModelUri"] = "hf://meta-llama/meta-llama-3-70b-instruct"
    assert validate(new, old=old) == [
        "spec.sourceModelUri: sourceModelUri is immutable; create a new LocalModelCache for another model"
    ]


def test_kubectl_kustomize_renders_the_crds() -> None:
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "manifests" / "crds")], capture_output=True, text=True, check=True
    )
    kinds = sorted(d["spec"]["names"]["kind"] for d in yaml.safe_load_all(out.stdout))
    assert kinds == ["LocalModelCache", "LocalModelNamespaceCache", "LocalModelNode", "LocalModelNodeGroup"]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.yaml")), ids=lambda p: p.parent.name)
def test_examples_pass_schema_cel_and_parser(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        errors = validate(doc)
        if path.parent.name == "standalone":  # the user's own machine: /tmp is allowed there
            errors = [e for e in errors if "system folder" not in e]
            pv = doc.get("spec", {}).get("persistentVolumeSpec", {})
            for source in CACHE_VOLUME_SOURCES:
                if source in pv:
                    assert cache_path_error(pv[source]["path"], cluster=False) is None
        assert errors == [], doc["metadata"]["name"]
    parse_text(path.read_text(), where=path.name)


# -- what a node group may point at (issue 20 §2): the CEL rules and the parser agree -----------------

PATHS = [
    "/",
    "/var",
    "/var/lib",
    "/var/lib/modelcache",
    "/models",
    "/mnt/models",
    "/mnt/disks/nvme0/cache",
    "/home/ml/models",
    "/tmp/cache",
    "/lib",
    "/lib64",
    "/lib64/x",
    "/library",
    "/models/../etc",
    "/models/./x",
    "/models//x",
    "/models/",
    "models",
    "",
    *(p for f in SYSTEM_FOLDERS for p in (f, f + "/x", f + "x")),
    *(p for f in SYSTEM_PARENTS for p in (f, f + "/modelcache")),
    # What the attack on issue 20 found admitted: container runtimes', CNI's, logs, scratch, snaps.
    "/var/lib/containers",
    "/var/lib/crio",
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
    "/srv/modelcache",
    "/mnt/disks/ssd0",
    "/models\nx",
    "/models\x00x",
    "/models\x7f",
    "/models\tx",
]


def _group(pv: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNodeGroup",
        "metadata": {"name": "g"},
        "spec": {"storageLimit": "1Ti", "persistentVolumeSpec": pv},
    }


@pytest.mark.parametrize("source", ["hostPath", "local"])
@pytest.mark.parametrize("path", PATHS)
def test_group_path_rules_agree_with_the_parser(source: str, path: str) -> None:
    """The CRD takes every path KServe's CRD takes (issue 16: applying ours over KServe's never makes a
    stored group invalid); the group webhook refuses exactly what the parser refuses, naming the field:
    one list of system folders."""
    from controller.admission import validate_group

    doc = _group({source: {"path": path}})
    assert validate(doc) == []
    verdict = validate_group("CREATE", doc, None)
    parser = cache_path_error(path)
    assert verdict.allowed == (parser is None), (verdict, parser)
    if not verdict.allowed:
        assert verdict.message.startswith(f"spec.persistentVolumeSpec.{source}.path: "), verdict
        assert "\n" not in verdict.message
    # The parser itself (standalone mode too) leaves scratch folders to the cluster's checks.
    if cache_path_error(path, cluster=False) is not None:
        with pytest.raises(SpecError) as info:
            parse_text(yaml.safe_dump(doc), where="g")
        assert info.value.field == f"spec.persistentVolumeSpec.{source}.path"


def test_group_path_rules_are_the_webhook_s_not_the_crd_s() -> None:
    """The CRD carries no rule on the paths (KServe's has none); the one list lives in
    localmodel/folders.py and the webhook, the agent and the serving-volume policy read it."""
    pv = schema_of("LocalModelNodeGroup")["properties"]["spec"]["properties"]["persistentVolumeSpec"]
    assert "x-kubernetes-validations" not in pv
    for source in CACHE_VOLUME_SOURCES:
        assert set(pv["properties"][source]["properties"]["path"]) == {"type"}
    for allowed in ("/mnt/disks/ssd0", "/srv/modelcache", "/models", "/var/lib/modelcache"):
        assert cache_path_error(allowed) is None, allowed


def test_group_may_name_only_a_hostpath_or_local_folder() -> None:
    from controller.admission import validate_group

    def refused(doc: dict[str, Any]) -> str:
        assert validate(doc) == [], "KServe's CRD takes it, so ours does"
        verdict = validate_group("CREATE", doc, None)
        assert not verdict.allowed and verdict.code == 422
        return verdict.message

    nfs = _group({"nfs": {"server": "evil", "path": "/"}})
    assert refused(nfs).startswith("spec.persistentVolumeSpec")
    both = _group({"hostPath": {"path": "/a"}, "local": {"path": "/a"}})
    assert refused(both).startswith("spec.persistentVolumeSpec")
    # No folder at all (the attack: {} and hostPath: {} made no PV, silently).
    empty: dict[str, Any]
    for empty in ({}, {"hostPath": {"path": ""}}, {"local": {"path": ""}}):
        assert refused(_group(empty)), empty
    # Every PersistentVolumeSpec field is declared: an unknown source is an unknown field.
    odd = _group({"futureVolume": {"path": "/"}})
    assert any("'futureVolume' was unexpected" in e for e in validate(odd))
    for doc in (nfs, both, odd):
        with pytest.raises(SpecError):
            parse_text(yaml.safe_dump(doc), where="g")
    declared = set(
        schema_of("LocalModelNodeGroup")["properties"]["spec"]["properties"]["persistentVolumeSpec"][
            "properties"
        ]
    )
    assert PV_SPEC_FIELDS | set(CACHE_VOLUME_SOURCES) <= declared
