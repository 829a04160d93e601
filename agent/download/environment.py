"""What the HTTP client takes from the environment, read at the entry points only (``pull`` and
``agent``) and passed in: the proxies and the CA bundle boto3 trusts."""

from __future__ import annotations

import urllib.request


def proxies_from_env() -> dict[str, str]:
    """``{"http": URL, "https": URL, "no": "host,.domain"}`` from the environment (entry points only)."""
    return urllib.request.getproxies_environment()


def aws_ca_bundle() -> str | None:
    """The CA bundle boto3 would trust (entry points only): ``AWS_CA_BUNDLE``, else the
    ``ca_bundle`` of the AWS profile in use, as botocore's config resolution reads them. None when
    neither is set or the AWS configuration cannot be read (boto3 reports that itself)."""
    try:
        import botocore.session
        from botocore.exceptions import BotoCoreError

        try:
            value = botocore.session.Session().get_config_variable("ca_bundle")
        except BotoCoreError:
            return None
    except ImportError:
        return None
    return str(value) if value else None
