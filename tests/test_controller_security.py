"""What a tenant, a node or a bad spec can reach through the controller (issue 20), over real HTTPS
on both cluster-state backends: the serving mounts narrowed to one model's folder, read-only; node
groups that point at the node's system folders or at other volume sources refused; file sources
refused in a cluster; the webhook server bounded against slow and malformed clients."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import pytest_asyncio

from controller.admission import serving_mounts, validate_group
from controller.reconcile import Controller
from controller.webhook import MUTATE_PODS, VALIDATE_CACHES, VALIDATE_GROUPS, Limits, WebhookServer
from localmodel.folders import SYSTEM_FOLDERS
from localmodel.kinds import LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE
from localmodel.layout import storage_key
from localmodel.resources import LocalModelCache
from localmodel.state.base import ClusterState
from tests import test_controller_reconcile as base
from tests.support.tls import make_cert
from tests.test_controller_reconcile import cache, group, setup_two_groups
from tests.test_controller_webhook import Client, cache_request, patch_of, pod_request

state = base.state  # the fixture: the embedded backend and the API emulator
KEY = storage_key("hf://org/m")
# Small bounds so a test waits seconds, not the production 10 s.
LIMITS = Limits(header_timeout=1.0, body_timeout=1.0, max_body=64 * 1024, max_requests=3)


@pytest_asyncio.fixture
async def https(state: ClusterState, tmp_path: Path) -> AsyncIterator[tuple[ClusterState, Client, Path]]:
    import aiohttp

    make_cert(tmp_path / "certs")
    server = WebhookServer(state, "127.0.0.1:0", tmp_path / "certs", reload_every=3600, limits=LIMITS)
    await server.start()
    trust = ssl.create_default_context(cafile=str(tmp_path / "certs" / "tls.crt"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
        try:
            yield state, Client(server, session), tmp_path / "certs" / "tls.crt"
        finally:
            await server.stop()


def group_request(operation: str, obj: Any, old: Any = None) -> dict[str, Any]:
    req = cache_request(operation, {"metadata": {"name": "g"}}, old)
    req["kind"] = {"group": "serving.kserve.io", "version": "v1alpha1", "kind": "LocalModelNodeGroup"}
    req["resource"] = {
        "group": "serving.kserve.io",
        "version": "v1alpha1",
        "resource": "localmodelnodegroups",
    }
    req["object"] = obj
    return req


# -- 1. the serving mount: one model's folder, read-only -------------------------------------------


def kserve_pod(claim: str) -> dict[str, Any]:
    """A predictor pod as KServe's pod mutator leaves it for a cached model: the claim mounted at
    /mnt/models with ``subPath: models/<key>`` (pkg/webhook/admission/pod/storage_initializer_injector.go
    :744-746 and :551 at v0.20), read-only by default (:258-266)."""
    req = pod_request(
        "isvc-0",
        labels={"internal.serving.kserve.io/localmodel": "m"},
        annotations={"serving.kserve.io/nodegroup": "a100"},
        volumes=[
            {"name": "kserve-pvc-source", "persistentVolumeClaim": {"claimName": claim}},
            {"name": "scratch", "emptyDir": {}},
        ],
    )
    req["object"]["spec"]["containers"] = [
        {
            "name": "kserve-container",
            "volumeMounts": [
                {
                    "name": "kserve-pvc-source",
                    "mountPath": "/mnt/models",
                    "subPath": f"models/{KEY}",
                    "readOnly": True,
                },
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        }
    ]
    return req


async def test_kserve_s_mount_is_narrowed_to_the_model_folder(
    https: tuple[ClusterState, Client, Path],
) -> None:
    st, client, _ = https
    await setup_two_groups(st)
    await st.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["a100"]))
    await Controller(st).run(once=True)
    await st.patch_status(LOCAL_MODEL_NODE, "a1", {"modelStatus": {"m": "ModelDownloaded"}})
    await Controller(st).run(once=True)

    req = kserve_pod("m-a100")
    r = await client.review(MUTATE_PODS, req)
    assert r["allowed"] is True
    pod = jsonpatch.apply_patch(req["object"], patch_of(r))
    volume, scratch = pod["spec"]["volumes"]
    assert volume["persistentVolumeClaim"] == {"claimName": "m-a100", "readOnly": True}
    assert scratch == {"name": "scratch", "emptyDir": {}}
    model, other = pod["spec"]["containers"][0]["volumeMounts"]
    # The serving PV's root is <cache>/models/<key>: the model itself, no subPath.
    assert model == {"name": "kserve-pvc-source", "mountPath": "/mnt/models", "readOnly": True}
    assert other == {"name": "scratch", "mountPath": "/scratch"}
    # Reinvoked (reinvocationPolicy: IfNeeded) after another mutator: the pod stays as it is.
    again = await client.review(MUTATE_PODS, {**req, "object": pod})
    assert jsonpatch.apply_patch(pod, patch_of(again)) == pod
    # A claim of another cache, or none, is left alone.
    other_cache = LocalModelCache.from_json(cache("x", "1Gi", ["a100"]))
    assert serving_mounts(req["object"], frozenset(), other_cache) == ([], None)
    # A folder below the model: the kubelet would create a missing one inside the published model.
    below = kserve_pod("m-a100")
    below["object"]["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "kserve-pvc-source", "mountPath": "/mnt/tok", "subPath": f"models/{KEY}/tokenizer"}
    )
    r = await client.review(MUTATE_PODS, below)
    assert r["allowed"] is False and r["status"]["code"] == 422
    assert r["status"]["message"].startswith("spec.containers[0].volumeMounts[2].subPath: "), r


# -- 2. what a node group may point at ---------------------------------------------------------------


def group_with(pv: dict[str, Any]) -> dict[str, Any]:
    g = group("g", "100Gi")
    g["spec"]["persistentVolumeSpec"] = {
        **pv,
        "nodeAffinity": g["spec"]["persistentVolumeSpec"]["nodeAffinity"],
    }
    return g


REFUSED_GROUPS = [
    ({"hostPath": {"path": "/"}}, "spec.persistentVolumeSpec.hostPath.path", "system folder"),
    ({"hostPath": {"path": "/etc"}}, "spec.persistentVolumeSpec.hostPath.path", "system folder"),
    ({"hostPath": {"path": "/etc/modelcache"}}, "spec.persistentVolumeSpec.hostPath.path", "system folder"),
    (
        {"hostPath": {"path": "/var/lib/kubelet/pods"}},
        "spec.persistentVolumeSpec.hostPath.path",
        "system folder",
    ),
    ({"local": {"path": "/lib64"}}, "spec.persistentVolumeSpec.local.path", "system folder"),
    ({"hostPath": {"path": "/var"}}, "spec.persistentVolumeSpec.hostPath.path", "system folder"),
    ({"hostPath": {"path": "/models/../etc"}}, "spec.persistentVolumeSpec.hostPath.path", "normalised"),
    ({"hostPath": {"path": "models"}}, "spec.persistentVolumeSpec.hostPath.path", "absolute"),
    ({"nfs": {"server": "x", "path": "/"}}, "spec.persistentVolumeSpec.nfs", "only a hostPath or local"),
    (
        {"csi": {"driver": "x", "volumeHandle": "y"}},
        "spec.persistentVolumeSpec.csi",
        "only a hostPath or local",
    ),
    ({"hostPath": {"path": "/a"}, "local": {"path": "/a"}}, "spec.persistentVolumeSpec", "not both"),
]


@pytest.mark.parametrize(("pv", "field", "why"), REFUSED_GROUPS)
async def test_group_webhook_refuses_what_a_spec_may_not_point_at(
    https: tuple[ClusterState, Client, Path], pv: dict[str, Any], field: str, why: str
) -> None:
    _, client, _ = https
    r = await client.review(VALIDATE_GROUPS, group_request("CREATE", group_with(pv)))
    assert r["allowed"] is False and r["status"]["code"] == 422
    assert r["status"]["message"].startswith(field + ":") and why in r["status"]["message"]


async def test_group_webhook_allows_a_folder_of_its_own(https: tuple[ClusterState, Client, Path]) -> None:
    _, client, _ = https
    for pv in (
        {"hostPath": {"path": "/var/lib/modelcache", "type": "DirectoryOrCreate"}},
        {"hostPath": {"path": "/models"}},
        {
            "local": {"path": "/mnt/disks/nvme0"},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "local",
        },
    ):
        r = await client.review(VALIDATE_GROUPS, group_request("CREATE", group_with(pv)))
        assert r["allowed"] is True, r
    # A status write on a group made before the rules existed, and a deletion: not judged.
    bad = group_with({"hostPath": {"path": "/"}})
    old = group_with({"hostPath": {"path": "/"}})
    bad["status"] = {"nodes": 1}
    assert validate_group("UPDATE", bad, old).allowed is True
    assert validate_group("DELETE", None, old).allowed is True
    # The spec changed: judged, and still refused.
    bad["spec"]["storageLimit"] = "1Ti"
    assert validate_group("UPDATE", bad, old).allowed is False


def test_system_folders_are_refused_with_everything_under_them() -> None:
    for folder in SYSTEM_FOLDERS:
        for path in (folder, folder + "/models"):
            verdict = validate_group("CREATE", group_with({"hostPath": {"path": path}}), None)
            assert verdict.allowed is False and "system folder" in verdict.message, path


async def test_file_sources_are_refused_in_a_cluster(https: tuple[ClusterState, Client, Path]) -> None:
    st, client, _ = https
    await setup_two_groups(st)
    for uri in ("file:///etc", "/etc/kubernetes", "file:///var/lib/modelcache/models"):
        c = cache("f", "1Gi", ["a100"])
        c["spec"]["sourceModelUri"] = uri
        r = await client.review(VALIDATE_CACHES, cache_request("CREATE", c))
        assert r["allowed"] is False and r["status"]["code"] == 422
        assert r["status"]["message"].startswith("spec.sourceModelUri: file:// sources")
    r = await client.review(VALIDATE_CACHES, cache_request("CREATE", cache("h", "1Gi", ["a100"])))
    assert r["allowed"] is True


# -- 4. the webhook server: malformed, deep and slow requests ------------------------------------


MALFORMED = [
    ("a string", "request.object: expected an object"),
    ({"metadata": []}, "metadata: expected an object"),
    (
        {"metadata": {"name": "x", "annotations": ["serving.kserve.io/nodegroup"]}},
        "metadata.annotations: expected an object",
    ),
    ({"metadata": {"name": "x", "labels": {"a": 1}}}, "metadata.labels.a: expected a string"),
    ({"metadata": {"name": "x"}, "spec": ["not", "an", "object"]}, "spec: expected an object"),
]


@pytest.mark.parametrize(("obj", "message"), MALFORMED)
async def test_malformed_objects_get_an_answer_naming_the_field(
    https: tuple[ClusterState, Client, Path], obj: Any, message: str
) -> None:
    _, client, _ = https
    pod = pod_request("p")
    pod["object"] = obj
    for path, req in (
        (MUTATE_PODS, pod),
        (VALIDATE_CACHES, {**cache_request("CREATE", {"metadata": {"name": "c"}}), "object": obj}),
        (VALIDATE_GROUPS, group_request("CREATE", obj)),
    ):
        r = await client.review(path, req)  # a 200 with an AdmissionReview, checked by review()
        assert r["allowed"] is False, (path, obj)
        assert r["status"]["message"].startswith(message), (path, r["status"]["message"])
        assert r["status"]["code"] == 400


async def test_a_malformed_nested_field_is_an_answer_not_a_500(
    https: tuple[ClusterState, Client, Path],
) -> None:
    st, client, _ = https
    await setup_two_groups(st)
    req = pod_request("p", annotations={"serving.kserve.io/nodegroup": "a100"})
    req["object"]["spec"]["affinity"] = {"nodeAffinity": ["a list"]}
    r = await client.review(MUTATE_PODS, req)
    assert r["allowed"] is False and r["status"]["code"] == 400
    assert r["status"]["message"].startswith("request.object")
    req["object"]["spec"]["affinity"] = "a string"
    r = await client.review(MUTATE_PODS, req)
    assert r["allowed"] is False and r["status"]["message"].startswith("spec.affinity: expected an object")


async def test_deep_json_is_a_400(https: tuple[ClusterState, Client, Path]) -> None:
    _, client, _ = https
    deep = b'{"request": {"uid": "u", "object": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}"
    for path in (MUTATE_PODS, VALIDATE_CACHES, VALIDATE_GROUPS):
        async with client.session.post(client.url + path, data=deep[: LIMITS.max_body - 1]) as response:
            assert response.status == 400, path
    # Above the size cap: refused before it is parsed.
    async with client.session.post(client.url + MUTATE_PODS, data=deep) as response:
        assert response.status == 413


async def raw(cert: Path, url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("https://").split(":")
    trust = ssl.create_default_context(cafile=str(cert))
    return await asyncio.open_connection(host, int(port), ssl=trust, server_hostname="localhost")


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open
    after ``seconds`` (a bound on the wait, far above the limit under test)."""
    async with asyncio.timeout(seconds):
        return await reader.read()


