"""Credentials per cache: ``serviceAccountName`` and ``storage`` resolved as KServe v0.20 does
(tag v0.20.0; every rule cited in :mod:`agent.credentials`), read by the agent in KServe's
``jobNamespace`` only, and never shown: the tests grep every log line, the state file, the
LocalModelNode's status and the Events for each secret value."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
import pytest_asyncio

from agent.credential_reader import CredentialReader, own_client, settings_for
from agent.credentials import (
    CacheCredentials,
    ServiceAccountWanted,
    StorageConfigWanted,
    from_service_account,
    from_storage_config,
    wanted,
)
from agent.download.pull import pull
from agent.download.s3 import _client
from agent.download.s3_settings import S3Settings
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import TransferSettings
from localmodel.errors import AccessDenied, DownloadError
from localmodel.kinds import EVENT, JSON, KINDS_BY_NAME, LOCAL_MODEL_NODE, SECRET, SERVICE_ACCOUNT
from localmodel.layout import storage_key
from localmodel.resources import LocalModelInfo, StorageSpec
from localmodel.state.memory import MemoryState
from localmodel.uri import parse_uri
from tests.support.agents import group_doc
from tests.support.hfhub import Hub
from tests.support.kubeapi import KubeAPI
from tests.support.s3files import S3Files
from tests.support.tls import make_cert
from tests.test_manifests import find, needs_kubectl, render

NS = "kserve-localmodel-jobs"


def secret(name: str, data: Mapping[str, str], *, annotations: Mapping[str, str] | None = None) -> JSON:
    meta: JSON = {"name": name, "namespace": NS}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def account(name: str, secrets: list[str], *, annotations: Mapping[str, str] | None = None) -> JSON:
    meta: JSON = {"name": name, "namespace": NS}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta,
        "secrets": [{"name": s} for s in secrets],
    }


# -- the rules (pure) ----------------------------------------------------------------------------


def test_which_objects_a_cache_names() -> None:
    """controller.go:171-179, 246-274: storage.key wins over the ServiceAccount; storage without a
    key means the ServiceAccount, "default" when none is named; neither field, nothing."""
    uri = "hf://org/m"
    assert wanted(LocalModelInfo(uri, "m")) is None
    assert wanted(LocalModelInfo(uri, "m", service_account_name="sa")) == ServiceAccountWanted("sa", True)
    assert wanted(LocalModelInfo(uri, "m", storage=StorageSpec())) == ServiceAccountWanted("default", False)
    both = LocalModelInfo(uri, "m", service_account_name="sa", storage=StorageSpec("k", {"region": "r"}))
    assert wanted(both) == StorageConfigWanted("k", {"region": "r"})


def test_storage_config_entry_with_parameters_over_it() -> None:
    """service_account_credentials.go:101-206 and kserve_storage.py:248-268."""
    entry = {
        "type": "s3",
        "access_key_id": "AKIDSTORAGE",
        "secret_access_key": "storage-secret-value",
        "endpoint_url": "http://minio.example:9000",
        "region": "eu-west-1",
        "verify_ssl": "0",
        "ca_bundle": "/etc/ca/bundle.pem",
    }
    found = from_storage_config(
        secret("storage-config", {"local": json.dumps(entry)}),
        StorageConfigWanted("local", {"region": "us-west-2"}),
        namespace=NS,
    )
    assert found == CacheCredentials(
        s3=S3Settings(
            access_key_id="AKIDSTORAGE",
            secret_access_key="storage-secret-value",
            endpoint_url="http://minio.example:9000",
            region="us-west-2",
            verify=False,
            ca_bundle="/etc/ca/bundle.pem",
        )
    )
    assert "storage-secret-value" not in repr(found)


@pytest.mark.parametrize(
    ("obj", "want", "words"),
    [
        (
            None,
            StorageConfigWanted("local", {}),
            ["Secret kserve-localmodel-jobs/storage-config", "does not exist"],
        ),
        (secret("storage-config", {"other": "{}"}), StorageConfigWanted("local", {}), ["no entry 'local'"]),
        (
            secret("storage-config", {"local": "not json"}),
            StorageConfigWanted("local", {}),
            ["not a JSON object"],
        ),
        (
            secret("storage-config", {"local": '{"type": "hdfs", "secret_access_key": "hidden-value"}'}),
            StorageConfigWanted("local", {}),
            ["type 'hdfs'", "type s3"],
        ),
        (secret("storage-config", {"local": "{}"}), StorageConfigWanted("local", {}), ["no type"]),
    ],
)
def test_storage_config_faults_name_the_object_never_a_value(
    obj: JSON | None, want: StorageConfigWanted, words: list[str]
) -> None:
    with pytest.raises(AccessDenied) as e:
        from_storage_config(obj, want, namespace=NS)
    message = str(e.value)
    assert all(w in message for w in words), message
    assert "hidden-value" not in message and "\n" not in message


def test_service_account_s3_secret_annotations_over_data() -> None:
    """s3/utils.go:36-187: each setting from the Secret's annotation, else its data; an endpoint
    without a scheme is https unless use-https is 0; s3_secret.go:73-109 for the keys."""
    s3 = secret(
        "s3-creds",
        {
            "awsAccessKeyID": "AKIDSA",
            "awsSecretAccessKey": "sa-secret-value",
            "S3_ENDPOINT": "ignored.example",
            "AWS_DEFAULT_REGION": "eu-central-1",
            "S3_USER_VIRTUAL_BUCKET": "true",
        },
        annotations={
            "serving.kserve.io/s3-endpoint": "minio.example:9000",
            "serving.kserve.io/s3-usehttps": "0",
            "serving.kserve.io/s3-verifyssl": "1",
            "serving.kserve.io/s3-cabundle": "/etc/ssl/ca.pem",
        },
    )
    found = from_service_account(account("sa", ["s3-creds"]), {"s3-creds": s3}, namespace=NS)
    assert found.s3 == S3Settings(
        access_key_id="AKIDSA",
        secret_access_key="sa-secret-value",
        endpoint_url="http://minio.example:9000",
        region="eu-central-1",
        verify=True,
        ca_bundle="/etc/ssl/ca.pem",
        addressing_style="virtual",
    )
    assert found.hf_token is None and found.azure is None


def test_service_account_irsa_annotations_legacy_endpoint_and_later_secrets() -> None:
    """service_account_credentials.go:240-246 (IRSA: the account's own S3 annotations, under the
    Secret's), 291-337 (kind by first key; the later Secret of a kind wins), and
    kserve_storage.py:321-330 (the legacy endpoint outside us-east-1 is virtual-host style)."""
    sa = account(
        "sa",
        ["hf-old", "gcs", "hf-new", "azure"],
        annotations={
            "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r",
            "serving.kserve.io/s3-endpoint": "https://s3.amazonaws.com",
            "serving.kserve.io/s3-region": "eu-west-3",
            "serving.kserve.io/s3-useanoncredential": "TRUE",
        },
    )
    objs = {
        "hf-old": secret("hf-old", {"HF_TOKEN": "hf_old_value"}),
        "gcs": secret("gcs", {"gcloud-application-credentials.json": "{}"}),
        "hf-new": secret("hf-new", {"HF_TOKEN": "hf_new_value\n"}),
        "azure": secret(
            "azure", {"AZ_CLIENT_ID": "cid", "AZ_CLIENT_SECRET": "az-secret", "AZ_TENANT_ID": "t"}
        ),
    }
    found = from_service_account(sa, objs, namespace=NS)
    assert found.hf_token == "hf_new_value"
    assert found.unused == ("gcs",)
    assert found.s3 == S3Settings(
        endpoint_url="https://s3.amazonaws.com",
        region="eu-west-3",
        addressing_style="virtual",
        anonymous=True,
    )
    assert found.azure is not None
    assert (found.azure.client_id, found.azure.client_secret, found.azure.tenant_id) == (
        "cid",
        "az-secret",
        "t",
    )
    for value in ("hf_new_value", "az-secret"):
        assert value not in repr(found)


def test_missing_secret_is_named_and_half_a_key_pair_refused() -> None:
    with pytest.raises(
        AccessDenied, match=r"Secret kserve-localmodel-jobs/gone \(listed by ServiceAccount sa\)"
    ):
        from_service_account(account("sa", ["gone"]), {"gone": None}, namespace=NS)
    half = secret("s3", {"awsSecretAccessKey": "only-the-secret-value"})
    with pytest.raises(AccessDenied, match="both the access key id and the secret access key") as e:
        from_service_account(account("sa", ["s3"]), {"s3": half}, namespace=NS)
    assert "only-the-secret-value" not in str(e.value)


# -- the reader and the S3 client ----------------------------------------------------------------


async def test_reader_reads_only_its_namespace_and_only_named_objects() -> None:
    state = MemoryState()
    await state.create(SERVICE_ACCOUNT, account("sa", ["tok"]))
    await state.create(SECRET, secret("tok", {"HF_TOKEN": "hf_value"}))
    elsewhere = secret("tok", {"HF_TOKEN": "hf_elsewhere"})
    elsewhere["metadata"]["namespace"] = "other"
    await state.create(SECRET, elsewhere)
    info = LocalModelInfo("hf://org/m", "m", service_account_name="sa")
    found = await CredentialReader(state, NS).credentials(info)
    assert found is not None and found.hf_token == "hf_value"
    settings = settings_for(SourceSettings(hf_token="agent-own"), found)
    assert settings.hf_token == "hf_value" and "hf_value" not in repr(settings)
    with pytest.raises(AccessDenied, match="ServiceAccount other/sa does not exist; create it in other"):
        await CredentialReader(state, "other").credentials(info)
    assert await CredentialReader(state, NS).credentials(LocalModelInfo("hf://org/m", "m")) is None


async def test_names_that_are_no_object_names_are_refused_before_any_request(kube_api: KubeAPI) -> None:
    """A crafted serviceAccountName, storage.key or Secret name listed by a ServiceAccount is
    AccessDenied naming the field, and nothing is read with it: no request leaves the namespace."""
    from localmodel.state.kube import KubeState

    await kube_api.store.create(SERVICE_ACCOUNT, account("loc", ["../../default/secrets/tok"]))
    await kube_api.store.create(SERVICE_ACCOUNT, account("ok", ["fine", "Not_A_Name"]))
    state = KubeState.for_url(kube_api.url)
    reader = CredentialReader(state, NS)
    try:
        before = len(kube_api.requests)
        for bad in ("../../default/serviceaccounts/sa", "sa/../x", "SA", "a" * 254):
            with pytest.raises(
                AccessDenied, match=r"^the cache's serviceAccountName: .*fix serviceAccountName$"
            ):
                await reader.credentials(LocalModelInfo("hf://org/m", "m", service_account_name=bad))
        for key in ("../x", "a/b", "..", "k y"):
            info = LocalModelInfo("s3://b/m", "m", storage=StorageSpec(key=key))
            with pytest.raises(AccessDenied, match=r"^the cache's storage.key: .*fix storage.key$"):
                await reader.credentials(info)
        assert kube_api.requests[before:] == []
        with pytest.raises(AccessDenied, match=r"ServiceAccount loc: secrets\[0\].name: '\.\./\.\./default"):
            await reader.credentials(LocalModelInfo("hf://org/m", "m", service_account_name="loc"))
        with pytest.raises(AccessDenied, match=r"ServiceAccount ok: secrets\[1\].name: 'Not_A_Name'"):
            await reader.credentials(LocalModelInfo("hf://org/m", "m", service_account_name="ok"))
        # Only the two ServiceAccounts were read; no Secret, listed or not.
        assert kube_api.requests[before:] == [
            ("GET", f"/api/v1/namespaces/{NS}/serviceaccounts/loc"),
            ("GET", f"/api/v1/namespaces/{NS}/serviceaccounts/ok"),
        ]
    finally:
        await state.close()


def test_s3_client_takes_the_cache_settings() -> None:
    settings = SourceSettings(
        s3_endpoint="http://agent-default.example:1",
        s3=S3Settings(
            access_key_id="AKIDCACHE",
            secret_access_key="cache-secret-value",
            endpoint_url="http://127.0.0.1:9",
            region="eu-west-1",
            addressing_style="virtual",
        ),
    )
    client, endpoint = _client(settings, "s3://b/m")
    credentials = client._request_signer._credentials
    assert (credentials.access_key, credentials.secret_key) == ("AKIDCACHE", "cache-secret-value")
    assert endpoint == "http://127.0.0.1:9" and client.meta.region_name == "eu-west-1"
    assert client.meta.config.s3 == {"addressing_style": "virtual"}
    # TLS of its own (a CA bundle, or verification off): the presigned GETs get a client of their own.
    assert own_client(CacheCredentials(s3=S3Settings()), TransferSettings()) is None
    own = own_client(CacheCredentials(s3=S3Settings(verify=False)), TransferSettings())
    assert own is not None and own.ssl_context.check_hostname is False
    own.close()


# -- end to end: the agent process on the Kubernetes API emulator ---------------------------------


def _kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": url}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


def _agent_env(tmp_path: Path, extra: Mapping[str, str] = {}) -> dict[str, str]:
    """No AWS or Hugging Face credentials of the agent's own: what it fetches, the cache's gave it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "HF_", "HUGGING_FACE")) and k not in ("KUBECONFIG",)
    }
    env["HOME"] = str(tmp_path / "home")
    return env | dict(extra)


