"""The admission webhooks over real HTTPS (a self-signed certificate made here), with AdmissionReview
bodies as the API server sends them, on both cluster-state backends; plus the pure decisions."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from controller import cli
from controller.admission import Verdict, place_pod, review_response, validate_cache
from controller.labels import MODEL_LABEL_PREFIX
from controller.reconcile import Controller
from controller.webhook import MUTATE_PODS, VALIDATE_CACHES, WebhookServer, parse_addr
from localmodel.errors import InvalidInput
from localmodel.kinds import LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE
from localmodel.layout import storage_key
from localmodel.resources import LocalModelCache, LocalModelNodeGroup, Node
from localmodel.state.base import ClusterState
from tests import test_controller_reconcile as base
from tests.support.tls import make_cert
from tests.test_controller_reconcile import cache, group, setup_two_groups

state = base.state  # the fixture: the embedded backend and the API emulator


class Client:
    def __init__(self, server: WebhookServer, session: aiohttp.ClientSession) -> None:
        self.url = f"https://127.0.0.1:{server.port}"
        self.session = session

    async def review(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
        async with self.session.post(self.url + path, json=body) as response:
            assert response.status == 200, await response.text()
            result: dict[str, Any] = await response.json()
        assert result["apiVersion"] == "admission.k8s.io/v1" and result["kind"] == "AdmissionReview"
        assert result["response"]["uid"] == request["uid"]
        return dict(result["response"])


@pytest_asyncio.fixture
async def https(
    state: ClusterState, tmp_path: Path
) -> AsyncIterator[tuple[ClusterState, Client, WebhookServer]]:
    make_cert(tmp_path / "certs")
    server = WebhookServer(state, "127.0.0.1:0", tmp_path / "certs", reload_every=3600)
    await server.start()
    trust = ssl.create_default_context(cafile=str(tmp_path / "certs" / "tls.crt"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
        try:
            yield state, Client(server, session), server
        finally:
            await server.stop()


def pod_request(
    name: str, *, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    """An AdmissionReview request for a pod CREATE, shaped as kube-apiserver sends it."""
    meta: dict[str, Any] = {"name": name, "namespace": "team"}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "c"}], **spec},
    }
    return {
        "uid": str(uuid.uuid4()),
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "name": name,
        "namespace": "team",
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": obj,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }


def cache_request(operation: str, obj: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    kind = {"group": "serving.kserve.io", "version": "v1alpha1", "kind": "LocalModelCache"}
    return {
        "uid": str(uuid.uuid4()),
        "kind": kind,
        "resource": {"group": "serving.kserve.io", "version": "v1alpha1", "resource": "localmodelcaches"},
        "name": obj["metadata"]["name"],
        "operation": operation,
        "userInfo": {"username": "alice"},
        "object": obj,
        "oldObject": old,
        "dryRun": False,
    }


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    patch: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return patch


def required_terms(response: dict[str, Any]) -> list[dict[str, Any]]:
    (op,) = patch_of(response)
    assert (op["op"], op["path"]) == ("add", "/spec/affinity")
    terms: list[dict[str, Any]] = op["value"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    return terms


def gpu_in(name: str) -> dict[str, Any]:
    return {"key": "gpu", "operator": "In", "values": [name]}


# -- pods ------------------------------------------------------------------------------------------


async def test_pod_placement_over_https(https: tuple[ClusterState, Client, WebhookServer]) -> None:
    st, client, _ = https
    await setup_two_groups(st)
    await st.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["a100"]))
    await st.create(LOCAL_MODEL_CACHE, cache("slow", "10Gi", ["a100"]))
    await Controller(st).run(once=True)
    key = storage_key("hf://org/m")
    await st.patch_status(LOCAL_MODEL_NODE, "a2", {"modelStatus": {"m": "ModelDownloaded"}})
    await Controller(st).run(once=True)  # labels a2 as holding m
    ready = {"key": MODEL_LABEL_PREFIX + key, "operator": "In", "values": ["ready"]}

    # Named by KServe's label, in group a100: only a100 nodes that hold it.
    r = await client.review(
        MUTATE_PODS,
        pod_request(
            "p1",
            labels={"internal.serving.kserve.io/localmodel": "m"},
            annotations={"serving.kserve.io/nodegroup": "a100"},
        ),
    )
    assert r["allowed"] is True
    assert required_terms(r) == [{"matchExpressions": [gpu_in("a100"), ready]}]
    # Named by our annotation, no group: the cache's first; the pod's own terms are ANDed.
    own = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
    ]}}  # fmt: skip
    keep: dict[str, Any] = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    r = await client.review(
        MUTATE_PODS,
        pod_request("p2", annotations={"modelcache.io/model": "m"}, affinity={"nodeAffinity": own, **keep}),
    )
    assert r["allowed"] is True
    (op,) = patch_of(r)
    assert op["value"]["podAntiAffinity"] == keep["podAntiAffinity"]
    zone = [t["matchExpressions"][0]["values"][0] for t in required_terms(r)]
    assert zone == ["a", "b"]
    assert all(t["matchExpressions"][1:] == [gpu_in("a100"), ready] for t in required_terms(r))
    # A group only: its members, whatever they hold.
    r = await client.review(
        MUTATE_PODS, pod_request("p3", annotations={"serving.kserve.io/nodegroup": "h100"})
    )
    assert r["allowed"] is True and required_terms(r) == [{"matchExpressions": [gpu_in("h100")]}]

    # Refusals say which.
    async def refused(request: dict[str, Any]) -> str:
        r = await client.review(MUTATE_PODS, request)
        assert r["allowed"] is False and "patch" not in r
        assert r["status"]["code"] == 403
        return str(r["status"]["message"])

    msg = await refused(
        pod_request(
            "p4",
            labels={"internal.serving.kserve.io/localmodel": "m"},
            annotations={"serving.kserve.io/nodegroup": "h100"},
        )
    )
    assert msg == "LocalModelCache 'm' does not list node group 'h100' (it lists a100)"
    msg = await refused(pod_request("p5", annotations={"modelcache.io/model": "slow"}))
    assert "no node of node group 'a100' holds LocalModelCache 'slow' downloaded yet" in msg
    assert "(0 of 2 copies available)" in msg
    msg = await refused(
        pod_request("p6", annotations={"serving.kserve.io/nodegroup": "t4", "modelcache.io/model": "m"})
    )
    assert msg == "LocalModelCache 'm' does not list node group 't4' (it lists a100)"
    msg = await refused(pod_request("p7", annotations={"modelcache.io/model": "nope"}))
    assert msg == "LocalModelCache 'nope' does not exist"

    # Pods that ask nothing, opt out, or are not being created: allowed untouched.
    for request in (
        pod_request("plain"),
        pod_request(
            "off",
            annotations={"serving.kserve.io/nodegroup": "t4", "serving.kserve.io/disable-localmodel": "true"},
        ),
        {**pod_request("upd", annotations={"serving.kserve.io/nodegroup": "t4"}), "operation": "UPDATE"},
    ):
        r = await client.review(MUTATE_PODS, request)
        assert r["allowed"] is True and "patch" not in r and "status" not in r


async def test_a_cache_refused_by_the_group_is_named(
    https: tuple[ClusterState, Client, WebhookServer],
) -> None:
    st, client, _ = https
    await setup_two_groups(st)
    await st.create(LOCAL_MODEL_CACHE, cache("big", "140Gi", ["a100", "h100"]))
    await Controller(st).run(once=True)
    r = await client.review(
        MUTATE_PODS,
        pod_request("p", annotations={"modelcache.io/model": "big", "serving.kserve.io/nodegroup": "h100"}),
    )
    assert r["allowed"] is False
    assert r["status"]["message"] == (
        "LocalModelCache 'big' is not admitted to node group 'h100': needs 140Gi, group h100 has 100Gi of "
        "100Gi free"
    )


# -- LocalModelCaches ------------------------------------------------------------------------------


async def test_cache_validation_over_https(https: tuple[ClusterState, Client, WebhookServer]) -> None:
    st, client, _ = https
    await setup_two_groups(st)  # a100: 500Gi, h100: 100Gi
    await st.create(LOCAL_MODEL_CACHE, cache("m", "60Gi", ["a100", "h100"]))

    async def verdict(
        operation: str, obj: dict[str, Any], old: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await client.review(VALIDATE_CACHES, cache_request(operation, obj, old))

    ok = await verdict("CREATE", cache("fits", "40Gi", ["a100", "h100"]))
    assert ok["allowed"] is True and "warnings" not in ok
    partial = await verdict("CREATE", cache("half", "50Gi", ["a100", "h100"]))
    assert partial["allowed"] is True
    assert partial["warnings"] == ["needs 50Gi, group h100 has 40Gi of 100Gi free"]

    bad_uri = cache("bad", "1Gi", ["a100"])
    bad_uri["spec"]["sourceModelUri"] = "hdfs://namenode/model"
    r = await verdict("CREATE", bad_uri)
    assert r["allowed"] is False and r["status"]["code"] == 422
    assert r["status"]["message"].startswith("spec.sourceModelUri: hdfs:// sources are not supported")
    r = await verdict("CREATE", cache("lost", "1Gi", ["a100", "t4"]))
    assert r["allowed"] is False
    assert r["status"]["message"] == "node group 't4' does not exist (node groups: a100, h100)"
    r = await verdict("CREATE", cache("huge", "600Gi", ["a100", "h100"]))
    assert r["allowed"] is False
    assert r["status"]["message"] == (
        "no listed node group can admit it: needs 600Gi, group a100 has 440Gi of 500Gi free; "
        "needs 600Gi, group h100 has 40Gi of 100Gi free"
    )
    twin = cache("twin", "1Gi", ["a100"])
    twin["spec"]["sourceModelUri"] = "hf://org/m"
    r = await verdict("CREATE", twin)
    assert r["allowed"] is False
    assert r["status"]["message"].startswith("LocalModelCache 'm' already caches hf://org/m")
    no_size = cache("nosize", "1Gi", ["a100"])
    del no_size["spec"]["modelSize"]
    r = await verdict("CREATE", no_size)
    assert r["allowed"] is False and "spec.modelSize" in r["status"]["message"]

    # Updates: the spec growing past every group is refused; the controller's finalizer patch on a
    # cache whose group is gone, and a deletion, are allowed.
    stored = await st.get(LOCAL_MODEL_CACHE, "m")
    grown = json.loads(json.dumps(stored))
    grown["spec"]["modelSize"] = "600Gi"
    r = await verdict("UPDATE", grown, stored)
    assert r["allowed"] is False and "no listed node group can admit it" in r["status"]["message"]
    orphan = json.loads(json.dumps(stored))
    orphan["spec"]["nodeGroups"] = ["gone"]
    finalized = json.loads(json.dumps(orphan))
    finalized["metadata"]["finalizers"] = []
    assert (await verdict("UPDATE", finalized, orphan))["allowed"] is True
    assert (await client.review(VALIDATE_CACHES, {**cache_request("DELETE", stored), "object": None}))[
        "allowed"
    ] is True


async def test_bad_requests_health_and_certificate_reload(
    https: tuple[ClusterState, Client, WebhookServer], tmp_path: Path
) -> None:
    _, client, server = https
    async with client.session.post(client.url + MUTATE_PODS, data=b"not json") as response:
        assert response.status == 400
    async with client.session.post(
        client.url + VALIDATE_CACHES, json={"kind": "AdmissionReview"}
    ) as response:
        assert response.status == 400
    async with client.session.get(client.url + "/healthz") as response:
        assert response.status == 200 and await response.text() == "ok"
    # Plain HTTP is not served.
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as plain:
            await plain.get(f"http://127.0.0.1:{server.port}/healthz")
    # cert-manager renews: the files change, the next connections get the new certificate.
    assert server.reload_if_changed() is False
    make_cert(tmp_path / "new", common_name="renewed")
    for f in ("tls.crt", "tls.key"):
        (tmp_path / "certs" / f).write_bytes((tmp_path / "new" / f).read_bytes())
        os.utime(tmp_path / "certs" / f, (1, 1))  # a different mtime, whatever the clock's resolution
    assert server.reload_if_changed() is True
    trust = ssl.create_default_context(cafile=str(tmp_path / "new" / "tls.crt"))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as renewed,
        renewed.get(client.url + "/healthz") as response,
    ):
        assert response.status == 200


def test_flags_and_addresses(tmp_path: Path) -> None:
    assert parse_addr("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert parse_addr(":9443") == ("0.0.0.0", 9443)
    assert parse_addr("[::1]:9443") == ("::1", 9443)
    for bad in ("8443", "host:port", "h:70000"):
        with pytest.raises(InvalidInput):
            parse_addr(bad)
    with pytest.raises(InvalidInput, match="go together"):
        cli.main(["--standalone", str(tmp_path), "--webhook-addr", ":9443"])
    with pytest.raises(InvalidInput, match="--once"):
        cli.main(["--once", "--webhook-addr", ":9443", "--webhook-cert-dir", str(tmp_path)])
    with pytest.raises(InvalidInput, match=r"tls\.crt"):
        WebhookServer(None, ":9443", tmp_path)  # type: ignore[arg-type]


# -- the pure decisions ----------------------------------------------------------------------------


def test_place_pod_pure() -> None:
    g = LocalModelNodeGroup.from_json(group("a100", "100Gi"))
    c = LocalModelCache.from_json(cache("m", "1Gi", ["a100"]))
    label = MODEL_LABEL_PREFIX + c.spec.storage_key
    pod = {"metadata": {"annotations": {"modelcache.io/model": "m"}}, "spec": {}}
    # A node labelled ready but outside the group does not count.
    outside = Node("h1", {"gpu": "h100", label: "ready"})
    assert not place_pod(pod, cache=c, group=g, ready_nodes=[outside]).allowed
    inside = Node("a1", {"gpu": "a100", label: "ready"})
    assert place_pod(pod, cache=c, group=g, ready_nodes=[outside, inside]).allowed
    # A group that selects nothing cannot place a pod that names a cache (one that names none: a
    # Warning, tests/test_kserve_users.py).
    folder_only = {"storageLimit": "1Gi", "persistentVolumeSpec": {"hostPath": {"path": "/models"}}}
    bare = LocalModelNodeGroup.from_json({**group("a100", "1Gi"), "spec": folder_only})
    v = place_pod(pod, cache=c, group=bare)
    assert not v.allowed and "selects no nodes" in v.message


def test_credentials_names_must_be_object_names_and_secret_keys() -> None:
    """KServe's schema takes any string for serviceAccountName and storage.key; the agent reads
    them as object names and a Secret key, so a crafted one is refused at apply, naming the field."""
    groups = [LocalModelNodeGroup.from_json(group("a100", "100Gi"))]
    for field, value in (
        ("serviceAccountName", "../../default/serviceaccounts/sa"),
        ("serviceAccountName", "Upper"),
        ("storage", {"key": "../x"}),
        ("storage", {"key": "a b"}),
    ):
        obj = cache("c", "1Gi", ["a100"])
        obj["spec"][field] = value
        v = validate_cache("CREATE", obj, None, caches=[], groups=groups)
        named = "spec.storage.key" if field == "storage" else f"spec.{field}"
        assert not v.allowed and v.code == 422 and v.message.startswith(f"{named}: "), v
        assert "\n" not in v.message
    for field, value in (("serviceAccountName", "sa-1.team"), ("storage", {"key": "my_s3.key-1"})):
        obj = cache("c", "1Gi", ["a100"])
        obj["spec"][field] = value
        assert validate_cache("CREATE", obj, None, caches=[], groups=groups).allowed


def test_validate_cache_pure_and_response_shape() -> None:
    groups = [LocalModelNodeGroup.from_json(group("a100", "100Gi"))]
    assert validate_cache("CONNECT", None, None, caches=[], groups=groups).allowed
    deleting = cache("x", "1Gi", ["nope"])
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert validate_cache("UPDATE", deleting, None, caches=[], groups=groups).allowed
    # An update that adds a missing group is refused; one that keeps an old missing group is not.
    old = cache("x", "1Gi", ["a100", "gone"])
    old["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    new = json.loads(json.dumps(old))
    new["spec"]["modelSize"] = "2Gi"
    assert validate_cache("UPDATE", new, old, caches=[], groups=groups).allowed
    new["spec"]["nodeGroups"] = ["a100", "gone", "t4"]
    assert validate_cache("UPDATE", new, old, caches=[], groups=groups).message.startswith("node group 't4'")
    assert review_response("u", Verdict(True)) == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": "u", "allowed": True},
    }


async def test_the_controller_command_serves_the_webhooks(tmp_path: Path) -> None:
    """`modelcache controller --standalone DOCS --webhook-addr ... --webhook-cert-dir ...`: the
    controller runs and the webhooks answer over HTTPS until SIGTERM."""
    base.write_docs(tmp_path / "docs")
    make_cert(tmp_path / "certs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = cli._parser().parse_args(
        [
            "--standalone", str(tmp_path / "docs"), "--webhook-addr", f"127.0.0.1:{port}",
            "--webhook-cert-dir", str(tmp_path / "certs"), "--resync", "60",
        ]
    )  # fmt: skip
    task = asyncio.create_task(cli._main(cli.ControllerSettings.from_args(args, {})))
    trust = ssl.create_default_context(cafile=str(tmp_path / "certs" / "tls.crt"))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                try:
                    async with session.get(f"https://127.0.0.1:{port}/healthz") as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectorError:
                    assert asyncio.get_running_loop().time() < deadline and not task.done()
                    await asyncio.sleep(0.05)
            body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
            request = cache_request("CREATE", cache("more", "400Gi", ["a100", "h100"]))
            async with session.post(
                f"https://127.0.0.1:{port}{VALIDATE_CACHES}", json={**body, "request": request}
            ) as r:
                answer = (await r.json())["response"]
        # The standalone documents hold "big" (140Gi) on a100 (500Gi): 400Gi fits neither group.
        assert answer["allowed"] is False
        assert "needs 400Gi, group a100 has 360Gi of 500Gi free" in answer["status"]["message"]
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # the command's own handler: a clean stop
        assert await asyncio.wait_for(task, 10) == 0
