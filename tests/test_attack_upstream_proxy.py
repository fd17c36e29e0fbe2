"""Hostile tests of the outbound proxy (issue 16), over real sockets.

tinyproxy's config accepts only plain user names and passwords, so the odd-credential
attacks run against `forward_proxy`: a small HTTP forward proxy on a real port that
checks Proxy-Authorization the way a corporate proxy does (Basic, UTF-8, RFC 7617) and
relays to the simulator. The misbehaving proxies are raw asyncio servers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from helpers import FAST_BACKOFF, proxy_env, seed_tokens

from closeproxy.config import load_settings
from closeproxy.server import running
from closeproxy.sim import RunningSim

ODD_USER = "prøxy@corp\\domain"
ODD_PASSWORD = "p%ss:w@rd 密码/#?"


@contextlib.asynccontextmanager
async def forward_proxy(
    target: str, user: str, password: str, seen: list[str]
) -> AsyncIterator[str]:
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    async def relay(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Proxy-Authorization", ""))
        if request.headers.get("Proxy-Authorization") != expected:
            return web.Response(status=407, headers={"Proxy-Authenticate": 'Basic realm="x"'})
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in {"host", "proxy-authorization"}
        }
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, target + request.path_qs, headers=headers, data=await request.read()
            ) as resp,
        ):
            body = await resp.read()
            return web.Response(status=resp.status, body=body, content_type=resp.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_proxy(
    behave: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await behave(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        # Hanging handlers are cancelled with the server.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await server.wait_closed()


@contextlib.asynccontextmanager
async def closeproxy_with(
    sim: RunningSim, token_file: Path, flags: dict[str, str]
) -> AsyncIterator[str]:
    settings = load_settings(flags, proxy_env(sim, token_file, CLOSEPROXY_LOG_LEVEL="debug"))
    async with running(settings, oauth_backoff=FAST_BACKOFF) as where:
        yield where.url


async def test_odd_credentials_reach_the_proxy_as_utf8_basic_auth(
    sim: RunningSim, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `@`, `%`, `:`, `\`, a space and non-Latin-1 letters, percent-encoded in the URL the
    # way curl takes them; they must arrive decoded and UTF-8 encoded (what curl sends).
    seed_tokens(sim, token_file)
    seen: list[str] = []
    async with forward_proxy(sim.url, ODD_USER, ODD_PASSWORD, seen) as where:
        url = f"http://{quote(ODD_USER, safe='')}:{quote(ODD_PASSWORD, safe='')}@{where}"
        async with (
            closeproxy_with(sim, token_file, {"upstream_proxy": url}) as proxy,
            aiohttp.ClientSession() as client,
        ):
            async with client.get(f"{proxy}/api/v1/me/") as resp:
                assert resp.status == 200, await resp.text()
            async with client.get(f"{proxy}/admin/status") as resp:
                status = await resp.text()
    assert seen
    assert ODD_PASSWORD not in status and quote(ODD_PASSWORD, safe="") not in status
    for record in caplog.records:
        text = record.getMessage()
        assert ODD_PASSWORD not in text and quote(ODD_PASSWORD, safe="") not in text


async def test_a_proxy_that_hangs_is_a_504_within_the_upstream_timeout(
    sim: RunningSim, token_file: Path
) -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(30)

    seed_tokens(sim, token_file)
    async with raw_proxy(hang) as where:
        async with (
            closeproxy_with(
                sim, token_file, {"upstream_proxy": f"http://{where}", "upstream_timeout": "1"}
            ) as proxy,
            aiohttp.ClientSession() as client,
        ):
            started = time.monotonic()
            async with client.get(f"{proxy}/api/v1/me/") as resp:
                body = await resp.json()
                assert resp.status == 504
            assert time.monotonic() - started < 5
    assert body["closeproxy_error"] == "upstream_timeout"


async def test_a_proxy_that_hangs_up_mid_request_is_named_in_the_502(
    sim: RunningSim, token_file: Path
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)

    seed_tokens(sim, token_file)
    async with raw_proxy(hang_up) as where:
        async with (
            closeproxy_with(sim, token_file, {"upstream_proxy": f"http://{where}"}) as proxy,
            aiohttp.ClientSession() as client,
        ):
            async with client.get(f"{proxy}/api/v1/me/") as resp:
                body = await resp.json()
                assert resp.status == 502
    # The user must learn that the outbound proxy is where to look, not Close.
    assert f"http://{where}" in body["error"], body


async def test_a_proxy_that_hangs_up_mid_connect_is_a_502_naming_it(
    sim: RunningSim, token_file: Path
) -> None:
    async def half_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Conn")  # cut mid status line

    seed_tokens(sim, token_file, api_url="https://api.close.invalid")
    async with raw_proxy(half_connect) as where:
        async with (
            closeproxy_with(
                sim,
                token_file,
                {"upstream_proxy": f"http://{where}", "api_url": "https://api.close.invalid"},
            ) as proxy,
            aiohttp.ClientSession() as client,
        ):
            async with client.get(f"{proxy}/api/v1/me/") as resp:
                body = await resp.json()
                assert resp.status == 502
    assert f"http://{where}" in body["error"], body
