"""The simulator's per-endpoint-group rate limits, over real sockets (issue 10)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from closeproxy.sim import SimConfig, run_sim
from closeproxy.sim.app import RunningSim
from closeproxy.sim.config import SimConfig as ConfigClass
from closeproxy.sim.ratelimit import RateLimiter, format_reset

HEADER = re.compile(
    r"limit=(?P<limit>\d+)(?P<sep>[,;]) remaining=(?P<remaining>\d+)[,;] "
    r"reset=(?P<reset>\d+(?:\.\d+)?)"
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        yield client


async def call(
    session: aiohttp.ClientSession, sim: RunningSim, token: object, method: str, path: str
) -> tuple[int, dict[str, str], object]:
    async with session.request(
        method,
        sim.url + path,
        headers={"Authorization": f"Bearer {token}"},
        json={"name": "Rate Co"} if method == "POST" else None,
    ) as resp:
        return resp.status, dict(resp.headers), await resp.json()


def parsed(header: str) -> dict[str, str]:
    match = HEADER.fullmatch(header)
    assert match, header
    return match.groupdict()


async def test_each_group_has_its_own_window_with_close_headers_and_body():
    config = SimConfig(group_rate_limits={"GET lead": 2}, rate_window=30.0)
    async with run_sim(config) as sim, aiohttp.ClientSession() as session:
        token = sim.state.issue_tokens()["access_token"]
        first = await call(session, sim, token, "GET", "/api/v1/lead/")
        second = await call(session, sim, token, "GET", "/api/v1/lead/?_limit=1")
        assert (first[0], second[0]) == (200, 200)
        assert parsed(first[1]["RateLimit"])["remaining"] == "1"
        assert parsed(second[1]["RateLimit"])["remaining"] == "0"

        status, headers, body = await call(session, sim, token, "GET", "/api/v1/lead/")
        assert status == 429
        header = parsed(headers["RateLimit"])
        assert (header["limit"], header["remaining"], header["sep"]) == ("2", "0", ",")
        assert 0 < float(header["reset"]) <= 30
        assert int(headers["Retry-After"]) == max(1, int(-(-float(header["reset"]) // 1)))
        assert isinstance(body, dict)
        assert body["error"]["message"] == "API call count exceeded for this period"
        assert body["error"]["rate_limit"] == 2
        assert 0 < body["error"]["rate_reset"] <= 30

        # Another method on the same path and another path are other groups, not limited.
        status, headers, _ = await call(session, sim, token, "POST", "/api/v1/lead/")
        assert status == 200
        assert "RateLimit" not in headers
        status, headers, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        assert status == 200
        assert "RateLimit" not in headers
        # A lead by id is still "GET lead": limited, and its 404 says so too.
        status, headers, _ = await call(session, sim, token, "GET", "/api/v1/lead/lead_nope/")
        assert status == 429
        assert parsed(headers["RateLimit"])["remaining"] == "0"

        groups = sim.state.rate_groups
        assert groups["GET lead"].hits == 4
        assert groups["GET lead"].limited == 2
        assert groups["POST lead"].limited == 0
        assert groups["GET me"].hits == 1


async def test_star_covers_every_group_not_named_and_global_limit_still_works():
    config = SimConfig(group_rate_limits={"*": 1, "GET me": 3}, rate_window=30.0)
    async with run_sim(config) as sim, aiohttp.ClientSession() as session:
        token = sim.state.issue_tokens()["access_token"]
        statuses = [(await call(session, sim, token, "GET", "/api/v1/me/"))[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        statuses = [(await call(session, sim, token, "GET", "/api/v1/user/"))[0] for _ in range(2)]
        assert statuses[1] == 429
        status, headers, _ = await call(session, sim, token, "POST", "/api/v1/lead/")
        assert status == 200
        assert parsed(headers["RateLimit"])["limit"] == "1"

        # The global window counts every group together and reports the tighter limit.
        sim.state.config.group_rate_limits = {}
        sim.state.config.rate_limit = 1
        status, headers, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        assert status == 200
        status, headers, _ = await call(session, sim, token, "DELETE", "/api/v1/task/x/")
        assert status == 429
        assert "Retry-After" in headers


async def test_separator_and_whole_second_resets():
    config = SimConfig(
        group_rate_limits={"GET me": 1},
        rate_window=2.5,
        rate_limit_separator=";",
        rate_limit_decimal_reset=False,
    )
    async with run_sim(config) as sim, aiohttp.ClientSession() as session:
        token = sim.state.issue_tokens()["access_token"]
        _, headers, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        assert re.fullmatch(r"limit=1; remaining=0; reset=3", headers["RateLimit"])
        status, headers, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        assert status == 429
        assert re.fullmatch(r"limit=1; remaining=0; reset=[1-3]", headers["RateLimit"])

        sim.state.config.rate_limit_decimal_reset = True
        _, headers, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        reset = parsed(headers["RateLimit"])["reset"]
        assert "." in reset
        # At most the window: exactly 2.5 when a slow machine let the first window run out.
        assert 0 < float(reset) <= 2.5


async def test_retry_after_can_be_left_out_and_ratelimit_can_be_malformed():
    config = SimConfig(
        group_rate_limits={"GET me": 1}, rate_window=30.0, rate_limit_retry_after=False
    )
    async with run_sim(config) as sim, aiohttp.ClientSession() as session:
        token = sim.state.issue_tokens()["access_token"]
        await call(session, sim, token, "GET", "/api/v1/me/")
        status, headers, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        assert status == 429
        assert "Retry-After" not in headers
        assert parsed(headers["RateLimit"])["remaining"] == "0"

        sim.state.config.rate_limit_retry_after = True
        sim.state.config.rate_limit_malformed = True
        status, headers, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        assert status == 429
        assert HEADER.search(headers["RateLimit"]) is None
        assert int(headers["Retry-After"]) >= 1


async def test_early_arrivals_count_requests_before_the_announced_reset():
    config = SimConfig(group_rate_limits={"GET me": 1}, rate_window=0.5)
    async with run_sim(config) as sim, aiohttp.ClientSession() as session:
        token = sim.state.issue_tokens()["access_token"]
        assert (await call(session, sim, token, "GET", "/api/v1/me/"))[0] == 200
        status, _, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        assert status == 429
        assert sim.state.rate_groups["GET me"].early_arrivals == 0
        # Straight away: early. Then wait as long as that 429 says, as a client should.
        status, headers, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        received = time.monotonic()
        assert status == 429
        assert sim.state.rate_groups["GET me"].early_arrivals == 1
        announced = float(parsed(headers["RateLimit"])["reset"])
        await asyncio.sleep(max(0.0, received + announced - time.monotonic()))
        status, _, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        assert status == 200
        stats = sim.state.rate_groups["GET me"]
        assert (stats.hits, stats.limited, stats.early_arrivals) == (4, 2, 1)

        async with session.get(sim.url + "/_sim/stats") as resp:
            document = await resp.json()
        assert document["rate_groups"] == {"GET me": {"hits": 4, "limited": 2, "early_arrivals": 1}}
        async with session.post(sim.url + "/_sim/reset") as resp:
            assert (await resp.json())["counters"]["api_requests"] == 0
        assert sim.state.rate_groups == {}


async def test_rate_knobs_over_control_are_validated_and_live(session):
    async with run_sim() as sim:
        token = sim.state.issue_tokens()["access_token"]
        for bad in (
            {"group_rate_limits": {"GET lead": -1}},
            {"group_rate_limits": ["GET lead", 1]},
            {"rate_limit_separator": "|"},
            {"rate_limit_malformed": "yes"},
        ):
            async with session.post(sim.url + "/_sim/control", json=bad) as resp:
                assert resp.status == 400
                assert next(iter(bad)) in (await resp.json())["error"]
        async with session.post(
            sim.url + "/_sim/control",
            json={
                "group_rate_limits": {"GET me": 1},
                "rate_window": 30,
                "rate_limit_separator": ";",
            },
        ) as resp:
            knobs = await resp.json()
        assert knobs["group_rate_limits"] == {"GET me": 1}
        assert (await call(session, sim, token, "GET", "/api/v1/me/"))[0] == 200
        status, headers, _ = await call(session, sim, token, "GET", "/api/v1/me/")
        assert status == 429
        assert parsed(headers["RateLimit"])["sep"] == ";"


def test_groups_are_bounded_and_named_like_the_proxy_names_them():
    limiter = RateLimiter(ConfigClass())
    assert limiter.group("GET", "/api/v1/lead/lead_x/") == "GET lead"
    assert limiter.group("POST", "/api/v1/activity/note/") == "POST activity"
    assert limiter.group("GET", "/api/v1/") == "GET other"
    assert limiter.group("GET", "/api/v1/Lead/") == "GET other"
    assert limiter.group("GET", "/api/v1/" + "x" * 41 + "/") == "GET other"
    for index in range(150):
        limiter.take(limiter.group("GET", f"/api/v1/g{index}/"))
    assert len(limiter.groups) == 101  # 100 named ones, then everything new is "other"
    assert limiter.groups["GET other"].hits == 50


@pytest.mark.parametrize(
    ("seconds", "decimal", "text"),
    [(0.1234, True, "0.124"), (2.0, True, "2"), (0.0001, False, "1"), (2.0, False, "2")],
)
def test_resets_are_rounded_up_never_down(seconds, decimal, text):
    assert format_reset(seconds, decimal=decimal) == text