async def _run_agent(tmp_path: Path, api: KubeAPI, env: Mapping[str, str], *extra: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", "agent", "--node-name", "n1",
        "--cache-dir", str(tmp_path / "cache"), "--kubeconfig", str(_kubeconfig(tmp_path / "kc", api.url)),
        "--health-addr", "off", "--metrics-addr", "off", "--allow-private-sources", "--log-level", "DEBUG",
        *extra,
        stderr=asyncio.subprocess.PIPE, env=dict(env),
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    text = err.decode()
    assert "Traceback" not in text, text
    return (proc.returncode if proc.returncode is not None else -1), text


def _lmn(models: list[JSON]) -> JSON:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNode",
        "metadata": {"name": "n1"},
        "spec": {"localModels": [{"nodeGroup": "g", "modelSize": "1Mi", **m} for m in models]},
    }


async def _nowhere_shown(api: KubeAPI, tmp_path: Path, logs: str, values: list[str]) -> None:
    # The state file, our manifests and every resume journal: each file the agent keeps.
    state_file = "".join(
        p.read_text(errors="replace")
        for p in sorted((tmp_path / "cache" / ".modelcache").rglob("*"))
        if p.is_file()
    )
    node = json.dumps(await api.store.get(LOCAL_MODEL_NODE, "n1"))
    events = json.dumps((await api.store.list(EVENT)).items)
    for value in values:
        for where, text in (("log", logs), ("state file", state_file), ("status", node), ("Events", events)):
            assert value not in text, f"a secret value in the {where}"


