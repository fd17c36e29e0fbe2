"""Revoking: `closeproxy revoke`/`logout` and POST /admin/revoke, with Close up and down."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from helpers import Proxy, cli_env, proxy_env, run_cli_async, seed_tokens

from closeproxy.sim import RunningSim


@pytest.mark.parametrize("command", ["revoke", "logout"])
async def test_revoke_with_close_up_tells_close_and_wipes(
    sim: RunningSim, token_file: Path, command: str
) -> None:
    tokens = seed_tokens(sim, token_file)
    result = await run_cli_async(proxy_env(sim, token_file), command)
    assert result.returncode == 0, result.stderr
    assert "revoked" in result.stdout
    assert not token_file.exists()
    revoked = [form["token"] for form in sim.state.revoke_log]
    assert revoked == [tokens.refresh_token, tokens.access_token]
    assert not sim.state.access_token_valid(tokens.access_token)


async def test_revoke_with_close_down_still_wipes_and_says_the_grant_may_live(
    sim: RunningSim, token_file: Path
) -> None:
    tokens = seed_tokens(sim, token_file)
    sim.state.token_endpoint = "down"
    result = await run_cli_async(proxy_env(sim, token_file), "revoke")
    assert result.returncode == 1
    assert "may still be active" in result.stderr
    assert "Traceback" not in result.stderr
    assert not token_file.exists()
    assert sim.state.access_token_valid(tokens.access_token)  # Close really was not told


async def test_revoke_when_not_logged_in_is_harmless(sim: RunningSim, token_file: Path) -> None:
    result = await run_cli_async(proxy_env(sim, token_file), "revoke")
    assert result.returncode == 0
    assert "nothing to revoke" in result.stdout
    assert sim.state.revokes == 0


async def test_admin_revoke_then_api_calls_need_login_without_touching_close(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    tokens = seed_tokens(sim, token_file, expires_in=-5)
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{proxy.url}/admin/revoke") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body == {"revoked": True, "wiped": True}
        assert not token_file.exists()
        requests_before = sim.state.token_requests
        for _ in range(3):
            async with client.get(f"{proxy.url}/api/v1/me/") as resp:
                assert resp.status == 401
                assert (await resp.json())["closeproxy_error"] == "login_required"
        assert sim.state.token_requests == requests_before
        assert sim.state.api_requests == 0
        async with client.get(f"{proxy.url}/admin/status") as resp:
            assert (await resp.json())["logged_in"] is False
    assert sim.state.revoke_log[0]["token"] == tokens.refresh_token


async def test_admin_revoke_with_close_down(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    seed_tokens(sim, token_file)
    sim.state.token_endpoint = "drop"
    async with aiohttp.ClientSession() as client, client.post(f"{proxy.url}/admin/revoke") as resp:
        assert resp.status == 502
        body = json.loads(await resp.text())
    assert body["wiped"] is True
    assert body["closeproxy_error"] == "revoke_incomplete"
    assert "may still be active" in body["error"]
    assert not token_file.exists()


async def test_revoke_wipes_before_telling_close_so_an_interrupted_revoke_leaves_nothing(
    sim: RunningSim, token_file: Path
) -> None:
    seed_tokens(sim, token_file)
    sim.state.token_delay = 3  # Close is slow to answer the revoke
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "closeproxy",
        "revoke",
        env=cli_env(proxy_env(sim, token_file)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(200):
        if sim.state.revoke_log or not token_file.exists():
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert not token_file.exists()  # gone while Close is still thinking
    process.send_signal(signal.SIGINT)
    await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode != 0
    assert not token_file.exists()


async def test_revoke_of_an_unreadable_token_file_wipes_it_and_says_so(
    sim: RunningSim, token_file: Path
) -> None:
    token_file.parent.mkdir(parents=True)
    token_file.write_text("{not json")
    result = await run_cli_async(proxy_env(sim, token_file), "logout")
    assert result.returncode == 1
    assert "could not be read" in result.stderr
    assert not token_file.exists()
    assert sim.state.revokes == 0
