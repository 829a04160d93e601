"""A migration played end to end (issue 16, "Done when"): a cluster as KServe v0.20's localmodel
controller and agent left it, then our controller and agents take over, every component a real
process where it is one in a cluster.

The Kubernetes API emulator serves KServe's own CRDs (tests/data/kserve-crds/) in pruning mode, as an
API server does once the kserve overlay is applied over a KServe install (our CRDs are not applied).
Seeded as KServe leaves them:

- two node groups ``g1`` and ``g2`` (one node each), whose ``persistentVolumeSpec.local.path`` is the
  node's folder (``/models`` in a cluster; here one folder per node under /var/lib, each the
  ``--cache-dir`` of its node's agent);
- the LocalModelCache ``llama`` on both groups, the LocalModelNamespaceCache ``team-a/coder`` on
  ``g1``, and the LocalModelCache ``private`` (a gated repo) on ``g1`` whose ``serviceAccountName``
  names a ServiceAccount in KServe's job namespace ``kserve-localmodel-jobs`` listing a Secret with
  ``HF_TOKEN`` (pkg/controller/v1alpha1/localmodelnode/controller.go: the download Job runs there;
  hf/hf_secret.go:23-46), each with KServe's status (copies, nodeStatus, inferenceServices) and
  KServe's finalizer;
- LocalModelNodes with KServe's spec (entries told apart by namespace, no field of ours) and its
  status (``modelStatus`` keyed ``name`` or ``namespace/name``, local_model_node_types.go:41-49);
- the serving PVs and PVCs KServe's controller makes: claim ``<cache>-<group>`` in the service's
  namespace, bound to a PV whose spec is the group's, so its root is the node folder itself, with no
  label of ours (pkg/controller/v1alpha1/localmodel/reconcilers/utils.go:603-624);
- InferenceServices labelled by KServe's defaulter (inference_service_defaults.go:586) and their
  running predictor pods as KServe's pod mutator leaves them: the claim mounted at /mnt/models with
  ``subPath: models/<key>`` (storage_initializer_injector.go:744-746);
- folders filled as KServe's agent fills them: ``models/<key>/`` with the files and huggingface_hub's
  ``.cache/huggingface/`` (tests/test_adoption.py:fill_like_kserve) for ``llama`` on both nodes and
  ``team-a/coder`` on n1; ``private`` was still downloading (its folder absent: KServe's Job had
  failed for want of the token's secret, say).

Then ``modelcache controller --admission warn`` (the kserve overlay's) and one ``modelcache agent``
per node take over, and the test checks: not one file of a complete model is fetched again (GETs of
its files at the hub: zero), ``private`` is fetched once with its cache's token, the namespace cache
is held and its pods are served, every predictor pod is admitted by our pod webhook as KServe
admitted it (only a placement added, KServe's mount kept), and once converged no write repeats:
every write request at the API server is counted over a window of WINDOW seconds (about ten
controller resyncs and a hundred agent status passes; the issue asks a minute, shortened to keep
the test near a minute and a half).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.labels import model_label
from controller.reconcile import Controller
from controller.serving import MANAGED_BY, MANAGED_BY_LABEL
from controller.webhook import Webhook
from localmodel.errors import NotFound
from localmodel.kinds import (
    INFERENCE_SERVICE,
    KINDS_BY_NAME,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE,
    NODE,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    POD,
)
from localmodel.layout import storage_key
from localmodel.resources import (
    FINALIZER,
    LOCALMODEL_LABEL,
    LOCALMODEL_NAMESPACE_LABEL,
    NAMESPACE_CACHE_FINALIZER,
)
from localmodel.state.base import ClusterState
from localmodel.state.kube import KubeState
from tests import test_controller_reconcile as base
from tests.support.agents import eventually, stop
from tests.support.hfhub import Hub
from tests.support.kubeapi import KubeAPI, kubeconfig, load_crds
from tests.test_adoption import fill_like_kserve
from tests.test_controller_reconcile import setup_two_groups
from tests.test_controller_serving import exists
from tests.test_controller_serving import pod as plain_pod
from tests.test_credentials import account, secret
from tests.test_e2e import spawn
from tests.test_kserve_users import kserve_claim

state = base.state  # the fixture: the embedded backend and the API emulator

KSERVE_CRDS = Path(__file__).parent / "data" / "kserve-crds"
RESYNC = 2.0  # the controller's full reconcile period (seconds)
SETTLE = 6.0  # after everything is downloaded and labelled, before counting
WINDOW = 25.0  # seconds of writes counted once converged

LLAMA = "hf://org/llama"
CODER = "hf://org/coder"
PRIVATE = "hf://org/private"
TOKEN = "hf_migrationTOKEN789"
LLAMA_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
}
CODER_FILES = {"config.json": b'{"model_type": "coder"}', "model.safetensors": b"c" * 9000}
PRIVATE_FILES = {"config.json": b'{"model_type": "secret"}', "w.bin": b"p" * 7000}


def node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kserve/localmodel": name}},
    }


def node_group(name: str, node_name: str, folder: Path) -> dict[str, Any]:
    """A group as KServe users write one (manifests/overlays/kserve/nodegroup-example.yaml)."""
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNodeGroup",
        "metadata": {"name": name},
        "spec": {
            "storageLimit": "1Gi",
            "persistentVolumeSpec": {
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Filesystem",
                "capacity": {"storage": "1Gi"},
                "local": {"path": str(folder)},
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "standard",
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "kserve/localmodel", "operator": "In", "values": [node_name]}
                                ]
                            }
                        ]
                    }
                },
            },
            "persistentVolumeClaimSpec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
                "storageClassName": "standard",
                "volumeMode": "Filesystem",
            },
        },
    }


def cache(
    name: str, uri: str, groups: list[str], namespace: str | None = None, **extra: Any
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["finalizers"] = [NAMESPACE_CACHE_FINALIZER if namespace else FINALIZER]
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNamespaceCache" if namespace else "LocalModelCache",
        "metadata": meta,
        "spec": {"sourceModelUri": uri, "modelSize": "10Mi", "nodeGroups": groups, **extra},
    }


def local_model_node(name: str, models: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNode",
        "metadata": {"name": name},
        "spec": {"localModels": models},
    }


def serving_claim(cache_name: str, group: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """The PV and PVC KServe's controller makes for a cache and group in a service's namespace."""
    name = f"{cache_name}-{group['metadata']['name']}"
    pv_name = f"{name}-{namespace}"
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name},
        "spec": group["spec"]["persistentVolumeSpec"],
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": group["spec"]["persistentVolumeClaimSpec"] | {"volumeName": pv_name},
    }
    return [pv, pvc]


def labels_for(cache_name: str, namespace: str | None) -> dict[str, str]:
    labels = {LOCALMODEL_LABEL: cache_name}
    if namespace is not None:
        labels[LOCALMODEL_NAMESPACE_LABEL] = namespace
    return labels


def isvc(
    name: str, namespace: str, uri: str, cache_name: str, group: str, cache_ns: str | None
) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels_for(cache_name, cache_ns),
            "annotations": {"serving.kserve.io/nodegroup": group},
        },
        "spec": {"predictor": {"model": {"storageUri": uri}}},
    }


def predictor(
    name: str, namespace: str, uri: str, cache_name: str, group: str, node_name: str, cache_ns: str | None
) -> dict[str, Any]:
    """A running predictor pod as KServe's pod mutator left it for a cached model."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-predictor-0",
            "namespace": namespace,
            "labels": labels_for(cache_name, cache_ns) | {"serving.kserve.io/inferenceservice": name},
            "annotations": {"serving.kserve.io/nodegroup": group},
        },
        "spec": {
            "nodeName": node_name,
            "volumes": [
                {"name": "kserve-pvc-source", "persistentVolumeClaim": {"claimName": f"{cache_name}-{group}"}}
            ],
            "containers": [
                {
                    "name": "kserve-container",
                    "image": "kserve/huggingfaceserver",
                    "volumeMounts": [
                        {
                            "name": "kserve-pvc-source",
                            "mountPath": "/mnt/models",
                            "subPath": f"models/{storage_key(uri)}",
                            "readOnly": True,
                        }
                    ],
                }
            ],
        },
        "status": {"phase": "Running"},
    }


