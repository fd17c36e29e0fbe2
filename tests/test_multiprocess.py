"""Several processes sharing one token file: two servers and a `closeproxy refresh` loop."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import aiohttp
from helpers import (
    ServeProcess,
    proxy_env,
    run_cli_async,
    seed_tokens,
    start_refresh,
    start_serve,
)

from closeproxy.file_store import FileGrantStore
from closeproxy.sim import RunningSim

LOAD_SECONDS = 9.0
# On a loaded machine a `closeproxy refresh` process can take seconds to start: the load
# goes on until the CLI has refreshed this often, within a bound.
CLI_REFRESHES = 3
MAX_LOAD_SECONDS = 60.0
LIFETIME = 2.0


async def _refresh_loop(env: dict[str, str], stop: asyncio.Event, codes: list[int]) -> list[int]:
    while not stop.is_set():
        process = await start_refresh(env)
        _, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        codes.append(process.returncode)
        await asyncio.sleep(1.5)
    return codes


async def _load(
    client: aiohttp.ClientSession,
    urls: list[str],
    stop: asyncio.Event,
    statuses: collections.Counter[int],
) -> None:
    i = 0
    while not stop.is_set():
        url = urls[i % len(urls)]
        i += 1
        async with client.get(f"{url}/api/v1/me/") as resp:
            await resp.read()
            statuses[resp.status] += 1


async def test_two_servers_and_a_refresh_loop_never_spend_a_refresh_token_twice(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess]
) -> None:
    sim.state.config.token_lifetime = LIFETIME
    seed_tokens(sim, token_file, expires_in=LIFETIME)
    sim.state.token_delay = 0.05  # widen every race window a little
    env = proxy_env(sim, token_file)
    # Started off the event loop: the in-process simulator must keep answering meanwhile.
    servers = []
    for _ in range(2):
        servers.append(await asyncio.to_thread(start_serve, env))
        serve_processes.append(servers[-1])  # stopped at teardown even if the next fails
    urls = [server.url for server in servers]

    stop = asyncio.Event()
    statuses: collections.Counter[int] = collections.Counter()
    started = time.monotonic()
    async with aiohttp.ClientSession() as client:
        workers = [asyncio.create_task(_load(client, urls, stop, statuses)) for _ in range(16)]
        codes: list[int] = []
        refresher = asyncio.create_task(_refresh_loop(env, stop, codes))
        await asyncio.sleep(LOAD_SECONDS)
        while len(codes) < CLI_REFRESHES and time.monotonic() - started < MAX_LOAD_SECONDS:
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*workers)
        cli_refreshes = await refresher
    elapsed = time.monotonic() - started

    assert sim.state.reuse_detected == 0
    assert dict(statuses) == {200: sum(statuses.values())}, statuses
    assert sum(statuses.values()) > 500
    # several expiries really happened, from the servers as well as from the CLI
    assert elapsed / LIFETIME >= 4
    assert len(cli_refreshes) >= CLI_REFRESHES
    assert sim.state.refreshes >= len(cli_refreshes) + 2
    assert await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers)) == [0, 0]
    final = FileGrantStore(token_file).read()
    assert final is not None and final.refresh_rejected is None
    # The grant is alive: the stored refresh token still works (the access token itself may
    # have run out of its 2 s since the last refresh), and nothing was spent twice.
    result = await run_cli_async(env, "refresh")
    assert result.returncode == 0, result.stderr
    assert sim.state.reuse_detected == 0
    stored = FileGrantStore(token_file).read()
    assert stored is not None and sim.state.access_token_valid(stored.access_token)
