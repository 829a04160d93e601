from pathlib import Path

import pytest

from localmodel.documents import load_documents, parse_text
from localmodel.errors import SpecError
from localmodel.kinds import LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE_GROUP, NODE
from localmodel.state.memory import MemoryState

GOOD = """\
apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelNodeGroup
metadata: {name: a100}
spec:
  storageLimit: 200Gi
  persistentVolumeSpec:
    hostPath: {path: /mnt/models}
    nodeAffinity:
      required:
        nodeSelectorTerms:
        - matchExpressions: [{key: gpu, operator: In, values: [a100]}]
---
# a comment-only document is fine
---
apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelCache
metadata: {name: llama}
spec: {sourceModelUri: "hf://meta-llama/Llama-3.1-8B", modelSize: 16Gi, nodeGroup: [a100]}
"""

NODES = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: n1, labels: {gpu: a100}}
- apiVersion: v1
  kind: Node
  metadata: {name: n2, labels: {gpu: h100}}
"""


def test_folder_of_documents(tmp_path: Path) -> None:
    (tmp_path / "caches.yaml").write_text(GOOD)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "nodes.yml").write_text(NODES)
    (tmp_path / ".hidden.yaml").write_text("not: [valid")
    (tmp_path / "README.md").write_text("ignored")
    docs = load_documents(tmp_path)
    assert [(d.kind.kind, d.name) for d in docs] == [
        ("LocalModelNodeGroup", "a100"),
        ("LocalModelCache", "llama"),
        ("Node", "n1"),
        ("Node", "n2"),
    ]
    assert docs[1].where.endswith("caches.yaml#3")
    assert docs[1].object["spec"]["nodeGroups"] == ["a100"]  # alias normalised
    assert docs[3].where.endswith("nodes.yml#1[1]")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [1, 2", "x.yaml: not valid YAML"),
        ("- 1\n- 2\n", "x.yaml#1: expected a Kubernetes object, got list"),
        (
            "kind: Deployment\napiVersion: apps/v1\nmetadata: {name: d}\n",
            "x.yaml#1: kind: unknown kind 'Deployment'",
        ),
        ("apiVersion: v1\nmetadata: {name: d}\n", "x.yaml#1: kind: is required"),
        (
            "apiVersion: serving.kserve.io/v1beta1\nkind: LocalModelCache\nmetadata: {name: x}\n",
            "x.yaml#1: apiVersion: expected 'serving.kserve.io/v1alpha1'",
        ),
        (
            GOOD.replace("16Gi", "16 gigs"),
            "x.yaml#3: spec.modelSize: '16 gigs' is not a Kubernetes quantity",
        ),
        (GOOD.replace("200Gi", "0"), "x.yaml#1: spec.storageLimit: '0' leaves no room"),
        (
            GOOD.replace('"hf://meta-llama/Llama-3.1-8B"', "hdfs://namenode/llama"),
            "x.yaml#3: spec.sourceModelUri: hdfs:// sources are not supported by the node cache",
        ),
        (
            GOOD.replace("metadata: {name: llama}", "metadata: {}"),
            "x.yaml#3: metadata.name: is required",
        ),
        (GOOD + "---\n" + GOOD.split("---")[0], "LocalModelNodeGroup 'a100' is defined twice"),
    ],
)
def test_bad_input_is_one_line_naming_document_and_field(text: str, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_text(text, where="x.yaml") if "twice" not in expected else _load(text)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def _load(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "x.yaml").write_text(text)
        load_documents(Path(d))


def test_kinds_can_be_restricted() -> None:
    with pytest.raises(SpecError, match="unknown kind 'Node'"):
        parse_text(NODES, where="n.yaml", kinds=["LocalModelCache", "LocalModelNodeGroup"])


def test_missing_path() -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_documents(Path("/nonexistent/caches.yaml"))


async def test_apply_is_all_or_nothing_and_keeps_status(tmp_path: Path) -> None:
    state = MemoryState(persist_to=tmp_path / "state.json")
    docs = parse_text(GOOD, where="x.yaml")
    for kind in (LOCAL_MODEL_NODE_GROUP, LOCAL_MODEL_CACHE):
        await state.apply(kind, [d.object for d in docs if d.kind == kind], prune=True)
    await state.patch_status(LOCAL_MODEL_CACHE, "llama", {"copies": {"available": 1}})
    # A broken edit is refused before anything is applied: the previous state stays whole.
    with pytest.raises(SpecError):
        parse_text(GOOD.replace("16Gi", "lots"), where="x.yaml")
    cache = await state.get(LOCAL_MODEL_CACHE, "llama")
    assert cache["spec"]["modelSize"] == "16Gi"
    # A good edit changes the spec, bumps generation and keeps the status.
    docs = parse_text(GOOD.replace("16Gi", "20Gi"), where="x.yaml")
    await state.apply(LOCAL_MODEL_CACHE, [d.object for d in docs if d.kind == LOCAL_MODEL_CACHE], prune=True)
    cache = await state.get(LOCAL_MODEL_CACHE, "llama")
    assert cache["spec"]["modelSize"] == "20Gi"
    assert cache["metadata"]["generation"] == 2
    assert cache["status"] == {"copies": {"available": 1}}
    # Removing the document removes the object; the persisted snapshot survives a restart.
    await state.apply(LOCAL_MODEL_CACHE, [], prune=True)
    restored = MemoryState(persist_to=tmp_path / "state.json")
    assert (await restored.list(LOCAL_MODEL_CACHE)).items == []
    assert [g["metadata"]["name"] for g in (await restored.list(LOCAL_MODEL_NODE_GROUP)).items] == ["a100"]
    assert (await restored.list(NODE)).items == []
