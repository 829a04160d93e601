"""Serving integration on both backends (embedded, and the Kubernetes API emulator over HTTP): the
node label per ready model, and KServe's PV/PVC per cache, group and serving namespace, kept by the
controller's loop from what it watches; plus the pure decisions behind them."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from controller.labels import MODEL_LABEL_PREFIX, label_writes, model_label, model_labels
from controller.reconcile import Controller
from controller.serving import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    SERVING_NAMESPACES_ANNOTATION,
    serving_demands,
    volume_ref,
    volume_writes,
)
from controller.snapshot import LabelWrite, ServingDemand, Snapshot, VolumeRef
from controller.views import Pod
from localmodel.errors import NotFound
from localmodel.kinds import (
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    POD,
)
from localmodel.layout import storage_key
from localmodel.placement import admit
from localmodel.resources import LocalModelCache, LocalModelNode, LocalModelNodeGroup, Node
from localmodel.state.base import ClusterState
from tests import test_controller_reconcile as base
from tests.test_controller_reconcile import cache, eventually, group, running, setup_two_groups

state = base.state  # the fixture: each test runs on the embedded backend and on the API emulator

KEY = storage_key("hf://org/m")
LABEL = MODEL_LABEL_PREFIX + KEY


def pod(name: str, ns: str, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, **meta},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }


async def labels_of(state: ClusterState, name: str) -> dict[str, str]:
    labels: dict[str, str] = (await state.get(NODE, name))["metadata"].get("labels") or {}
    return {k: v for k, v in labels.items() if k.startswith(MODEL_LABEL_PREFIX)}


async def exists(state: ClusterState, kind: Any, name: str, namespace: str | None = None) -> bool:
    try:
        await state.get(kind, name, namespace=namespace)
    except NotFound:
        return False
    return True


# -- node labels ---------------------------------------------------------------------------------


async def test_node_label_follows_the_downloaded_state(state: ClusterState) -> None:
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["a100"]))
    async with running(state) as controller:
        await eventually(lambda: exists(state, LOCAL_MODEL_NODE, "a1"))
        assert await labels_of(state, "a1") == {}
        await state.patch_status(LOCAL_MODEL_NODE, "a1", {"modelStatus": {"m": "ModelDownloading"}})
        await asyncio.sleep(0.1)
        assert await labels_of(state, "a1") == {}
        full_before = controller.reconciles
        await state.patch_status(LOCAL_MODEL_NODE, "a1", {"modelStatus": {"m": "ModelDownloaded"}})

        async def labelled() -> bool:
            return await labels_of(state, "a1") == {LABEL: "ready"}

        await eventually(labelled)
        assert await labels_of(state, "a2") == {}
        assert controller.reconciles > full_before
        # Someone removes it: put back. A failed copy loses it.
        await state.patch(NODE, "a1", {"metadata": {"labels": {LABEL: None}}})
        await eventually(labelled)
        await state.patch_status(LOCAL_MODEL_NODE, "a1", {"modelStatus": {"m": "ModelDownloadError"}})

        async def unlabelled() -> bool:
            return await labels_of(state, "a1") == {}

        await eventually(unlabelled)
        # Downloaded again, then the cache drops the group: the label goes with the spec entry.
        await state.patch_status(LOCAL_MODEL_NODE, "a1", {"modelStatus": {"m": "ModelDownloaded"}})
        await eventually(labelled)
        await state.patch(LOCAL_MODEL_CACHE, "m", {"spec": {"nodeGroups": ["h100"]}})
        await eventually(unlabelled)
        # The node's other labels are untouched.
        assert (await state.get(NODE, "a1"))["metadata"]["labels"]["gpu"] == "a100"


def test_label_writes_pure() -> None:
    g = LocalModelNodeGroup.from_json(group("a100", "100Gi"))
    c = LocalModelCache.from_json(cache("m", "1Gi", ["a100"]))
    other = storage_key("hf://org/gone")
    # modelStatus is keyed by modelName; a name the spec no longer lists is not ready here.
    lmn = LocalModelNode.from_json(
        {
            "metadata": {"name": "a1"},
            "spec": {"localModels": [{"sourceModelUri": "hf://org/m", "modelName": "m"}]},
            "status": {"modelStatus": {"m": "ModelDownloaded", "gone": "ModelDownloaded"}},
        }
    )
    s = Snapshot(
        caches={"m": c},
        groups={"a100": g},
        nodes={"a1": Node("a1", {"gpu": "a100"}), "a2": Node("a2", {"gpu": "a100"})},
        local_model_nodes={"a1": lmn},
        node_models={"a1": frozenset({other}), "a2": frozenset({KEY})},
    )
    # Only models the spec lists count; a stale label elsewhere goes; absent nodes are skipped.
    assert label_writes(s, {"a1", "a2", "gone"}) == [
        LabelWrite("a1", {KEY: True, other: False}),
        LabelWrite("a2", {KEY: False}),
    ]
    assert model_labels({model_label(KEY): "ready", "gpu": "x"}) == frozenset({KEY})
    assert len(model_label(KEY).split("/", 1)[1]) <= 63  # a valid label name


# -- KServe's PV and PVC -------------------------------------------------------------------------


async def test_pv_and_pvc_for_each_serving_namespace(state: ClusterState) -> None:
    """KServe's names, which its InferenceService path references: PVC ``<cache>-<group>`` and PV
    ``<cache>-<group>-<namespace>`` (kserve/kserve pkg/controller/v1alpha1/localmodel/reconcilers/
    utils.go:605-618 at v0.20); the PV itself is ours, one model's folder (see
    tests/test_controller_security.py for KServe's subPath mount of it)."""
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["a100", "h100"]))
    async with running(state):
        await eventually(lambda: exists(state, LOCAL_MODEL_NODE, "h1"))
        # A KServe predictor pod: the localmodel label, the group annotation.
        await state.create(
            POD,
            pod(
                "isvc-0",
                "team",
                labels={"internal.serving.kserve.io/localmodel": "m"},
                annotations={"serving.kserve.io/nodegroup": "h100"},
            ),
        )
        await eventually(lambda: exists(state, PERSISTENT_VOLUME_CLAIM, "m-h100", "team"))
        await eventually(lambda: exists(state, PERSISTENT_VOLUME, "m-h100-team"))
        pv = await state.get(PERSISTENT_VOLUME, "m-h100-team")
        pvc = await state.get(PERSISTENT_VOLUME_CLAIM, "m-h100", namespace="team")
        m = await state.get(LOCAL_MODEL_CACHE, "m")
        h100 = await state.get(LOCAL_MODEL_NODE_GROUP, "h100")
        # One model's folder, read-only, from the fixed template (nothing else of the group's spec).
        assert pv["spec"]["hostPath"] == {"path": f"/models/models/{KEY}", "type": "Directory"}
        assert pv["spec"]["nodeAffinity"] == h100["spec"]["persistentVolumeSpec"]["nodeAffinity"]
        assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
        assert pv["spec"]["accessModes"] == pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
        assert set(pv["spec"]) == {
            "capacity",
            "accessModes",
            "volumeMode",
            "storageClassName",
            "persistentVolumeReclaimPolicy",
            "hostPath",
            "nodeAffinity",
            "claimRef",
        }
        assert pv["spec"]["claimRef"]["namespace"] == "team" and pv["spec"]["claimRef"]["name"] == "m-h100"
        assert pvc["spec"]["volumeName"] == "m-h100-team"
        assert pvc["spec"]["storageClassName"] == pv["spec"]["storageClassName"]
        for obj in (pv, pvc):
            assert obj["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY
            (owner,) = obj["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"]) == (
                "LocalModelCache",
                "m",
                m["metadata"]["uid"],
            )
        # No group annotation: KServe's default, the cache's first group. A pod mounting the claim.
        await state.create(POD, pod("other", "ml", annotations={"modelcache.io/model": "m"}))
        await eventually(lambda: exists(state, PERSISTENT_VOLUME_CLAIM, "m-a100", "ml"))
        mounting = pod("mounting", "third")
        mounting["spec"]["volumes"] = [{"name": "v", "persistentVolumeClaim": {"claimName": "m-h100"}}]
        await state.create(POD, mounting)
        await eventually(lambda: exists(state, PERSISTENT_VOLUME, "m-h100-third"))
        # Made ahead of any pod, by annotation.
        await state.patch(
            LOCAL_MODEL_CACHE, "m", {"metadata": {"annotations": {SERVING_NAMESPACES_ANNOTATION: "early"}}}
        )
        await eventually(lambda: exists(state, PERSISTENT_VOLUME_CLAIM, "m-a100", "early"))
        await eventually(lambda: exists(state, PERSISTENT_VOLUME_CLAIM, "m-h100", "early"))
        # Deleted by someone while still wanted: made again.
        await state.delete(PERSISTENT_VOLUME, "m-h100-team")
        await eventually(lambda: exists(state, PERSISTENT_VOLUME, "m-h100-team"))
        # The pods go: the claims stay (a rollout's next pods use them) while the cache lists the group.
        await state.delete(POD, "isvc-0", namespace="team")
        await asyncio.sleep(0.2)
        assert await exists(state, PERSISTENT_VOLUME_CLAIM, "m-h100", "team")
        # The cache drops h100: every h100 claim and volume goes, the a100 ones stay.
        await state.patch(LOCAL_MODEL_CACHE, "m", {"spec": {"nodeGroups": ["a100"]}})

        async def h100_gone() -> bool:
            return not any(
                [
                    await exists(state, PERSISTENT_VOLUME_CLAIM, "m-h100", "team"),
                    await exists(state, PERSISTENT_VOLUME, "m-h100-team"),
                    await exists(state, PERSISTENT_VOLUME, "m-h100-third"),
                    await exists(state, PERSISTENT_VOLUME_CLAIM, "m-h100", "early"),
                ]
            )

        await eventually(h100_gone)
        assert await exists(state, PERSISTENT_VOLUME_CLAIM, "m-a100", "ml")
        # The group goes: so do its volumes.
        await state.delete(LOCAL_MODEL_NODE_GROUP, "a100")

        async def all_gone() -> bool:
            pvs = (await state.list(PERSISTENT_VOLUME)).items
            pvcs = (await state.list(PERSISTENT_VOLUME_CLAIM)).items
            return not pvs and not pvcs

        await eventually(all_gone)


