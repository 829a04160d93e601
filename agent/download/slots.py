"""The request slots of one download that, with peer fill, open one by one as bytes arrive, so that
its chunks land one after the other rather than all at once.

Requests that share one link (the origin's) progress at the same rate. Started together, the first
``concurrency`` chunks all land at the very end of the first wave: nothing is durable, so nothing
can be given to peers, until then, and on a model of one wave (256 MiB in chunks of 16 MiB on 16
connections) the other nodes wait for the whole of it. Started so that each request is 1/c of a
chunk behind the one before (c = ``concurrency``), they land one every chunk-time of the link, and
every later request keeps that spacing (it starts when one ends): peers stream chunk by chunk.

With k slots open, each of the k requests gets 1/k of the bytes arriving: the one furthest along
goes 1/c of a chunk further while the download receives k/c of a chunk (:func:`opening_step`),
so the (k+1)-th slot opens once that many bytes arrived since the k-th opened, one slot at a time
(a first request fetched alone, the probe of a server's ranges, opens one, not all), and only
while every open slot is in use. All are open
once about ``chunk_size * (c - 1) / 2`` bytes have arrived. When the link is the bound (the
origin's rate), this costs no time; on a link where each connection is its own bound, the first
``(c - 1) / 2`` chunks come over fewer connections.
"""

from __future__ import annotations

import asyncio


def opening_step(opened: int, concurrency: int, chunk_size: int) -> int:
    """Bytes a download receives, from the moment its slot ``opened`` opened, before the next one
    opens."""
    return chunk_size * opened // concurrency


class Slots(asyncio.Semaphore):
    """At most ``concurrency`` requests of one download at once; with ``ramp``, one at first and
    one more each :func:`opening_step` bytes that :meth:`received` sees."""

    def __init__(self, concurrency: int, chunk_size: int, *, ramp: bool) -> None:
        self.concurrency = concurrency
        self.chunk_size = chunk_size
        self.opened = 1 if ramp else concurrency
        self.opened_at = 0  # bytes received when the last slot opened
        super().__init__(self.opened)

    def received(self, total: int) -> None:
        """The download has received ``total`` bytes in all: open the next slot if it is due."""
        if self.opened >= self.concurrency:
            return
        if not self.locked():
            self.opened_at = total  # a slot is unused (a probe alone): none more until all are busy
            return
        if total - self.opened_at >= opening_step(self.opened, self.concurrency, self.chunk_size):
            self.opened += 1
            self.opened_at = total
            self.release()
