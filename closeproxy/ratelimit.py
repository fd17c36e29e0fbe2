"""Close's rate limits, absorbed (SPEC §9): read its headers, hold a spent endpoint group,
retry a 429 while the request's wait budget lasts.

    RateLimits.send(request facts, attempt) -> for each attempt:
        GroupGate.admit   (held while the group backs off or Close said it is spent)
        attempt()         (the forwarder's _send_once)
        GroupGate.observe (RateLimit / Retry-After / 429 update the group)
        retry_wait        (a 429 is retried only if its wait fits in what is left)

The decisions follow Envoy's retry policy with ``rate_limited_retry_back_off``: the
server's own reset header sets the back-off, and a reset beyond what the request may
still wait means no retry at all: Close's 429 goes to the client at once, unchanged.

A group's gate keeps Close's last report (``limit``, ``remaining``, ``reset``) and a
number of *credits*: requests it may still send before the reset, that is ``remaining``
minus the requests already on their way. When the credits are gone, new requests wait
for the reset; when the reset passes, ``limit`` requests go and the rest wait for the
first answer of the new window. So a crowd of requests meets Close's window in turns
instead of as a stampede of 429s. Before Close has said anything about a group, nothing
is held (pacing below the limit without a signal is not this module's job).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from aiohttp import web

from .ratelimit_gate import OTHER, GroupGate, fits, group_name, jitter
from .ratelimit_headers import DEFAULT_WAIT, request_budget

# proxy.py reads the client's header and its refusal from here.
from .ratelimit_headers import WAIT_HEADER as WAIT_HEADER
from .ratelimit_headers import BadWaitHeader as BadWaitHeader

# Seconds a request waited for its group, for the dashboard's table of recent requests.
WAITED = web.RequestKey("waited", float)
log = logging.getLogger("closeproxy.ratelimit")

MAX_GROUPS: Final = 100
# How often a waiting request looks whether its client is still there.
CLIENT_CHECK_INTERVAL: Final = 0.1


class Answer(Protocol):
    """What the loop needs of an upstream response."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def release(self) -> None: ...


A = TypeVar("A", bound=Answer)


class ClientGone(Exception):
    """The client hung up while its request waited; nothing more is sent for it."""


class Held(Exception):
    """Its group began backing off while the request waited for a connection: it gives
    the connection back and waits for the reset like the others."""


@dataclass
class Wait:
    """One request's budget and what it has spent of it."""

    group: str
    budget: float
    spent: float = 0.0


