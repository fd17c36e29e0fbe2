"""The deputy's guards over real sockets: Host, Origin, proxy key, targets, methods, limits."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import (
    Proxy,
    ProxyFactory,
    RawResponse,
    proxy_env,
    raw_request,
    run_cli,
    seed_tokens,
)

from closeproxy.errors import ConfigError
from closeproxy.sim import RunningSim

KEY = "k3y-" + "x" * 40


def no_cors_headers(resp: RawResponse) -> bool:
    return not any(name.lower().startswith("access-control-") for name, _ in resp.headers)


async def request_with(
    port: int,
    *header_lines: str,
    method: str = "GET",
    body: bytes = b"",
    target: str = "/api/v1/me/",
) -> RawResponse:
    lines = [f"{method} {target} HTTP/1.1", *header_lines, "Connection: close"]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return await raw_request(port, "\n".join(lines) + "\n\n", body)


def error_code(resp: RawResponse) -> str:
    return str(json.loads(resp.body)["closeproxy_error"])


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "evil.example:{port}",
        "127.0.0.1@evil.example",
        "localhost:{port}.evil.example",
        "",
    ],
)
async def test_unknown_host_names_are_refused(
    sim: RunningSim, token_file: Path, proxy: Proxy, host: str
) -> None:
    seed_tokens(sim, token_file)
    resp = await request_with(proxy.port, f"Host: {host.format(port=proxy.port)}")
    assert resp.status == 403
    assert error_code(resp) == "forbidden_origin"
    assert sim.state.api_requests == 0


async def test_missing_host_is_refused(sim: RunningSim, token_file: Path, proxy: Proxy) -> None:
    seed_tokens(sim, token_file)
    resp = await raw_request(proxy.port, "GET /api/v1/me/ HTTP/1.0\n\n")
    assert resp.status in {400, 403}
    assert sim.state.api_requests == 0


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:{port}",
        "LOCALHOST:{port}",
        "127.0.0.1:{port}",
        "[::1]:{port}",
        "127.0.0.1:1",
    ],
)
async def test_loopback_host_names_are_served_on_any_port(
    sim: RunningSim, token_file: Path, proxy: Proxy, host: str
) -> None:
    seed_tokens(sim, token_file)
    resp = await request_with(proxy.port, f"Host: {host.format(port=proxy.port)}")
    assert resp.status == 200


async def test_allow_host_adds_exact_names_only(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    seed_tokens(sim, token_file)
    async with start_proxy(allowed_hosts=["closeproxy.internal", "Api.Local"]) as proxy:
        for host, status in [
            ("closeproxy.internal:8730", 200),
            ("api.local", 200),
            ("CLOSEPROXY.INTERNAL", 200),
            ("x.closeproxy.internal", 403),
            ("closeproxy.internal.evil.example", 403),
        ]:
            resp = await request_with(proxy.port, f"Host: {host}")
            assert resp.status == status, host


async def test_ipv6_loopback_listener_serves_its_own_host(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback; the IPv6 test cannot run")
    seed_tokens(sim, token_file)
    async with start_proxy(host="::1") as proxy:
        assert proxy.url.startswith("http://[::1]:")
        async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}/api/v1/me/") as resp:
            assert resp.status == 200


@pytest.mark.parametrize(
    ("method", "headers", "body"),
    [
        ("GET", ["Origin: https://evil.example"], b""),
        ("POST", ["Origin: https://evil.example", "Content-Type: application/json"], b"{}"),
        ("GET", ["Origin: null"], b""),
        ("GET", ["Sec-Fetch-Site: cross-site"], b""),
        ("POST", ["Sec-Fetch-Site: cross-site"], b"{}"),
        ("GET", ["Sec-Fetch-Site: same-site"], b""),
        ("POST", ["Origin: http://localhost:1", "Content-Type: text/plain"], b"name=x"),
        (
            "POST",
            ["Origin: https://evil.example", "Content-Type: application/x-www-form-urlencoded"],
            b"a=b",
        ),
        ("OPTIONS", ["Origin: https://evil.example", "Access-Control-Request-Method: DELETE"], b""),
        ("OPTIONS", ["Access-Control-Request-Method: POST"], b""),
    ],
)
async def test_cross_site_browser_requests_are_refused_without_cors(
    sim: RunningSim, token_file: Path, proxy: Proxy, method: str, headers: list[str], body: bytes
) -> None:
    seed_tokens(sim, token_file)
    resp = await request_with(
        proxy.port,
        f"Host: 127.0.0.1:{proxy.port}",
        *headers,
        method=method,
        body=body,
        target="/api/v1/lead/",
    )
    assert resp.status == 403
    assert error_code(resp) == "forbidden_origin"
    assert no_cors_headers(resp)
    assert sim.state.api_requests == 0


async def test_same_origin_and_direct_navigation_are_served(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    seed_tokens(sim, token_file)
    for headers in (
        [f"Origin: http://127.0.0.1:{proxy.port}"],
        ["Sec-Fetch-Site: none"],
        ["Sec-Fetch-Site: same-origin"],
    ):
        resp = await request_with(proxy.port, f"Host: 127.0.0.1:{proxy.port}", *headers)
        assert resp.status == 200, headers
        assert no_cors_headers(resp)


@pytest.fixture
async def elsewhere() -> AsyncIterator[tuple[int, list[str]]]:
    """A second local server standing in for "anywhere else"; it counts what reaches it."""
    hits: list[str] = []

    async def count(request: web.Request) -> web.Response:
        hits.append(request.raw_path)
        return web.Response(text="elsewhere")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1]), hits
    finally:
        await runner.cleanup()


async def test_absolute_form_targets_never_change_the_upstream(
    sim: RunningSim, token_file: Path, proxy: Proxy, elsewhere: tuple[int, list[str]]
) -> None:
    seed_tokens(sim, token_file)
    other_port, hits = elsewhere
    for target in (
        f"http://127.0.0.1:{other_port}/api/v1/me/",
        "http://evil.example/api/v1/me/",
        f"//127.0.0.1:{other_port}/api/v1/me/",
    ):
        resp = await request_with(proxy.port, f"Host: 127.0.0.1:{proxy.port}", target=target)
        assert resp.status in {400, 404}, target
        assert resp.status == 400 or error_code(resp) == "not_proxied"
    assert hits == []
    assert sim.state.api_requests == 0


@pytest.mark.parametrize(
    ("method", "target", "extra"),
    [
        ("CONNECT", "evil.example:443", []),
        ("CONNECT", "/api/v1/me/", []),
        ("TRACE", "/api/v1/me/", []),
        (
            "GET",
            "/api/v1/me/",
            [
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
            ],
        ),
        ("GET", "/api/v1/me/", ["Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__"]),
    ],
)
async def test_tunnels_traces_and_upgrades_are_refused(
    sim: RunningSim, token_file: Path, proxy: Proxy, method: str, target: str, extra: list[str]
) -> None:
    seed_tokens(sim, token_file)
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{proxy.port}", *extra]
    resp = await raw_request(proxy.port, "\n".join(lines) + "\n\n", read_timeout=5)
    assert resp.status in {400, 405}
    assert sim.state.api_requests == 0


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


async def test_proxy_key_as_basic_or_bearer_and_never_forwarded(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    seed_tokens(sim, token_file)
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    async with start_proxy(proxy_key=str(key_file)) as proxy:
        cases = [
            ([], 401),
            ([f"Authorization: {basic('wrong')}"], 401),
            ([f"Authorization: {basic(KEY)}"], 200),
            (["Authorization: Bearer wrong"], 401),
            ([f"Authorization: Bearer {KEY}"], 200),
            ([f"Authorization: {basic(KEY[:-1])}"], 401),
            ([f"Authorization: Basic {base64.b64encode(KEY.encode()).decode()}"], 200),
            ([f"Authorization: Bearer {KEY}", "Authorization: Bearer x"], 401),
        ]
        for headers, status in cases:
            resp = await request_with(proxy.port, f"Host: localhost:{proxy.port}", *headers)
            assert resp.status == status, headers
            if status == 401:
                assert error_code(resp) == "proxy_key_required"
                assert (
                    resp.header(
                        "WWW-Authenticate",
                    )
                    == 'Basic realm="closeproxy", charset="UTF-8"'
                )
            assert KEY.encode() not in resp.body
        # health needs no key, and reveals nothing
        resp = await request_with(proxy.port, f"Host: localhost:{proxy.port}", target="/healthz")
        assert resp.status == 200
        resp = await request_with(
            proxy.port, f"Host: localhost:{proxy.port}", target="/admin/status"
        )
        assert resp.status == 401
    upstream = [value for r in sim.state.api_log for _, value in r.headers]
    assert len(sim.state.api_log) == 3
    assert all(KEY not in value for value in upstream)


def test_non_loopback_listen_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        result = run_cli({}, "serve", "--host", host, "--port", "0", timeout=20)
        assert result.returncode == 2
        assert "proxy key" in result.stderr
        assert "--proxy-key-file" in result.stderr


async def test_non_loopback_listen_with_a_key_requires_it(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    seed_tokens(sim, token_file)
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    async with start_proxy(host="0.0.0.0", proxy_key=str(key_file)) as proxy:
        resp = await request_with(proxy.port, f"Host: 127.0.0.1:{proxy.port}")
        assert resp.status == 401
        resp = await request_with(
            proxy.port, f"Host: 127.0.0.1:{proxy.port}", f"Authorization: Bearer {KEY}"
        )
        assert resp.status == 200


async def test_unix_socket_mode_serves_and_is_private(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    seed_tokens(sim, token_file)
    path = tmp_path / "closeproxy.sock"
    async with start_proxy(unix_socket=str(path)) as proxy:
        assert proxy.url == f"unix:{path}"
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(connector=connector) as client:
            async with client.get("http://localhost/api/v1/me/") as resp:
                assert resp.status == 200
            async with client.get("http://evil.example/api/v1/me/") as resp:
                assert resp.status == 403
    assert not path.exists()


async def test_a_stale_socket_is_replaced_but_a_live_one_is_not_stolen(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    async with start_proxy(unix_socket=str(path)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(ConfigError, match="in use by another process"):
            async with start_proxy(unix_socket=str(path)):
                pass
        # Let the first proxy accept and close the probe connection before it shuts down.
        await asyncio.sleep(0.1)


async def test_oversized_header_block_is_refused(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    seed_tokens(sim, token_file)
    big = await request_with(proxy.port, f"Host: localhost:{proxy.port}", "X-Big: " + "a" * 70000)
    assert big.status in {400, 431}
    many = await request_with(
        proxy.port, f"Host: localhost:{proxy.port}", *(f"X-H{i}: v" for i in range(300))
    )
    assert many.status in {400, 431}
    assert sim.state.api_requests == 0


async def test_a_slow_header_sender_is_cut_off_while_others_are_served(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    async with start_proxy(header_timeout=1) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /api/v1/me/ HTTP/1.1\r\n")
        started = time.monotonic()
        cut_off = None
        for i in range(20):  # one header byte every 0.25 s
            try:
                writer.write(b"X"[:1] if i else b"X-Slow: ")
                await writer.drain()
            except ConnectionError:
                cut_off = time.monotonic() - started
                break
            async with client.get(f"{proxy.url}/api/v1/me/") as resp:
                assert resp.status == 200  # everyone else is served meanwhile
            if reader.at_eof() or (await _closed(reader)):
                cut_off = time.monotonic() - started
                break
            await asyncio.sleep(0.25)
        writer.close()
        assert cut_off is not None, "the slow client was never cut off"
        assert cut_off < 3


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1024), 0.01)
    except TimeoutError:
        return False
    return data == b"" or data.startswith(b"HTTP/1.1 4")


async def test_max_body_size_refuses_large_bodies_clearly(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    async with start_proxy(max_body_size="64k") as proxy:
        async with client.post(f"{proxy.url}/api/v1/_sim/upload", data=b"x" * 65536) as resp:
            assert resp.status == 200
        async with client.post(f"{proxy.url}/api/v1/_sim/upload", data=b"x" * 65537) as resp:
            assert resp.status == 413
            assert (await resp.json())["closeproxy_error"] == "body_too_large"

        async def chunked():
            for _ in range(20):
                yield os.urandom(16384)

        try:
            async with client.post(f"{proxy.url}/api/v1/_sim/upload", data=chunked()) as resp:
                status = resp.status
        except aiohttp.ClientError:
            status = None  # the proxy may cut the connection while the client still sends
        assert status in {413, None}
        uploads = [r for r in sim.state.api_log if r.raw_path == "/api/v1/_sim/upload"]
        assert all(r.body_size <= 65536 or not r.body_complete for r in uploads)
        assert len([r for r in uploads if r.body_complete]) == 1


async def test_json_logs_carry_a_request_id(
    sim: RunningSim, token_file: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from helpers import cli_env

    seed_tokens(sim, token_file)
    env = proxy_env(sim, token_file, CLOSEPROXY_LOG_FORMAT="json")
    process = subprocess.Popen(
        [sys.executable, "-m", "closeproxy", "serve"],
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.to_thread(process.stdout.readline)
        url = line.split("listening on ")[1].strip()
        async with aiohttp.ClientSession() as client:
            for _ in range(2):
                async with client.get(f"{url}/api/v1/me/") as resp:
                    assert resp.status == 200
    finally:
        process.terminate()
        _, err = await asyncio.to_thread(process.communicate, None, 20)
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    access = [r for r in records if r.get("path") == "/api/v1/me/"]
    assert len(access) == 2
    assert all(r["status"] == 200 and r["method"] == "GET" for r in access)
    assert len({r["request_id"] for r in access}) == 2
    assert all({"time", "level", "logger", "message", "duration_ms"} <= set(r) for r in access)


def test_long_lived_secrets_stay_redacted_however_many_tokens_rotate() -> None:
    from closeproxy.logs import redact, register_secret

    register_secret("client-secret-that-lives-long", permanent=True)
    for i in range(500):
        register_secret(f"rotating-token-{i:04d}")
    assert redact("x client-secret-that-lives-long y") == "x [secure] y"
    assert redact("rotating-token-0499") == "[secure]"


async def first_answer_to_expect(
    port: int, head: str
) -> tuple[int, bytes, asyncio.StreamReader, Any]:
    """Send a head asking `Expect: 100-continue`, no body: the first answer, and its body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.replace("\n", "\r\n").encode())
    await writer.drain()
    async with asyncio.timeout(10):
        status_head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in status_head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length)
    return int(status_head.split(b" ", 2)[1]), body, reader, writer


