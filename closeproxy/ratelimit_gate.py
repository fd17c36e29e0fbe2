"""One endpoint group's gate: who may go to Close now, from what Close last reported.

Requests are grouped by method and first path segment after /api/v1/ (``GET lead``);
a group's gate keeps Close's last report and the credits left before its reset (see
ratelimit.py for how the forwarding loop uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from .ratelimit_headers import announced_wait, parse_ratelimit

API_PREFIX: Final = "/api/v1/"
# A 429 saying "retry in 0 s" must not turn into a tight loop of retries against Close.
MIN_WAIT: Final = 0.1
JITTER_FRACTION: Final = 0.1
JITTER_MAX: Final = 1.0
OTHER: Final = "other"
GROUP_SEGMENT: Final = re.compile(r"[a-z0-9_]{1,40}")
# Methods outside this set share one group, so odd verbs cannot grow the table.
KNOWN_METHODS: frozenset[str] = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
)


# --- endpoint groups --------------------------------------------------------------------


def group_segment(path: str) -> str:
    """The first path segment after /api/v1/, or ``other`` when it is no plain name."""
    if not path.startswith(API_PREFIX):
        return OTHER
    segment = path[len(API_PREFIX) :].split("/", 1)[0]
    return segment if GROUP_SEGMENT.fullmatch(segment) else OTHER


def group_name(method: str, path: str) -> str:
    """``GET lead``; odd methods all count as ``other``."""
    if method not in KNOWN_METHODS:
        return OTHER
    return f"{method} {group_segment(path)}"


# --- waiting decisions ----------------------------------------------------------------


def jitter(wait: float, fraction: float) -> float:
    """The extra wait for `fraction` in [0, 1): at most 10 % of the wait and at most 1 s."""
    return min(wait * JITTER_FRACTION, JITTER_MAX) * fraction


def fits(spent: float, wait: float, budget: float) -> bool:
    """May a request that waited `spent` seconds wait `wait` more within `budget`?"""
    return spent + wait <= budget


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
