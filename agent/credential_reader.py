"""The I/O half of per-cache credentials: fetch the ServiceAccount and Secrets a cache names from
the one namespace the agent may read them in, and hand the pure rules (:mod:`agent.credentials`)
what they need; then the download's settings and, when the cache's S3 TLS settings differ from
the agent's, an HTTP client of its own.

Who reads the Secrets, and why the agent: KServe's own node agent reads them itself, with a
ClusterRole on every Secret and ServiceAccount of the cluster (get, list, watch;
charts/kserve-localmodel-resources/files/resources.yaml:107-129, used at
pkg/controller/v1alpha1/localmodelnode/controller.go:246-274). Ours gets ``get`` only (no list,
no watch: it reads by name exactly the objects a cache names), through a Role in that one
namespace (``manifests/agent/rbac.yaml``). The other design, the controller copying
each cache's credentials into a Secret the agents read, leaves the agents the same reach (every
node must read the credentials of every model it may hold: any cache may be placed on it), and
adds a writer of Secrets and a second copy of every credential; it buys only that Secrets put in
``jobNamespace`` for other uses stay out of the agents' reach, which the docs ask for instead
(that namespace holds download credentials only, as KServe uses it). Nothing read here is
logged, stored in the state file or status, or put in an Event: errors name objects, never values.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Mapping
from typing import Any

from agent.credentials import (
    STORAGE_CONFIG_SECRET,
    CacheCredentials,
    ServiceAccountWanted,
    StorageConfigWanted,
    from_service_account,
    from_storage_config,
    missing_service_account,
    secret_names,
    wanted,
)
from agent.download.client import ClientSettings, HttpClient
from agent.download.source_settings import SourceSettings
from agent.download.transfer import TransferSettings
from localmodel.errors import (
    AccessDenied,
    ClusterStateError,
    InvalidName,
    NotFound,
    TransientError,
)
from localmodel.kinds import SECRET, SERVICE_ACCOUNT, ResourceKind
from localmodel.resources import LocalModelInfo
from localmodel.state.base import ClusterState

log = logging.getLogger("modelcache.agent")


class CredentialReader:
    """Reads a cache's credentials from ``namespace`` of ``state`` at each download (never cached:
    a Secret created or rotated is used by the next attempt)."""

    def __init__(self, state: ClusterState, namespace: str) -> None:
        self.state = state
        self.namespace = namespace

    async def credentials(self, info: LocalModelInfo) -> CacheCredentials | None:
        """None when the cache names no credentials. AccessDenied naming a missing or unreadable
        object, TransientError when the API server does not answer."""
        want = wanted(info)
        if want is None:
            return None
        if isinstance(want, StorageConfigWanted):
            secret = await self._get(SECRET, STORAGE_CONFIG_SECRET)
            return from_storage_config(secret, want, namespace=self.namespace)
        assert isinstance(want, ServiceAccountWanted)
        account = await self._get(SERVICE_ACCOUNT, want.name)
        if account is None:
            raise missing_service_account(want, namespace=self.namespace)
        secrets = {name: await self._get(SECRET, name) for name in secret_names(account)}
        found = from_service_account(account, secrets, namespace=self.namespace)
        if found.unused:
            log.info(
                "%s: Secret(s) %s of ServiceAccount %s are of a kind not taken per cache (GCS key "
                "file, https, HDFS); the agent's own settings apply",
                info.model_name,
                ", ".join(found.unused),
                want.name,
            )
        return found

    async def _get(self, kind: ResourceKind, name: str) -> Mapping[str, Any] | None:
        where = f"{kind.kind} {self.namespace}/{name}"
        try:
            return await self.state.get(kind, name, namespace=self.namespace)
        except NotFound:
            return None
        except InvalidName as e:  # the checks in agent.credentials keep names sound; the namespace
            raise AccessDenied(f"the cache's credentials: cannot read {where}: {e}") from None
        except ClusterStateError as e:
            if getattr(e, "status", None) in (401, 403):
                raise AccessDenied(
                    f"the cache's credentials: the agent may not read {where} (HTTP {e.status}); "
                    "apply the Role modelcache-agent-credentials (manifests/agent/rbac.yaml) "
                    f"in namespace {self.namespace}"
                ) from None
            raise TransientError(
                f"the cache's credentials: cannot read {where}: {type(e).__name__}"
            ) from None


def settings_for(base: SourceSettings, found: CacheCredentials | None) -> SourceSettings:
    """``base`` with the cache's own credentials in place of the agent's where it has them."""
    if found is None:
        return base
    changes: dict[str, Any] = {}
    if found.hf_token:
        changes["hf_token"] = found.hf_token
    if found.s3 is not None:
        changes["s3"] = found.s3
    if found.azure is not None:
        changes["azure"] = found.azure
    return dataclasses.replace(base, **changes) if changes else base


def own_client(found: CacheCredentials | None, transfer: TransferSettings) -> HttpClient | None:
    """An HTTP client for the cache's presigned S3 GETs when its TLS settings are its own (a CA
    bundle, or verification off): the shared client trusts the agent's. It has its own connection
    limit and byte-rate cap, each the agent's. The caller closes it."""
    s3 = found.s3 if found is not None else None
    if s3 is None or (s3.verify and not s3.ca_bundle):
        return None
    context: ssl.SSLContext | None = None
    if not s3.verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return HttpClient(
        ClientSettings(
            concurrency=transfer.concurrency,
            read_size=transfer.read_size,
            connect_timeout=transfer.connect_timeout,
            read_timeout=transfer.read_timeout,
            max_bandwidth=transfer.max_bandwidth,
            proxies=transfer.proxies,
            low_speed_limit=transfer.low_speed_limit,
            low_speed_time=transfer.low_speed_time,
            ca_bundle=s3.ca_bundle,
            allow_private=transfer.allow_private,
        ),
        ssl_context=context,
    )
