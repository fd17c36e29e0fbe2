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

import asyncio
import contextlib
import email.utils
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

from aiohttp import web

# Seconds a request waited for its group, for the dashboard's table of recent requests.
WAITED = web.RequestKey("waited", float)
log = logging.getLogger("closeproxy.ratelimit")

WAIT_HEADER: Final = "Closeproxy-Rate-Limit-Wait"
API_PREFIX: Final = "/api/v1/"
# No signal at all in a 429 (or only unreadable ones): wait this long.
DEFAULT_WAIT: Final = 1.0
# A 429 saying "retry in 0 s" must not turn into a tight loop of retries against Close.
MIN_WAIT: Final = 0.1
JITTER_FRACTION: Final = 0.1
JITTER_MAX: Final = 1.0
MAX_GROUPS: Final = 100
OTHER: Final = "other"
GROUP_SEGMENT: Final = re.compile(r"[a-z0-9_]{1,40}")
# Methods outside this set share one group, so odd verbs cannot grow the table.
KNOWN_METHODS: frozenset[str] = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
)
RATELIMIT_PART: Final = re.compile(r"\s*([A-Za-z-]+)\s*=\s*([^\s,;]+)\s*")
RATELIMIT_KEYS: frozenset[str] = frozenset({"limit", "remaining", "reset"})
# How often a waiting request looks whether its client is still there.
CLIENT_CHECK_INTERVAL: Final = 0.1
# A reset further away than this is no reset anyone should believe.
MAX_RESET: Final = 24 * 3600.0


# --- Close's headers ------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimitReport:
    """One parsed ``RateLimit: limit=N, remaining=N, reset=S`` header."""

    limit: int | None
    remaining: int | None
    reset: float | None  # seconds from the moment the answer arrived


def parse_ratelimit(value: str | None) -> RateLimitReport | None:
    """Close's RateLimit header (``,`` or ``;`` between parts); None when absent or malformed."""
    if not value:
        return None
    found: dict[str, str] = {}
    for part in re.split(r"[,;]", value):
        if not part.strip():
            continue
        match = RATELIMIT_PART.fullmatch(part)
        if match is None:
            return None
        key = match.group(1).lower()
        if key in RATELIMIT_KEYS:
            if key in found:
                return None
            found[key] = match.group(2)
    if not found:
        return None
    try:
        limit = _count(found.get("limit"))
        remaining = _count(found.get("remaining"))
        reset = _seconds(found.get("reset"))
    except ValueError:
        return None
    return RateLimitReport(limit=limit, remaining=remaining, reset=reset)


