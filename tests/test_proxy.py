"""Forwarding over real sockets: client -> proxy -> simulator and back."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import time
from pathlib import Path

import aiohttp
import pytest
from helpers import Proxy, ProxyFactory, get_request, raw_request, seed_tokens
from yarl import URL

from closeproxy.sim import RunningSim, download_sha256

BYTE_EXACT_TARGET = "/api/v1/lead/?query=name%3A%22A%20B%22&_fields=id,display_name&x=%2F"


def echo_url(proxy: Proxy, tail: str = "x") -> URL:
    return URL(f"{proxy.url}/api/v1/_sim/echo/{tail}", encoded=True)


async def counters_once_handled(
    client: aiohttp.ClientSession, proxy: Proxy, timeout: float = 10.0
) -> dict[str, int]:
    """The proxy's counters once it has finished with the one request a client left."""
    async with asyncio.timeout(timeout):
        while True:
            async with client.get(f"{proxy.url}/admin/status") as resp:
                counters: dict[str, int] = (await resp.json())["counters"]
            if counters["client_disconnects"] + counters["upstream_errors"] > 0:
                return counters
            await asyncio.sleep(0.02)


def upstream_authorizations(sim: RunningSim) -> list[list[str]]:
    return [
        [value for name, value in record.headers if name.lower() == "authorization"]
        for record in sim.state.api_log
    ]


