"""Close's rate limits, simulated: a fixed window per endpoint group, headers and 429s.

Close limits each endpoint group (method plus URL family) per key and answers
``429`` with ``Retry-After`` and ``RateLimit: limit=N, remaining=N, reset=S``. Here a
group is the method plus the first path segment after ``/api/v1/`` (``GET lead``), as
the proxy sees it (SPEC section 9). ``group_rate_limits`` limits named groups (``"*"``
every group not named); the older ``rate_limit`` is one window over all of /api/v1/.
Knobs vary the header the way Close is seen in the wild: ``;`` instead of ``,``,
whole-second resets, no ``Retry-After``, a RateLimit header nobody can parse.

Per group the limiter counts ``hits`` (requests it saw), ``limited`` (429s sent) and
``early_arrivals``: requests that arrived before the reset the group's last 429
announced, the figure a well-behaved client keeps at zero.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass

from closeproxy.sim.config import SimConfig

API_PREFIX: str = "/api/v1/"
OTHER_GROUP: str = "other"
MAX_GROUPS: int = 100
GROUP_SEGMENT: re.Pattern[str] = re.compile(r"[a-z0-9_]{1,40}")
ANY_GROUP: str = "*"
MALFORMED_HEADER: str = "limit=lots, remaining=?, reset=soon"


def group_segment(path: str) -> str:
    """The first path segment after /api/v1/, or ``other`` when it is no plain name."""
    segment = path[len(API_PREFIX) :].split("/", 1)[0] if path.startswith(API_PREFIX) else ""
    return segment if GROUP_SEGMENT.fullmatch(segment) else OTHER_GROUP


@dataclass
class GroupStats:
    """What the limiter saw of one endpoint group since the last reset."""

    hits: int = 0
    limited: int = 0
    early_arrivals: int = 0


@dataclass
class RateVerdict:
    """Where one fixed window stands after a request was counted (or refused)."""

    allowed: bool
    limit: int
    remaining: int
    reset: float  # seconds until the window starts over


@dataclass
class _Window:
    start: float = -math.inf
    count: int = 0

    def verdict(self, limit: int, length: float, now: float) -> RateVerdict:
        count = self.count if now - self.start < length else 0
        reset = self.start + length - now if count else length
        remaining = max(0, limit - count)
        return RateVerdict(allowed=remaining > 0, limit=limit, remaining=remaining, reset=reset)

    def take(self, length: float, now: float) -> None:
        if now - self.start >= length:
            self.start = now
            self.count = 0
        self.count += 1


def format_reset(seconds: float, *, decimal: bool) -> str:
    """Rounded up, never down: a client that waits exactly this long is not early."""
    if not decimal:
        return str(math.ceil(seconds))
    text = f"{math.ceil(seconds * 1000) / 1000:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def ratelimit_header(verdict: RateVerdict, config: SimConfig) -> str:
    if config.rate_limit_malformed:
        return MALFORMED_HEADER
    reset = format_reset(verdict.reset, decimal=config.rate_limit_decimal_reset)
    parts = (f"limit={verdict.limit}", f"remaining={verdict.remaining}", f"reset={reset}")
    return f"{config.rate_limit_separator} ".join(parts)


def retry_after(verdict: RateVerdict) -> int:
    # Retry-After is whole seconds; rounding down would invite an early retry.
    return max(1, math.ceil(verdict.reset))


def announced_reset(verdict: RateVerdict, config: SimConfig) -> float:
    """Seconds a 429 tells the client to wait, by the earliest signal it carries."""
    if not config.rate_limit_malformed:
        return float(format_reset(verdict.reset, decimal=config.rate_limit_decimal_reset))
    if config.rate_limit_retry_after:
        return float(retry_after(verdict))
    return verdict.reset


def too_many_headers(verdict: RateVerdict, config: SimConfig) -> dict[str, str]:
    headers = {"RateLimit": ratelimit_header(verdict, config)}
    if config.rate_limit_retry_after:
        headers["Retry-After"] = str(retry_after(verdict))
    return headers


def too_many_body(verdict: RateVerdict, config: SimConfig) -> dict[str, object]:
    # Close's documented body; clients are told to sleep for rate_reset seconds.
    return {
        "error": {
            "message": "API call count exceeded for this period",
            "rate_reset": math.ceil(verdict.reset * 1000) / 1000,
            "rate_limit": verdict.limit,
            "rate_window": config.rate_window,
            "rate_limit_type": "key",
        }
    }


class RateLimiter:
    """Fixed windows per endpoint group and one over everything; counters per group."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self.reset()

    def reset(self) -> None:
        self.groups: dict[str, GroupStats] = {}
        self._windows: dict[str, _Window] = {}
        self._all = _Window()
        self._blocked_until: dict[str, float] = {}

    def group(self, method: str, path: str) -> str:
        """``GET lead``; beyond the 100th distinct group everything new is ``other``."""
        name = f"{method} {group_segment(path)}"
        if name not in self.groups and len(self.groups) >= MAX_GROUPS:
            return f"{method} {OTHER_GROUP}"
        return name

    def _group_limit(self, group: str) -> int | None:
        limits = self._config.group_rate_limits
        return limits.get(group, limits.get(ANY_GROUP))

    def _verdicts(self, group: str, now: float) -> list[tuple[_Window, RateVerdict]]:
        length = self._config.rate_window
        found: list[tuple[_Window, RateVerdict]] = []
        limit = self._group_limit(group)
        if limit is not None:
            window = self._windows.setdefault(group, _Window())
            found.append((window, window.verdict(limit, length, now)))
        if self._config.rate_limit is not None:
            found.append((self._all, self._all.verdict(self._config.rate_limit, length, now)))
        return found

    @staticmethod
    def _tightest(verdicts: list[RateVerdict]) -> RateVerdict | None:
        refused = [verdict for verdict in verdicts if not verdict.allowed]
        candidates = refused or verdicts
        return min(candidates, key=lambda v: v.remaining) if candidates else None

    def status(self, group: str) -> RateVerdict | None:
        """Where the group stands, without counting anything; None when it is not limited."""
        return self._tightest([v for _, v in self._verdicts(group, time.monotonic())])

    def take(self, group: str) -> RateVerdict | None:
        """Count one request of ``group``; a refused verdict means answer 429."""
        now = time.monotonic()
        stats = self.groups.setdefault(group, GroupStats())
        stats.hits += 1
        if now < self._blocked_until.get(group, -math.inf):
            stats.early_arrivals += 1
        found = self._verdicts(group, now)
        verdict = self._tightest([v for _, v in found])
        if verdict is None:
            return None
        if not verdict.allowed:
            stats.limited += 1
            self._blocked_until[group] = now + announced_reset(verdict, self._config)
            return verdict
        length = self._config.rate_window
        for window, _ in found:
            window.take(length, now)
        after = self._tightest([v for _, v in self._verdicts(group, now)])
        if after is not None:
            after.allowed = True  # this request got its slot, even if it was the last one
        return after

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {group: asdict(stats) for group, stats in sorted(self.groups.items())}
