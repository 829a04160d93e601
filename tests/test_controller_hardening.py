"""What the attack on issue 20 found past the first fixes, on the controller's side: sources naming
the node or the cluster, the webhook server's TLS handshake and oversized bodies, node groups and
serving namespaces that are invalid, serving names that collide, and the serving mounts' policy."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import pytest_asyncio

from controller.admission import validate_cache, validate_group
from controller.plan import plan
from controller.reconcile import Controller
from controller.serving import (
    INVALID_NAMESPACE,
    NAME_COLLISION,
    SERVING,
    SERVING_NAMESPACES_ANNOTATION,
    serving_demands,
    volume_name,
    volume_writes,
)
from controller.snapshot import ServingDemand, Snapshot
from controller.views import Pod
from controller.webhook import MUTATE_PODS, VALIDATE_CACHES, Limits, WebhookServer
from localmodel.hosts import internal_host_error, ipv4_literal
from localmodel.kinds import (
    EVENT,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    PERSISTENT_VOLUME_CLAIM,
)
from localmodel.layout import storage_key
from localmodel.placement import admit
from localmodel.resources import LocalModelCache, LocalModelNodeGroup
from localmodel.state.base import ClusterState
from tests import test_controller_reconcile as base
from tests.support.tls import make_cert
from tests.test_controller_reconcile import cache, setup_two_groups
from tests.test_controller_webhook import Client, cache_request, patch_of, pod_request

state = base.state  # the fixture: the embedded backend and the API emulator
KEY = storage_key("hf://org/m")
LIMITS = Limits(handshake_timeout=1.0, header_timeout=1.0, body_timeout=20.0, max_body=64 * 1024)


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


# -- sources that name the node or the cluster -------------------------------------------------------

INTERNAL = [
    "http://169.254.169.254/latest/meta-data/model.tar.gz",
    "http://127.0.0.1:10250/pods/model.tar",
    "https://kubernetes.default.svc/api/model.tar",
    "https://kubernetes.default/x.tar",
    "https://kubernetes/x.tar",
    "http://localhost/x.tar",
    "http://foo.localhost./x.tar",
    "http://minio.storage.svc.cluster.local:9000/b/m.tar",
    "http://minio.storage.svc/m.tar",
    "http://2130706433/m.tar",  # 127.0.0.1 as one decimal number
    "http://0177.0.0.1/m.tar",  # octal
    "http://0x7f.0.0.1/m.tar",  # hex
    "http://0xa9fea9fe/m.tar",  # 169.254.169.254 as one hex number
    "http://127.1/m.tar",
    "http://0/m.tar",
    "http://0.0.0.0/m.tar",
    "http://[::1]/m.tar",
    "http://[::]/m.tar",
    "http://[::ffff:127.0.0.1]/m.tar",
    "http://[::ffff:a9fe:a9fe]/m.tar",
    "http://[fe80::1%25eth0]/m.tar",
    "http://[fd00:ec2::254]/m.tar",
    "HTTP://LOCALHOST/m.tar",
]


@pytest.mark.parametrize("uri", INTERNAL)
async def test_sources_on_the_node_or_in_the_cluster_are_refused(
    https: tuple[ClusterState, Client, Path], uri: str
) -> None:
    st, client, _ = https
    await setup_two_groups(st)
    c = cache("m", "1Gi", ["a100"])
    c["spec"]["sourceModelUri"] = uri
    r = await client.review(VALIDATE_CACHES, cache_request("CREATE", c))
    assert r["allowed"] is False, uri
    message = r["status"]["message"]
    assert r["status"]["code"] == 422
    assert message.startswith("spec.sourceModelUri: host '") and "\n" not in message, message


async def test_sources_outside_the_cluster_are_allowed(https: tuple[ClusterState, Client, Path]) -> None:
    st, client, _ = https
    await setup_two_groups(st)
    for i, uri in enumerate(
        (
            "https://example.com/m.tar.gz",
            "http://10.0.0.5:8080/m.tar",  # a mirror on the private network: not refused by the host
            "https://[2001:db8::1]/m.tar",
            "https://svc.example.com/m.tar",
            "https://127x.example/m.tar",
        )
    ):
        c = cache(f"m{i}", "1Gi", ["a100"])
        c["spec"]["sourceModelUri"] = uri
        r = await client.review(VALIDATE_CACHES, cache_request("CREATE", c))
        assert r["allowed"] is True, (uri, r)


def test_ipv4_literals_in_every_form() -> None:
    assert str(ipv4_literal("2130706433")) == "127.0.0.1"
    assert str(ipv4_literal("0x7f.1")) == "127.0.0.1"
    assert str(ipv4_literal("0177.0.0.01")) == "127.0.0.1"
    assert str(ipv4_literal("169.254.43518")) == "169.254.169.254"
    assert str(ipv4_literal("10.0.0.5.")) == "10.0.0.5"
    for name in ("example.com", "1.2.3.4.5", "256.0.0.1", "08.0.0.1", "", "1..2"):
        assert ipv4_literal(name) is None, name
    assert internal_host_error("example.com") is None
    assert internal_host_error("8.8.8.8") is None
    assert "link-local" in (internal_host_error("169.254.169.254") or "")


# -- the webhook server: TLS handshake and oversized bodies ------------------------------------------


async def test_a_connection_without_a_handshake_is_closed(https: tuple[ClusterState, Client, Path]) -> None:
    _, client, _ = https
    host, port = client.url.removeprefix("https://").split(":")
    # Plain TCP, never a ClientHello: closed after the handshake bound (the test's bound is generous).
    for first in (b"", b"\x16\x03\x01\x02\x00"):  # nothing; the start of a ClientHello
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(first)
            await writer.drain()
            async with asyncio.timeout(LIMITS.handshake_timeout + 30):
                assert await reader.read(1000) == b"", first
        finally:
            writer.close()


async def test_a_body_over_the_cap_is_a_413_at_once(https: tuple[ClusterState, Client, Path]) -> None:
    _, client, cert = https
    host, port = client.url.removeprefix("https://").split(":")
    trust = ssl.create_default_context(cafile=str(cert))
    reader, writer = await asyncio.open_connection(host, int(port), ssl=trust, server_hostname="localhost")
    try:
        writer.write(
            f"POST {MUTATE_PODS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {LIMITS.max_body + 1}\r\n\r\n{{".encode()
        )
        await writer.drain()
        # The body would take body_timeout (20 s) to time out: the answer comes before that.
        async with asyncio.timeout(LIMITS.body_timeout - 5):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    finally:
        writer.close()


# -- what a node group may point at: the one list ----------------------------------------------------


def group_at(pv: dict[str, object]) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNodeGroup",
        "metadata": {"name": "g"},
        "spec": {"storageLimit": "1Ti", "persistentVolumeSpec": pv},
    }


@pytest.mark.parametrize(
    "path",
    [
        "/var/lib/containers",
        "/var/lib/crio/x",
        "/var/lib/rancher",
        "/var/lib/cni",
        "/opt/cni/bin",
        "/var/log",
        "/var/log/pods",
        "/tmp",
        "/tmp/cache",
        "/var/tmp",
        "/var/snap/microk8s",
        "/srv",
        "/media",
        "/mnt",
        "/opt",
        "/home",
        "/models\nx",
        "/models\x00x",
    ],
)
def test_group_webhook_refuses_every_system_folder(path: str) -> None:
    verdict = validate_group("CREATE", group_at({"hostPath": {"path": path}}), None)
    assert verdict.allowed is False and verdict.code == 422, path
    assert verdict.message.startswith("spec.persistentVolumeSpec.hostPath.path: "), verdict.message
    assert "\n" not in verdict.message


def test_group_webhook_allows_folders_of_their_own() -> None:
    for path in ("/mnt/disks/ssd0", "/srv/modelcache", "/models", "/var/lib/modelcache", "/home/ml/cache"):
        assert validate_group("CREATE", group_at({"local": {"path": path}}), None).allowed, path


# -- every mount of our serving claims: read-only, whole ----------------------------------------------


async def test_the_webhook_makes_every_mount_of_our_claims_read_only(
    https: tuple[ClusterState, Client, Path],
) -> None:
    """Not only the claims of the cache a pod names: any claim the controller made in its namespace."""
    st, client, _ = https
    await setup_two_groups(st)
    m = cache("m", "10Gi", ["a100"])
    m["metadata"]["annotations"] = {SERVING_NAMESPACES_ANNOTATION: "team"}
    await st.create(LOCAL_MODEL_CACHE, m)
    await st.create(LOCAL_MODEL_CACHE, cache("x", "1Gi", ["a100"]))
    await Controller(st).run(once=True)
    await st.patch_status(
        LOCAL_MODEL_NODE, "a1", {"modelStatus": {"m": "ModelDownloaded", "x": "ModelDownloaded"}}
    )
    await Controller(st).run(once=True)
    assert (await st.get(PERSISTENT_VOLUME_CLAIM, "m-a100", namespace="team"))["metadata"]["labels"]
    volumes = [
        {"name": "w", "persistentVolumeClaim": {"claimName": "m-a100", "readOnly": False}},
        {"name": "mine", "persistentVolumeClaim": {"claimName": "data"}},  # the tenant's own claim
    ]
    mounts = [{"name": "w", "mountPath": "/w"}, {"name": "mine", "mountPath": "/data"}]
    # A pod that asks only for a node group, and one that names another cache.
    for ask in (
        {"annotations": {"serving.kserve.io/nodegroup": "a100"}},
        {"annotations": {"modelcache.io/model": "x"}},
    ):
        req = pod_request("p", volumes=volumes, **ask)
        req["object"]["spec"]["containers"] = [{"name": "c", "volumeMounts": mounts}]
        req["object"]["spec"]["initContainers"] = [{"name": "i", "volumeMounts": mounts[:1]}]
        r = await client.review(MUTATE_PODS, req)
        assert r["allowed"] is True, r
        pod = jsonpatch.apply_patch(req["object"], patch_of(r))
        assert pod["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "m-a100", "readOnly": True}
        assert pod["spec"]["volumes"][1] == volumes[1]
        assert pod["spec"]["containers"][0]["volumeMounts"] == [
            {"name": "w", "mountPath": "/w", "readOnly": True},
            {"name": "mine", "mountPath": "/data"},
        ]
        assert pod["spec"]["initContainers"][0]["volumeMounts"] == [
            {"name": "w", "mountPath": "/w", "readOnly": True}
        ]
    # Ways around the whole-folder rule are refused, naming the field.
    for bad in ({"subPathExpr": "models/$(K)"}, {"subPath": "foo/bar"}, {"subPath": f"./models/{KEY}"}):
        req = pod_request("p", volumes=volumes, annotations={"serving.kserve.io/nodegroup": "a100"})
        req["object"]["spec"]["containers"] = [{"name": "c", "volumeMounts": [{**mounts[0], **bad}]}]
        r = await client.review(MUTATE_PODS, req)
        assert r["allowed"] is False and r["status"]["code"] == 422, bad
        assert r["status"]["message"].startswith(f"spec.containers[0].volumeMounts[0].{next(iter(bad))}: ")


# -- serving names: claims that collide, PV names that must be unique ---------------------------------

SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def test_pv_names_are_unique_and_fit() -> None:
    # The attack: m/g/ns x-y and m/g-x/ns y were both m-g-x-y.
    assert volume_name("m", "g", "x-y") != volume_name("m", "g-x", "y")
    assert volume_name("m", "g-x", "y") == "m-g-x-y"  # KServe's name where it is unambiguous
    long_cache, long_group = "c" * 200, "g" * 200
    names = {
        volume_name(c, g, ns)
        for c, g, ns in [
            ("m", "g", "x-y"),
            ("m", "g-x", "y"),
            ("m-g", "x", "z"),  # ("m-g", "x") is claim "m-g-x" too: one owner, resolved before
            ("m", "g", "x"),
            (long_cache, long_group, "team"),
            (long_cache, long_group, "team-2"),
            (long_cache, long_group + "h", "team"),
            ("a" * 253, "b", "n"),
        ]
    }
    assert len(names) == 8
    for name in names:
        assert len(name) <= 253 and SUBDOMAIN.fullmatch(name), name


def named_group(name: str) -> dict[str, object]:
    g = base.group("a100", "500Gi")
    g["metadata"] = {"name": name}
    return g


def test_colliding_claim_names_serve_the_older_cache_only() -> None:
    groups = {n: LocalModelNodeGroup.from_json(named_group(n)) for n in ("c", "b-c")}
    older = cache("a", "1Gi", ["b-c"])
    older["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    younger = cache("a-b", "1Gi", ["c"])
    younger["metadata"]["creationTimestamp"] = "2026-01-02T00:00:00Z"
    caches = {c["metadata"]["name"]: LocalModelCache.from_json(c) for c in (older, younger)}
    s = Snapshot(
        caches=caches,
        groups=groups,
        nodes={},
        serving=frozenset({ServingDemand("a-b", None, "d"), ServingDemand("a", None, "d")}),
    )
    admitted = admit(caches.values(), groups.values()).admitted
    writes = [(w.kind, w.action, w.name, w.namespace) for w in volume_writes(s, admitted)]
    assert writes == [
        ("PersistentVolume", "create", "a-b-c-d", None),
        ("PersistentVolumeClaim", "create", "a-b-c", "d"),
    ]
    created = volume_writes(s, admitted)[0].body
    assert created is not None and created["metadata"]["annotations"]["modelcache.io/cache"] == "a"
    # A pod mounting the claim by name asks for the owner's model.
    by_claim = serving_demands(
        [
            Pod.from_json(
                {
                    "metadata": {"namespace": "d"},
                    "spec": {"volumes": [{"persistentVolumeClaim": {"claimName": "a-b-c"}}]},
                }
            )
        ],
        caches,
    )
    assert by_claim == {ServingDemand("a", "b-c", "d")}
    done = plan(s)
    (status,) = [w for w in done.statuses if w.name == "a-b"]
    (served,) = [c for c in status.patch["conditions"] if c["type"] == SERVING]
    assert served["status"] == "False" and served["nodeGroup"] == "c" and served["reason"] == NAME_COLLISION
    assert "'a-b-c'" in served["message"] and "'a'" in served["message"]
    (warning,) = [e for e in done.events if e.name == "a-b" and e.type == "Warning"]
    assert warning.reason == NAME_COLLISION and warning.message == served["message"]
    assert not [
        c for w in done.statuses if w.name == "a" for c in w.patch["conditions"] if c["type"] == SERVING
    ]


async def test_colliding_claim_names_on_a_cluster(https: tuple[ClusterState, Client, Path]) -> None:
    st, client, _ = https
    for g in ("c", "b-c"):
        await st.create(LOCAL_MODEL_NODE_GROUP, named_group(g))
    await st.create(NODE, base.node("a1", "a100"))
    for c in (cache("a", "1Gi", ["b-c"]), cache("a-b", "1Gi", ["c"])):
        c["metadata"]["annotations"] = {SERVING_NAMESPACES_ANNOTATION: "d"}
        await st.create(LOCAL_MODEL_CACHE, c)  # "a" first: older, or as old and first by name
    await Controller(st).run(once=True)
    claims = (await st.list(PERSISTENT_VOLUME_CLAIM, namespace="d")).items
    assert [(c["metadata"]["name"], c["metadata"]["annotations"]["modelcache.io/cache"]) for c in claims] == [
        ("a-b-c", "a")
    ]
    refused = await st.get(LOCAL_MODEL_CACHE, "a-b")
    (served,) = [c for c in refused["status"]["conditions"] if c["type"] == SERVING]
    assert served["reason"] == NAME_COLLISION and served["nodeGroup"] == "c"
    events = (await st.list(EVENT, namespace="default")).items
    assert any(e["reason"] == NAME_COLLISION and e["involvedObject"]["name"] == "a-b" for e in events)
    # A pod naming the refused cache is refused: it would mount the other cache's model.
    await st.patch_status(
        LOCAL_MODEL_NODE, "a1", {"modelStatus": {"a": "ModelDownloaded", "a-b": "ModelDownloaded"}}
    )
    await Controller(st).run(once=True)
    r = await client.review(MUTATE_PODS, pod_request("p", annotations={"modelcache.io/model": "a-b"}))
    assert r["allowed"] is False and "is not served from node group 'c'" in r["status"]["message"], r
    assert (await client.review(MUTATE_PODS, pod_request("q", annotations={"modelcache.io/model": "a"})))[
        "allowed"
    ]
    # The cache webhook refuses a new cache whose claim name an existing one has.
    existing = [LocalModelCache.from_json(await st.get(LOCAL_MODEL_CACHE, "a"))]
    groups = [LocalModelNodeGroup.from_json(named_group(g)) for g in ("c", "b-c")]
    newcomer = cache("a-b", "1Gi", ["c"])
    newcomer["spec"]["sourceModelUri"] = "hf://org/new"
    verdict = validate_cache("CREATE", newcomer, None, caches=existing, groups=groups)
    assert verdict.allowed is False
    assert verdict.message.startswith("spec.nodeGroups: the serving claim 'a-b-c'"), verdict.message
    assert "LocalModelCache 'a' from node group b-c" in verdict.message


# -- modelcache.io/serving-namespaces ------------------------------------------------------------------

BAD_NAMESPACES = [
    "Bad_NS",
    "n" * 300,
    "a,,b",
    "kube-system",
    "modelcache-system",
    "modelcache-agent",
    "kube-public",
]


@pytest.mark.parametrize("value", BAD_NAMESPACES)
async def test_serving_namespaces_are_validated_at_admission(
    https: tuple[ClusterState, Client, Path], value: str
) -> None:
    st, client, _ = https
    await setup_two_groups(st)
    c = cache("m", "1Gi", ["a100"])
    c["metadata"]["annotations"] = {SERVING_NAMESPACES_ANNOTATION: value}
    r = await client.review(VALIDATE_CACHES, cache_request("CREATE", c))
    assert r["allowed"] is False and r["status"]["code"] == 422, value
    assert r["status"]["message"].startswith(f"metadata.annotations[{SERVING_NAMESPACES_ANNOTATION}] entry ")
    # An update of the annotation alone is judged too.
    old = cache("m", "1Gi", ["a100"])
    r = await client.review(VALIDATE_CACHES, cache_request("UPDATE", c, old))
    assert r["allowed"] is False, value


def test_the_plan_skips_invalid_serving_namespaces() -> None:
    groups = {"a100": LocalModelNodeGroup.from_json(base.group("a100", "100Gi"))}
    c = cache("m", "1Gi", ["a100"])
    c["metadata"]["annotations"] = {
        SERVING_NAMESPACES_ANNOTATION: "team, Bad_NS,,kube-system,modelcache-agent"
    }
    caches = {"m": LocalModelCache.from_json(c)}
    s = Snapshot(caches=caches, groups=groups, nodes={})
    done = plan(s)
    assert [(w.kind, w.name, w.namespace) for w in done.volumes] == [
        ("PersistentVolume", "m-a100-team", None),
        ("PersistentVolumeClaim", "m-a100", "team"),
    ]
    (status,) = [w for w in done.statuses if w.kind == "LocalModelCache"]
    (served,) = [x for x in status.patch["conditions"] if x["type"] == SERVING]
    assert served["reason"] == INVALID_NAMESPACE and "nodeGroup" not in served
    for part in ("entry 2", "'Bad_NS'", "entry 3", "an empty entry", "'kube-system'", "'modelcache-agent'"):
        assert part in served["message"], part
    assert [e.reason for e in done.events if e.type == "Warning"] == [INVALID_NAMESPACE]
    # Fixed: the condition goes.
    c["metadata"]["annotations"] = {SERVING_NAMESPACES_ANNOTATION: "team"}
    fixed = plan(Snapshot(caches={"m": LocalModelCache.from_json(c)}, groups=groups, nodes={}))
    (status,) = [w for w in fixed.statuses if w.kind == "LocalModelCache"]
    assert [x["type"] for x in status.patch["conditions"]] == ["Admitted", "Ready"]


# -- groups stored past admission: said to be invalid, and why ----------------------------------------


@pytest.mark.parametrize(
    ("pv", "why"),
    [
        (
            {"hostPath": {"path": "/"}},
            "spec.persistentVolumeSpec.hostPath.path: '/' is a shared system folder",
        ),
        (
            {"nfs": {"server": "evil", "path": "/"}},
            "spec.persistentVolumeSpec.nfs: nfs: only a hostPath or local",
        ),
        ({"hostPath": {"path": "/var/log/x"}}, "'/var/log/x' is (or is under) a system folder"),
        ({"hostPath": {"path": "/tmp/x"}}, "'/tmp/x' is (or is under) a system folder"),
    ],
)
async def test_a_stored_invalid_group_is_named_invalid_in_the_status(
    https: tuple[ClusterState, Client, Path], pv: dict[str, object], why: str
) -> None:
    st, client, _ = https
    bad = group_at(pv)
    bad["metadata"] = {"name": "root"}
    await st.create(LOCAL_MODEL_NODE_GROUP, bad)  # as KServe's CRDs (no rules, no webhook) store it
    await st.create(LOCAL_MODEL_CACHE, cache("m", "1Gi", ["root"]))
    await Controller(st).run(once=True)
    status = (await st.get(LOCAL_MODEL_CACHE, "m"))["status"]
    (admitted,) = [c for c in status["conditions"] if c["type"] == "Admitted"]
    assert admitted["status"] == "False" and admitted["reason"] == "NodeGroupInvalid"
    assert admitted["message"].startswith("node group 'root' is invalid and ignored: "), admitted
    assert why in admitted["message"] and "does not exist" not in admitted["message"]
    # The cache webhook says the same of a new cache that lists it.
    r = await client.review(VALIDATE_CACHES, cache_request("CREATE", cache("n", "1Gi", ["root"])))
    assert r["allowed"] is False and r["status"]["message"].startswith("node group 'root' is invalid: ")
    # Fixed: admitted, without a restart.
    await st.patch(
        LOCAL_MODEL_NODE_GROUP,
        "root",
        {"spec": {"persistentVolumeSpec": {"hostPath": {"path": "/models"}, "nfs": None, "local": None}}},
    )
    await Controller(st).run(once=True)
    status = (await st.get(LOCAL_MODEL_CACHE, "m"))["status"]
    (admitted,) = [c for c in status["conditions"] if c["type"] == "Admitted"]
    assert admitted["status"] == "True", admitted


@pytest.mark.parametrize("pv", [{}, {"hostPath": {}}, {"local": {}}])
async def test_a_group_without_a_folder_is_refused_and_its_caches_say_so(
    https: tuple[ClusterState, Client, Path], pv: dict[str, object]
) -> None:
    """The attack: {} and hostPath: {} were admitted and silently made no serving volume."""
    verdict = validate_group("CREATE", group_at(pv), None)
    assert verdict.allowed is False and verdict.code == 422
    assert (
        verdict.message.startswith("spec.persistentVolumeSpec") and "names no cache folder" in verdict.message
    )
    st, _, _ = https
    stored = group_at(pv)
    stored["metadata"] = {"name": "a100"}
    affinity = base.group("a100", "1Gi")["spec"]["persistentVolumeSpec"]["nodeAffinity"]
    stored["spec"]["persistentVolumeSpec"] = {**pv, "nodeAffinity": affinity}  # stored past admission
    await st.create(LOCAL_MODEL_NODE_GROUP, stored)
    await st.create(NODE, base.node("a1", "a100"))
    m = cache("m", "1Gi", ["a100"])
    m["metadata"]["annotations"] = {SERVING_NAMESPACES_ANNOTATION: "team"}
    await st.create(LOCAL_MODEL_CACHE, m)
    await Controller(st).run(once=True)
    status = (await st.get(LOCAL_MODEL_CACHE, "m"))["status"]
    (served,) = [c for c in status["conditions"] if c["type"] == SERVING]
    assert served["reason"] == "NoCacheFolder" and served["nodeGroup"] == "a100"
    assert "no serving volume is made" in served["message"]
    assert (await st.list(PERSISTENT_VOLUME_CLAIM, namespace="team")).items == []
    events = (await st.list(EVENT, namespace="default")).items
    assert any(e["reason"] == "NoCacheFolder" for e in events)
