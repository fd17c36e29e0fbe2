"""How the simulated Close is set up (``SimConfig``) and the parsers of its live knobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RATE_LIMIT_SEPARATORS: frozenset[str] = frozenset({",", ";"})


@dataclass
class SimConfig:
    """How the simulated Close is set up; fields marked live are read on every request."""

    client_id: str = "sim-client"
    client_secret: str = field(default="sim-secret", repr=False)
    token_lifetime: float = 3600.0  # live
    organization_id: str = "orga_sim"
    user_id: str = "user_sim"
    auto_consent: bool = True  # live
    # live; requests per window on all of /api/v1/ together
    rate_limit: int | None = None
    rate_window: float = 1.0  # live
    # live; "GET lead" -> requests per rate_window; "*" covers every group not named
    group_rate_limits: dict[str, int] = field(default_factory=dict)
    rate_limit_separator: str = ","  # live; "," or ";" between the RateLimit parts
    rate_limit_decimal_reset: bool = True  # live; False rounds reset up to whole seconds
    rate_limit_retry_after: bool = True  # live; False: a 429 says when only in RateLimit
    rate_limit_malformed: bool = False  # live; RateLimit headers nobody can parse
    default_redirect_uri: str = "https://example.com/callback/close"
    log_limit: int | None = 10_000  # newest entries kept in each log; None keeps all
    # Data: None keeps the five classic demo leads; a number builds a whole organization.
    seed: int | None = None
    # Where the data and the issued tokens are kept across restarts; None: memory only.
    data_dir: Path | None = None


def nonneg_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError("expected a number >= 0")
    return float(value)


def positive_float(value: object) -> float:
    number = nonneg_float(value)
    if number == 0:
        raise ValueError("expected a number > 0")
    return number


def nonneg_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def optional_nonneg_int(value: object) -> int | None:
    return None if value is None else nonneg_int(value)


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def group_limits(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError('expected an object like {"GET lead": 5, "*": 100}')
    limits: dict[str, int] = {}
    for group, limit in value.items():
        if not isinstance(group, str) or not group:
            raise ValueError("group names must be non-empty strings")
        try:
            limits[group] = nonneg_int(limit)
        except ValueError:
            raise ValueError(f"group {group!r}: expected an integer >= 0") from None
    return limits


def one_of(choices: frozenset[str]) -> Callable[[object], str]:
    """A knob parser accepting one of `choices`."""

    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"expected one of {sorted(choices)}")
        return value

    return parse


separator = one_of(RATE_LIMIT_SEPARATORS)


# Knobs living on SimConfig, read live so they can change while the simulator runs.
CONFIG_KNOBS: dict[str, Callable[[object], object]] = {
    "token_lifetime": nonneg_float,
    "auto_consent": boolean,
    "rate_limit": optional_nonneg_int,
    "rate_window": positive_float,
    "group_rate_limits": group_limits,
    "rate_limit_separator": separator,
    "rate_limit_decimal_reset": boolean,
    "rate_limit_retry_after": boolean,
    "rate_limit_malformed": boolean,
}
