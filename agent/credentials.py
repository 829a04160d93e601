"""Per-cache credentials, pure: a LocalModelCache's ``serviceAccountName`` and ``storage`` turned into
what its download uses, by KServe v0.20's rules (tag v0.20.0), from the ServiceAccount and Secrets
that :mod:`agent.credential_reader` fetched from one namespace (KServe's ``jobNamespace``,
``kserve-localmodel-jobs``).

Which rule applies (pkg/controller/v1alpha1/localmodelnode/controller.go:171-179, 246-274):

- Neither field set: no per-cache credentials; the agent's own (its environment, its mounted
  ``modelcache-hf`` Secret) are used, as KServe's download Job then gets none of its own.
- ``storage.key`` set: the Secret ``storage-config`` (pkg/constants/constants.go:198), its entry
  ``storage.key``: JSON whose ``type`` must be ``s3`` (the only object store KServe's storage spec
  supports besides HDFS, service_account_credentials.go:55, 117-150), with ``storage.parameters``
  laid over it (service_account_credentials.go:198-206). The storage initializer then reads
  ``endpoint_url``, ``access_key_id``, ``secret_access_key``, ``region``, ``ca_bundle``,
  ``verify_ssl`` and ``anonymous`` (python/storage/kserve_storage/kserve_storage.py:248-268).
  ``serviceAccountName`` is then ignored, as KServe ignores it.
- Otherwise (``serviceAccountName``, or ``storage`` without a key): the ServiceAccount named
  (``default`` when none is), and each Secret its ``secrets`` list names, in order
  (service_account_credentials.go:211-269). A Secret counts by its first key found in KServe's
  order (service_account_credentials.go:291-337): ``awsSecretAccessKey`` is S3 (keys
  ``awsAccessKeyID``/``awsSecretAccessKey``, s3/s3_secret.go:73-109), then the GCS key file, then
  Azure (``AZ_*``/``AZURE_*``, ``AZURE_STORAGE_ACCESS_KEY``; azure/azure_secret.go:23-88), then
  https and HDFS, then ``HF_TOKEN`` (hf/hf_secret.go:23-46). Of two Secrets of one kind the later
  wins (KServe merges or appends the same variables; the last one is what the container sees).
  S3 settings come from each of the Secret's annotations, else its data (s3/utils.go:36-155):
  ``serving.kserve.io/s3-endpoint`` / ``S3_ENDPOINT``, ``s3-usehttps`` / ``S3_USE_HTTPS``,
  ``s3-region`` / ``AWS_DEFAULT_REGION``, ``s3-verifyssl`` / ``S3_VERIFY_SSL``,
  ``s3-usevirtualbucket`` / ``S3_USER_VIRTUAL_BUCKET``, ``s3-useaccelerate`` / ``S3_USE_ACCELERATE``,
  ``s3-useanoncredential`` / ``awsAnonymousCredential``, ``s3-cabundle`` / ``AWS_CA_BUNDLE``; an
  endpoint without a scheme is https unless use-https is ``0`` (s3/utils.go:157-187). A
  ServiceAccount with the IRSA annotation ``eks.amazonaws.com/role-arn`` gives the same settings
  from its own annotations (service_account_credentials.go:240-246), under the Secrets' values.
- Values as the storage initializer reads them (kserve_storage.py:288-381): verify is off for
  ``0``/``false``; anonymous, virtual-host style and acceleration are on for ``true`` (any case);
  the legacy endpoint ``https://s3.amazonaws.com`` with a region other than us-east-1 is
  virtual-host style.

Where we differ, on purpose: KServe logs a ServiceAccount or Secret it cannot read and starts the
download without it (controller.go:175-178, service_account_credentials.go:217-222); here the
download fails with :class:`~localmodel.errors.AccessDenied` naming the object (never its
content), shown in the model's status and a Warning Event, and is retried until it appears. Not
taken per cache: IRSA's role itself (the agent's own identity signs), a CA bundle ConfigMap
(``AWS_CA_BUNDLE_CONFIGMAP``: KServe's download Job mounts none either, platform_default.go:32),
GCS key files, https headers and HDFS: those Secrets are listed in :attr:`CacheCredentials.unused`.
KServe's cluster-wide S3 defaults (``credentials`` in ``inferenceservice-config``) are the
agent's environment here (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``).
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.download.azure import AzureSettings
from agent.download.s3_settings import S3Settings
from localmodel.errors import AccessDenied
from localmodel.k8snames import config_key_error, subdomain_error
from localmodel.resources import LocalModelInfo
from localmodel.text import printable

JOB_NAMESPACE = "kserve-localmodel-jobs"  # KServe's localModel.jobNamespace default
STORAGE_CONFIG_SECRET = "storage-config"  # noqa: S105 - a Secret's name
DEFAULT_SERVICE_ACCOUNT = "default"
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"

_S3_SECRET_KEY = "awsSecretAccessKey"  # noqa: S105 - a key's name
_S3_ACCESS_KEY = "awsAccessKeyID"
_GCS_KEY_FILE = "gcloud-application-credentials.json"
_AZURE_KEYS = ("AZ_CLIENT_ID", "AZURE_CLIENT_ID", "AZURE_ACCESS_TOKEN", "AZURE_STORAGE_ACCESS_KEY")
_HTTPS_HOST = "https-host"
_HDFS_NAMENODE = "HDFS_NAMENODE"
_HF_TOKEN = "HF_TOKEN"  # noqa: S105 - a key's name
_ANNOTATION = "serving.kserve.io/"
# (annotation suffix, data key) per setting, s3/s3_secret.go:30-71.
_S3_FIELDS = {
    "endpoint": ("s3-endpoint", "S3_ENDPOINT"),
    "use_https": ("s3-usehttps", "S3_USE_HTTPS"),
    "region": ("s3-region", "AWS_DEFAULT_REGION"),
    "verify": ("s3-verifyssl", "S3_VERIFY_SSL"),
    "virtual": ("s3-usevirtualbucket", "S3_USER_VIRTUAL_BUCKET"),
    "accelerate": ("s3-useaccelerate", "S3_USE_ACCELERATE"),
    "anonymous": ("s3-useanoncredential", "awsAnonymousCredential"),
    "ca_bundle": ("s3-cabundle", "AWS_CA_BUNDLE"),
}


@dataclass(frozen=True)
class CacheCredentials:
    """What one cache's download uses in place of the agent's own settings: ``hf_token``, ``s3``,
    ``azure`` (None: the agent's own), and ``unused``: Secrets of a kind not taken per cache
    (their names only). Secrets are never in the repr."""

    hf_token: str | None = field(default=None, repr=False)
    s3: S3Settings | None = None
    azure: AzureSettings | None = None
    unused: tuple[str, ...] = ()


@dataclass(frozen=True)
class StorageConfigWanted:
    """Read Secret :data:`STORAGE_CONFIG_SECRET`, entry ``key``, with ``parameters`` over it."""

    key: str
    parameters: Mapping[str, str]


@dataclass(frozen=True)
class ServiceAccountWanted:
    """Read this ServiceAccount, then each Secret it lists."""

    name: str
    explicit: bool  # named by the cache (else KServe's "default")


Wanted = StorageConfigWanted | ServiceAccountWanted | None


def wanted(info: LocalModelInfo) -> Wanted:
    """Which objects the cache's credentials come from (controller.go:171-179, 246-274).
    AccessDenied naming the field when ``serviceAccountName`` is no ServiceAccount name or
    ``storage.key`` no Secret key (:mod:`localmodel.k8snames`; KServe's schema takes any string):
    nothing is read for such a name."""
    if info.storage is not None and info.storage.key:
        if (why := config_key_error(info.storage.key)) is not None:
            raise AccessDenied(f"the cache's storage.key: {why}; fix storage.key")
        return StorageConfigWanted(info.storage.key, dict(info.storage.parameters))
    if info.service_account_name or info.storage is not None:
        name = info.service_account_name or DEFAULT_SERVICE_ACCOUNT
        if (why := subdomain_error(name)) is not None:
            raise AccessDenied(f"the cache's serviceAccountName: {why}; fix serviceAccountName")
        return ServiceAccountWanted(name, explicit=bool(info.service_account_name))
    return None


def secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's values as text: ``data`` (base64) with ``stringData`` over it, as the API server
    merges them. A value that is not base64 or not UTF-8 is AccessDenied naming the key."""
    name = printable(str((secret.get("metadata") or {}).get("name", "")))
    out: dict[str, str] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            out[str(key)] = base64.b64decode(str(value), validate=True).decode()
        except (binascii.Error, ValueError):
            raise AccessDenied(
                f"Secret {name}: the value of {printable(str(key))!r} is not base64 of UTF-8 text"
            ) from None
    out.update({str(k): str(v) for k, v in (secret.get("stringData") or {}).items()})
    return out


def from_storage_config(
    secret: Mapping[str, Any] | None, want: StorageConfigWanted, *, namespace: str
) -> CacheCredentials:
    """The credentials of ``storage.key`` in the ``storage-config`` Secret (None: it does not
    exist). AccessDenied naming the Secret and key (never a value) when it or the entry is missing,
    the entry is not a JSON object of strings, or its type is not s3."""
    where = f"Secret {namespace}/{STORAGE_CONFIG_SECRET}"
    if secret is None:
        raise AccessDenied(
            f"the cache's storage.key {printable(want.key)!r} needs {where}, which does not exist; "
            f"create it in {namespace} or remove storage.key"
        )
    data = secret_data(secret)
    if want.key not in data:
        raise AccessDenied(
            f"{where} has no entry {printable(want.key)!r} (the cache's storage.key); add it or fix "
            "storage.key"
        )
    try:
        config = json.loads(data[want.key])
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise AccessDenied(f"{where}: entry {printable(want.key)!r} is not a JSON object")
    merged = {str(k): v for k, v in config.items()} | dict(want.parameters)
    if not all(isinstance(v, str) for v in merged.values()):
        raise AccessDenied(f"{where}: entry {printable(want.key)!r} holds a value that is not a string")
    kind = merged.get("type", "")
    if kind != "s3":
        what = f"type {printable(kind)!r}" if kind else "no type"
        raise AccessDenied(
            f"{where}: entry {printable(want.key)!r} has {what}; modelcache takes storage.key "
            "credentials of type s3 (KServe's other type, hdfs, is not a source here)"
        )
    return CacheCredentials(
        s3=_s3_settings(
            access_key_id=merged.get("access_key_id"),
            secret_access_key=merged.get("secret_access_key"),
            endpoint=merged.get("endpoint_url"),
            use_https=None,
            region=merged.get("region"),
            verify=merged.get("verify_ssl"),
            virtual=None,
            accelerate=None,
            anonymous=merged.get("anonymous"),
            ca_bundle=merged.get("ca_bundle"),
            where=f"{where} entry {printable(want.key)!r}",
            endpoint_from=f"{where}, entry {printable(want.key)!r}, field endpoint_url",
        )
    )


def secret_names(account: Mapping[str, Any]) -> tuple[str, ...]:
    """The Secrets a ServiceAccount lists (``secrets[].name``), in order. AccessDenied naming the
    ServiceAccount and the entry when one is no Secret name (:mod:`localmodel.k8snames`): none of
    them is read then."""
    names = []
    for i, ref in enumerate(account.get("secrets") or ()):
        if isinstance(ref, Mapping) and isinstance(ref.get("name"), str) and ref["name"]:
            if (why := subdomain_error(ref["name"])) is not None:
                account_name = printable(str((account.get("metadata") or {}).get("name", "")))
                raise AccessDenied(
                    f"the cache's credentials: ServiceAccount {account_name}: secrets[{i}].name: {why}; "
                    "fix the ServiceAccount"
                )
            names.append(ref["name"])
    return tuple(names)


def missing_service_account(want: ServiceAccountWanted, *, namespace: str) -> AccessDenied:
    field_hint = "fix serviceAccountName" if want.explicit else "set serviceAccountName or storage.key"
    return AccessDenied(
        f"the cache's credentials: ServiceAccount {namespace}/{printable(want.name)} does not exist; "
        f"create it in {namespace} or {field_hint}"
    )


def from_service_account(
    account: Mapping[str, Any],
    secrets: Mapping[str, Mapping[str, Any] | None],
    *,
    namespace: str,
) -> CacheCredentials:
    """The credentials of a ServiceAccount and the Secrets it lists (``secrets``: name -> object,
    None when it does not exist). AccessDenied naming the first missing Secret (never a value)."""
    account_name = printable(str((account.get("metadata") or {}).get("name", "")))
    annotations = _annotations(account)
    # IRSA: the ServiceAccount's own annotations give the S3 settings (not its role: see above).
    s3_layers: list[tuple[str, Mapping[str, str], Mapping[str, str]]] = []
    if IRSA_ANNOTATION in annotations:
        s3_layers.append((f"ServiceAccount {namespace}/{account_name}", annotations, {}))
    hf_token: str | None = None
    azure: AzureSettings | None = None
    unused: list[str] = []
    for name in secret_names(account):
        secret = secrets.get(name)
        if secret is None:
            raise AccessDenied(
                f"the cache's credentials: Secret {namespace}/{printable(name)} (listed by ServiceAccount "
                f"{account_name}) does not exist; create it in {namespace} or remove it from the "
                "ServiceAccount"
            )
        data = secret_data(secret)
        if _S3_SECRET_KEY in data:
            s3_layers.append((f"Secret {namespace}/{printable(name)}", _annotations(secret), data))
        elif _GCS_KEY_FILE in data:
            unused.append(name)
        elif any(k in data for k in _AZURE_KEYS):
            azure = _azure(data)
        elif _HTTPS_HOST in data or _HDFS_NAMENODE in data:
            unused.append(name)
        elif _HF_TOKEN in data:
            hf_token = data[_HF_TOKEN].replace("\r", "").replace("\n", "").strip() or None
    return CacheCredentials(
        hf_token=hf_token, s3=_s3_from_layers(s3_layers, account_name), azure=azure, unused=tuple(unused)
    )


def _annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    raw = (obj.get("metadata") or {}).get("annotations") or {}
    return {str(k): str(v) for k, v in raw.items()}


def _s3_from_layers(
    layers: Sequence[tuple[str, Mapping[str, str], Mapping[str, str]]], account: str
) -> S3Settings | None:
    """Each layer (the object it comes from, its annotations, its data) sets what it names; later
    layers win (KServe's MergeEnvs)."""
    if not layers:
        return None
    values: dict[str, str] = {}
    origin: dict[str, str] = {}  # setting -> "<object>, <annotation or key>", for errors
    keys: dict[str, str] = {}
    for source, notes, data in layers:
        for setting, (suffix, data_key) in _S3_FIELDS.items():
            if _ANNOTATION + suffix in notes:
                values[setting] = notes[_ANNOTATION + suffix]
                origin[setting] = f"{source}, annotation {_ANNOTATION + suffix}"
            elif data_key in data:
                values[setting] = data[data_key]
                origin[setting] = f"{source}, key {data_key}"
        if _S3_SECRET_KEY in data:
            keys = {"id": data.get(_S3_ACCESS_KEY, ""), "secret": data[_S3_SECRET_KEY]}
    return _s3_settings(
        access_key_id=keys.get("id"),
        secret_access_key=keys.get("secret"),
        endpoint=values.get("endpoint"),
        use_https=values.get("use_https"),
        region=values.get("region"),
        verify=values.get("verify"),
        virtual=values.get("virtual"),
        accelerate=values.get("accelerate"),
        anonymous=values.get("anonymous"),
        ca_bundle=values.get("ca_bundle"),
        where=f"the S3 Secret of ServiceAccount {account}",
        endpoint_from=origin.get("endpoint", ""),
    )


def _s3_settings(
    *,
    access_key_id: str | None,
    secret_access_key: str | None,
    endpoint: str | None,
    use_https: str | None,
    region: str | None,
    verify: str | None,
    virtual: str | None,
    accelerate: str | None,
    anonymous: str | None,
    ca_bundle: str | None,
    where: str,
    endpoint_from: str = "",
) -> S3Settings:
    """The S3 settings of a cache's credentials. AccessDenied naming ``where`` (and, for the
    endpoint, ``endpoint_from``: the object and key it came from), never a value: half a key pair,
    or an endpoint that is no ``http(s)://host[:port][/path]`` URL."""
    access_key_id = (access_key_id or "").strip() or None
    secret_access_key = (secret_access_key or "").strip() or None
    if (access_key_id is None) != (secret_access_key is None) and not _true(anonymous):
        raise AccessDenied(f"{where}: give both the access key id and the secret access key, or neither")
    url = _endpoint_url(endpoint, use_https)
    if url is not None and (why := endpoint_error(url)) is not None:
        raise AccessDenied(
            f"the cache's credentials: {endpoint_from or where}: the S3 endpoint {why}; give a URL such "
            "as https://s3.example.com:9000"
        )
    region = (region or "").strip() or None
    style = "virtual" if _true(virtual) else None
    if url == "https://s3.amazonaws.com" and region not in (None, "us-east-1"):
        style = "virtual"  # kserve_storage.py:321-330: else S3 answers PermanentRedirect
    return S3Settings(
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        endpoint_url=url,
        region=region,
        verify=(verify or "").strip().lower() not in ("0", "false"),
        ca_bundle=(ca_bundle or "").strip() or None,
        addressing_style=style,
        anonymous=_true(anonymous),
        accelerate=_true(accelerate),
    )


def _endpoint_url(endpoint: str | None, use_https: str | None) -> str | None:
    """s3/utils.go:157-187: a scheme given is kept; else https, or http when use-https is "0"."""
    endpoint = (endpoint or "").strip()
    if not endpoint:
        return None
    if endpoint.lower().startswith(("https://", "http://")):
        return endpoint
    return ("http://" if (use_https or "").strip() == "0" else "https://") + endpoint


def endpoint_error(url: str) -> str | None:
    """Why ``url`` is no S3 endpoint botocore can use (``http(s)://host[:port][/path]``, nothing
    else: no space or control character, no user or password, no query), or None. The reason never
    repeats the value: it comes from a Secret."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "holds a space or control character"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a URL (a port that is not a number, or brackets that do not close)"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "names no host"
    if parts.username is not None or parts.password is not None:
        return "holds a user or password (give them as the access key id and secret instead)"
    if parts.query or parts.fragment:
        return "holds a query or fragment"
    if port == 0:
        return "has port 0"
    return None


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _azure(data: Mapping[str, str]) -> AzureSettings:
    """The Azure settings of a Secret's data, as KServe maps its keys onto the variables the
    storage initializer reads (azure/azure_secret.go:64-88, legacy ``AZ_*`` first)."""
    return AzureSettings.from_env({k: v for k, v in data.items() if k.startswith(("AZ_", "AZURE_"))})