async def test_two_caches_of_one_private_repo_with_different_tokens(
    kube_api: KubeAPI, hf_hub: Hub, tmp_path: Path
) -> None:
    """Two caches of one private repo (two revisions' URIs: two folders), each with a ServiceAccount
    whose Secret holds an HF_TOKEN (hf/hf_secret.go:23-46): the valid one is downloaded, the other
    is AccessDenied; a cache whose Secret is missing says which, and recovers once it is created."""
    files = {"config.json": b'{"a": 1}', "w.bin": b"w" * 2000}
    hf_hub.add_repo("org/private", files, token="hf_validTOKEN123")
    hf_hub.add_repo("org/private", files, revision="v1")
    good, bad, late = "hf://org/private", "hf://org/private:main", "hf://org/private:v1"
    for obj in (
        group_doc("g", path=tmp_path / "cache"),
        _lmn(
            [
                {"modelName": "good", "sourceModelUri": good, "serviceAccountName": "good-sa"},
                {"modelName": "bad", "sourceModelUri": bad, "serviceAccountName": "bad-sa"},
                {"modelName": "late", "sourceModelUri": late, "serviceAccountName": "late-sa"},
            ]
        ),
        account("good-sa", ["good-token"]),
        secret("good-token", {"HF_TOKEN": "hf_validTOKEN123"}),
        account("bad-sa", ["bad-token"]),
        secret("bad-token", {"HF_TOKEN": "hf_wrongTOKEN456"}),
        account("late-sa", ["late-token"]),
        # The same token in another namespace: never read.
        secret("late-token", {"HF_TOKEN": "hf_validTOKEN123"})
        | {"metadata": {"name": "late-token", "namespace": "default"}},
    ):
        await kube_api.store.create(KINDS_BY_NAME[obj["kind"]], obj)
    env = _agent_env(tmp_path, {"HF_ENDPOINT": hf_hub.endpoint, "HF_HUB_DISABLE_XET": "1"})
    rc, logs = await _run_agent(tmp_path, kube_api, env, "--once", "--retry-min", "3600")
    assert rc == 1, logs
    node = await kube_api.store.get(LOCAL_MODEL_NODE, "n1")
    assert node["status"]["modelStatus"] == {
        "good": "ModelDownloaded",
        "bad": "ModelDownloadError",
        "late": "ModelDownloadError",
    }
    models = json.loads((tmp_path / "cache" / ".modelcache" / "state.json").read_text())["status"]["models"]
    assert models["bad"]["reason"] == "AccessDenied"
    assert models["late"]["reason"] == "AccessDenied"
    assert (
        "Secret kserve-localmodel-jobs/late-token (listed by ServiceAccount late-sa) does not exist"
        in (models["late"]["message"])
    )
    # What `kubectl get localmodelnode n1 -o yaml` shows: the reason and the Secret's name.
    late_status = node["status"]["models"]["late"]
    assert late_status["reason"] == "AccessDenied" and "late-token" in late_status["message"]
    assert (tmp_path / "cache" / "models" / storage_key(good) / "w.bin").read_bytes() == b"w" * 2000
    assert not (tmp_path / "cache" / "models" / storage_key(bad)).exists()
    warnings = [
        e["message"] for e in (await kube_api.store.list(EVENT)).items if e.get("reason") == "DownloadFailed"
    ]
    assert any("late-token" in m for m in warnings), warnings
    await _nowhere_shown(kube_api, tmp_path, logs, ["hf_validTOKEN123", "hf_wrongTOKEN456"])

    # The Secret appears: the running agent's next attempt reads it (no restart, no spec change).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", "agent", "--node-name", "n1",
        "--cache-dir", str(tmp_path / "cache"),
        "--kubeconfig", str(_kubeconfig(tmp_path / "kc", kube_api.url)),
        "--health-addr", "off", "--metrics-addr", "off", "--allow-private-sources",
        "--retry-min", "1", "--retry-max", "1",
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        await _wait_for_reason(tmp_path, "late", "AccessDenied")
        await kube_api.store.create(SECRET, secret("late-token", {"HF_TOKEN": "hf_validTOKEN123"}))
        await _wait_for_state(kube_api, "late", "ModelDownloaded")
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (tmp_path / "cache" / "models" / storage_key(late) / "w.bin").read_bytes() == b"w" * 2000
    await _nowhere_shown(kube_api, tmp_path, logs + err.decode(), ["hf_validTOKEN123", "hf_wrongTOKEN456"])


