"""KServe's LocalModelNamespaceCache (v0.18+) end to end, every component a real process where it
is one in a cluster: the Kubernetes API emulator serving our CRDs (pruning mode: what the schema
does not keep is dropped, as an API server does), ``modelcache controller``, one ``modelcache
agent`` and a Hugging Face-compatible server.

Three caches of one name on one node group: the cluster cache ``llama`` and the namespace cache
``team-a/llama`` of the same model, and ``team-b/llama`` of another. As KServe's controller writes
them, the node's LocalModelNode lists three entries told apart by namespace, and the agent keys
their state ``llama``, ``team-a/llama`` and ``team-b/llama``
(pkg/apis/serving/v1alpha1/local_model_node_types.go:41-49,
pkg/controller/v1alpha1/localmodelnode/controller.go:355-363 at KServe v0.20). The model both
``llama`` caches name is fetched once. The pod webhook serves a pod KServe labelled for a namespace
cache in that namespace and refuses it elsewhere; deleting a namespace cache takes its finalizer
(KServe's ``localmodelnamespacecache.kserve.io/finalizer``) off once no node lists it, and its
folder goes only where no other cache of that model remains."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio

from controller.labels import model_label
from controller.webhook import Webhook
from localmodel.errors import NotFound
from localmodel.kinds import (
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE,
    NODE,
)
from localmodel.layout import storage_key
from localmodel.resources import (
    FINALIZER,
    LOCALMODEL_LABEL,
    LOCALMODEL_NAMESPACE_LABEL,
    NAMESPACE_CACHE_FINALIZER,
)
from localmodel.state.kube import KubeState
from tests.support.agents import cache_doc, eventually, group_doc, stop
from tests.support.hfhub import Hub
from tests.support.kubeapi import KubeAPI, kubeconfig, load_crds
from tests.test_e2e import node_obj, spawn

ROOT = Path(__file__).resolve().parent.parent
SHARED = "hf://org/llama-shared"  # the cluster cache's and team-a's
OTHER = "hf://org/llama-team-b"


def namespace_cache_doc(name: str, namespace: str, uri: str, size: str, groups: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNamespaceCache",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"sourceModelUri": uri, "modelSize": size, "nodeGroups": groups},
    }


def pod(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "llama-predictor", "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "kserve-container", "image": "x"}]},
    }


@pytest_asyncio.fixture
async def crd_api() -> AsyncIterator[KubeAPI]:
    api = KubeAPI(crds=load_crds(ROOT / "manifests" / "crds"))
    await api.start()
    try:
        yield api
    finally:
        await api.close()


async def test_namespace_caches_beside_a_cluster_cache(hf_hub: Hub, crd_api: KubeAPI, tmp_path: Path) -> None:
    hf_hub.add_repo("org/llama-shared", {"config.json": b'{"a": 1}', "model.bin": b"s" * 300_000})
    hf_hub.add_repo("org/llama-team-b", {"config.json": b'{"b": 2}', "model.bin": b"b" * 200_000})
    api = crd_api
    await api.create(node_obj("n1", "g"))
    await api.create(group_doc("g", limit="100Mi"))
    config = kubeconfig(tmp_path / "kubeconfig", api.url)
    env = dict(os.environ, HF_ENDPOINT=hf_hub.endpoint, HF_HUB_DISABLE_XET="1")
    logs = tmp_path / "logs"
    logs.mkdir()
    cache_dir = tmp_path / "n1" / "cache"
    procs: dict[str, asyncio.subprocess.Process] = {}
    state = KubeState.for_url(api.url, watch_timeout=5)

    def dump_logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))

    async def settled(check: Any, what: str, timeout: float = 40) -> Any:
        try:
            return await eventually(check, timeout=timeout, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{dump_logs()}") from None

    try:
        procs["controller"] = await spawn(
            "controller", "--kubeconfig", str(config), "--resync", "1", "--no-leader-elect",
            "--metrics-addr", "off",
            env=env, log=logs / "controller.log",
        )  # fmt: skip
        procs["n1"] = await spawn(
            "agent", "--node-name", "n1", "--cache-dir", str(cache_dir), "--kubeconfig", str(config),
            "--health-addr", "off", "--metrics-addr", "off", "--resync", "1", "--status-interval", "0.2",
            "--chunk-size", "1Mi", "--eviction-grace", "0",
            "--allow-private-sources",  # the test hub is on 127.0.0.1
            env=env, log=logs / "n1.log",
        )  # fmt: skip
        await api.create(cache_doc("llama", SHARED, "1Mi", ["g"]))
        await api.create(namespace_cache_doc("llama", "team-a", SHARED, "1Mi", ["g"]))
        await api.create(namespace_cache_doc("llama", "team-b", OTHER, "1Mi", ["g"]))

        async def all_downloaded() -> dict[str, str] | None:
            try:
                lmn = await state.get(LOCAL_MODEL_NODE, "n1")
            except NotFound:
                return None  # the controller has not written it yet
            got = (lmn.get("status") or {}).get("modelStatus") or {}
            return got if len(got) == 3 and set(got.values()) == {"ModelDownloaded"} else None

        status = await settled(all_downloaded, "three models downloaded on n1")
        assert set(status) == {"llama", "team-a/llama", "team-b/llama"}
        lmn = await state.get(LOCAL_MODEL_NODE, "n1")
        entries = {
            (m.get("namespace"), m["modelName"], m["sourceModelUri"]) for m in lmn["spec"]["localModels"]
        }
        assert entries == {(None, "llama", SHARED), ("team-a", "llama", SHARED), ("team-b", "llama", OTHER)}
        # One folder per model: the two caches of SHARED share it.
        folders = sorted(p.name for p in (cache_dir / "models").iterdir() if not p.name.startswith("."))
        assert folders == sorted([storage_key(SHARED), storage_key(OTHER)])
        assert (cache_dir / "models" / storage_key(OTHER) / "model.bin").read_bytes() == b"b" * 200_000

        async def copies(namespace: str | None) -> bool:
            if namespace is None:
                obj = await state.get(LOCAL_MODEL_CACHE, "llama")
            else:
                obj = await state.get(LOCAL_MODEL_NAMESPACE_CACHE, "llama", namespace=namespace)
            got = (obj.get("status") or {}).get("copies")
            return got == {"available": 1, "total": 1, "failed": 0}

        for ns in (None, "team-a", "team-b"):
            await settled(lambda ns=ns: copies(ns), f"one copy of {ns}/llama")
        team_a = await state.get(LOCAL_MODEL_NAMESPACE_CACHE, "llama", namespace="team-a")
        assert team_a["metadata"]["finalizers"] == [NAMESPACE_CACHE_FINALIZER]
        assert team_a["status"]["nodeStatus"] == {"n1": "NodeDownloaded"}
        assert (await state.get(LOCAL_MODEL_CACHE, "llama"))["metadata"]["finalizers"] == [FINALIZER]
        # Its Events live in its namespace and name it there.
        placed = [
            e
            for e in await api.events(reason="Placed", name="llama")
            if (e.get("involvedObject") or {}).get("kind") == "LocalModelNamespaceCache"
        ]
        assert {(e["metadata"]["namespace"], e["involvedObject"]["namespace"]) for e in placed} == {
            ("team-a", "team-a"),
            ("team-b", "team-b"),
        }

        # A pod KServe labelled for team-b's cache is served there, on a node holding team-b's model.
        async def labelled() -> bool:
            labels = (await state.get(NODE, "n1"))["metadata"].get("labels") or {}
            return model_label(storage_key(OTHER)) in labels and model_label(storage_key(SHARED)) in labels

        await settled(labelled, "model labels on n1")
        webhook = Webhook(state)
        ns_labels = {LOCALMODEL_LABEL: "llama", LOCALMODEL_NAMESPACE_LABEL: "team-b"}
        verdict = await webhook.review_pod(
            {"operation": "CREATE", "namespace": "team-b", "object": pod("team-b", ns_labels)}
        )
        assert verdict.allowed, verdict.message
        terms = verdict.patch[0]["value"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        assert all(
            {"key": model_label(storage_key(OTHER)), "operator": "In", "values": ["ready"]}
            in t["matchExpressions"]
            for t in terms
        )
        # ... and refused in another namespace.
        verdict = await webhook.review_pod(
            {"operation": "CREATE", "namespace": "team-a", "object": pod("team-a", ns_labels)}
        )
        assert not verdict.allowed
        assert verdict.message.startswith(
            "LocalModelNamespaceCache 'team-b/llama' serves namespace 'team-b' only"
        )

        # team-b's cache goes: its entry leaves the node, its folder is deleted, its finalizer comes off.
        await state.delete(LOCAL_MODEL_NAMESPACE_CACHE, "llama", namespace="team-b")

        async def team_b_gone() -> bool:
            listing = await state.list(LOCAL_MODEL_NAMESPACE_CACHE, namespace="team-b")
            lmn = await state.get(LOCAL_MODEL_NODE, "n1")
            keys = set((lmn.get("status") or {}).get("modelStatus") or {})
            return (
                not listing.items
                and keys == {"llama", "team-a/llama"}
                and not (cache_dir / "models" / storage_key(OTHER)).exists()
            )

        await settled(team_b_gone, "team-b/llama deleted everywhere")
        # team-a's goes too: the cluster cache still holds the shared model, so its folder stays.
        await state.delete(LOCAL_MODEL_NAMESPACE_CACHE, "llama", namespace="team-a")

        async def team_a_gone() -> bool:
            lmn = await state.get(LOCAL_MODEL_NODE, "n1")
            return not (await state.list(LOCAL_MODEL_NAMESPACE_CACHE)).items and set(
                (lmn.get("status") or {}).get("modelStatus") or {}
            ) == {"llama"}

        await settled(team_a_gone, "team-a/llama deleted")
        await asyncio.sleep(1.5)  # an agent pass after the spec changed: the shared folder stays
        assert (cache_dir / "models" / storage_key(SHARED) / "model.bin").read_bytes() == b"s" * 300_000
        lmn = await state.get(LOCAL_MODEL_NODE, "n1")
        assert lmn["status"]["modelStatus"] == {"llama": "ModelDownloaded"}
        for name, proc in procs.items():
            assert proc.returncode is None, f"{name} exited early\n{dump_logs()}"
    finally:
        await state.close()
        codes = {name: await stop(proc) for name, proc in procs.items()}
    assert set(codes.values()) == {0}, codes
