"""The rate limits' pure parts: Close's headers, groups, jitter, gates and the budget (§9)."""

from __future__ import annotations

import email.utils
import math

import pytest

from closeproxy.config import load_settings
from closeproxy.errors import ConfigError
from closeproxy.ratelimit import RateLimits
from closeproxy.ratelimit_gate import GroupGate, fits, group_segment, jitter
from closeproxy.ratelimit_headers import (
    DEFAULT_WAIT,
    BadWaitHeader,
    RateLimitReport,
    announced_wait,
    parse_ratelimit,
    parse_retry_after,
    request_budget,
)

NOW_WALL = 1_800_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("limit=100, remaining=50, reset=5", RateLimitReport(100, 50, 5.0)),
        ("limit=100; remaining=0; reset=0.25", RateLimitReport(100, 0, 0.25)),
        ("limit=20,remaining=3,reset=1.5", RateLimitReport(20, 3, 1.5)),
        ("Limit=20 ;  Remaining=3 ; Reset=2", RateLimitReport(20, 3, 2.0)),
        ("remaining=0, reset=3", RateLimitReport(None, 0, 3.0)),
        ("limit=5, remaining=1, reset=1, policy=x", RateLimitReport(5, 1, 1.0)),
    ],
)
def test_ratelimit_header_with_either_separator_and_decimal_reset(
    value: str, expected: RateLimitReport
) -> None:
    assert parse_ratelimit(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "limit=lots, remaining=?, reset=soon",
        "limit=-1, remaining=0, reset=1",
        "limit=5, remaining=0, reset=-3",
        "limit=5, remaining=0, reset=nan",
        "limit=5, remaining=0, reset=1e400",
        "limit=5, remaining=0, reset=99999999",
        "limit=5, limit=6, reset=1",
        "garbage",
        "policy=x",
    ],
)
def test_malformed_ratelimit_headers_are_ignored(value: str | None) -> None:
    assert parse_ratelimit(value) is None


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert parse_retry_after("3", now=NOW_WALL) == 3.0
    assert parse_retry_after(" 1.5 ", now=NOW_WALL) == 1.5
    date = email.utils.formatdate(NOW_WALL + 7, usegmt=True)
    assert parse_retry_after(date, now=NOW_WALL) == pytest.approx(7.0)
    past = email.utils.formatdate(NOW_WALL - 7, usegmt=True)
    assert parse_retry_after(past, now=NOW_WALL) == 0.0
    for bad in (None, "", "soon", "-1", "Wed, 99 Foo 2026"):
        assert parse_retry_after(bad, now=NOW_WALL) is None


def test_announced_wait_prefers_retry_after_then_reset_then_one_second() -> None:
    both = {"Retry-After": "2", "RateLimit": "limit=5, remaining=0, reset=0.4"}
    assert announced_wait(both, now=NOW_WALL) == 2.0
    reset_only = {"RateLimit": "limit=5; remaining=0; reset=0.4"}
    assert announced_wait(reset_only, now=NOW_WALL) == 0.4
    unreadable = {"Retry-After": "later", "RateLimit": "limit=lots"}
    assert announced_wait(unreadable, now=NOW_WALL) == DEFAULT_WAIT
    assert announced_wait({}, now=NOW_WALL) == DEFAULT_WAIT


@pytest.mark.parametrize(
    ("path", "segment"),
    [
        ("/api/v1/lead/", "lead"),
        ("/api/v1/lead/lead_abc/", "lead"),
        ("/api/v1/activity/call/", "activity"),
        ("/api/v1/me/", "me"),
        ("/api/v1/custom_field", "custom_field"),
        ("/api/v1/", "other"),
        ("/api/v1/Lead/", "other"),
        ("/api/v1/le-ad/", "other"),
        ("/api/v1/" + "a" * 40 + "/", "a" * 40),
        ("/api/v1/" + "a" * 41 + "/", "other"),
        ("/elsewhere/", "other"),
    ],
)
def test_group_segment(path: str, segment: str) -> None:
    assert group_segment(path) == segment


def test_groups_are_bounded_at_one_hundred_and_odd_methods_share_one() -> None:
    limits = RateLimits(60)
    for index in range(100):
        limits.gate(limits.group("GET", f"/api/v1/g{index}/"))
    assert limits.group("GET", "/api/v1/g5/") == "GET g5"
    assert limits.group("GET", "/api/v1/new/") == "GET other"
    assert limits.group("POST", "/api/v1/new/") == "POST other"
    assert RateLimits(60).group("BREW", "/api/v1/lead/") == "other"


def test_jitter_is_at_most_a_tenth_of_the_wait_and_at_most_a_second() -> None:
    for wait in (0.0, 0.5, 3.0, 9.99, 10.0, 60.0, 3600.0):
        for fraction in (0.0, 0.3, 0.999999):
            extra = jitter(wait, fraction)
            assert 0 <= extra <= min(wait * 0.1, 1.0)
    assert jitter(60.0, 0.5) == 0.5
    assert jitter(2.0, 0.5) == pytest.approx(0.1)


def test_budget_header_lowers_never_raises_and_must_be_a_number() -> None:
    assert request_budget(None, 60) == 60
    assert request_budget("5", 60) == 5
    assert request_budget(" 0 ", 60) == 0
    assert request_budget("600", 60) == 60
    assert request_budget("2.5", 1) == 1
    for bad in ("soon", "-1", "nan", "inf", ""):
        with pytest.raises(BadWaitHeader, match="Closeproxy-Rate-Limit-Wait"):
            request_budget(bad, 60)