async def _wait_for_reason(tmp_path: Path, model: str, reason: str) -> None:
    path = tmp_path / "cache" / ".modelcache" / "state.json"
    for _ in range(600):
        try:
            found: Any = json.loads(path.read_text())["status"]["models"].get(model, {})
        except (OSError, ValueError, KeyError):
            found = {}
        if found.get("reason") == reason:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{model} never had reason {reason}")


async def _wait_for_state(api: KubeAPI, model: str, state: str) -> None:
    for _ in range(600):
        node = await api.store.get(LOCAL_MODEL_NODE, "n1")
        if (node.get("status") or {}).get("modelStatus", {}).get(model) == state:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{model} never {state}")


@pytest.mark.parametrize(
    "endpoint",
    [
        "PWsecretXYZ host:notaport",
        "http://127.0.0.1:notaport/PWsecretXYZ",
        "http://user:PWsecretXYZ@127.0.0.1:1",
        "http://127.0.0.1:1/?X-Amz-Signature=PWsecretXYZ",
    ],
    ids=["space", "port", "userinfo", "query"],
)
async def test_a_bad_endpoint_from_a_secret_is_named_never_shown(
    kube_api: KubeAPI, tmp_path: Path, endpoint: str
) -> None:
    """A malformed endpoint_url in the storage-config Secret: one line naming the Secret, entry and
    field (AccessDenied, no traceback, no request), and the value in no log line, status, Event or
    state file."""
    entry = {
        "type": "s3",
        "access_key_id": "AKIDLEAK1",
        "secret_access_key": "PWsecret2",
        "endpoint_url": endpoint,
    }
    for obj in (
        group_doc("g", path=tmp_path / "cache"),
        _lmn([{"modelName": "keyed", "sourceModelUri": "s3://bucket1/llm", "storage": {"key": "local"}}]),
        secret("storage-config", {"local": json.dumps(entry)}),
    ):
        await kube_api.store.create(KINDS_BY_NAME[obj["kind"]], obj)
    rc, logs = await _run_agent(tmp_path, kube_api, _agent_env(tmp_path), "--once", "--retry-min", "3600")
    assert rc == 1, logs
    assert "Traceback" not in logs and "unexpectedly" not in logs
    models = json.loads((tmp_path / "cache" / ".modelcache" / "state.json").read_text())["status"]["models"]
    assert models["keyed"]["reason"] == "AccessDenied"
    assert models["keyed"]["message"].startswith(
        f"the cache's credentials: Secret {NS}/storage-config, entry 'local', field endpoint_url: the S3 "
        "endpoint "
    )
    await _nowhere_shown(kube_api, tmp_path, logs, ["PWsecretXYZ", "PWsecret2"])


