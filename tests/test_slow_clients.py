"""Faults at the edges: slow, vanishing and malformed clients; an upstream failing mid-body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    Proxy,
    ProxyFactory,
    ServeProcess,
    cli_env,
    get_request,
    proxy_env,
    raw_request,
    seed_tokens,
)

from closeproxy.admission import client_budget
from closeproxy.sim import RunningSim


async def status_counters(client: aiohttp.ClientSession, proxy: Proxy) -> dict[str, int]:
    async with client.get(f"{proxy.url}/admin/status") as resp:
        counters: dict[str, int] = (await resp.json())["counters"]
        return counters


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_upstream_failing_mid_body_reaches_the_client_as_a_cut_body(
    sim: RunningSim,
    token_file: Path,
    proxy: Proxy,
    client: aiohttp.ClientSession,
    chunked: bool,
) -> None:
    seed_tokens(sim, token_file)
    query = "bytes=1000000&chunk=65536&cut_after=300000" + ("&chunked=1" if chunked else "")
    async with client.get(f"{proxy.url}/api/v1/_sim/download?{query}") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):  # never a short body that looks whole
            await resp.read()
    counters = await status_counters(client, proxy)
    assert counters["upstream_errors"] == 1


async def test_http_09_request_lines_are_refused(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    seed_tokens(sim, token_file)
    head = (
        "GET /api/v1/_sim/echo/x\n"
        f"Host: 127.0.0.1:{proxy.port}\n"
        "X-Smuggled: 1\n"
        "Connection: close\n\n"
    )
    resp = await raw_request(proxy.port, head)
    assert resp.status == 400
    assert sim.state.api_log == []


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


async def test_a_client_hanging_up_before_the_response_head_is_one_debug_line(
    sim: RunningSim,
    token_file: Path,
    proxy: Proxy,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed_tokens(sim, token_file)
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        get_request("/api/v1/_sim/sleep?seconds=0.3", proxy.port).replace("\n", "\r\n").encode()
    )
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()  # gone while Close is still thinking

    async def handled() -> bool:
        counters = await status_counters(client, proxy)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        return bool(errors) or counters["client_disconnects"] + counters["upstream_errors"] > 0

    await wait_until(handled)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    gone = [r for r in caplog.records if r.getMessage().startswith("client went away")]
    assert [r.levelno for r in gone] == [logging.DEBUG]
    counters = await status_counters(client, proxy)
    assert counters["client_disconnects"] == 1
    assert counters["upstream_errors"] == 0


# --- slow clients -----------------------------------------------------------------------

DOWNLOAD = "/api/v1/_sim/download?bytes=200000000&chunk=65536"


async def open_raw(port: int, head: str, body: bytes = b"") -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.replace("\n", "\r\n").encode() + body)
    await writer.drain()
    return reader, writer


def upload_head(port: int, length: int) -> str:
    return (
        f"POST /api/v1/_sim/upload HTTP/1.1\nHost: 127.0.0.1:{port}\n"
        f"Content-Length: {length}\nConnection: close\n\n"
    )


async def read_response(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict[str, Any]]:
    """One response, read as it arrives: a reset that follows it (the client was still
    sending) must not hide it."""
    async with asyncio.timeout(timeout):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = next(
            int(line.partition(":")[2])
            for line in head.split("\r\n")
            if line.lower().startswith("content-length:")
        )
        body = await reader.readexactly(length)
    return int(head.split(" ", 2)[1]), json.loads(body)


async def test_a_stalled_upload_is_answered_408_after_the_client_timeout(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    seed_tokens(sim, token_file)
    async with start_proxy(client_timeout=0.5) as proxy:
        reader, writer = await open_raw(proxy.port, upload_head(proxy.port, 100), b"x" * 10)
        status, doc = await read_response(reader, 10)
        writer.close()
    assert status == 408
    assert doc["closeproxy_error"] == "client_timeout"
    assert "--client-timeout" in doc["error"]
    assert sim.state.api_log == []  # never sent on: the body was incomplete


async def test_a_body_trickling_below_the_minimum_rate_is_cut(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    seed_tokens(sim, token_file)
    async with start_proxy(client_timeout=1, client_min_rate="1k") as proxy:
        reader, writer = await open_raw(proxy.port, upload_head(proxy.port, 100))

        async def trickle() -> None:
            # Never a pause near the timeout, but about 4 bytes a second.
            for _ in range(100):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.25)

        trickling = asyncio.create_task(trickle())
        try:
            status, doc = await read_response(reader, 10)
        finally:
            trickling.cancel()
            writer.close()
    assert status == 408
    assert doc["closeproxy_error"] == "client_timeout"


async def test_a_client_that_does_not_read_its_download_is_cut(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    async with start_proxy(client_timeout=0.5) as proxy:
        reader, writer = await open_raw(proxy.port, get_request(DOWNLOAD, proxy.port))

        async def cut() -> bool:
            return (await status_counters(client, proxy))["slow_clients_cut"] == 1

        await wait_until(cut)
        received = 0
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(1 << 20):
                    received += len(chunk)
        writer.close()
        counters = await status_counters(client, proxy)
    assert received < 200_000_000  # the connection ended, the body incomplete
    assert counters["upstream_errors"] == 0


async def test_a_full_pool_is_answered_503_proxy_busy_not_as_a_slow_close(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    async with start_proxy(upstream_connections=1, pool_timeout=0.3) as proxy:
        busy = asyncio.create_task(client.get(f"{proxy.url}/api/v1/_sim/sleep?seconds=2"))

        async def in_flight() -> bool:
            return len(sim.state.api_log) == 1

        await wait_until(in_flight)
        async with client.get(f"{proxy.url}/api/v1/me/") as resp:
            assert resp.status == 503
            doc = await resp.json()
        async with await busy as resp:
            assert resp.status == 200
        counters = await status_counters(client, proxy)
    assert doc["closeproxy_error"] == "proxy_busy"
    assert "--upstream-connections" in doc["error"]
    assert len(sim.state.api_log) == 1  # Close never saw the refused one
    assert counters["proxy_busy"] == 1


async def test_slow_clients_cannot_take_every_connection_to_close(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Downloads nobody reads and uploads that trickle hold at most the slow share (half
    of --upstream-connections); everyone else is still served at once."""
    seed_tokens(sim, token_file)
    async with start_proxy(upstream_connections=8) as proxy:
        readers = [await open_raw(proxy.port, get_request(DOWNLOAD, proxy.port)) for _ in range(12)]
        uploads = [
            await open_raw(proxy.port, upload_head(proxy.port, 5_000_000), b"u" * 1000)
            for _ in range(6)
        ]

        async def trickle() -> None:
            while True:
                for _, writer in uploads:
                    if not writer.is_closing():
                        writer.write(b"u")
                await asyncio.sleep(0.5)

        trickling = asyncio.create_task(trickle())
        try:

            async def slow_ones_cut() -> bool:
                return (await status_counters(client, proxy))["slow_clients_cut"] >= 18 - 4

            await wait_until(slow_ones_cut, timeout=30)
            async with asyncio.timeout(5):
                async with client.get(f"{proxy.url}/api/v1/me/") as resp:
                    assert resp.status == 200
            counters = await status_counters(client, proxy)
        finally:
            trickling.cancel()
            for _, writer in readers + uploads:
                writer.transport.abort()
    assert counters["upstream_errors"] == 0
    assert counters["proxy_busy"] == 0


