"""A download's request slots (agent/download/slots.py): with peer fill they open one by one as
bytes arrive, so that chunks sharing one link land one after the other, not all at the end."""

from __future__ import annotations

import asyncio

from agent.download.slots import Slots, opening_step

MiB = 1 << 20


def test_with_k_open_the_next_opens_after_k_of_c_of_a_chunk() -> None:
    # k requests share the link: the one furthest along goes 1/c of a chunk while k/c arrive.
    assert [opening_step(k, 4, MiB) for k in (1, 2, 3)] == [MiB // 4, MiB // 2, 3 * MiB // 4]
    assert sum(opening_step(k, 16, 16 * MiB) for k in range(1, 16)) == 16 * MiB * 15 // 2


async def test_with_the_ramp_one_slot_first_then_one_more_at_each_step() -> None:
    slots = Slots(4, MiB, ramp=True)
    await slots.acquire()
    assert slots.locked()
    slots.received(MiB // 4 - 1)
    assert slots.locked()
    slots.received(MiB // 4)
    assert not slots.locked()
    await slots.acquire()
    slots.received(MiB // 4 + MiB // 2 - 1)
    assert slots.locked()
    slots.received(MiB // 4 + MiB // 2)
    await slots.acquire()
    assert slots.locked() and slots.opened == 3


async def test_bytes_received_at_once_open_one_slot_not_all() -> None:
    # A first request fetched alone (a server's ranges probed) ends with a whole chunk received:
    # one more slot, and the rest as before, so the next requests do not start together.
    slots = Slots(4, MiB, ramp=True)
    await slots.acquire()
    slots.received(16 * MiB)
    await slots.acquire()
    assert slots.locked() and slots.opened == 2
    for total in (17 * MiB, 18 * MiB):  # the next ones, each taken as it opens
        slots.received(total)
        await asyncio.wait_for(slots.acquire(), 10)
    assert slots.locked() and slots.opened == 4


async def test_no_slot_opens_while_one_is_unused() -> None:
    slots = Slots(4, MiB, ramp=True)
    await slots.acquire()
    slots.received(MiB)
    assert slots.opened == 2 and not slots.locked()  # the second is not taken yet
    slots.received(10 * MiB)
    assert slots.opened == 2
    await slots.acquire()
    slots.received(10 * MiB + MiB // 2)  # 2/4 of a chunk from when it was taken
    assert slots.opened == 3


async def test_without_the_ramp_every_slot_is_open_from_the_start() -> None:
    slots = Slots(4, MiB, ramp=False)
    for _ in range(4):
        await slots.acquire()
    assert slots.locked()
    slots.received(100 * MiB)
    assert slots.locked()
