"""Slow clients: how long the proxy waits on a client, and how many connections they hold.

A request waits on its client while a read of the request body has no data yet, or
while a write of the answer cannot drain because the client does not read. One such
wait may last at most `timeout` seconds, and all of a request's waits together at most
`timeout` plus one second per `min_rate` bytes moved: a body trickling below that rate
is cut like one that stalled.

A request that holds one of Close's connections and has waited on its client for more
than SLOW_AFTER at once, or in all for more than SLOW_AFTER plus one second per FAST_ENOUGH
bytes it moved, needs a seat in the slow share (half the pool). When none is free it is
cut at once: clients that do not keep up never take the connections others need, while a
client moving data at an ordinary speed (which always keeps the proxy waiting a little,
Close being faster) never needs one.

One Watch looks at every request's current wait each TICK, instead of a timer armed and
cancelled per wait: nearly every wait ends within microseconds (a write the socket takes
at once), and a timer each cost more than the rest of the pacing. A cut comes at most a
TICK late.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

from aiohttp import StreamReader, web

# Waiting on the client this long in all marks a request as paced by its client.
SLOW_AFTER: Final = 1.0
# Each byte moved allows that much more waiting: a client averaging this rate or more
# over its waits is no slow client, however long its transfer.
FAST_ENOUGH: Final = 64 * 1024
# How often the Watch looks at the waits in progress.
TICK: Final = 0.1


class ClientTooSlow(TimeoutError):
    """The client sent its body or read the answer too slowly, so it was cut."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ClientLimits:
    """--client-timeout and --client-min-rate (None: no rate check)."""

    timeout: float
    min_rate: int | None


class SlowShare:
    """Seats for requests that hold a connection to Close while waiting on a slow client."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.taken = 0

    def take(self) -> bool:
        if self.taken >= self.capacity:
            return False
        self.taken += 1
        return True

    def give(self) -> None:
        self.taken -= 1


class Watch:
    """The waits in progress, looked at every TICK while there are any."""

    def __init__(self) -> None:
        self._waiting: set[Pacer] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, pacer: Pacer) -> None:
        self._waiting.add(pacer)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)

    def discard(self, pacer: Pacer) -> None:
        self._waiting.discard(pacer)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for pacer in [pacer for pacer in self._waiting if pacer.due <= now]:
            pacer.check(now)
        self._timer = loop.call_later(TICK, self._tick) if self._waiting else None


class Pacer:
    """Times one request's waits on its client, and cuts it when they are too long."""

    def __init__(self, limits: ClientLimits, share: SlowShare, watch: Watch) -> None:
        self._limits = limits
        self._share = share
        self._watch = watch
        self._loop = asyncio.get_running_loop()
        self._waited = 0.0
        self._paced = 0.0  # waited while holding a connection to Close
        self._moved = 0
        self.due = 0.0  # when the Watch is to look at the current wait
        self._deadline = 0.0
        self._content: StreamReader | None = None
        self._request: web.Request | None = None
        self.holds_upstream = False
        self.seated = False
        self.cut: ClientTooSlow | None = None

    async def read(self, content: StreamReader) -> bytes:
        """The next piece of the request body (b"" at its end)."""
        self._content = content
        started = self._arm()
        try:
            chunk = await content.readany()
        finally:
            self._disarm(started)
            self._content = None
        if self.cut is not None:
            raise self.cut
        self._moved += len(chunk)
        return chunk

    async def write(self, request: web.Request, out: web.StreamResponse, chunk: bytes) -> None:
        """Write a piece of the answer; raises ConnectionError when the client was cut."""
        self._request = request
        started = self._arm()
        try:
            await out.write(chunk)
        finally:
            self._disarm(started)
            self._request = None
        self._moved += len(chunk)

    async def write_eof(self, request: web.Request, out: web.StreamResponse) -> None:
        self._request = request
        started = self._arm()
        try:
            await out.write_eof()
        finally:
            self._disarm(started)
            self._request = None

    def close(self) -> None:
        self._watch.discard(self)
        if self.seated:
            self.seated = False
            self._share.give()

    def _arm(self) -> float:
        now = self._loop.time()
        limits = self._limits
        budget = limits.timeout
        if limits.min_rate is not None:
            budget = min(budget, limits.timeout + self._moved / limits.min_rate - self._waited)
        self._deadline = now + max(budget, 0.0)
        first = self._deadline
        if self.holds_upstream and not self.seated:
            # One pause of SLOW_AFTER, or waits adding up past the allowance its bytes
            # earned (a trickle); bytes sitting in socket buffers earn nothing once it stops.
            allowance = SLOW_AFTER + self._moved / FAST_ENOUGH - self._paced
            first = min(first, now + SLOW_AFTER, now + max(allowance, 0.0))
        self.due = first
        self._watch.add(self)
        return now

    def _disarm(self, started: float) -> None:
        self._watch.discard(self)
        waited = self._loop.time() - started
        self._waited += waited
        if self.holds_upstream:
            self._paced += waited

    def check(self, now: float) -> None:
        """The Watch found the current wait due at `now`."""
        if now < self._deadline and self.holds_upstream and not self.seated:
            if self._share.take():
                self.seated = True
                self.due = self._deadline
                return
            self._watch.discard(self)
            self._cut(
                ClientTooSlow(
                    503,
                    "proxy_busy",
                    "this client paused, and the share of connections to Close for slow "
                    f"clients ({self._share.capacity}) is in use: send without pauses, or "
                    "try again later",
                )
            )
            return
        self._watch.discard(self)
        limits = self._limits
        rate = "" if limits.min_rate is None else f", or ran under {limits.min_rate} bytes/s"
        self._cut(
            ClientTooSlow(
                408,
                "client_timeout",
                f"the client paused for over {limits.timeout:g} s{rate}: send the body "
                "faster, or raise --client-timeout / lower --client-min-rate",
            )
        )

    def _cut(self, exc: ClientTooSlow) -> None:
        self.cut = exc
        if self._content is not None:
            # Wakes the waiting read; being a TimeoutError, aiohttp's lingering read of
            # the rest of the body ends quietly on it too.
            self._content.set_exception(exc)
        elif self._request is not None and self._request.transport is not None:
            # The answer's head is out: all that is left is to hang up.
            self._request.transport.abort()
