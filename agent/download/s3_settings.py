"""How one S3 listing reaches its bucket when a cache names its own credentials (pure data).

Built per cache by :mod:`agent.credentials` from the Secrets KServe's users already have; the
agent's own environment (``AWS_*``, the AWS profile) is used for every field left ``None``.
Secrets are never in the repr."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class S3Settings:
    """``access_key_id``/``secret_access_key``: a key pair (both or neither); ``endpoint_url``: the
    S3 API's base URL (MinIO, Ceph, another region); ``region``; ``verify``: check the endpoint's
    TLS certificate; ``ca_bundle``: a PEM file in the agent's container to check it against;
    ``addressing_style``: ``"virtual"`` (bucket in the host name) or None (botocore's choice, path
    style for a custom endpoint); ``anonymous``: unsigned requests (a public bucket);
    ``accelerate``: S3 Transfer Acceleration's endpoint."""

    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    endpoint_url: str | None = None
    region: str | None = None
    verify: bool = True
    ca_bundle: str | None = None
    addressing_style: str | None = None
    anonymous: bool = False
    accelerate: bool = False
