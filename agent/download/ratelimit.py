"""The byte-rate cap (``--max-bandwidth``) every worker of a client shares."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    """The byte-rate cap shared by every worker: a token bucket that starts empty and saves at most
    :attr:`SAVED` seconds' worth while the workers are between reads.

    Each read takes its bytes' worth of tokens and waits until the balance is back to zero before
    handing them on. Reads are paid for one after another, so in any window of ``w`` seconds the
    bytes handed on are at most ``rate * (w + SAVED)`` plus the one read whose wait straddles the
    window's start: 2 % over a second. A bucket that starts full or may fill for a second lets a
    burst through, a second's worth at the start (a 200 MB pull under a 50 MB/s cap measured
    63.8 MB/s) or after every pause; saving nothing at all loses the moments between a wait's end
    and the next read (a single connection then runs 15 % under the cap). A thread the scheduler
    wakes late hands its read on late, never early.
    """

    SAVED = 0.02  # seconds
    # The most :attr:`step` and :attr:`receive_buffer` grow to, in bytes: a local copy's step when
    # uncapped, and more than Linux's largest default receive buffer (tcp_rmem's 6 MiB; rmem_max
    # clamps a larger SO_RCVBUF anyway). Unbounded, a high cap overflows the C int setsockopt takes.
    MAX_STEP = 64 << 20
    MAX_RECEIVE_BUFFER = 32 << 20

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        """``rate`` in bytes per second; ``clock`` in seconds (a test's fake clock)."""
        self.rate = rate
        self.clock = clock
        self.tokens = 0.0
        self.stamp = clock()
        self.lock = threading.Lock()

    @property
    def step(self) -> int:
        """Bytes to move at most per payment where the caller picks the size (a local copy): a 20th of
        a second's worth (64 KiB at least), so one payment never runs far ahead of the cap."""
        return min(self.MAX_STEP, max(64 << 10, int(self.rate / 20)))

    @property
    def receive_buffer(self) -> int:
        """SO_RCVBUF for a capped client's sockets, in bytes: an eighth of a second's worth (64 KiB at
        least). The kernel otherwise grows a socket's receive buffer to megabytes, which the server
        fills at line speed while the cap holds the reads back: the cap would hold at the client's
        reads but not on the wire. At most :attr:`MAX_RECEIVE_BUFFER` (a cap over 256 MB/s)."""
        return min(self.MAX_RECEIVE_BUFFER, max(64 << 10, int(self.rate / 8)))

    def delay(self, n: int) -> float:
        """Take ``n`` bytes' worth of tokens; the seconds to wait before handing them on."""
        with self.lock:
            now = self.clock()
            self.tokens = min(self.rate * self.SAVED, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            return -self.tokens / self.rate if self.tokens < 0 else 0.0