async def test_token_is_put_in_and_client_authorization_never_reaches_close(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    tokens = seed_tokens(sim, token_file)
    async with client.get(
        f"{proxy.url}/api/v1/me/", headers={"Authorization": "Basic YXBpa2V5Og=="}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["id"] == sim.state.config.user_id
    assert upstream_authorizations(sim) == [[f"Bearer {tokens.access_token}"]]


async def test_path_and_query_arrive_byte_for_byte(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    seed_tokens(sim, token_file)
    resp = await raw_request(proxy.port, get_request(BYTE_EXACT_TARGET, proxy.port))
    assert resp.status == 200
    assert [r.raw_path for r in sim.state.api_log] == [BYTE_EXACT_TARGET]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
async def test_every_method_and_json_body_arrive_intact(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession, method: str
) -> None:
    seed_tokens(sim, token_file)
    body = json.dumps({"name": "Ünïcode Lead", "nested": {"n": [1, 2, 3]}}).encode()
    send = body if method not in {"GET", "HEAD"} else None
    headers = {"Content-Type": "application/json"} if send else {}
    async with client.request(
        method, echo_url(proxy, "m?a=1&a=2"), data=send, headers=headers
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    record = sim.state.api_log[-1]
    assert record.method == method
    assert record.raw_path == "/api/v1/_sim/echo/m?a=1&a=2"
    if send:
        assert record.body_sha256 == hashlib.sha256(body).hexdigest()
        assert ("Content-Type", "application/json") in record.headers
    if method == "HEAD":
        assert raw == b""
    else:
        assert json.loads(raw)["method"] == method


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        ("/api/v1/../oauth2/token/", 400, "bad_path"),
        ("/api/v1/%2e%2e/oauth2/token/", 400, "bad_path"),
        ("/api/v1/%2E%2E%2Foauth2/token/", 400, "bad_path"),
        ("/api/v1/%252e%252e/oauth2/token/", 400, "bad_path"),
        ("/api/v1/lead/..", 400, "bad_path"),
        ("/api/v1/.%2e/x", 400, "bad_path"),
        ("/api/v1/x\\..\\y", 400, "bad_path"),
        ("/oauth2/token/", 404, "not_proxied"),
        ("/", 404, "not_proxied"),
        ("/api/v1", 404, "not_proxied"),
        ("/api%2Fv1/me/", 404, "not_proxied"),
        ("/API/v1/me/", 404, "not_proxied"),
    ],
)
async def test_escaping_and_foreign_paths_never_reach_close(
    sim: RunningSim, token_file: Path, proxy: Proxy, target: str, status: int, code: str
) -> None:
    seed_tokens(sim, token_file)
    resp = await raw_request(proxy.port, get_request(target, proxy.port))
    assert resp.status == status
    assert resp.header("Content-Type") == "application/json"
    assert json.loads(resp.body)["closeproxy_error"] == code
    assert sim.state.api_requests == 0
    assert sim.state.token_requests == 0


async def test_hop_by_hop_headers_cookies_and_forwarding_claims_are_dropped(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    seed_tokens(sim, token_file)
    head = (
        f"GET /api/v1/_sim/echo/h HTTP/1.1\nHost: 127.0.0.1:{proxy.port}\n"
        "Connection: close, X-Private\nX-Private: hop\nKeep-Alive: timeout=5\nTE: trailers\n"
        "Cookie: session=abc\nX-Forwarded-For: 6.6.6.6\nForwarded: for=6.6.6.6\n"
        "Proxy-Authorization: Basic eDp5\nX-Tz-Offset: -5\nx-http-method-override: PUT\n\n"
    )
    resp = await raw_request(proxy.port, head)
    assert resp.status == 200
    sent = {name.lower(): value for name, value in sim.state.api_log[-1].headers}
    for dropped in (
        "x-private",
        "keep-alive",
        "te",
        "cookie",
        "x-forwarded-for",
        "forwarded",
        "proxy-authorization",
    ):
        assert dropped not in sent
    assert sent["x-tz-offset"] == "-5"
    assert sent["x-http-method-override"] == "PUT"
    assert sent["host"] == f"127.0.0.1:{sim.port}"


async def test_response_hop_by_hop_and_set_cookie_are_not_relayed(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    async with client.get(f"{proxy.url}/api/v1/_sim/headers") as resp:
        assert resp.status == 200
        assert resp.headers["X-Custom"] == "yes"
        for dropped in (
            "X-Hop",
            "Set-Cookie",
            "Keep-Alive",
            "Access-Control-Allow-Origin",
            "Access-Control-Allow-Credentials",
        ):
            assert dropped not in resp.headers


async def test_gzip_body_reaches_client_with_identical_bytes_and_headers(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    target = "/api/v1/_sim/gzip"
    direct_head = {
        "Authorization": f"Bearer {sim.state.issue_tokens()['access_token']}",
        "Accept-Encoding": "gzip",
    }
    async with client.get(sim.url + target, headers=direct_head) as resp:
        direct_body, direct_headers = await resp.read(), resp.headers.copy()
    async with client.get(proxy.url + target, headers={"Accept-Encoding": "gzip"}) as resp:
        proxied_body, proxied_headers = await resp.read(), resp.headers.copy()
    assert proxied_body == direct_body
    assert json.loads(gzip.decompress(proxied_body))  # really gzip, really untouched
    for name in ("Content-Encoding", "Content-Length", "Content-Type", "ETag"):
        assert proxied_headers[name] == direct_headers[name]


async def test_client_without_accept_encoding_is_not_sent_one(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    seed_tokens(sim, token_file)
    await raw_request(proxy.port, get_request("/api/v1/_sim/echo/ae", proxy.port))
    names = [name.lower() for name, _ in sim.state.api_log[-1].headers]
    assert "accept-encoding" not in names
    assert "user-agent" not in names


@pytest.mark.parametrize("status", [204, 304])
async def test_bodyless_statuses_carry_no_body(
    sim: RunningSim, token_file: Path, proxy: Proxy, status: int
) -> None:
    seed_tokens(sim, token_file)
    # A second request on the same connection proves no stray body bytes were sent.
    head = (
        f"GET /api/v1/_sim/status/{status} HTTP/1.1\nHost: localhost:{proxy.port}\n\n"
        f"GET /api/v1/_sim/status/200 HTTP/1.1\nHost: localhost:{proxy.port}\n"
        "Connection: close\n\n"
    )
    resp = await raw_request(proxy.port, head)
    assert resp.status == status
    assert resp.body.startswith(b"HTTP/1.1 200 ")


async def test_head_carries_no_body_but_keeps_content_length(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    seed_tokens(sim, token_file)
    head = (
        f"HEAD /api/v1/_sim/download?bytes=5000 HTTP/1.1\nHost: localhost:{proxy.port}\n\n"
        f"GET /api/v1/_sim/status/200 HTTP/1.1\nHost: localhost:{proxy.port}\n"
        "Connection: close\n\n"
    )
    resp = await raw_request(proxy.port, head)
    assert resp.status == 200
    assert resp.header("Content-Length") == "5000"
    assert resp.body.startswith(b"HTTP/1.1 200 ")


async def test_redirect_into_the_api_is_relayed_pointing_at_the_proxy(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    inside = f"{sim.url}/api/v1/lead/?_skip=10"
    outside = "https://files.example.com/export.gz?sig=1"
    async with client.get(
        f"{proxy.url}/api/v1/_sim/redirect", params={"to": inside}, allow_redirects=False
    ) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"{proxy.url}/api/v1/lead/?_skip=10"
    async with client.get(
        f"{proxy.url}/api/v1/_sim/redirect", params={"to": outside}, allow_redirects=False
    ) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == outside
    # relayed, not followed: the simulator saw only the two redirect requests
    assert [r.raw_path.split("?")[0] for r in sim.state.api_log] == ["/api/v1/_sim/redirect"] * 2


async def test_close_errors_pass_through_unchanged(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    # A 429 is waited out by default (test_ratelimit_proxy.py); with 0 s it passes through.
    async with start_proxy(rate_limit_wait=0) as proxy:
        async with client.get(f"{proxy.url}/api/v1/_sim/status/503") as resp:
            assert resp.status == 503
            assert "closeproxy_error" not in await resp.json()
        sim.state.config.rate_limit = 1
        sim.state.config.rate_window = 30
        async with client.get(f"{proxy.url}/api/v1/me/") as resp:
            assert resp.status == 200
        async with client.get(f"{proxy.url}/api/v1/me/") as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) >= 1
            assert resp.headers["RateLimit"].startswith("limit=1, remaining=0")
            assert "closeproxy_error" not in await resp.json()


async def test_upstream_401_refreshes_once_and_replays(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    old = seed_tokens(sim, token_file)
    sim.state.force_401 = 1
    async with client.post(f"{proxy.url}/api/v1/_sim/echo/replay", data=b"x" * 1000) as resp:
        assert resp.status == 200
        assert (await resp.json())["body_size"] == 1000
    assert sim.state.refreshes == 1
    auths = upstream_authorizations(sim)
    assert len(auths) == 2
    assert auths[0] == [f"Bearer {old.access_token}"]
    assert auths[1] != auths[0]
    assert all(r.body_size == 1000 for r in sim.state.api_log)


async def test_upstream_401_with_large_body_is_passed_through(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    sim.state.force_401 = 1
    body = os.urandom(2 * 1024 * 1024)
    async with client.post(f"{proxy.url}/api/v1/_sim/upload", data=io.BytesIO(body)) as resp:
        assert resp.status == 401
        assert "closeproxy_error" not in await resp.json()  # Close's own 401, untouched
    assert sim.state.refreshes == 0
    assert sim.state.api_requests == 1


async def test_chunked_small_body_is_still_replayable(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    sim.state.force_401 = 1

    async def body():
        for _ in range(10):
            yield b"y" * 100

    async with client.post(f"{proxy.url}/api/v1/_sim/upload", data=body()) as resp:
        assert resp.status == 200
        assert (await resp.json())["bytes"] == 1000
    assert sim.state.refreshes == 1


async def test_repeated_401_after_refresh_does_not_burn_refresh_tokens(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    sim.state.force_401 = 4
    for _ in range(2):
        async with client.get(f"{proxy.url}/api/v1/me/") as resp:
            assert resp.status == 401
    # one refresh for the first 401; the token Close kept refusing is not refreshed again
    assert sim.state.refreshes == 1


async def test_large_streamed_download_and_upload_are_byte_exact(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    size = 20 * 1024 * 1024 + 123
    digest = hashlib.sha256()
    async with client.get(f"{proxy.url}/api/v1/_sim/download", params={"bytes": str(size)}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(size)
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
    assert digest.hexdigest() == download_sha256(size)

    block = os.urandom(1024 * 1024)

    async def upload():
        for _ in range(20):
            yield block

    async with client.post(f"{proxy.url}/api/v1/_sim/upload", data=upload()) as resp:
        assert resp.status == 200
        result = await resp.json()
    assert result == {"bytes": 20 * len(block), "sha256": hashlib.sha256(block * 20).hexdigest()}


async def test_first_byte_arrives_before_upstream_finishes(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    params = {"bytes": str(10 * 65536), "chunk": "65536", "delay": "0.2"}
    started = time.monotonic()
    async with client.get(f"{proxy.url}/api/v1/_sim/download", params=params) as resp:
        first = await resp.content.readany()
        first_at = time.monotonic() - started
        rest = await resp.read()
        total_at = time.monotonic() - started
    assert first and len(first) + len(rest) == 10 * 65536
    # the upstream needs ~1.8 s to send it all; the first chunk must not wait for that
    assert total_at >= 1.5
    assert first_at < total_at / 2


async def test_upstream_unreachable_is_502(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    seed_tokens(sim, token_file, api_url=dead)
    async with start_proxy(api_url=dead) as proxy:
        async with client.get(f"{proxy.url}/api/v1/me/") as resp:
            assert resp.status == 502
            assert (await resp.json())["closeproxy_error"] == "upstream_unreachable"


async def test_upstream_silent_is_504_within_the_timeout(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    async with start_proxy(upstream_timeout=0.5) as proxy:
        started = time.monotonic()
        async with client.get(f"{proxy.url}/api/v1/_sim/sleep", params={"seconds": "5"}) as resp:
            elapsed = time.monotonic() - started
            assert resp.status == 504
            assert (await resp.json())["closeproxy_error"] == "upstream_timeout"
    assert 0.4 < elapsed < 2.5


async def test_not_logged_in_is_401_login_required_without_touching_close(
    sim: RunningSim, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.url}/api/v1/me/") as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["closeproxy_error"] == "login_required"
    assert "closeproxy login" in body["error"]
    assert sim.state.api_requests == 0 and sim.state.token_requests == 0


async def test_healthz_and_admin_status(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    tokens = seed_tokens(sim, token_file)
    async with client.get(f"{proxy.url}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    async with client.get(f"{proxy.url}/api/v1/me/") as resp:
        assert resp.status == 200
    async with client.get(f"{proxy.url}/admin/status") as resp:
        text = await resp.text()
    status = json.loads(text)
    assert status["logged_in"] is True
    assert status["organization_id"] == sim.state.config.organization_id
    assert status["counters"]["requests"] == 1
    assert tokens.access_token not in text
    assert str(tokens.refresh_token) not in text
    async with client.get(f"{proxy.url}/admin/refresh") as resp:
        assert resp.status == 405
        assert (await resp.json())["closeproxy_error"] == "method_not_allowed"


async def test_admin_refresh_rotates_and_reports(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    tokens = seed_tokens(sim, token_file)
    async with client.post(f"{proxy.url}/admin/refresh") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert json.loads(text)["counters"]["refreshes"] == 1
    assert sim.state.refreshes == 1
    assert tokens.access_token not in text
    assert json.loads(token_file.read_text())["access_token"] != tokens.access_token


async def test_client_hanging_up_mid_request_leaves_the_proxy_serving(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        f"POST /api/v1/_sim/upload HTTP/1.1\r\nHost: localhost:{proxy.port}\r\n"
        "Content-Length: 5000000\r\n\r\n".encode()
        + b"z" * 2_000_000
    )
    await writer.drain()
    writer.close()
    counters = await counters_once_handled(client, proxy)
    assert counters["upstream_errors"] == 0
    assert counters["client_disconnects"] == 1
    async with client.get(f"{proxy.url}/api/v1/me/") as resp:
        assert resp.status == 200


async def test_a_literal_percent_in_the_query_is_forwarded_as_sent(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    seed_tokens(sim, token_file)
    target = "/api/v1/_sim/echo/q?discount=50%&note=a\\b"
    resp = await raw_request(proxy.port, get_request(target, proxy.port))
    assert resp.status == 200
    assert sim.state.api_log[-1].raw_path == target


async def test_a_client_leaving_mid_download_is_not_an_upstream_error(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        get_request("/api/v1/_sim/download?bytes=50000000&chunk=65536", proxy.port)
        .replace("\n", "\r\n")
        .encode()
    )
    await writer.drain()
    await reader.readexactly(100_000)
    writer.transport.abort()  # gone, with megabytes still to come
    counters = await counters_once_handled(client, proxy)
    assert counters["upstream_errors"] == 0
    assert counters["client_disconnects"] == 1