def _count(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def _seconds(text: str | None) -> float | None:
    if text is None:
        return None
    if not re.fullmatch(r"\d+(?:\.\d+)?", text):
        raise ValueError(text)
    value = float(text)
    if value > MAX_RESET:
        raise ValueError(text)
    return value


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Retry-After as seconds (RFC 9110 §10.2.3: delay-seconds or an HTTP-date)."""
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        # Further than a day is still Close's word: no budget covers it, so the 429 goes
        # to the client at once (dropping it would mean asking Close again every second).
        return min(float(text), MAX_RESET)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RESET)


def announced_wait(headers: Mapping[str, str], *, now: float) -> float:
    """How long a 429 says to wait: Retry-After, else the RateLimit reset, else 1 s."""
    retry_after = parse_retry_after(headers.get("Retry-After"), now=now)
    if retry_after is not None:
        return retry_after
    report = parse_ratelimit(headers.get("RateLimit"))
    if report is not None and report.reset is not None:
        return report.reset
    return DEFAULT_WAIT


def jitter(wait: float, fraction: float) -> float:
    """The extra wait for `fraction` in [0, 1): at most 10 % of the wait and at most 1 s."""
    return min(wait * JITTER_FRACTION, JITTER_MAX) * fraction


def fits(spent: float, wait: float, budget: float) -> bool:
    """May a request that waited `spent` seconds wait `wait` more within `budget`?"""
    return spent + wait <= budget


class BadWaitHeader(ValueError):
    """The client's Closeproxy-Rate-Limit-Wait header is not a number of seconds."""


def request_budget(value: str | None, setting: float) -> float:
    """The request's wait budget: the header may lower the setting, never raise it."""
    if value is None:
        return setting
    text = value.strip()
    try:
        asked = float(text)
    except ValueError:
        asked = math.nan
    if not math.isfinite(asked) or asked < 0:
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise BadWaitHeader(
            f"{WAIT_HEADER} must be a number of seconds, 0 or more (0 hands you Close's 429 "
            f"at once), got {shown!r}"
        )
    return min(asked, setting)


# --- endpoint groups --------------------------------------------------------------------


def group_segment(path: str) -> str:
    """The first path segment after /api/v1/, or ``other`` when it is no plain name."""
    if not path.startswith(API_PREFIX):
        return OTHER
    segment = path[len(API_PREFIX) :].split("/", 1)[0]
    return segment if GROUP_SEGMENT.fullmatch(segment) else OTHER


def _group_name(method: str, path: str) -> str:
    if method not in KNOWN_METHODS:
        return OTHER
    return f"{method} {group_segment(path)}"


# --- one group's gate -----------------------------------------------------------------


@dataclass
class GroupGate:
    """What the proxy knows about one endpoint group, and who may go to Close now.

    Times are ``time.monotonic()`` seconds unless named ``*_wall``; every method takes the
    clock as an argument so that the decisions can be tested without waiting.
    """

    limit: int | None = None
    remaining: int | None = None
    reset_at_wall: float | None = None
    waits: int = 0
    waited_seconds: float = 0.0
    passed_through: int = 0
    # Backing off after a 429 until then.
    blocked_until: float = -math.inf
    # End of Close's current window; inf: a new window started, its end not yet reported.
    window_end: float = -math.inf
    # Requests that may still go before window_end; None: Close has not limited us.
    credits: int | None = None
    in_flight: int = 0
    waiting: int = 0  # requests held right now
    reason: str = ""
    _news: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def admit(self, now: float) -> float:
        """0.0 when a request may go now (it is counted as on its way), else the seconds
        to wait before asking again (``inf``: until another answer of this group)."""
        if now < self.blocked_until:
            return self.blocked_until - now
        if self.credits is not None and now >= self.window_end:
            # Close's window is over: a fresh one allows `limit`, the rest wait for news.
            self.credits = self.limit if self.limit else None
            self.window_end = math.inf
        if self.credits is not None:
            if self.credits <= 0:
                return self.window_end - now if self.window_end < math.inf else math.inf
            self.credits -= 1
        self.in_flight += 1
        return 0.0

    def force(self) -> None:
        """A request goes without waiting (budget 0, or a wait it could not afford)."""
        if self.credits:
            self.credits -= 1
        self.in_flight += 1

    def observe(
        self, status: int | None, headers: Mapping[str, str], *, now: float, now_wall: float
    ) -> None:
        """An answer of this group arrived (status None: the attempt failed without one)."""
        self.in_flight = max(0, self.in_flight - 1)
        report = parse_ratelimit(headers.get("RateLimit")) if status is not None else None
        if report is not None:
            if report.limit is not None:
                self.limit = report.limit
            self.remaining = report.remaining
            self.reset_at_wall = None if report.reset is None else now_wall + report.reset
            if report.reset is not None and report.remaining is not None:
                self.window_end = now + report.reset
                # Requests on their way may not be counted in `remaining` yet.
                self.credits = max(0, report.remaining - self.in_flight)
                if self.credits == 0:
                    self.reason = f"Close reported remaining={report.remaining}"
        elif self.credits == 0 and self.window_end == math.inf and self.in_flight == 0:
            # The new window's first answers said nothing: stop holding anyone.
            self.credits = None
        if status == 429:
            wait = max(announced_wait(headers, now=now_wall), MIN_WAIT)
            self.blocked_until = max(self.blocked_until, now + wait)
            self.reason = "Close answered 429"
            if self.credits is None or self.window_end < now + wait:
                self.credits = 0
                self.window_end = now + wait
        self.wake()

    def wake(self) -> None:
        """Every request waiting on this group looks at it again."""
        self._news.set()
        self._news = asyncio.Event()

    async def news(self, seconds: float) -> bool:
        """True after the next answer of this group; False after `seconds`."""
        event = self._news
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await event.wait()
        return event.is_set()

    def status(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "remaining": self.remaining,
            "reset_at": None if self.reset_at_wall is None else round(self.reset_at_wall, 3),
            "waits": self.waits,
            "waited_seconds": round(self.waited_seconds, 3),
            "passed_through": self.passed_through,
            "waiting": self.waiting,
        }


# --- the forwarding loop ----------------------------------------------------------------


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
        name = _group_name(method, path)
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