def test_retry_only_while_the_total_wait_fits_the_budget() -> None:
    assert fits(0, 5, 60)
    assert fits(55, 5, 60)
    assert not fits(56, 5, 60)
    assert not fits(0, 61, 60)
    assert not fits(0, 0.1, 0)


def test_a_group_nobody_limited_is_never_held() -> None:
    gate = GroupGate()
    assert [gate.admit(now) for now in (0, 0, 0, 1)] == [0.0] * 4
    gate.observe(200, {}, now=1, now_wall=NOW_WALL)
    assert gate.admit(1) == 0.0


def test_remaining_zero_holds_the_group_until_the_reset_then_lets_the_limit_go() -> None:
    gate = GroupGate()
    assert gate.admit(10.0) == 0.0
    gate.observe(200, {"RateLimit": "limit=3, remaining=0, reset=0.5"}, now=10.0, now_wall=NOW_WALL)
    assert gate.admit(10.1) == pytest.approx(0.4)
    assert gate.reset_at_wall == NOW_WALL + 0.5
    # The window is over: three go, the fourth waits for the first answer of the new one.
    assert [gate.admit(10.6) for _ in range(3)] == [0.0] * 3
    assert gate.admit(10.6) == math.inf
    gate.observe(200, {"RateLimit": "limit=3, remaining=2, reset=1"}, now=10.7, now_wall=NOW_WALL)
    # Two more are already on their way and may take Close's two remaining slots.
    assert gate.admit(10.7) == pytest.approx(1.0)


def test_remaining_counts_requests_already_on_their_way() -> None:
    gate = GroupGate()
    for _ in range(3):
        assert gate.admit(0) == 0.0
    gate.observe(200, {"RateLimit": "limit=10, remaining=4, reset=1"}, now=0, now_wall=NOW_WALL)
    # Two are still in flight: 4 - 2 = 2 may go.
    assert [gate.admit(0) for _ in range(2)] == [0.0, 0.0]
    assert gate.admit(0) == pytest.approx(1.0)


def test_a_429_backs_the_group_off_for_retry_after() -> None:
    gate = GroupGate()
    gate.admit(0)
    headers = {"Retry-After": "2", "RateLimit": "limit=5, remaining=0, reset=0.5"}
    gate.observe(429, headers, now=0, now_wall=NOW_WALL)
    assert gate.admit(1.0) == pytest.approx(1.0)
    assert gate.admit(2.0) == 0.0  # backed off; the fresh window lets `limit` go
    assert gate.reason == "Close answered 429"


def test_a_429_with_nothing_readable_backs_off_one_second() -> None:
    gate = GroupGate()
    gate.admit(0)
    gate.observe(429, {"RateLimit": "limit=lots"}, now=0, now_wall=NOW_WALL)
    assert gate.admit(0.25) == pytest.approx(0.75)
    assert gate.admit(1.0) == 0.0


def test_a_429_saying_zero_still_backs_off_a_little() -> None:
    gate = GroupGate()
    gate.admit(0)
    gate.observe(429, {"Retry-After": "0"}, now=0, now_wall=NOW_WALL)
    assert gate.admit(0.01) == pytest.approx(0.09)


def test_answers_without_headers_in_a_new_window_stop_the_holding() -> None:
    gate = GroupGate()
    gate.admit(0)
    gate.observe(200, {"RateLimit": "limit=1, remaining=0, reset=1"}, now=0, now_wall=NOW_WALL)
    assert gate.admit(1.0) == 0.0
    assert gate.admit(1.0) == math.inf
    gate.observe(500, {}, now=1.1, now_wall=NOW_WALL)  # said nothing about the limit
    assert gate.admit(1.1) == 0.0


def test_status_reports_null_for_what_close_never_sent() -> None:
    limits = RateLimits(60)
    gate = limits.gate("GET lead")
    gate.observe(200, {"RateLimit": "remaining=4, reset=2"}, now=0, now_wall=NOW_WALL)
    limits.gate("GET me").observe(200, {}, now=0, now_wall=NOW_WALL)
    assert limits.status() == {
        "GET lead": {
            "limit": None,
            "remaining": 4,
            "reset_at": NOW_WALL + 2,
            "waits": 0,
            "waited_seconds": 0.0,
            "passed_through": 0,
            "waiting": 0,
        }
    }


def test_rate_limit_wait_setting_defaults_to_60_and_follows_precedence() -> None:
    assert load_settings({}, {}).rate_limit_wait == 60.0
    assert load_settings({}, {"CLOSEPROXY_RATE_LIMIT_WAIT": "0"}).rate_limit_wait == 0.0
    flagged = load_settings({"rate_limit_wait": "7.5"}, {"CLOSEPROXY_RATE_LIMIT_WAIT": "0"})
    assert flagged.rate_limit_wait == 7.5
    with pytest.raises(ConfigError, match="CLOSEPROXY_RATE_LIMIT_WAIT") as caught:
        load_settings({}, {"CLOSEPROXY_RATE_LIMIT_WAIT": "-1"})
    assert caught.value.setting == "rate_limit_wait"