class RateLimits:
    """The gates of every endpoint group (bounded), the loop that uses them, the counters."""

    def __init__(
        self,
        max_wait: float,
        *,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.max_wait = max_wait
        self._gates: dict[str, GroupGate] = {}
        # Observers (metrics): a finished wait (group, seconds); Close's `remaining` (group, n).
        self.on_wait: Callable[[str, float], None] | None = None
        self.on_remaining: Callable[[str, int], None] | None = None
        self._rng = rng
        self._clock = clock
        self._wall = wall
        # Set when the proxy stops: nobody waits any more, Close's 429s go through.
        self.stopping = False

    def group(self, method: str, path: str) -> str:
        """``GET lead``; past the 100th distinct group, new ones count as ``METHOD other``."""
        name = group_name(method, path)
        if name in self._gates or len(self._gates) < MAX_GROUPS or name == OTHER:
            return name
        return f"{method} {OTHER}"

    def gate(self, group: str) -> GroupGate:
        gate = self._gates.get(group)
        if gate is None:
            gate = self._gates[group] = GroupGate()
        return gate

    def wait_for(self, method: str, path: str, header: str | None) -> Wait:
        """The request's group and budget; BadWaitHeader for a header that is no number."""
        return Wait(self.group(method, path), request_budget(header, self.max_wait))

    def stop(self) -> None:
        """The proxy is stopping: every waiting request goes now and gets Close's answer
        (a 429 included), so that no wait holds the drain or is cut without an answer."""
        self.stopping = True
        for gate in self._gates.values():
            gate.wake()

    def recheck(self, wait: Wait) -> None:
        """Held when the request's group started backing off after it was let through
        (a 429 arrived while it queued for a connection) and it can afford the wait."""
        gate = self.gate(wait.group)
        left = gate.blocked_until - self._clock()
        if (
            wait.budget > 0
            and not self.stopping
            and left > 0
            and fits(wait.spent, left, wait.budget)
        ):
            raise Held()

    def status(self) -> dict[str, dict[str, object]]:
        """For /admin/status: the groups Close sent a limit for, or that waited."""
        return {
            name: gate.status()
            for name, gate in sorted(self._gates.items())
            if gate.limit is not None or gate.remaining is not None or gate.waits or gate.reason
        }

    async def send(
        self,
        wait: Wait,
        attempt: Callable[[], Awaitable[A]],
        *,
        replayable: bool,
        client_gone: Callable[[], bool],
        idle: Callable[[], None] = lambda: None,
    ) -> A:
        """Send through the group's gate; retry 429s while the budget lasts (if replayable).

        `idle` is called after a 429 that will be retried, before the wait: the caller
        gives back what only an attempt needs (its connection slot to Close).
        """
        gate = self.gate(wait.group)
        while True:
            await self._hold(gate, wait, client_gone)
            try:
                answer = await attempt()
            except Held:
                gate.in_flight = max(0, gate.in_flight - 1)
                continue  # back to the gate, which holds it until the reset
            except BaseException:
                gate.observe(None, {}, now=self._clock(), now_wall=self._wall())
                raise
            gate.observe(answer.status, answer.headers, now=self._clock(), now_wall=self._wall())
            if self.on_remaining is not None and gate.remaining is not None:
                self.on_remaining(wait.group, gate.remaining)
            if answer.status != 429:
                return answer
            if (
                not replayable
                or self.stopping
                or not fits(wait.spent, self._retry_wait(gate), wait.budget)
            ):
                gate.passed_through += 1
                return answer
            answer.release()
            idle()

    def _retry_wait(self, gate: GroupGate) -> float:
        return max(0.0, gate.blocked_until - self._clock())

    async def _hold(self, gate: GroupGate, wait: Wait, client_gone: Callable[[], bool]) -> None:
        """Wait while the gate holds the group, within the budget; one log line per wait."""
        if wait.budget <= 0 or self.stopping:
            gate.force()  # the client asked for Close's answer, whatever it is
            return
        started = self._clock()
        waited = False
        outcome = "then sent"
        try:
            while True:
                now = self._clock()
                left = wait.budget - wait.spent - (now - started)
                delay = gate.admit(now)
                if delay <= 0:
                    return
                if (delay > left and delay < math.inf) or left <= 0 or self.stopping:
                    # The reset is past the budget: go now and let Close's 429 through.
                    gate.force()
                    outcome = "then sent, the budget being spent"
                    return
                if not waited:
                    waited = True
                    gate.waiting += 1
                extra = jitter(delay if delay < math.inf else DEFAULT_WAIT, self._rng())
                await self._sleep(gate, min(delay + extra, left), client_gone)
        except ClientGone:
            outcome = "until the client hung up"
            raise
        finally:
            if waited:
                gate.waiting -= 1
                seconds = self._clock() - started
                wait.spent += seconds
                gate.waits += 1
                gate.waited_seconds += seconds
                if self.on_wait is not None:
                    self.on_wait(wait.group, seconds)
                log.info(
                    "%s waited %.2f s for Close's rate limit (%s), %s",
                    wait.group,
                    seconds,
                    gate.reason or "backing off",
                    outcome,
                )

    async def _sleep(
        self, gate: GroupGate, seconds: float, client_gone: Callable[[], bool]
    ) -> None:
        """Sleep `seconds` or until the group has news; ClientGone if the client hangs up."""
        deadline = self._clock() + seconds
        while (left := deadline - self._clock()) > 0:
            if client_gone():
                raise ClientGone()
            if await gate.news(min(left, CLIENT_CHECK_INTERVAL)):
                return
        if client_gone():
            raise ClientGone()