async def test_volumes_are_made_again_when_the_group_s_path_changes(state: ClusterState) -> None:
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
    await state.create(POD, pod("p", "team", annotations={"modelcache.io/model": "m"}))
    async with running(state):
        await eventually(lambda: exists(state, PERSISTENT_VOLUME, "m-h100-team"))
        await eventually(lambda: exists(state, PERSISTENT_VOLUME_CLAIM, "m-h100", "team"))
        spec = (await state.get(LOCAL_MODEL_NODE_GROUP, "h100"))["spec"]["persistentVolumeSpec"]
        spec["hostPath"] = {"path": "/nvme/models"}
        await state.patch(LOCAL_MODEL_NODE_GROUP, "h100", {"spec": {"persistentVolumeSpec": spec}})

        async def moved() -> bool:
            try:
                pv = await state.get(PERSISTENT_VOLUME, "m-h100-team")
                await state.get(PERSISTENT_VOLUME_CLAIM, "m-h100", namespace="team")
            except NotFound:
                return False
            return bool(
                pv["spec"].get("hostPath") == {"path": f"/nvme/models/models/{KEY}", "type": "Directory"}
            )

        await eventually(moved)


async def test_volumes_go_with_the_cache_and_others_are_left_alone(state: ClusterState) -> None:
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
    # A user's own PVC of the very name: never touched.
    foreign = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "m-h100", "namespace": "mine"},
    }
    await state.create(PERSISTENT_VOLUME_CLAIM, foreign)
    await state.create(POD, pod("p", "team", annotations={"modelcache.io/model": "m"}))
    await state.create(POD, pod("q", "mine", annotations={"modelcache.io/model": "m"}))
    await Controller(state).run(once=True)
    assert await exists(state, PERSISTENT_VOLUME_CLAIM, "m-h100", "team")
    mine = await state.get(PERSISTENT_VOLUME_CLAIM, "m-h100", namespace="mine")
    assert "labels" not in mine["metadata"]
    await state.delete(LOCAL_MODEL_CACHE, "m")
    await Controller(state).run(once=True)
    assert not await exists(state, PERSISTENT_VOLUME_CLAIM, "m-h100", "team")
    assert not await exists(state, PERSISTENT_VOLUME, "m-h100-team")
    assert await exists(state, PERSISTENT_VOLUME_CLAIM, "m-h100", "mine")