def test_a_bad_endpoint_of_a_service_account_secret_names_where_it_came_from() -> None:
    s3 = secret("s3", {"awsAccessKeyID": "AKID", "awsSecretAccessKey": "sk", "S3_ENDPOINT": "PWsecretF h:x"})
    with pytest.raises(AccessDenied) as e:
        from_service_account(account("sa", ["s3"]), {"s3": s3}, namespace=NS)
    assert str(e.value).startswith(
        f"the cache's credentials: Secret {NS}/s3, key S3_ENDPOINT: the S3 endpoint "
    )
    assert "PWsecretF" not in str(e.value)
    s3["metadata"]["annotations"] = {"serving.kserve.io/s3-endpoint": "h:PWsecretG"}
    s3["stringData"] = {"S3_ENDPOINT": "fine.example"}
    with pytest.raises(
        AccessDenied, match=f"Secret {NS}/s3, annotation serving.kserve.io/s3-endpoint: "
    ) as e:
        from_service_account(account("sa", ["s3"]), {"s3": s3}, namespace=NS)
    assert "PWsecretG" not in str(e.value)


def test_messages_written_anywhere_are_redacted() -> None:
    """What reaches a status, the state file or an Event goes through one redaction, as logs do: a
    URL quoted in an error loses its user, password and query."""
    from agent import records
    from localmodel.events import event_body
    from localmodel.logs import redact_message
    from localmodel.resources import ModelProgress, ModelState

    text = (
        "GET https://u:PWsecretA@h.example/b/k?X-Amz-Signature=PWsecretB&x=1 failed; "
        "see s3://bucket/k?versionId=PWsecretC, token=PWsecretD"
    )
    shown = redact_message(text)
    assert shown == ("GET https://h.example/b/k?<redacted> failed; see s3://bucket/k?<redacted> token=***")
    failed = records.failed(ModelProgress(ModelState.PENDING), "TransientError", text)
    assert failed.message == shown
    body = event_body(
        involved=LOCAL_MODEL_NODE, name="n1", uid=None, reason="DownloadFailed", message=text,
        type_="Warning", component="c", now="2026-01-01T00:00:00Z",
    )  # fmt: skip
    assert body["message"] == shown


