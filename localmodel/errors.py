"""The project's exception tree. Everything modelcache raises on purpose is one of these.

    ModelcacheError                  base: catch this to catch everything we raise on purpose
    ├── InvalidInput                 bad user input; the CLI exits 2 (QuantityError, URIError, SpecError)
    │   ├── QuantityError            a Kubernetes Quantity that does not parse
    │   ├── URIError                 a source URI of an unknown scheme or a malformed one
    │   └── SpecError                a document or field that does not fit the schema
    ├── ClusterStateError            the cluster state (API server or embedded) refused or failed
    │   ├── NotFound                 the object does not exist (HTTP 404)
    │   ├── AlreadyExists            create of an existing name (HTTP 409 on create)
    │   ├── Conflict                 stale resourceVersion on write (HTTP 409)
    │   ├── Gone                     a watch's resourceVersion is too old (HTTP 410): relist
    │   └── Unavailable              the state source cannot be reached right now (retryable)
    └── DownloadError                a model could not be fetched; ``reason`` is a CamelCase word
        ├── AccessDenied             401/403: gated or private, or credentials missing/wrong
        ├── SourceNotFound           the repository, revision, bucket, key or file does not exist
        ├── TransientError           network error, timeout, 429 or 5xx: retried with backoff
        ├── IntegrityError           bytes that do not match the source's size or checksum
        ├── UnsafePath               a remote name that would land outside the model's folder
        ├── DiskFull                 no space left (ENOSPC) or over the node's quota
        ├── PermissionDenied         the cache's filesystem refused a write (EACCES, EPERM, EROFS)
        ├── SourceNotAllowed         a source this process may not read (file:// outside the allowed prefixes)
        └── ForeignFolder            the destination holds files modelcache did not publish: never replaced

Third-party exceptions are mapped into this tree in one place per boundary (``from e``), so callers
never catch an httpx or botocore error directly.
"""

from __future__ import annotations

import errno
import os


class ModelcacheError(Exception):
    """Base of every error modelcache raises on purpose."""


class InvalidInput(ModelcacheError):
    """Input from a user (flag, document, field) that cannot be accepted as it is."""


class QuantityError(InvalidInput, ValueError):
    """A Kubernetes Quantity string that does not parse."""


class URIError(InvalidInput, ValueError):
    """A source URI that names an unknown scheme or is malformed."""


class SpecError(InvalidInput, ValueError):
    """A document or a field that does not fit the custom resource's schema.

    ``where`` names the document (file and index) and ``field`` the dotted path, so the one-line
    message tells the user exactly what to fix.
    """

    def __init__(self, message: str, *, field: str | None = None, where: str | None = None) -> None:
        self.reason = message
        self.field = field
        self.where = where
        parts = [p for p in (where, field) if p]
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)

    def located(self, where: str) -> SpecError:
        """The same error, placed in a document (``file.yaml#2``)."""
        return SpecError(self.reason, field=self.field, where=where)

    def nested(self, prefix: str) -> SpecError:
        """The same error, with ``prefix`` prepended to the field path."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        return SpecError(self.reason, field=field, where=self.where)


class ClusterStateError(ModelcacheError):
    """The cluster state source refused a request or failed."""

    status: int = 500


class NotFound(ClusterStateError):
    status = 404


class AlreadyExists(ClusterStateError):
    status = 409


class Conflict(ClusterStateError):
    status = 409


class Gone(ClusterStateError):
    status = 410


class InvalidName(ClusterStateError):
    """A name or namespace no object can have (:func:`localmodel.k8snames.path_segment_error`):
    refused before any request, so it never changes the API path."""

    status = 422


class Unavailable(ClusterStateError):
    status = 503
    retry_after: float | None = None  # seconds the server asked to wait (Retry-After), if it did


class DownloadError(ModelcacheError):
    """A model could not be fetched. Messages never carry tokens or signed query strings."""

    reason = "DownloadFailed"


class AccessDenied(DownloadError):
    reason = "AccessDenied"


class SourceNotFound(DownloadError):
    reason = "NotFound"


class TransientError(DownloadError):
    """Worth retrying: ``retry_after`` is the server's Retry-After in seconds, when it sent one."""

    reason = "NetworkError"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IntegrityError(DownloadError):
    reason = "VerificationFailed"


class UnsafePath(DownloadError):
    reason = "UnsafePath"


class DiskFull(DownloadError):
    reason = "DiskFull"


class PermissionDenied(DownloadError):
    reason = "PermissionDenied"


class SourceNotAllowed(DownloadError):
    reason = "SourceNotAllowed"


class ForeignFolder(DownloadError):
    """The destination exists and was not published by modelcache (no manifest of ours names it)."""

    reason = "ForeignFolder"


def from_os_error(e: OSError, what: str | None = None) -> DownloadError:
    """The error tree's word for an OSError met while fetching or publishing a model, one line naming
    ``what`` (else the error's file name). The rule, the same for the engine, ``pull`` and the agent:
    ENOSPC, EDQUOT and EFBIG are DiskFull; EACCES, EPERM and EROFS are PermissionDenied; EXDEV (a
    publish is a rename from ``.modelcache/`` into ``models/``) says both must be one filesystem;
    anything else is DownloadError with the OS's text."""
    # A rename's error names both paths: the destination (filename2) is the one a user can act on.
    named = e.filename2 if getattr(e, "filename2", None) is not None else e.filename
    where = f"{what}: " if what else (f"{named}: " if named is not None else "")
    text = (os.strerror(e.errno) if e.errno else str(e)).replace("\n", " ")
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DiskFull(f"{where}no space left on the cache's filesystem ({text})")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(
            f"{where}the filesystem refused the write ({text}); check the folder's owner, mode and mount"
        )
    if e.errno == errno.EXDEV:
        return DownloadError(
            f"{where}{text}: models/ and .modelcache/ of the cache folder must be one filesystem "
            "(is a mount placed over one of them?)"
        )
    return DownloadError(f"{where}{text}")
