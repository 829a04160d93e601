"""The one rule from an HTTP status to the project's error tree, for every source that speaks HTTP
(the engine's GETs, the HEAD of http(s) sources, the hub's API). Pure: no I/O.

- 401, 403: AccessDenied (no retry mends credentials).
- 404: SourceNotFound.
- 408, 429, 5xx and 0 (no status at all): TransientError, retried, honouring ``Retry-After`` in
  seconds (RFC 9110 §10.2.3; the HTTP-date form is read as absent).
- anything else: DownloadError.
"""

from __future__ import annotations

from localmodel.errors import AccessDenied, DownloadError, SourceNotFound, TransientError


def http_status_error(source: str, status: int, retry_after: float | None = None) -> DownloadError:
    """``source``: the label that starts the message; ``retry_after``: seconds, or None."""
    if status in (401, 403):
        return AccessDenied(f"{source}: access denied (HTTP {status}); check the credentials")
    if status == 404:
        return SourceNotFound(f"{source}: not found (HTTP 404)")
    if status in (408, 429) or status >= 500 or status == 0:
        return TransientError(f"{source}: HTTP {status or 'error'}", retry_after=retry_after)
    return DownloadError(f"{source}: HTTP {status}")


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header's value -> seconds, or None when absent or not a number."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