async def test_a_bad_s3_endpoint_of_the_agent_is_one_line() -> None:
    """The agent's own endpoint (AWS_ENDPOINT_URL) that botocore refuses: AccessDenied at the
    boundary, the value not repeated, nothing chained."""
    settings = SourceSettings(s3_endpoint="https://PWsecretE host:1")
    with pytest.raises(AccessDenied, match="the S3 endpoint is not a URL botocore can use") as e:
        _client(settings, "s3://b/m")
    assert "PWsecretE" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


async def test_s3_cache_with_a_storage_key(kube_api: KubeAPI, s3_server: str, tmp_path: Path) -> None:
    """storage.key names an entry of the storage-config Secret (pkg/constants/constants.go:198,
    kserve_storage.py:248-268) with the endpoint and keys of the local S3 server; the agent has none
    of its own, so a cache without it fails and one with it is fetched."""
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="AKIDS3TEST",
        aws_secret_access_key="s3-secret-access-value",
    )
    s3.create_bucket(Bucket="private-models")
    s3.put_object(Bucket="private-models", Key="llm/config.json", Body=b'{"b": 2}')
    s3.put_object(Bucket="private-models", Key="llm/w.bin", Body=b"s" * 3000)
    uri, plain = "s3://private-models/llm", "s3://private-models/llm/"
    entry = {
        "type": "s3",
        "access_key_id": "AKIDS3TEST",
        "secret_access_key": "s3-secret-access-value",
        "endpoint_url": s3_server,
    }
    for obj in (
        group_doc("g", path=tmp_path / "cache"),
        _lmn(
            [
                {
                    "modelName": "keyed",
                    "sourceModelUri": uri,
                    "storage": {"key": "local", "parameters": {"region": "us-east-1"}},
                },
                {"modelName": "plain", "sourceModelUri": plain},
            ]
        ),
        secret("storage-config", {"local": json.dumps(entry)}),
    ):
        await kube_api.store.create(KINDS_BY_NAME[obj["kind"]], obj)
    rc, logs = await _run_agent(tmp_path, kube_api, _agent_env(tmp_path), "--once", "--retry-min", "3600")
    assert rc == 1
    node = await kube_api.store.get(LOCAL_MODEL_NODE, "n1")
    assert node["status"]["modelStatus"] == {"keyed": "ModelDownloaded", "plain": "ModelDownloadError"}
    models = json.loads((tmp_path / "cache" / ".modelcache" / "state.json").read_text())["status"]["models"]
    assert models["plain"]["reason"] == "AccessDenied", models["plain"]
    assert (tmp_path / "cache" / "models" / storage_key(uri) / "w.bin").read_bytes() == b"s" * 3000
    await _nowhere_shown(kube_api, tmp_path, logs, ["s3-secret-access-value", "AKIDS3TEST"])


