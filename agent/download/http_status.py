"""The one rule from an HTTP status to the project's error tree, for every source that speaks HTTP
(the engine's GETs, the HEAD of http(s) sources, the hub's API). Pure: no I/O.

- 401, 403: AccessDenied (no retry mends credentials).
- 404: SourceNotFound.
- 408, 429, 5xx and 0 (no status at all): TransientError, retried, honouring ``Retry-After`` in
  seconds (RFC 9110 §10.2.3; the HTTP-date form is read as absent).
- anything else: DownloadError.
"""

from __future__ import annotations

import re

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


# At most 18 digits: any size or offset a file can have (< 2**63) and never int()'s digit limit
# (4300, CVE-2020-10735) nor a number too large to compare cheaply.
_DECIMAL = re.compile(r"0*(\d{1,18})", re.ASCII)


def decimal(value: str | None) -> int | None:
    """An untrusted header's (or field's) non-negative decimal, RFC 9110's ``1*DIGIT`` (ASCII
    digits only, blanks around it ignored) -> int; None when absent, not that form, or above
    10**18 (no file is that large: the caller treats it as it treats any malformed value)."""
    if value is None:
        return None
    match = _DECIMAL.fullmatch(value.strip())
    return int(match[1]) if match is not None else None


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header's value -> seconds (RFC 9110 §10.2.3's delay-seconds, ``1*DIGIT``),
    or None when absent or not that form: a negative, fractional, "nan", "inf" or 5,000-digit
    value is read as absent, as the HTTP-date form is."""
    seconds = decimal(value)
    return float(seconds) if seconds is not None else None