# --- open-file limits -------------------------------------------------------------------


def serve_with_open_files(env: dict[str, str], soft: int, hard: int, *args: str) -> ServeProcess:
    """`closeproxy serve` started under the given RLIMIT_NOFILE."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    process = subprocess.Popen(
        [sys.executable, "-m", "closeproxy", "serve", *args],
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )
    server = ServeProcess(process)
    server.wait_ready(20)
    return server


def open_file_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs /proc")
async def test_serve_raises_the_soft_open_file_limit_to_the_hard_one(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess]
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-file limit here is only {hard}")
    seed_tokens(sim, token_file)
    server = await asyncio.to_thread(serve_with_open_files, proxy_env(sim, token_file), 256, hard)
    serve_processes.append(server)
    assert open_file_limit(server.process.pid) == (hard, hard)


async def test_near_the_open_file_limit_new_clients_are_refused_at_once(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess], serve_loop: str
) -> None:
    """Idle connections beyond what the open-file limit allows: the next client gets a
    prompt 503, not a wait in the listen queue until the idle ones time out."""
    seed_tokens(sim, token_file)
    env = proxy_env(sim, token_file)
    server = await asyncio.to_thread(
        serve_with_open_files,
        env,
        160,
        160,
        "--upstream-connections",
        "16",
        "--event-loop",
        serve_loop,
    )
    serve_processes.append(server)
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(200)]
    try:
        reader, writer = await open_raw(server.port, get_request("/api/v1/me/", server.port))
        try:
            status, doc = await read_response(reader, 3)
        finally:
            writer.transport.abort()
    finally:
        for _, idle_writer in idle:
            idle_writer.transport.abort()
    assert status == 503
    assert doc["closeproxy_error"] == "too_many_connections"
    assert "ulimit -n" in doc["error"]

    async def served() -> bool:
        # Until the proxy has seen the idle ones go, a new client may still be refused,
        # and a refusal that cannot linger is a reset: not served yet, not a failure.
        try:
            answer = await raw_request(server.port, get_request("/api/v1/me/", server.port))
        except ConnectionResetError:
            return False
        return answer.status == 200

    await wait_until(served)


async def test_a_burst_of_idle_clients_is_admitted_only_up_to_the_budget(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess], serve_loop: str
) -> None:
    """Clients that queue up while the proxy is busy are accepted in one go: only as many
    as the budget allows may stay, the rest are refused, so the reserve stays free."""
    seed_tokens(sim, token_file)
    server = await asyncio.to_thread(
        serve_with_open_files,
        proxy_env(sim, token_file),
        160,
        160,
        "--upstream-connections",
        "16",
        "--event-loop",
        serve_loop,
    )
    serve_processes.append(server)
    budget = client_budget(160, 16)
    server.process.send_signal(signal.SIGSTOP)  # the burst waits in the listen queue
    try:
        burst = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(120)]
    finally:
        server.process.send_signal(signal.SIGCONT)
    try:

        async def refused(reader: asyncio.StreamReader) -> bool:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    return b" 503 " in await reader.readline()
            return False

        answers = await asyncio.gather(*(refused(reader) for reader, _ in burst))
    finally:
        for _, writer in burst:
            writer.transport.abort()
    assert answers.count(False) <= budget
    assert answers.count(True) >= len(burst) - budget
