"""What Close's rate-limit headers say, and how long a request may wait (SPEC §9).

Close's ``RateLimit`` and ``Retry-After`` headers, read into numbers; the client's
``Closeproxy-Rate-Limit-Wait`` header, read into the request's wait budget.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

WAIT_HEADER: Final = "Closeproxy-Rate-Limit-Wait"
# No signal at all in a 429 (or only unreadable ones): wait this long.
DEFAULT_WAIT: Final = 1.0
RATELIMIT_PART: Final = re.compile(r"\s*([A-Za-z-]+)\s*=\s*([^\s,;]+)\s*")
RATELIMIT_KEYS: frozenset[str] = frozenset({"limit", "remaining", "reset"})
# A reset further away than this is no reset anyone should believe.
MAX_RESET: Final = 24 * 3600.0


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