def expect_head(port: int, path: str = "/api/v1/_sim/upload", **headers: str) -> str:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Length: 5",
        "Expect: 100-continue",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return "\n".join(lines) + "\n\n"


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("host", 403, "forbidden_origin"),
        ("cross_site", 403, "forbidden_origin"),
        ("no_key", 401, "proxy_key_required"),
        ("not_logged_in", 401, "login_required"),
        ("too_large", 413, "body_too_large"),
        ("host_on_unknown_path", 403, "forbidden_origin"),
        ("unknown_expectation", 417, "expectation_failed"),
    ],
)
async def test_expect_100_continue_gets_the_refusal_instead_of_continue(
    sim: RunningSim,
    token_file: Path,
    start_proxy: ProxyFactory,
    tmp_path: Path,
    case: str,
    status: int,
    code: str,
) -> None:
    if case != "not_logged_in":
        seed_tokens(sim, token_file)
    flags: dict[str, Any] = {"max_body_size": "4"} if case == "too_large" else {}
    if case == "no_key":
        key_file = tmp_path / "key"
        key_file.write_text(KEY)
        flags["proxy_key"] = str(key_file)
    async with start_proxy(**flags) as proxy:
        head = expect_head(proxy.port)
        if case in {"host", "host_on_unknown_path"}:
            path = "/elsewhere" if case == "host_on_unknown_path" else "/api/v1/_sim/upload"
            head = expect_head(proxy.port, path).replace("127.0.0.1:", "evil.example:")
        elif case == "cross_site":
            head = expect_head(proxy.port, Origin="https://evil.example")
        elif case == "unknown_expectation":
            head = head.replace("100-continue", "200-ok")
        answer, body, _, writer = await first_answer_to_expect(proxy.port, head)
        writer.transport.abort()
    assert answer == status
    assert json.loads(body)["closeproxy_error"] == code
    assert sim.state.api_log == []


async def test_expect_100_continue_is_answered_when_every_check_passes(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    seed_tokens(sim, token_file)
    answer, _, reader, writer = await first_answer_to_expect(proxy.port, expect_head(proxy.port))
    assert answer == 100
    writer.write(b"hello")
    async with asyncio.timeout(10):
        final = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert final.startswith(b"HTTP/1.1 200 ")
    assert sim.state.api_log[-1].body_size == 5