async def test_slow_clients_are_cut_off(https: tuple[ClusterState, Client, Path]) -> None:
    _, client, cert = https
    bound = LIMITS.header_timeout + 30  # generous: the machine may be slow, the point is "not forever"
    # Partial headers, then silence.
    reader, writer = await raw(cert, client.url)
    writer.write(b"POST /mutate/pods HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    await writer.drain()
    assert await closed_within(reader, bound) == b""
    writer.close()
    # Headers trickled a byte at a time do not extend the deadline.
    reader, writer = await raw(cert, client.url)

    async def trickle() -> None:
        for b in b"POST /mutate/pods HTTP/1.1\r\nX-Slow: " + b"a" * 10_000:
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    try:
        assert await closed_within(reader, bound) == b""
    finally:
        sender.cancel()
        writer.close()
    # Whole headers, part of the body: a 408 and the connection closed.
    reader, writer = await raw(cert, client.url)
    writer.write(b'POST /mutate/pods HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"request":')
    await writer.drain()
    answer = await closed_within(reader, LIMITS.body_timeout + 30)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    writer.close()
    # An idle keep-alive connection is closed too.
    reader, writer = await raw(cert, client.url)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    answer = await closed_within(reader, bound)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
    writer.close()


async def test_a_connection_serves_a_bounded_number_of_requests(
    https: tuple[ClusterState, Client, Path],
) -> None:
    _, client, cert = https
    reader, writer = await raw(cert, client.url)
    body = json.dumps({"request": {"uid": "u", "operation": "CREATE", "object": {"metadata": {"name": "p"}}}})
    request = (
        f"POST {MUTATE_PODS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    writer.write(request * (LIMITS.max_requests + 1))
    await writer.drain()
    answer = await closed_within(reader, 30)
    # Exactly max_requests answers, the last one closing the connection; the extra one is not read.
    assert answer.count(b"HTTP/1.1 200") == LIMITS.max_requests
    assert answer.lower().count(b"connection: close") == 1
    writer.close()
