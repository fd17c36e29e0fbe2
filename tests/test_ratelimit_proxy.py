"""Close's rate limits absorbed by the proxy, over real sockets against the simulator (§9)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import Proxy, ProxyFactory, cli_env, seed_tokens, start_demo

from closeproxy.ratelimit_headers import WAIT_HEADER
from closeproxy.sim import RunningSim

LEADS = "/api/v1/lead/"


def limit(sim: RunningSim, window: float, **groups: int) -> None:
    """`limit(sim, 1.0, GET_lead=2)`: per-group limits per window at the simulator."""
    sim.state.config.rate_window = window
    sim.state.config.group_rate_limits = {
        name.replace("_", " ", 1): count for name, count in groups.items()
    }


async def exhaust_directly(
    sim: RunningSim, client: aiohttp.ClientSession, token: str, method: str, path: str
) -> None:
    """Spend the group's window at Close itself, as another tool with this token would
    (up to remaining=0, short of a 429: the proxy's first attempt meets the first one)."""
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(1000):
        async with client.request(
            method, sim.url + path, headers=headers, json={"name": "x"}
        ) as resp:
            await resp.read()
            if resp.status == 429 or "remaining=0" in resp.headers.get("RateLimit", ""):
                return
    raise AssertionError("the simulator never limited the group")


async def status_doc(client: aiohttp.ClientSession, proxy: Proxy) -> dict[str, Any]:
    async with client.get(f"{proxy.url}/admin/status") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def group_hits(sim: RunningSim, group: str) -> int:
    stats = sim.state.rate_groups.get(group)
    return 0 if stats is None else stats.hits


async def test_get_and_json_post_meeting_a_429_end_200_after_the_reset_one_lead_made(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    tokens = seed_tokens(sim, token_file)
    limit(sim, 1.0, GET_lead=1, POST_lead=1)
    await exhaust_directly(sim, client, tokens.access_token, "GET", LEADS)
    async with client.get(f"{proxy.url}{LEADS}") as resp:
        assert resp.status == 200
        assert "data" in await resp.json()
    await exhaust_directly(sim, client, tokens.access_token, "POST", LEADS)
    before = len(sim.state.leads)
    async with client.post(f"{proxy.url}{LEADS}", json={"name": "Retried Inc."}) as resp:
        assert resp.status == 200
        created = await resp.json()
    assert created["name"] == "Retried Inc."
    assert len(sim.state.leads) == before + 1
    for group in ("GET lead", "POST lead"):
        stats = sim.state.rate_groups[group]
        # Direct: 200; through the proxy: 429, then the retry that succeeded.
        assert (stats.hits, stats.limited) == (3, 1)
        # The simulator counts requests that arrive before the reset its 429 announced.
        assert stats.early_arrivals == 0


@pytest.mark.parametrize(
    "knobs",
    [
        {"rate_limit_separator": ";"},
        {"rate_limit_retry_after": False},
        {"rate_limit_decimal_reset": False, "rate_limit_separator": ";"},
        {"rate_limit_malformed": True, "rate_limit_retry_after": False},
    ],
    ids=["semicolons", "no-retry-after", "whole-seconds", "malformed-1s-fallback"],
)
async def test_every_header_shape_close_sends_is_waited_out(
    sim: RunningSim,
    token_file: Path,
    proxy: Proxy,
    client: aiohttp.ClientSession,
    knobs: dict[str, object],
) -> None:
    tokens = seed_tokens(sim, token_file)
    limit(sim, 1.0, GET_lead=2)
    sim.state.set_knobs(knobs)
    for _ in range(2):  # the window's two slots, spent by another tool
        async with client.get(
            sim.url + LEADS, headers={"Authorization": f"Bearer {tokens.access_token}"}
        ) as resp:
            assert resp.status == 200
    for _ in range(4):
        async with client.get(f"{proxy.url}{LEADS}") as resp:
            assert resp.status == 200
    stats = sim.state.rate_groups["GET lead"]
    assert stats.limited >= 1
    assert stats.early_arrivals == 0


@pytest.mark.parametrize("how", ["setting", "header"])
async def test_budget_zero_hands_over_closes_429_unchanged_and_the_header_stays_home(
    sim: RunningSim,
    token_file: Path,
    start_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    how: str,
) -> None:
    tokens = seed_tokens(sim, token_file)
    # Whole-second resets in a long window: two 429s a moment apart carry the same headers.
    limit(sim, 60.0, GET_lead=1)
    sim.state.config.rate_limit_decimal_reset = False
    await exhaust_directly(sim, client, tokens.access_token, "GET", LEADS)
    flags = {"rate_limit_wait": 0} if how == "setting" else {}
    headers = {WAIT_HEADER: "0"} if how == "header" else {}
    async with start_proxy(**flags) as proxy:
        async with client.get(f"{proxy.url}{LEADS}", headers=headers) as resp:
            through = (resp.status, dict(resp.headers), await resp.json())
        async with client.get(
            sim.url + LEADS, headers={"Authorization": f"Bearer {tokens.access_token}"}
        ) as resp:
            direct = (resp.status, dict(resp.headers), await resp.json())
        rate_limits = (await status_doc(client, proxy))["rate_limits"]
    assert through[0] == direct[0] == 429
    for name in ("Retry-After", "RateLimit", "Content-Type"):
        assert through[1][name] == direct[1][name]
    assert through[1]["Retry-After"].isdigit()
    # Only the countdown in Close's body moves between the two answers.
    through[2]["error"].pop("rate_reset")
    direct[2]["error"].pop("rate_reset")
    assert through[2] == direct[2]
    assert all(
        name.lower() != WAIT_HEADER.lower()
        for record in sim.state.api_log
        for name, _ in record.headers
    )
    assert rate_limits["GET lead"]["passed_through"] == 1
    assert rate_limits["GET lead"]["waits"] == 0


async def test_header_never_raises_the_budget_and_must_be_a_number(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    tokens = seed_tokens(sim, token_file)
    limit(sim, 30.0, GET_lead=1)
    await exhaust_directly(sim, client, tokens.access_token, "GET", LEADS)
    async with start_proxy(rate_limit_wait=1) as proxy:
        started = time.monotonic()
        async with client.get(f"{proxy.url}{LEADS}", headers={WAIT_HEADER: "600"}) as resp:
            assert resp.status == 429  # a 30 s reset is beyond the 1 s setting
        assert time.monotonic() - started < 20
        async with client.get(f"{proxy.url}{LEADS}", headers={WAIT_HEADER: "soon"}) as resp:
            assert resp.status == 400
            body = await resp.json()
    assert body["closeproxy_error"] == "bad_rate_limit_wait"
    assert WAIT_HEADER in body["error"]


async def test_reset_beyond_the_budget_passes_the_429_through_at_once(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    tokens = seed_tokens(sim, token_file)
    limit(sim, 60.0, GET_lead=1)
    await exhaust_directly(sim, client, tokens.access_token, "GET", LEADS)
    async with start_proxy(rate_limit_wait=20) as proxy:
        started = time.monotonic()
        for _ in range(2):  # the second meets the gate already backing off for 60 s
            async with client.get(f"{proxy.url}{LEADS}") as resp:
                assert resp.status == 429
                assert resp.headers["Retry-After"] == "60"
        elapsed = time.monotonic() - started
        rate_limits = (await status_doc(client, proxy))["rate_limits"]
    # Not after waiting out the 20 s budget (twice).
    assert elapsed < 10
    assert rate_limits["GET lead"]["passed_through"] == 2
    assert rate_limits["GET lead"]["waits"] == 0


async def test_body_over_a_mebibyte_meeting_a_429_is_passed_through(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    tokens = seed_tokens(sim, token_file)
    limit(sim, 1.0, POST__sim=1)
    await exhaust_directly(sim, client, tokens.access_token, "POST", "/api/v1/_sim/upload")
    body = io.BytesIO(b"x" * (2 * 1024 * 1024))
    async with client.post(f"{proxy.url}/api/v1/_sim/upload", data=body) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"].isdigit()
        assert "RateLimit" in resp.headers
        assert "rate_limit" in (await resp.json())["error"]
    assert sim.state.rate_groups["POST _sim"].hits == 2
    doc = await status_doc(client, proxy)
    assert doc["rate_limits"]["POST _sim"]["passed_through"] == 1


async def test_body_over_a_mebibyte_waits_while_its_group_backs_off(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    limit(sim, 1.0, POST__sim=1)
    async with client.post(
        f"{proxy.url}/api/v1/_sim/upload", data=b"small", headers={WAIT_HEADER: "0"}
    ) as resp:
        assert resp.status == 200  # Close said remaining=0: the proxy holds the next one
    body = io.BytesIO(b"x" * (2 * 1024 * 1024))
    async with client.post(f"{proxy.url}/api/v1/_sim/upload", data=body) as resp:
        assert resp.status == 200
        assert (await resp.json())["bytes"] == 2 * 1024 * 1024
    stats = sim.state.rate_groups["POST _sim"]
    assert (stats.hits, stats.limited) == (2, 0)
    doc = await status_doc(client, proxy)
    assert doc["rate_limits"]["POST _sim"]["waits"] == 1


async def test_fifty_concurrent_requests_to_an_exhausted_group_wait_their_turn(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    limit(sim, 1.0, GET_lead=10)
    # Spend the window through the proxy until Close's first 429 comes back.
    for _ in range(11):
        async with client.get(f"{proxy.url}{LEADS}", headers={WAIT_HEADER: "0"}) as resp:
            await resp.read()
    assert sim.state.rate_groups["GET lead"].limited == 1

    async def one() -> int:
        async with client.get(f"{proxy.url}{LEADS}?_limit=1") as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(50)))
    assert statuses == [200] * 50
    stats = sim.state.rate_groups["GET lead"]
    assert stats.early_arrivals == 0  # nothing reached Close before a reset it announced
    assert stats.limited == 1  # and no stampede of 429s after it
    doc = await status_doc(client, proxy)
    assert doc["rate_limits"]["GET lead"]["waits"] == 50
    assert doc["rate_limits"]["GET lead"]["waited_seconds"] <= 50 * 60


async def test_other_groups_flow_while_one_waits(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    limit(sim, 5.0, GET_lead=1)
    async with client.get(f"{proxy.url}{LEADS}") as resp:
        assert resp.status == 200  # remaining=0 for the next 5 s
    waiting = asyncio.create_task(client.get(f"{proxy.url}{LEADS}"))

    async def held() -> bool:
        doc = await status_doc(client, proxy)
        return bool(doc["rate_limits"]["GET lead"]["waiting"] == 1)

    await wait_until(held)
    for _ in range(5):
        started = time.monotonic()
        async with client.get(f"{proxy.url}/api/v1/me/") as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 2
    assert not waiting.done()
    async with await waiting as resp:
        assert resp.status == 200


async def test_client_hanging_up_mid_wait_costs_nothing(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    limit(sim, 30.0, GET_lead=1)
    async with client.get(f"{proxy.url}{LEADS}") as resp:
        assert resp.status == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"GET {LEADS} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode())
    await writer.drain()

    async def waiting(count: int) -> bool:
        doc = await status_doc(client, proxy)
        return bool(doc["rate_limits"]["GET lead"]["waiting"] == count)

    await wait_until(lambda: waiting(1))
    writer.close()
    await writer.wait_closed()
    await wait_until(lambda: waiting(0))
    doc = await status_doc(client, proxy)
    assert group_hits(sim, "GET lead") == 1
    assert doc["counters"]["upstream_errors"] == 0
    assert doc["rate_limits"]["GET lead"]["waits"] == 1


async def test_status_shows_the_group_and_the_log_one_line_per_wait_without_secrets(
    sim: RunningSim,
    token_file: Path,
    proxy: Proxy,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = seed_tokens(sim, token_file)
    limit(sim, 1.0, GET_lead=2)
    caplog.set_level(logging.INFO, logger="closeproxy.ratelimit")
    for _ in range(5):
        async with client.get(f"{proxy.url}{LEADS}") as resp:
            assert resp.status == 200
    started = time.time()
    doc = await status_doc(client, proxy)
    group = doc["rate_limits"]["GET lead"]
    assert group["limit"] == 2
    assert group["remaining"] in {0, 1}
    assert started - 5 < group["reset_at"] < started + 5
    assert group["waits"] >= 2
    assert group["waited_seconds"] > 0
    assert group["passed_through"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "closeproxy.ratelimit"]
    assert len(lines) == group["waits"]
    assert all(line.startswith("GET lead waited ") for line in lines)
    text = json.dumps(doc) + "\n".join(lines)
    assert tokens.access_token not in text
    assert tokens.refresh_token
    assert tokens.refresh_token not in text
    assert sim.state.rate_groups["GET lead"].early_arrivals == 0


async def test_demo_prints_a_curl_loop_that_passes_only_through_the_proxy() -> None:
    process = await start_demo("--port", "0", "--exit-after", "60")
    assert process.stdout is not None
    loops: list[str] = []
    try:
        while len(loops) < 2:
            line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
            assert line, "demo ended before printing its rate-limit loops"
            if line.startswith("  for i in"):
                loops.append(line.strip())
        counts = []
        for loop in loops:
            shell = await asyncio.create_subprocess_shell(
                loop, stdout=asyncio.subprocess.PIPE, env=cli_env({})
            )
            out, _ = await asyncio.wait_for(shell.communicate(), 60)
            counts.append(
                {int(s): int(n) for n, s in (row.split() for row in out.decode().splitlines())}
            )
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)
    through, without = counts
    assert through == {200: 20}
    assert without.get(429, 0) > 0
    assert sum(without.values()) == 20


async def test_waits_and_remaining_show_in_metrics(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    tokens = seed_tokens(sim, token_file)
    limit(sim, 1.0, GET_lead=1)
    await exhaust_directly(sim, client, tokens.access_token, "GET", LEADS)
    async with client.get(f"{proxy.url}{LEADS}") as resp:
        assert resp.status == 200
    async with client.get(f"{proxy.url}/metrics") as resp:
        assert resp.status == 200
        families = {
            family.name: family for family in text_string_to_metric_families(await resp.text())
        }

    def value(family: str, sample_name: str) -> float:
        samples = [
            sample.value
            for sample in families[family].samples
            if sample.name == sample_name and sample.labels.get("group") == "GET lead"
        ]
        assert samples, f"{sample_name} has no GET lead sample"
        return samples[0]

    assert value("closeproxy_rate_limit_waits", "closeproxy_rate_limit_waits_total") == 1
    assert (
        value("closeproxy_rate_limit_wait_seconds", "closeproxy_rate_limit_wait_seconds_total") > 0
    )
    assert value("closeproxy_rate_limit_remaining", "closeproxy_rate_limit_remaining") >= 0
