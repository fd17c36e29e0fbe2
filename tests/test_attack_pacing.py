"""Hostile tests of the slow-client limits (issue 7): legitimate traffic is never cut.

Clients here read and send at ordinary network speeds (a few MB/s, limited by the
client, not by Close), over real sockets through the proxy to the simulator.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from helpers import ProxyFactory, seed_tokens

from closeproxy.sim import RunningSim

MB = 1024 * 1024


async def paced_download(
    client: aiohttp.ClientSession, url: str, rate: float, pause_at: int | None = None
) -> tuple[int, int]:
    """Read `url` at about `rate` bytes/s (optionally pausing 2 s once); (status, bytes)."""
    got = 0
    started = time.monotonic()
    paused = False
    async with client.get(url) as resp:
        async for chunk in resp.content.iter_chunked(64 * 1024):
            got += len(chunk)
            if pause_at is not None and not paused and got >= pause_at:
                paused = True
                await asyncio.sleep(2)  # the user's laptop hiccups
                started += 2
            ahead = got / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        return resp.status, got


async def test_concurrent_downloads_read_at_normal_speed_are_never_cut(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    # Four connections to Close, so two slow-share seats; four clients each download
    # 12 MiB at 4 MiB/s (Close is faster, so the proxy always waits on them a little).
    seed_tokens(sim, token_file)
    size = 12 * MB
    async with (
        start_proxy(upstream_connections=4) as proxy,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client,
    ):
        url = f"{proxy.url}/api/v1/_sim/download?bytes={size}"
        results = await asyncio.gather(*(paced_download(client, url, 4 * MB) for _ in range(4)))
        async with client.get(f"{proxy.url}/admin/status") as resp:
            counters = (await resp.json())["counters"]
    assert results == [(200, size)] * 4
    assert counters["slow_clients_cut"] == 0


async def test_a_download_paused_for_2_s_under_no_load_is_not_cut(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    seed_tokens(sim, token_file)
    size = 8 * MB
    async with (
        start_proxy() as proxy,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client,
    ):
        url = f"{proxy.url}/api/v1/_sim/download?bytes={size}"
        assert await paced_download(client, url, 16 * MB, pause_at=2 * MB) == (200, size)


async def test_concurrent_uploads_sent_at_normal_speed_are_never_cut(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    # Streamed (over 1 MiB) uploads of 8 MiB at 4 MiB/s, four at once, four connections.
    seed_tokens(sim, token_file)
    size = 8 * MB
    piece = b"x" * (64 * 1024)

    async def body() -> AsyncIterator[bytes]:
        started = time.monotonic()
        sent = 0
        while sent < size:
            yield piece
            sent += len(piece)
            ahead = sent / (4 * MB) - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def upload(client: aiohttp.ClientSession, url: str) -> tuple[int, object]:
        async with client.post(url, data=body(), headers={"Content-Length": str(size)}) as resp:
            return resp.status, (await resp.json()).get("sha256")

    async with (
        start_proxy(upstream_connections=4) as proxy,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client,
    ):
        url = f"{proxy.url}/api/v1/_sim/upload"
        results = await asyncio.gather(*(upload(client, url) for _ in range(4)))
    digest = hashlib.sha256(piece * (size // len(piece))).hexdigest()
    assert results == [(200, digest)] * 4
