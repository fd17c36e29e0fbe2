"""Hostile tests of the rate-limit absorption (SPEC §9), over real sockets.

Some attacks need a Close that says things the simulator never would (absurd
Retry-After values); those run against `Hostile`, a tiny aiohttp upstream on a real port
whose answers each test scripts. Tokens come from the simulator as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers import ProxyFactory, seed_tokens

from closeproxy.ratelimit_headers import WAIT_HEADER
from closeproxy.sim import RunningSim

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Hostile:
    """A scripted upstream: `handler` answers every request; `arrivals` logs them."""

    url: str
    handler: Handler
    arrivals: list[tuple[float, str, str]] = field(default_factory=list)

    def hits(self, path: str) -> int:
        return sum(1 for _, _, seen in self.arrivals if seen == path)


@contextlib.asynccontextmanager
async def hostile_upstream(handler: Handler) -> AsyncIterator[Hostile]:
    hostile = Hostile("", handler)

    async def entry(request: web.Request) -> web.StreamResponse:
        hostile.arrivals.append((time.monotonic(), request.method, request.path))
        return await hostile.handler(request)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", entry)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    hostile.url = f"http://127.0.0.1:{port}"
    try:
        yield hostile
    finally:
        await runner.cleanup()


def too_many(**headers: str) -> web.Response:
    return web.json_response({"error": "rate limited"}, status=429, headers=headers)


async def test_requests_waiting_to_retry_a_429_leave_the_pool_to_other_groups(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    # Two connections to Close. Two requests of group A meet a 429 saying "in 2 s" and
    # wait to retry; a request of group B must not wait for their connections.
    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/api/v1/slow_group/") and hostile.hits(request.path) <= 2:
            return too_many(**{"Retry-After": "2"})
        return web.json_response({"ok": True})

    async with hostile_upstream(answer) as hostile:
        seed_tokens(sim, token_file, api_url=hostile.url)
        async with (
            start_proxy(api_url=hostile.url, upstream_connections=2, pool_timeout=1) as proxy,
            aiohttp.ClientSession() as client,
        ):

            async def get(path: str) -> tuple[int, float]:
                started = time.monotonic()
                async with client.get(proxy.url + path) as resp:
                    await resp.read()
                    return resp.status, time.monotonic() - started

            waiting = [asyncio.create_task(get("/api/v1/slow_group/")) for _ in range(2)]
            deadline = time.monotonic() + 10
            while hostile.hits("/api/v1/slow_group/") < 2:
                assert time.monotonic() < deadline, "the two requests never reached Close"
                await asyncio.sleep(0.01)
            status, took = await get("/api/v1/other_group/")
            assert status == 200
            assert took < 0.9  # not held until a retry frees a connection (2 s)
            assert [s for s, _ in await asyncio.gather(*waiting)] == [200, 200]


@pytest.mark.parametrize(
    "retry_after",
    ["100000", "9" * 5000, "Fri, 01 Jan 2100 00:00:00 GMT"],
    ids=["27h", "huge", "2100"],
)
async def test_a_retry_after_beyond_a_day_passes_the_429_through_at_once(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, retry_after: str
) -> None:
    # Close says "come back in 27 hours" (or in 2100): no budget covers that, so the
    # client gets the 429 at once, as for any reset past its budget; Close is not asked
    # again every second meanwhile.
    async def answer(request: web.Request) -> web.StreamResponse:
        return too_many(**{"Retry-After": retry_after})

    async with hostile_upstream(answer) as hostile:
        seed_tokens(sim, token_file, api_url=hostile.url)
        async with (
            start_proxy(api_url=hostile.url, rate_limit_wait=3) as proxy,
            aiohttp.ClientSession() as client,
        ):
            started = time.monotonic()
            async with client.get(proxy.url + "/api/v1/lead/") as resp:
                assert resp.status == 429
                assert resp.headers["Retry-After"] == retry_after
            assert time.monotonic() - started < 1.5
            assert hostile.hits("/api/v1/lead/") == 1


@pytest.mark.parametrize(
    "retry_after",
    ["1e308", "-1", "NaN", "inf", "0x10", "Wed, 01 Jan 1990 00:00:00 GMT", ""],
)
async def test_absurd_retry_after_values_are_waited_out_briefly_never_a_crash(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, retry_after: str
) -> None:
    # Malformed (or past) values fall back to a short wait; the retry then succeeds.
    async def answer(request: web.Request) -> web.StreamResponse:
        if hostile.hits(request.path) == 1:
            return too_many(**{"Retry-After": retry_after, "RateLimit": "limit=x" * 500})
        return web.json_response({"ok": True})

    async with hostile_upstream(answer) as hostile:
        seed_tokens(sim, token_file, api_url=hostile.url)
        async with (
            start_proxy(api_url=hostile.url, rate_limit_wait=5) as proxy,
            aiohttp.ClientSession() as client,
        ):
            started = time.monotonic()
            async with client.get(proxy.url + "/api/v1/lead/") as resp:
                assert resp.status == 200
            assert time.monotonic() - started < 2.5
            assert hostile.hits("/api/v1/lead/") == 2


@pytest.mark.parametrize("value", ["inf", "-1", "nan", "1e400", "-inf", "", "1_0x"])
async def test_hostile_wait_headers_are_a_400_before_close_is_asked(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, value: str
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    async with hostile_upstream(answer) as hostile:
        seed_tokens(sim, token_file, api_url=hostile.url)
        async with (
            start_proxy(api_url=hostile.url) as proxy,
            aiohttp.ClientSession() as client,
        ):
            async with client.get(
                proxy.url + "/api/v1/lead/", headers={WAIT_HEADER: value}
            ) as resp:
                assert resp.status == 400
                body = await resp.json()
                assert body["closeproxy_error"] == "bad_rate_limit_wait"
            assert hostile.arrivals == []


async def test_a_client_hanging_up_while_waiting_to_retry_costs_no_second_request(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return too_many(**{"Retry-After": "2"})

    async with hostile_upstream(answer) as hostile:
        seed_tokens(sim, token_file, api_url=hostile.url)
        async with (
            start_proxy(api_url=hostile.url) as proxy,
            aiohttp.ClientSession() as client,
        ):
            pending = asyncio.create_task(client.get(proxy.url + "/api/v1/lead/"))
            deadline = time.monotonic() + 10
            while hostile.hits("/api/v1/lead/") < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            pending.cancel()  # the client hangs up while the proxy waits to retry
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            while True:  # the proxy notices (an event, bounded), then nothing more goes
                async with client.get(proxy.url + "/admin/status") as resp:
                    doc = await resp.json()
                if doc["counters"]["client_disconnects"] >= 1:
                    break
                assert time.monotonic() < deadline, doc
                await asyncio.sleep(0.05)
            assert doc["counters"]["upstream_errors"] == 0
            assert hostile.hits("/api/v1/lead/") == 1


async def test_stopping_hands_waiting_requests_closes_429_at_once(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    # A request waiting 20 s for a reset must not hold Ctrl-C (or SIGTERM) for 20 s (or
    # the whole 30 s drain, then be cut without an answer): it goes now, gets Close's 429.
    async def answer(request: web.Request) -> web.StreamResponse:
        return too_many(**{"Retry-After": "20"})

    async with hostile_upstream(answer) as hostile:
        seed_tokens(sim, token_file, api_url=hostile.url)
        async with aiohttp.ClientSession() as client:
            async with start_proxy(api_url=hostile.url) as proxy:

                async def get() -> tuple[int, str | None]:
                    async with client.get(proxy.url + "/api/v1/lead/") as resp:
                        await resp.read()
                        return resp.status, resp.headers.get("Retry-After")

                waiting = asyncio.create_task(get())
                deadline = time.monotonic() + 10
                while hostile.hits("/api/v1/lead/") < 1:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                started = time.monotonic()
            stopped_in = time.monotonic() - started  # the block's end is the drain
            assert await waiting == (429, "20")
            assert stopped_in < 3
            # Its one last attempt (the proxy never makes a 429 up), then nothing.
            assert hostile.hits("/api/v1/lead/") == 2


@pytest.mark.parametrize("size", [512 * 1024, 2 * 1024 * 1024], ids=["kept", "streamed"])
async def test_a_429_on_a_chunked_body_is_retried_only_when_the_body_was_kept(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, size: int
) -> None:
    bodies: list[int] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        bodies.append(len(await request.read()))
        if len(bodies) == 1:
            return too_many(**{"Retry-After": "0.2"})
        return web.json_response({"ok": True})

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(size // 65536):
            yield b"b" * 65536

    async with hostile_upstream(answer) as hostile:
        seed_tokens(sim, token_file, api_url=hostile.url)
        async with (
            start_proxy(api_url=hostile.url) as proxy,
            aiohttp.ClientSession() as client,
        ):
            async with client.post(proxy.url + "/api/v1/activity/", data=chunked()) as resp:
                status = resp.status
                await resp.read()
    if size <= 1024 * 1024:
        assert (status, bodies) == (200, [size, size])  # replayed whole
    else:
        assert (status, bodies) == (429, [size])  # Close's 429, unchanged, never replayed


async def test_thousands_of_groups_and_odd_methods_stay_bounded(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({}, headers={"RateLimit": "limit=10, remaining=9, reset=1"})

    async with hostile_upstream(answer) as hostile:
        seed_tokens(sim, token_file, api_url=hostile.url)
        async with (
            start_proxy(api_url=hostile.url) as proxy,
            aiohttp.ClientSession() as client,
        ):
            for index in range(1500):
                method = ("GET", "PROPFIND", "PURGE", "POST")[index % 4]
                async with client.request(method, f"{proxy.url}/api/v1/seg{index}/") as resp:
                    assert resp.status == 200
            async with client.get(f"{proxy.url}/admin/status") as resp:
                groups = (await resp.json())["rate_limits"]
    assert len(groups) <= 100 + 8  # 100 named, then one `METHOD other` per known method
    assert "other" in groups  # PROPFIND and PURGE share one group
    assert not any("PROPFIND" in name or "PURGE" in name for name in groups)


async def test_requests_queued_for_a_connection_when_a_429_arrives_wait_for_the_reset(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    # Two connections, six requests of one group before Close has said anything: two go,
    # four queue for a connection. Close answers the two with 429 "in 3 s": the four
    # that then get a connection must wait for the reset, not meet four more 429s.
    reset_at: list[float] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        if not reset_at or time.monotonic() < reset_at[0]:
            await asyncio.sleep(0.3)
            if not reset_at:
                reset_at.append(time.monotonic() + 3)
            return too_many(**{"Retry-After": "3"})
        return web.json_response({"ok": True})

    async with hostile_upstream(answer) as hostile:
        seed_tokens(sim, token_file, api_url=hostile.url)
        async with (
            start_proxy(api_url=hostile.url, upstream_connections=2, pool_timeout=20) as proxy,
            aiohttp.ClientSession() as client,
        ):

            async def get() -> int:
                async with client.get(proxy.url + "/api/v1/lead/") as resp:
                    await resp.read()
                    return resp.status

            assert await asyncio.gather(*(get() for _ in range(6))) == [200] * 6
    early = [at for at, _, _ in hostile.arrivals if at < reset_at[0]]
    assert len(early) == 2, f"{len(early)} requests reached Close before the reset"