def test_volume_writes_pure() -> None:
    a100 = LocalModelNodeGroup.from_json(group("a100", "100Gi"))
    h100 = LocalModelNodeGroup.from_json(group("h100", "10Gi"))
    small = LocalModelCache.from_json(cache("small", "1Gi", ["a100", "h100"]))
    big = LocalModelCache.from_json(cache("big", "50Gi", ["a100", "h100"]))
    caches = {"small": small, "big": big}
    groups = {"a100": a100, "h100": h100}
    admitted = admit(caches.values(), groups.values()).admitted
    s = Snapshot(
        caches=caches,
        groups=groups,
        nodes={},
        serving=frozenset(
            {
                ServingDemand("big", "h100", "t"),  # h100 refused it: no claim for an empty folder
                ServingDemand("big", None, "t"),  # the first group: a100
                ServingDemand("small", "nope", "t"),  # a group it does not list
                ServingDemand("ghost", None, "t"),  # no such cache
            }
        ),
        volumes={"old-a100-t": VolumeRef("old", "a100", "t")},
        claims={("t", "old-a100"): VolumeRef("old", "a100", "t", deleting=True)},
    )
    writes = [(w.kind, w.action, w.name, w.namespace) for w in volume_writes(s, admitted)]
    assert writes == [
        ("PersistentVolume", "delete", "old-a100-t", None),
        ("PersistentVolume", "create", "big-a100-t", None),
        ("PersistentVolumeClaim", "create", "big-a100", "t"),
    ]
    created = volume_writes(s, admitted)[1]
    assert created.body is not None
    ref = volume_ref(created.body)
    assert ref is not None and ref.digest is not None and len(ref.digest) == 16
    assert dataclasses.replace(ref, digest=None) == VolumeRef("big", "a100", "t")
    # Made from the group's specs as they were: the pair is made again once they change.
    current = {"big-a100-t": ref}
    claim = volume_ref(volume_writes(s, admitted)[2].body or {})
    assert claim is not None
    for volumes, claims, expected in (
        (current, {("t", "big-a100"): claim}, []),  # as made: nothing to do
        (
            {"big-a100-t": dataclasses.replace(ref, digest="0" * 16)},
            {("t", "big-a100"): claim},
            [
                ("PersistentVolumeClaim", "delete", "big-a100", "t"),
                ("PersistentVolume", "delete", "big-a100-t", None),
            ],
        ),
        (
            # Made by a version before the fixed template (the group's whole folder): made again.
            {"big-a100-t": dataclasses.replace(ref, digest=None)},
            {("t", "big-a100"): dataclasses.replace(claim, digest=None)},
            [
                ("PersistentVolumeClaim", "delete", "big-a100", "t"),
                ("PersistentVolume", "delete", "big-a100-t", None),
            ],
        ),
    ):
        again = dataclasses.replace(
            s, volumes=volumes, claims=claims, serving=frozenset({ServingDemand("big", None, "t")})
        )
        assert [(w.kind, w.action, w.name, w.namespace) for w in volume_writes(again, admitted)] == expected
    assert created.body["spec"]["capacity"] == {"storage": "100Gi"}
    assert serving_demands(
        [Pod.from_json(pod("x", "n", labels={"internal.serving.kserve.io/localmodel": "big"}))], caches
    ) == {ServingDemand("big", None, "n")}
    done = pod("y", "n", annotations={"modelcache.io/model": "big"})
    done["status"] = {"phase": "Succeeded"}
    assert serving_demands([Pod.from_json(done)], caches) == set()


