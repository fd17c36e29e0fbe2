"""`closeproxy demo`: one command, no account, no network, a working proxy."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
from helpers import start_demo


async def test_demo_serves_the_api_within_seconds() -> None:
    started = time.monotonic()
    process = await start_demo("--port", "0", "--exit-after", "20")
    assert process.stdout is not None
    url = None
    printed = ""
    try:
        while url is None:
            line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
            assert line, f"demo ended early: {printed}"
            printed += line
            if match := re.match(r"listening on (http://127\.0\.0\.1:\d+)", line):
                url = match.group(1)
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{url}/api/v1/me/") as resp:
                assert resp.status == 200
                assert (await resp.json())["id"] == "user_sim"
            async with client.post(f"{url}/api/v1/lead/", json={"name": "Acme"}) as resp:
                assert resp.status in {200, 201}
        assert time.monotonic() - started < 10
        rest = (await asyncio.wait_for(process.stdout.read(300), 5)).decode()
        assert f"curl {url}/api/v1/me/" in printed + rest
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)
    assert process.returncode == 0


async def _demo_url(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    printed = ""
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        assert line, f"demo ended early: {printed}"
        printed += line
        if match := re.match(r"listening on (http://127\.0\.0\.1:\d+)", line):
            return match.group(1)


async def _seeded_leads(seed: str) -> tuple[int, list[str]]:
    process = await start_demo("--port", "0", "--seed", seed, "--exit-after", "30")
    try:
        url = await _demo_url(process)
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{url}/api/v1/lead/?_limit=5&_fields=id,display_name") as resp,
        ):
            assert resp.status == 200
            page = await resp.json()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)
    assert process.returncode == 0
    return page["total_results"], [lead["display_name"] for lead in page["data"]]


async def test_demo_seed_serves_the_same_organization_every_time() -> None:
    first, second = await asyncio.gather(_seeded_leads("40"), _seeded_leads("40"))
    assert first[0] == 40
    assert first == second
    other = await _seeded_leads("41")
    assert other[0] == 41


async def test_demo_refuses_a_seed_that_is_not_a_number() -> None:
    process = await start_demo("--seed", "many")
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert "--seed" in err.decode() and "whole number" in err.decode()