# -- who may read them --------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", ["base", "overlays/kserve"])
def test_only_a_role_in_the_job_namespace_reads_secrets(overlay: str) -> None:
    """No ClusterRole grants Secrets (KServe's agent has get/list/watch on all of them,
    charts/kserve-localmodel-resources/files/resources.yaml:107-129); the agent gets ``get`` by name
    in kserve-localmodel-jobs; beside KServe that namespace is KServe's (not in the overlay)."""
    docs = render(overlay)
    # The one other Secret the project touches: peer fill's token, which the controller makes in the
    # agents' namespace (get by its name, create; tests/test_controller_manifests.py).
    token = find(docs, "Role", "modelcache-controller-peer-token")
    assert token["metadata"]["namespace"] == "modelcache-agent"
    assert token["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["modelcache-peer-token"],
            "verbs": ["get"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "Role") and doc is not token:
            for rule in doc.get("rules", []):
                if "secrets" in rule.get("resources", []) or "*" in rule.get("resources", []):
                    assert doc["kind"] == "Role", doc["metadata"]["name"]
                    assert doc["metadata"]["namespace"] == NS
                    assert rule["verbs"] == ["get"]
    role = find(docs, "Role", "modelcache-agent-credentials")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets", "serviceaccounts"], "verbs": ["get"]}
    ]
    binding = find(docs, "RoleBinding", "modelcache-agent-credentials")
    assert binding["metadata"]["namespace"] == NS
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "modelcache-agent", "namespace": "modelcache-agent"}
    ]
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    assert (NS in namespaces) is (overlay == "base")


