"""The Pacer's waits: those that end in time are never cut, one that does not is cut on time.

One Watch looks at every request's wait in progress each TICK (issue 11), instead of a
timer per wait: a wait must be cut at its own deadline (within a TICK), whatever the
waits before it. These run the Pacer against a stand-in for the client's side whose
writes take as long as told.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from closeproxy.pacing import TICK, ClientLimits, ClientTooSlow, Pacer, SlowShare, Watch


class Client:
    """A client connection whose next write blocks for `delay` seconds (or until cut)."""

    def __init__(self) -> None:
        self.transport = self
        self.aborted = asyncio.Event()
        self.delay = 0.0

    def abort(self) -> None:
        self.aborted.set()

    async def write(self, chunk: bytes) -> None:
        try:
            await asyncio.wait_for(self.aborted.wait(), self.delay)
        except TimeoutError:
            return  # the client read it
        raise ConnectionResetError("cut")

    async def write_eof(self) -> None:
        await self.write(b"")


def pacer(timeout: float, seats: int = 0, watch: Watch | None = None) -> Pacer:
    limits = ClientLimits(timeout=timeout, min_rate=None)
    return Pacer(limits, SlowShare(seats), watch or Watch())


async def write(pacer: Pacer, client: Client, delay: float) -> float:
    """One write taking `delay`; how long it took."""
    client.delay = delay
    loop = asyncio.get_running_loop()
    started = loop.time()
    await pacer.write(cast(Any, client), cast(Any, client), b"x")
    return loop.time() - started


async def test_waits_each_within_the_timeout_are_never_cut() -> None:
    # The first wait arms the timer for 0.3 s from its start; the second starts 0.2 s
    # in and lasts past that moment: the timer must move on, not cut it.
    paced, client = pacer(timeout=0.3), Client()
    await write(paced, client, 0.1)
    await asyncio.sleep(0.1)
    assert await write(paced, client, 0.25) >= 0.24
    await asyncio.sleep(0.2)
    client.delay = 0.25
    await paced.write_eof(cast(Any, client), cast(Any, client))
    assert paced.cut is None and not client.aborted.is_set()
    paced.close()


async def test_a_wait_past_the_timeout_is_cut_at_its_own_deadline() -> None:
    paced, client = pacer(timeout=0.3), Client()
    await write(paced, client, 0.05)  # arms for 0.3 s from here
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionError):
        await write(paced, client, 5.0)
    took = loop.time() - started
    # Cut 0.3 s into this wait: not when the first wait's timer came due (0.05 s in).
    assert 0.28 <= took < 1.0, took
    assert isinstance(paced.cut, ClientTooSlow) and paced.cut.status == 408
    paced.close()


async def test_a_paused_holder_without_a_seat_is_cut_after_slow_after() -> None:
    # Holding a connection to Close, no seat in the slow share: cut at SLOW_AFTER (1 s),
    # though the timer pending was armed for a later moment (a body read at 60 s).
    paced, client = pacer(timeout=60.0, seats=0), Client()
    await write(paced, client, 0.01)  # not holding: armed 60 s out
    paced.holds_upstream = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionError):
        await write(paced, client, 5.0)
    assert 0.95 <= loop.time() - started < 2.0
    assert paced.cut is not None and paced.cut.code == "proxy_busy"
    paced.close()


async def test_waits_that_end_at_once_arm_no_timer_each() -> None:
    # A hundred requests' answers written without a wait: at most the Watch's own tick
    # was scheduled, not a timer per request or per write.
    loop = asyncio.get_running_loop()
    scheduled = len(cast(Any, loop)._scheduled)
    watch = Watch()
    for _ in range(100):
        paced, client = pacer(timeout=30.0, watch=watch), Client()
        paced.holds_upstream = True
        await write(paced, client, 0.0)
        await write(paced, client, 0.0)
        paced.close()
    assert len(cast(Any, loop)._scheduled) - scheduled <= 1
    await asyncio.sleep(TICK * 1.5)
    assert len(cast(Any, loop)._scheduled) == scheduled  # nothing waits: the tick stopped
