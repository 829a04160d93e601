"""The whole path on this machine, every component a real process where it is one in a cluster: the
Kubernetes API emulator, ``modelcache controller``, three ``modelcache agent`` processes (nodes
a100-1 and a100-2 of group a100, h100-1 of group h100) and a Hugging Face-compatible server.

A LocalModelCache for both groups is downloaded by every node and reports three available copies; a
pod annotated for a100 is given an affinity to the two a100 nodes by the controller's pod webhook
(its decision code, reading the emulator over HTTP); h100 is then removed from the cache, the h100
node deletes its copy and the a100 copies stay; ``modelcache serve --dry-run`` plans vLLM on one
node's copy."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from controller.labels import MODEL_LABEL_VALUE, model_label
from controller.webhook import Webhook
from localmodel.kinds import KINDS_BY_NAME, LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE, NODE
from localmodel.layout import storage_key
from localmodel.state.kube import KubeState
from tests.support.agents import cache_doc, eventually, group_doc, stop
from tests.support.hfhub import Hub
from tests.support.kubeapi import KubeAPI, kubeconfig
from tests.test_runtime_preflight import make_model

NODES = {"a100-1": "a100", "a100-2": "a100", "h100-1": "h100"}
URI = "hf://org/llama-tiny"


def node_obj(name: str, gpu: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"gpu": gpu}}}


async def spawn(*args: str, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    out = log.open("wb")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "modelcache", *args, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    finally:
        out.close()  # the child holds its own descriptor


async def test_cache_for_two_groups_end_to_end(hf_hub: Hub, kube_api: KubeAPI, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_model(repo, shards=2, tensor_bytes=200_000)
    hf_hub.add_repo("org/llama-tiny", {p.name: p.read_bytes() for p in repo.iterdir()})
    store = kube_api.store
    for name, gpu in NODES.items():
        await store.create(NODE, node_obj(name, gpu))
    # No hostPath on the groups: each agent of this test has its own --cache-dir on one machine, and an
    # agent refuses a group whose PV path differs from its --cache-dir.
    for group in ("a100", "h100"):
        await store.create(KINDS_BY_NAME["LocalModelNodeGroup"], group_doc(group, limit="100Mi"))
    config = kubeconfig(tmp_path / "kubeconfig", kube_api.url)
    env = dict(os.environ, HF_ENDPOINT=hf_hub.endpoint, HF_HUB_DISABLE_XET="1")
    logs = tmp_path / "logs"
    logs.mkdir()
    caches = {name: tmp_path / "nodes" / name / "cache" for name in NODES}
    procs: dict[str, asyncio.subprocess.Process] = {}
    state = KubeState.for_url(kube_api.url, watch_timeout=5)
    try:
        procs["controller"] = await spawn(
            "controller", "--kubeconfig", str(config), "--resync", "1", "--no-leader-elect",
            "--metrics-addr", "off",
            env=env, log=logs / "controller.log",
        )  # fmt: skip
        for name, cache in caches.items():
            procs[name] = await spawn(
                "agent", "--node-name", name, "--cache-dir", str(cache), "--kubeconfig", str(config),
                "--health-addr", "off", "--metrics-addr", "off", "--resync", "1", "--status-interval", "0.2",
                "--chunk-size", "1Mi", "--eviction-grace", "0",
                "--allow-private-sources",  # the test hub is on 127.0.0.1
                env=env, log=logs / f"{name}.log",
            )  # fmt: skip
        await store.create(LOCAL_MODEL_CACHE, cache_doc("llama", URI, "10Mi", ["a100", "h100"]))

        async def copies() -> dict[str, Any] | None:
            status = (await store.get(LOCAL_MODEL_CACHE, "llama")).get("status") or {}
            got = status.get("copies") or {}
            return got if got.get("available") == 3 else None

        def dump_logs() -> str:
            return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))

        try:
            got = await eventually(copies, timeout=30, what="three available copies")
        except AssertionError as e:
            cache_obj = await store.get(LOCAL_MODEL_CACHE, "llama")
            raise AssertionError(f"{e}\n{cache_obj}\n{dump_logs()}") from None
        assert got == {"available": 3, "total": 3, "failed": 0}
        key = storage_key(URI)
        for name, cache in caches.items():
            copy = cache / "models" / key
            for f in repo.iterdir():
                assert (copy / f.name).read_bytes() == f.read_bytes(), (name, f.name)
            lmn = await store.get(LOCAL_MODEL_NODE, name)
            assert lmn["status"]["modelStatus"] == {"llama": "ModelDownloaded"}

        # The controller marks the nodes holding the model; the pod webhook pins an a100 pod to them.
        async def labelled() -> bool:
            nodes = {n: (await store.get(NODE, n))["metadata"].get("labels") or {} for n in NODES}
            return all(labels.get(model_label(key)) == MODEL_LABEL_VALUE for labels in nodes.values())

        await eventually(labelled, timeout=15, what="model labels on the nodes")
        pod: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "llama-predictor",
                "namespace": "default",
                "annotations": {"serving.kserve.io/nodegroup": "a100"},
                "labels": {"internal.serving.kserve.io/localmodel": "llama"},
            },
            "spec": {"containers": [{"name": "kserve-container", "image": "x"}]},
        }
        verdict = await Webhook(state).review_pod({"operation": "CREATE", "object": pod})
        assert verdict.allowed, verdict.message
        (op,) = verdict.patch
        assert op["path"] == "/spec/affinity"
        terms = op["value"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        placed = [
            n
            for n, gpu in NODES.items()
            if any(_term_matches(t, n, {"gpu": gpu, model_label(key): MODEL_LABEL_VALUE}) for t in terms)
        ]
        assert placed == ["a100-1", "a100-2"]
        # A group-only pod (no cache named) is pinned to the group's nodes as well.
        pod["metadata"]["labels"] = {}
        verdict = await Webhook(state).review_pod({"operation": "CREATE", "object": pod})
        terms = verdict.patch[0]["value"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        assert [n for n, g in NODES.items() if any(_term_matches(t, n, {"gpu": g}) for t in terms)] == [
            "a100-1",
            "a100-2",
        ]

        # h100 leaves the cache: its node deletes its copy, the a100 copies stay.
        await store.patch(LOCAL_MODEL_CACHE, "llama", {"spec": {"nodeGroups": ["a100"]}})

        async def h100_gone() -> bool:
            status = (await store.get(LOCAL_MODEL_CACHE, "llama")).get("status") or {}
            return not (caches["h100-1"] / "models" / key).exists() and (status.get("copies") or {}) == {
                "available": 2,
                "total": 2,
                "failed": 0,
            }

        try:
            await eventually(h100_gone, timeout=30, what="the h100 copy deleted")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{dump_logs()}") from None
        for name in ("a100-1", "a100-2"):
            assert (caches[name] / "models" / key / "config.json").is_file()
        await eventually(
            lambda: _no_label(store, "h100-1", model_label(key)), timeout=15, what="h100 label removed"
        )
        for name, proc in procs.items():
            assert proc.returncode is None, f"{name} exited early\n{dump_logs()}"
    finally:
        await state.close()
        codes = {name: await stop(proc) for name, proc in procs.items()}
    assert set(codes.values()) == {0}, codes

    # The runtime plans vLLM on a node's copy.
    copy = caches["a100-1"] / "models" / storage_key(URI)
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", "serve", "--dry-run", "--model_dir", str(copy),
        "--gpus-per-node", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k not in ("TENSOR_PARALLEL_SIZE", "REQUEST_GPU_COUNT")},
    )  # fmt: skip
    out, err = await asyncio.wait_for(serve.communicate(), 60)
    assert serve.returncode == 0, err.decode()
    plan = json.loads(out)
    assert plan["command"][:3] == ["vllm", "serve", str(copy)]
    assert (plan["tensor_parallel_size"], plan["pipeline_parallel_size"], plan["nodes"]) == (1, 1, 1)
    assert plan["env"]["HF_HUB_OFFLINE"] == "1"


async def _no_label(store: Any, node: str, label: str) -> bool:
    labels = (await store.get(NODE, node))["metadata"].get("labels") or {}
    return label not in labels


def _term_matches(term: dict[str, Any], name: str, labels: dict[str, str]) -> bool:
    """A nodeSelectorTerm's matchExpressions (In, Exists) and matchFields (metadata.name In)."""
    for expr in term.get("matchExpressions") or []:
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "Exists" and value is None:
            return False
    for field in term.get("matchFields") or []:
        if field["key"] == "metadata.name" and name not in field["values"]:
            return False
    return True