async def test_standalone_takes_secret_documents(hf_hub: Hub, tmp_path: Path) -> None:
    """Standalone mode (no API server): Secret and ServiceAccount documents beside the caches, of
    the credentials namespace or of none, are read as in a cluster; of another namespace, not."""
    hf_hub.add_repo("org/gated", {"w.bin": b"g" * 1500}, token="hf_standaloneTOKEN789")
    hf_hub.add_repo("org/gated", {"w.bin": b"g" * 1500}, revision="v2")
    docs = tmp_path / "docs"
    docs.mkdir()
    group = group_doc("g", path=tmp_path / "cache", label="gpu")
    group["spec"]["persistentVolumeSpec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0][
        "matchExpressions"
    ][0]["values"] = ["h100"]
    caches = [
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelCache",
            "metadata": {"name": name},
            "spec": {
                "sourceModelUri": uri,
                "modelSize": "1Mi",
                "nodeGroups": ["g"],
                "serviceAccountName": sa,
            },
        }
        for name, uri, sa in (
            ("mine", "hf://org/gated", "hf-sa"),
            ("theirs", "hf://org/gated:v2", "other-sa"),
        )
    ]
    token = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf"},
        "stringData": {"HF_TOKEN": "hf_standaloneTOKEN789"},
    }
    other_ns = secret("hf-other", {"HF_TOKEN": "hf_standaloneTOKEN789"}) | {
        "metadata": {"name": "hf-other", "namespace": "elsewhere"}
    }
    sa = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "hf-sa"},
        "secrets": [{"name": "hf"}],
    }
    other_sa = account("other-sa", ["hf-other"])
    (docs / "all.json").write_text(
        json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": [group, *caches, token, other_ns, sa, other_sa]}
        )
    )
    env = _agent_env(tmp_path, {"HF_ENDPOINT": hf_hub.endpoint, "HF_HUB_DISABLE_XET": "1"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", "agent", "--node-name", "n1", "--node-labels", "gpu=h100",
        "--cache-dir", str(tmp_path / "cache"), "--standalone", str(docs), "--once",
        "--health-addr", "off", "--metrics-addr", "off", "--log-level", "DEBUG",
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    logs = err.decode()
    assert proc.returncode == 1, logs
    models = json.loads((tmp_path / "cache" / ".modelcache" / "state.json").read_text())["status"]["models"]
    assert models["mine"]["state"] == "ModelDownloaded", models["mine"]
    assert models["theirs"]["reason"] == "AccessDenied"
    assert (
        "Secret kserve-localmodel-jobs/hf-other (listed by ServiceAccount other-sa) does not exist"
        in (models["theirs"]["message"])
    )
    assert (
        tmp_path / "cache" / "models" / storage_key("hf://org/gated") / "w.bin"
    ).read_bytes() == b"g" * 1500
    assert "hf_standaloneTOKEN789" not in logs
    assert "hf_standaloneTOKEN789" not in (tmp_path / "cache" / ".modelcache" / "state.json").read_text()


@pytest_asyncio.fixture
async def s3_tls(tmp_path: Path) -> AsyncIterator[tuple[S3Files, Path]]:
    """S3 over TLS, its certificate signed by a CA of the test's own (tests/test_pull_s3_tls.py)."""
    certs = tmp_path / "certs"
    make_cert(certs)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    server = S3Files(tmp_path / "s3")
    await server.start(ssl_context=context)
    server.bucket("bkt")
    for key, body in {"llm/config.json": b'{"a": 1}', "llm/model.safetensors": b"w" * 100}.items():
        server.put("bkt", key, body)
    try:
        yield server, certs / "tls.crt"
    finally:
        await server.close()


async def test_s3_secret_ca_bundle_and_verify_off_reach_listing_and_fetch(
    s3_tls: tuple[S3Files, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3 Secret of the cache's ServiceAccount gives an https endpoint behind a private CA: its
    ``serving.kserve.io/s3-cabundle`` (s3/utils.go:99-105) is trusted by the listing (boto3) and the
    presigned GETs (a client of the cache's own); ``S3_VERIFY_SSL: "0"`` works as KServe's does
    (kserve_storage.py:346-350). Without either, the certificate is not trusted."""
    server, bundle = s3_tls
    for k in list(os.environ):
        if k.startswith("AWS_") or k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    host = server.endpoint.removeprefix("https://")
    keys = {
        "awsAccessKeyID": "AKIDTLS",
        "awsSecretAccessKey": "tls-secret-value",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    state = MemoryState()
    await state.create(SERVICE_ACCOUNT, account("bundle", ["with-ca"]))
    await state.create(SERVICE_ACCOUNT, account("insecure", ["no-verify"]))
    await state.create(SERVICE_ACCOUNT, account("plain", ["no-ca"]))
    note = "serving.kserve.io/"
    ca = {note + "s3-endpoint": host, note + "s3-cabundle": str(bundle)}
    await state.create(SECRET, secret("with-ca", keys, annotations=ca))
    await state.create(SECRET, secret("no-verify", keys | {"S3_ENDPOINT": host, "S3_VERIFY_SSL": "0"}))
    await state.create(SECRET, secret("no-ca", keys | {"S3_ENDPOINT": host}))
    reader = CredentialReader(state, NS)

    async def fetch(sa: str) -> None:
        found = await reader.credentials(LocalModelInfo("s3://bkt/llm", sa, service_account_name=sa))
        client = own_client(found, TransferSettings())
        try:
            await pull(
                parse_uri("s3://bkt/llm"),
                Destination.for_folder(tmp_path / sa),
                sources=settings_for(SourceSettings(list_attempts=1), found),
                transfer=TransferSettings(attempts=1),
                client=client,
            )
        finally:
            if client is not None:
                client.close()

    await fetch("bundle")
    await fetch("insecure")
    for sa in ("bundle", "insecure"):
        assert (tmp_path / sa / "model.safetensors").read_bytes() == b"w" * 100
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED") as e:
        await fetch("plain")
    assert "tls-secret-value" not in str(e.value)