def resolves(hub: Hub, repo: str) -> list[str]:
    """The hub's file GETs of ``repo`` (any revision): what was fetched."""
    return [r.path for r in hub.requests if r.method == "GET" and r.path.startswith(f"/{repo}/resolve/")]


@pytest.fixture
def node_folders() -> Iterator[Path]:
    """Where the nodes' folders live: not under /tmp, which our controller refuses as a node
    group's folder in a cluster (localmodel/folders.py SCRATCH_FOLDERS), as KServe's /models is not."""
    root = Path(tempfile.mkdtemp(prefix="modelcache-migration-", dir="/var/lib"))
    try:
        yield root
    finally:
        shutil.rmtree(root)


async def test_a_kserve_cluster_migrates_without_refetching_and_converges(
    hf_hub: Hub, node_folders: Path, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/llama", LLAMA_FILES)
    hf_hub.add_repo("org/coder", CODER_FILES)
    hf_hub.add_repo("org/private", PRIVATE_FILES, token=TOKEN)
    folders = {n: node_folders / n for n in ("n1", "n2")}
    for n, folder in folders.items():
        fill_like_kserve(folder / "models" / storage_key(LLAMA), hf_hub, "org/llama", LLAMA_FILES)
        folder.mkdir(parents=True, exist_ok=True)
    fill_like_kserve(folders["n1"] / "models" / storage_key(CODER), hf_hub, "org/coder", CODER_FILES)
    groups = {"g1": node_group("g1", "n1", folders["n1"]), "g2": node_group("g2", "n2", folders["n2"])}

    api = KubeAPI(crds=load_crds(KSERVE_CRDS))
    await api.start()
    state = KubeState.for_url(api.url, watch_timeout=5)
    procs: dict[str, asyncio.subprocess.Process] = {}
    logs = tmp_path / "logs"
    logs.mkdir()

    def dump_logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))

    async def settled(check: Any, what: str, timeout: float = 60) -> Any:
        try:
            return await eventually(check, timeout=timeout, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{dump_logs()}") from None

    try:
        # -- the cluster as KServe left it ---------------------------------------------------------
        for obj in (node("n1"), node("n2")):
            await api.store.create(NODE, obj)
        for g in groups.values():
            await api.create(g)
        seeded = [
            (cache("llama", LLAMA, ["g1", "g2"]), {"n1": "NodeDownloaded", "n2": "NodeDownloaded"}, 2),
            (cache("coder", CODER, ["g1"], namespace="team-a"), {"n1": "NodeDownloaded"}, 1),
            (cache("private", PRIVATE, ["g1"], serviceAccountName="hf-sa"), {"n1": "NodeDownloading"}, 0),
        ]
        for obj, node_status, available in seeded:
            await api.create(obj)
            kind = LOCAL_MODEL_NAMESPACE_CACHE if obj["metadata"].get("namespace") else LOCAL_MODEL_CACHE
            await api.store.patch_status(
                kind,
                obj["metadata"]["name"],
                {
                    "copies": {"available": available, "total": len(node_status), "failed": 0},
                    "nodeStatus": node_status,
                },
                namespace=obj["metadata"].get("namespace"),
            )
        llama_entry = {"modelName": "llama", "sourceModelUri": LLAMA}
        await api.create(
            local_model_node(
                "n1",
                [
                    llama_entry,
                    {"modelName": "coder", "namespace": "team-a", "sourceModelUri": CODER},
                    {"modelName": "private", "sourceModelUri": PRIVATE, "serviceAccountName": "hf-sa"},
                ],
            )
        )
        await api.store.patch_status(
            LOCAL_MODEL_NODE,
            "n1",
            {
                "modelStatus": {
                    "llama": "ModelDownloaded",
                    "team-a/coder": "ModelDownloaded",
                    "private": "ModelDownloading",
                }
            },
        )
        await api.create(local_model_node("n2", [llama_entry]))
        await api.store.patch_status(LOCAL_MODEL_NODE, "n2", {"modelStatus": {"llama": "ModelDownloaded"}})
        # The private model's credentials, in the job namespace only.
        for obj in (account("hf-sa", ["hf-token"]), secret("hf-token", {"HF_TOKEN": TOKEN})):
            await api.store.create(KINDS_BY_NAME[obj["kind"]], obj)
        # Services and their running pods, and the serving claims KServe made for them.
        served = [
            ("chat", "team-a", LLAMA, "llama", "g1", "n1", None),
            ("chat2", "team-b", LLAMA, "llama", "g2", "n2", None),
            ("code", "team-a", CODER, "coder", "g1", "n1", "team-a"),
        ]
        pods = []
        for name, ns, uri, cache_name, group, node_name, cache_ns in served:
            await api.store.create(INFERENCE_SERVICE, isvc(name, ns, uri, cache_name, group, cache_ns))
            pod = predictor(name, ns, uri, cache_name, group, node_name, cache_ns)
            await api.store.create(POD, pod)
            pods.append(pod)
            pv, pvc = serving_claim(cache_name, groups[group], ns)
            await api.store.create(PERSISTENT_VOLUME, pv)
            await api.store.create(PERSISTENT_VOLUME_CLAIM, pvc)
        kserve_volumes = [v["metadata"]["name"] for v in (await api.store.list(PERSISTENT_VOLUME)).items]
        kserve_claims = {
            (c["metadata"]["namespace"], c["metadata"]["name"]): c["spec"]
            for c in (await api.store.list(PERSISTENT_VOLUME_CLAIM)).items
        }

        # -- our controller and agents take over --------------------------------------------------
        config = kubeconfig(tmp_path / "kubeconfig", api.url)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "HF_", "HUGGING_FACE")) and k != "KUBECONFIG"
        }
        env |= {"HF_ENDPOINT": hf_hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HOME": str(tmp_path / "home")}
        procs["controller"] = await spawn(
            "controller", "--kubeconfig", str(config), "--resync", str(RESYNC), "--no-leader-elect",
            "--metrics-addr", "off", "--admission", "warn",
            env=env, log=logs / "controller.log",
        )  # fmt: skip
        for n, folder in folders.items():
            procs[n] = await spawn(
                "agent", "--node-name", n, "--cache-dir", str(folder), "--kubeconfig", str(config),
                "--health-addr", "off", "--metrics-addr", "off", "--resync", "1", "--status-interval", "0.2",
                "--admission", "warn",
                "--allow-private-sources",  # the test hub is on 127.0.0.1
                env=env, log=logs / f"{n}.log",
            )  # fmt: skip

        async def downloaded(name: str, want: dict[str, str]) -> bool:
            try:
                lmn = await state.get(LOCAL_MODEL_NODE, name)
            except NotFound:
                return False
            return ((lmn.get("status") or {}).get("modelStatus") or {}) == want

        await settled(
            lambda: downloaded(
                "n1",
                {"llama": "ModelDownloaded", "team-a/coder": "ModelDownloaded", "private": "ModelDownloaded"},
            ),
            "n1 to hold its three models",
        )
        await settled(lambda: downloaded("n2", {"llama": "ModelDownloaded"}), "n2 to hold llama")

        async def labelled() -> bool:
            want = {
                "n1": {storage_key(u) for u in (LLAMA, CODER, PRIVATE)},
                "n2": {storage_key(LLAMA)},
            }
            for n, keys in want.items():
                labels = (await state.get(NODE, n))["metadata"].get("labels") or {}
                if not all(labels.get(model_label(k)) == "ready" for k in keys):
                    return False
            return True

        await settled(labelled, "model labels on both nodes")

        async def copies() -> bool:
            got = [
                ((await state.get(kind, name, namespace=ns)).get("status") or {}).get("copies")
                for kind, name, ns in (
                    (LOCAL_MODEL_CACHE, "llama", None),
                    (LOCAL_MODEL_NAMESPACE_CACHE, "coder", "team-a"),
                    (LOCAL_MODEL_CACHE, "private", None),
                )
            ]
            return got == [
                {"available": 2, "total": 2, "failed": 0},
                {"available": 1, "total": 1, "failed": 0},
                {"available": 1, "total": 1, "failed": 0},
            ]

        await settled(copies, "every cache's copies")

        # Not one file of a complete model fetched again; the private one once each, with its token.
        assert resolves(hf_hub, "org/llama") == []
        assert resolves(hf_hub, "org/coder") == []
        fetched = [
            r for r in hf_hub.requests if r.method == "GET" and r.path.startswith("/org/private/resolve/")
        ]
        assert sorted(r.path.rsplit("/", 1)[-1] for r in fetched) == sorted(PRIVATE_FILES)
        assert all(r.authorized for r in fetched)
        for n in folders:
            llama = folders[n] / "models" / storage_key(LLAMA)
            assert {p: (llama / p).read_bytes() for p in LLAMA_FILES} == LLAMA_FILES
            assert (llama / ".cache" / "huggingface" / ".gitignore").read_text() == "*"  # theirs, kept
        private = folders["n1"] / "models" / storage_key(PRIVATE)
        assert {p: (private / p).read_bytes() for p in PRIVATE_FILES} == PRIVATE_FILES
        # The namespace cache keeps KServe's finalizer and is held where KServe held it.
        coder = await state.get(LOCAL_MODEL_NAMESPACE_CACHE, "coder", namespace="team-a")
        assert coder["metadata"]["finalizers"] == [NAMESPACE_CACHE_FINALIZER]
        assert coder["status"]["nodeStatus"] == {"n1": "NodeDownloaded"}
        # KServe's serving claims are left as KServe made them, and serve: no pair of ours beside them.
        for (ns, name), spec in kserve_claims.items():
            claim = await state.get(PERSISTENT_VOLUME_CLAIM, name, namespace=ns)
            assert claim["spec"] == spec and "labels" not in claim["metadata"], (ns, name)
        assert {c["metadata"]["name"] for c in (await state.list(PERSISTENT_VOLUME_CLAIM)).items} == {
            name for _, name in kserve_claims
        }
        assert {v["metadata"]["name"] for v in (await state.list(PERSISTENT_VOLUME)).items} == set(
            kserve_volumes
        )

        # Every predictor pod is admitted as KServe admitted it: a placement on a node holding its
        # model, KServe's mount of models/<key> untouched.
        webhook = Webhook(state)
        for pod, (_, ns, uri, *_rest) in zip(pods, served, strict=True):
            review = {"operation": "CREATE", "namespace": ns, "object": pod}
            verdict = await webhook.review_pod(review)
            assert verdict.allowed, (pod["metadata"]["name"], verdict.message)
            assert [op["path"] for op in verdict.patch] == ["/spec/affinity"], verdict.patch
            terms = verdict.patch[0]["value"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]["nodeSelectorTerms"]
            want = {"key": model_label(storage_key(uri)), "operator": "In", "values": ["ready"]}
            assert all(want in t["matchExpressions"] for t in terms), terms
        # The namespace cache serves its own namespace only.
        elsewhere = predictor("code", "team-b", CODER, "coder", "g1", "n1", "team-a")
        verdict = await webhook.review_pod(
            {"operation": "CREATE", "namespace": "team-b", "object": elsewhere}
        )
        assert not verdict.allowed and "serves namespace 'team-a' only" in verdict.message

        # Converged: count every write over the window.
        await asyncio.sleep(SETTLE)
        since = time.monotonic()
        await asyncio.sleep(WINDOW)
        counted = api.write_counts(since=since)
        for name, proc in procs.items():
            assert proc.returncode is None, f"{name} exited early\n{dump_logs()}"
    finally:
        await state.close()
        codes = {name: await stop(proc) for name, proc in procs.items()}
        await api.close()
    print(f"\nwrites in {WINDOW:.0f} s once converged: {sum(counted.values())}")
    for key, times in sorted(counted.items()):
        print(f"  {times:4d} {' '.join(key)}")
    assert not counted, f"writes repeat once converged: {dict(counted)}\n{dump_logs()}"
    # Each KServe claim was told of once (the create its name refused), not at every pass.
    told = [
        line.split(" exists ")[0].rsplit(" ", 2)[-2:]
        for line in (logs / "controller.log").read_text().splitlines()
        if "exists and is not the controller's" in line
    ]
    assert sorted(told) == sorted(["PersistentVolumeClaim", f"{ns}/{name}"] for ns, name in kserve_claims)
    assert set(codes.values()) == {0}, codes


async def test_another_party_s_claim_is_tried_once_and_ours_made_once_it_is_gone(state: ClusterState) -> None:
    """A serving claim of the name KServe's controller gave it (and its PV) is learnt from the one
    create answered 409 and not tried again; neither half of our pair is made beside it. Once it is
    deleted, the next full pass (a resync) makes ours."""
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache_doc_for_h100())
    await state.create(PERSISTENT_VOLUME_CLAIM, kserve_claim("m-h100", "team"))
    await state.create(POD, plain_pod("p", "team", labels={LOCALMODEL_LABEL: "m"}))
    controller = Controller(state)
    await controller.load()
    await controller.reconcile(full=True)
    assert not await exists(state, PERSISTENT_VOLUME, "m-h100-team")  # no PV of ours for their claim
    assert controller.plan_only(full=True).volumes == ()  # learnt: not tried again
    await controller.reconcile(full=True)
    claim = await state.get(PERSISTENT_VOLUME_CLAIM, "m-h100", namespace="team")
    assert "labels" not in claim["metadata"]

    await state.delete(PERSISTENT_VOLUME_CLAIM, "m-h100", namespace="team")
    await controller.reconcile(full=True)
    ours = await state.get(PERSISTENT_VOLUME_CLAIM, "m-h100", namespace="team")
    assert ours["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY
    volume = await state.get(PERSISTENT_VOLUME, "m-h100-team")
    assert volume["spec"]["claimRef"]["name"] == "m-h100"


def cache_doc_for_h100() -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelCache",
        "metadata": {"name": "m"},
        "spec": {"sourceModelUri": "hf://org/m", "modelSize": "10Gi", "nodeGroups": ["h100"]},
    }