async def test_a_group_s_volume_source_is_never_copied(state: ClusterState) -> None:
    """A group written past admission (no CRD rules, no webhook) that names the node's root, another
    volume source, or extra fields: no serving PV points at the root or copies the source; a group
    with a folder gets a PV on that model's folder alone, with nothing of its other fields."""
    await setup_two_groups(state)
    root = group("root", "100Gi")
    root["spec"]["persistentVolumeSpec"]["hostPath"] = {"path": "/", "type": "Directory"}
    nfs = group("nfs", "100Gi")
    nfs["spec"]["persistentVolumeSpec"].pop("hostPath")
    nfs["spec"]["persistentVolumeSpec"]["nfs"] = {"server": "evil", "path": "/"}
    extra = group("extra", "100Gi")
    extra["spec"]["persistentVolumeSpec"].update(
        accessModes=["ReadWriteMany"], mountOptions=["rw"], persistentVolumeReclaimPolicy="Recycle"
    )
    extra["spec"]["persistentVolumeClaimSpec"] = {
        "accessModes": ["ReadWriteMany"],
        "dataSource": {"kind": "PersistentVolumeClaim", "name": "someone-elses"},
        "selector": {"matchLabels": {"x": "y"}},
    }
    for g in (root, nfs, extra):
        await state.create(LOCAL_MODEL_NODE_GROUP, g)
        await state.create(
            NODE,
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": g["metadata"]["name"] + "-1", "labels": {"gpu": g["metadata"]["name"]}},
            },
        )
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["root", "nfs", "extra"]))
    await state.patch(
        LOCAL_MODEL_CACHE, "m", {"metadata": {"annotations": {SERVING_NAMESPACES_ANNOTATION: "team"}}}
    )
    await Controller(state).run(once=True)
    pvs = {p["metadata"]["name"]: p for p in (await state.list(PERSISTENT_VOLUME)).items}
    assert set(pvs) == {"m-extra-team"}
    spec = pvs["m-extra-team"]["spec"]
    assert spec["hostPath"] == {"path": f"/models/models/{KEY}", "type": "Directory"}
    assert spec["accessModes"] == ["ReadOnlyMany"] and spec["persistentVolumeReclaimPolicy"] == "Retain"
    assert "mountOptions" not in spec
    claim = await state.get(PERSISTENT_VOLUME_CLAIM, "m-extra", namespace="team")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert "dataSource" not in claim["spec"] and "selector" not in claim["spec"]
    assert {
        (c["metadata"]["namespace"], c["metadata"]["name"])
        for c in (await state.list(PERSISTENT_VOLUME_CLAIM)).items
    } == {("team", "m-extra")}
