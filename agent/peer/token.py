"""The cluster's peer token: read from a file (the ``modelcache-peer-token`` Secret mounted into the
agent), read again whenever the file changes, and compared in constant time.

Rotation is replacing the Secret: the kubelet writes the new content into a fresh folder and swaps
the mount's ``..data`` link, so the token file's path now reaches another inode. :meth:`TokenFile.check`
notices by the file's identity (device, inode, size, change time) and reads it again; the token it
replaced is still accepted for :attr:`TokenFile.grace` seconds, so a peer that read the new Secret a
moment later than this agent is not refused in between.

A file that is missing, empty or unreadable at start is :class:`InvalidInput` (the agent exits 2 in
one line naming ``--peer-token-file``). Later, the last good token stays in force and
:attr:`TokenFile.problem` says why the file could not be read (the agent's ``PeerServing`` condition)
until it can. No token is ever logged or put in a message: only the file's path.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from localmodel.errors import InvalidInput

log = logging.getLogger("modelcache.agent")

# A Secret's value is small; a file past this is not a token (a wrong path: a log, a model file).
MAX_TOKEN_BYTES = 4096
FLAG = "--peer-token-file"


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_token(path: Path) -> tuple[str, tuple[int, int, int, int]]:
    """The token in ``path`` (surrounding whitespace removed: a Secret made from ``echo`` ends in a
    newline) and the file's identity. Raises :class:`InvalidInput` naming ``--peer-token-file`` and
    the path, never the content, when the file is missing, unreadable, too large, not text or empty."""
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise InvalidInput(
            f"{FLAG}: cannot read {path}: {e.strerror or type(e).__name__}; mount the "
            "modelcache-peer-token Secret there, or name the file that holds the token"
        ) from None
    if len(data) > MAX_TOKEN_BYTES:
        raise InvalidInput(f"{FLAG}: {path} is over {MAX_TOKEN_BYTES} bytes; it is not a token file")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InvalidInput(f"{FLAG}: {path} is not ASCII text; a token is printable ASCII") from None
    if not token:
        raise InvalidInput(f"{FLAG}: {path} is empty; put the cluster's peer token in it")
    if not token.isprintable() or any(c.isspace() for c in token):
        raise InvalidInput(f"{FLAG}: {path} holds spaces or control characters; a token is one word")
    return token, _identity(st)


# Seconds the previous token stays good after the file changed. Each node's kubelet refreshes a
# mounted Secret on its own schedule (its sync period, 1 min by default, plus its cache's TTL), so
# nodes see a rotated token up to about two minutes apart: within this window both sides of every
# pair hold a token the other accepts (the sender retries a refusal with its previous one).
ROTATION_GRACE = 180.0


class TokenFile:
    """The accepted tokens: the file's current one and, for ``grace`` seconds after a change was
    seen, the one before. Safe to call from any thread. ``clock``: seconds (a test's fake clock)."""

    def __init__(
        self, path: Path, *, grace: float = ROTATION_GRACE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.grace = grace
        self.clock = clock
        self.problem: str | None = None  # why the file could not be read again, until it can
        self._lock = threading.Lock()
        self._current: bytes = b""
        self._previous: bytes | None = None
        self._previous_until = 0.0
        self._identity: tuple[int, int, int, int] | None = None

    def load(self) -> None:
        """Read the file for the first time; :class:`InvalidInput` when it holds no token."""
        token, identity = read_token(self.path)
        with self._lock:
            self._current, self._identity = token.encode(), identity

    def current(self) -> str:
        """The token to send to other peers (read again first if the file changed)."""
        with self._lock:
            self._refresh()
            return self._current.decode()

    def previous(self) -> str | None:
        """The token before the current one while it is still accepted (``grace`` seconds after the
        change was seen), else None: what a sender tries when a peer refuses the current one (that
        peer's kubelet has not brought it the rotated Secret yet)."""
        with self._lock:
            self._refresh()
            if self._previous is not None and self._previous and self.clock() < self._previous_until:
                return self._previous.decode()
            return None

    def check(self, authorization: str | None) -> bool:
        """True when ``authorization`` (an ``Authorization`` header's value, None when absent) is
        ``Bearer <token>`` for an accepted token. Compared with :func:`hmac.compare_digest`: the
        answer's time tells nothing of how much of a token matched."""
        presented = _bearer(authorization)
        with self._lock:
            self._refresh()
            accepted = [self._current]
            if self._previous is not None and self.clock() < self._previous_until:
                accepted.append(self._previous)
        if presented is None or not accepted[0]:
            return False
        # Every accepted token is compared, so the time does not say which one matched either.
        matches = [hmac.compare_digest(presented, token) for token in accepted]
        return any(matches)

    def _refresh(self) -> None:
        try:
            identity = _identity(self.path.stat())  # follows the kubelet's ..data link on purpose
        except OSError as e:
            self._fail(f"{FLAG}: cannot read {self.path}: {e.strerror or type(e).__name__}")
            return
        if identity == self._identity:
            self._recovered()
            return
        try:
            token, identity = read_token(self.path)
        except InvalidInput as e:
            self._fail(str(e))
            return
        self._recovered()
        self._identity = identity
        new = token.encode()
        if new != self._current:
            self._previous, self._previous_until = self._current, self.clock() + self.grace
            self._current = new
            log.info(
                "the peer token in %s changed; the previous one is accepted %.0f s more",
                self.path,
                self.grace,
            )

    def _recovered(self) -> None:
        if self.problem is not None:
            log.info("%s: %s is readable again", FLAG, self.path)
            self.problem = None

    def _fail(self, problem: str) -> None:
        # The last good token stays: a Secret being swapped is briefly unreadable.
        if problem != self.problem:
            log.warning("%s (the last token read stays in force)", problem)
        self.problem = problem


def _bearer(authorization: str | None) -> bytes | None:
    if authorization is None:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    try:
        return value.strip().encode("ascii")
    except UnicodeEncodeError:
        return None
