"""What the agent knows of each storage key, and the rules by which a model's state changes. Pure:
no I/O; the loop (:mod:`agent.loop`) owns the records and applies these transitions.

A :class:`Record` holds the :class:`~localmodel.resources.ModelProgress` the status shows, replaced
whole by each transition, beside the loop's own bookkeeping (failures, the retry time, the warning of
the last plan, the real size from the source's listing). Transitions:

- :func:`published`: a model found complete on disk, or kept by the plan: ``Downloaded``.
- :func:`started`: a download begins: ``Downloading``, the last outcome (reason, message, retry
  time, completion time) cleared.
- :func:`completed`: the pull's result: ``Downloaded`` with its bytes, files and revision; the
  verification counts only when the pull checked anything (an up-to-date result checked nothing, so
  the last counts stand).
- :func:`failed`: ``Error`` with a reason, a message and, for a download, the retry time.
- :func:`queued`: wanted and waiting for a slot: ``Pending``; a refusal for room is forgotten (room
  appeared), any other reason stays until the download starts.
- :func:`interrupted`: a download cancelled while running goes back to ``Pending``.
- :func:`listed`, :func:`sized`, :func:`advanced`: a running download's revision and bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from localmodel.logs import redact_message
from localmodel.resources import DroppedPeer, ModelProgress, ModelState

# Refusals the planner makes for room: forgotten once the model is planned for download again.
ROOM_REASONS = ("InsufficientStorage", "SizeExceedsDeclared")


@dataclass
class Record:
    """One storage key (mutable: the loop owns it). ``uri`` is redacted: a record is reported."""

    progress: ModelProgress
    failures: int = 0
    retry_at: float | None = None  # monotonic time before which a failed model is not retried
    warning: str | None = None  # the plan's, shown when there is no message
    real_size: int | None = None  # bytes, from the source's listing

    @property
    def key(self) -> str:
        return self.progress.storage_key or ""

    @property
    def uri(self) -> str:
        return self.progress.source_model_uri or ""

    @property
    def state(self) -> ModelState:
        return self.progress.state

    def shown(self) -> ModelProgress:
        """What the status shows: the progress, with the plan's warning when there is no message."""
        if self.progress.message:
            return self.progress
        warning = redact_message(self.warning) if self.warning else self.warning
        return dataclasses.replace(self.progress, message=warning)


def new_record(key: str, uri: str) -> Record:
    """A key seen for the first time: ``Pending``; ``uri`` already redacted."""
    return Record(ModelProgress(ModelState.PENDING, storage_key=key, source_model_uri=uri))


def published(p: ModelProgress, *, size: int, files: int, revision: str | None) -> ModelProgress:
    """Found complete on disk: ``size`` bytes in ``files`` files."""
    return dataclasses.replace(
        p,
        state=ModelState.DOWNLOADED,
        bytes_done=size,
        bytes_total=size,
        files_done=files,
        files_total=files,
        revision=revision,
    )


def kept(p: ModelProgress) -> ModelProgress:
    """Wanted and already published."""
    return dataclasses.replace(p, state=ModelState.DOWNLOADED)


def started(p: ModelProgress, *, now: str) -> ModelProgress:
    """A download begins at ``now`` (RFC 3339)."""
    return dataclasses.replace(
        p,
        state=ModelState.DOWNLOADING,
        start_time=now,
        completion_time=None,
        reason=None,
        message=None,
        retry_after=None,
    )


def completed(
    p: ModelProgress,
    *,
    size: int,
    files: int,
    revision: str | None,
    checked: tuple[int, int] | None,
    now: str,
) -> ModelProgress:
    """The pull published ``size`` bytes in ``files`` files at ``now``; ``checked``: (files verified
    against a source hash, files checked by size alone), None when the pull checked nothing."""
    verified, size_only = checked if checked is not None else (p.files_verified, p.files_size_only)
    return dataclasses.replace(
        published(p, size=size, files=files, revision=revision),
        files_verified=verified,
        files_size_only=size_only,
        completion_time=now,
    )


def failed(p: ModelProgress, reason: str, message: str, *, retry_after: str | None = None) -> ModelProgress:
    """``Error`` with ``reason`` and ``message`` (redacted: :func:`localmodel.logs.redact_message`,
    as it goes to the status and the state file); ``retry_after``: when it is tried again (RFC 3339)."""
    message = redact_message(message)
    if retry_after is None:
        return dataclasses.replace(p, state=ModelState.ERROR, reason=reason, message=message)
    return dataclasses.replace(
        p, state=ModelState.ERROR, reason=reason, message=message, retry_after=retry_after
    )


def queued(p: ModelProgress) -> ModelProgress:
    """Planned for download, waiting for a slot."""
    if p.reason in ROOM_REASONS:
        p = dataclasses.replace(p, reason=None, message=None)
    return dataclasses.replace(p, state=ModelState.PENDING)


def interrupted(p: ModelProgress) -> ModelProgress:
    """A download cancelled while it ran (not for removal) waits again."""
    return dataclasses.replace(p, state=ModelState.PENDING) if p.state is ModelState.DOWNLOADING else p


def sized(p: ModelProgress, *, total: int, done: int, files: int) -> ModelProgress:
    """The engine's start: ``total`` bytes in ``files`` files, ``done`` already staged."""
    return dataclasses.replace(p, bytes_total=total, bytes_done=done, files_total=files)


def listed(p: ModelProgress, *, revision: str | None) -> ModelProgress:
    """The source's listing came back: the revision it is at."""
    return dataclasses.replace(p, revision=revision)


def advanced(p: ModelProgress, nbytes: int) -> ModelProgress:
    return dataclasses.replace(p, bytes_done=p.bytes_done + nbytes)


def sourced(
    p: ModelProgress,
    *,
    origin: int | None,
    peers: int | None,
    manifest_sha256: str | None,
    dropped: tuple[DroppedPeer, ...],
) -> ModelProgress:
    """Peer fill: where the last download's bytes came from (bytes from the origin and from peers),
    the digest of the published manifest (:func:`localmodel.peering.manifest_digest`) and the peers
    it dropped."""
    return dataclasses.replace(
        p,
        bytes_from_origin=origin,
        bytes_from_peers=peers,
        manifest_sha256=manifest_sha256,
        peers_dropped=tuple(DroppedPeer(d.address, redact_message(d.reason)) for d in dropped),
    )


def peers_cleared(p: ModelProgress) -> ModelProgress:
    """A new download attempt: the peers the last one dropped are asked again."""
    return dataclasses.replace(p, peers_dropped=())


def peer_dropped(p: ModelProgress, dropped: DroppedPeer) -> ModelProgress:
    """A peer the running download stopped using, shown at once (redacted, as every message)."""
    one = DroppedPeer(dropped.address, redact_message(dropped.reason))
    return dataclasses.replace(p, peers_dropped=(*p.peers_dropped, one))
