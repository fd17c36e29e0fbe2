"""Token life inside one proxy: proactive, reactive and failing refreshes, over real ports."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
from aiohttp import web
from helpers import (
    Proxy,
    ProxyFactory,
    make_settings,
    provider_against_token_endpoint,
    proxy_env,
    run_cli_async,
    seed_tokens,
)

from closeproxy.errors import TokenStoreError
from closeproxy.file_store import FileGrantStore
from closeproxy.grant import TokenSet, Version
from closeproxy.refresh_policy import FORCE
from closeproxy.server import running
from closeproxy.sim import RunningSim, run_sim
from closeproxy.upstream import client_session
from closeproxy.wiring import token_provider


def stored(token_file: Path) -> TokenSet:
    tokens = FileGrantStore(token_file).read()
    assert tokens is not None
    return tokens


async def get_me(client: aiohttp.ClientSession, proxy: Proxy) -> tuple[int, dict[str, object]]:
    async with client.get(f"{proxy.url}/api/v1/me/") as resp:
        return resp.status, await resp.json()


async def test_200_concurrent_requests_on_an_expired_token_cause_one_refresh(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    old = seed_tokens(sim, token_file, expires_in=-10)
    sim.state.expire_access_token(old.access_token)
    sim.state.token_delay = 0.2  # keep the refresh in flight while all 200 arrive
    results = await asyncio.gather(*(get_me(client, proxy) for _ in range(200)))
    assert [status for status, _ in results] == [200] * 200
    assert sim.state.refreshes == 1
    assert sim.state.token_requests == 1
    new = stored(token_file)
    assert new.access_token != old.access_token
    assert {
        value for r in sim.state.api_log for name, value in r.headers if name == "Authorization"
    } == {f"Bearer {new.access_token}"}


async def test_refresh_inside_the_margin_happens_in_the_background(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    old = seed_tokens(sim, token_file, expires_in=120)  # inside the default 300 s margin
    sim.state.token_delay = 0.5
    async with start_proxy() as proxy:
        started = time.monotonic()
        status, _ = await get_me(client, proxy)
        assert status == 200
        assert time.monotonic() - started < 0.4  # did not wait for the slow refresh
        await asyncio.sleep(0.8)
        assert sim.state.refreshes == 1
        assert stored(token_file).access_token != old.access_token
        status, _ = await get_me(client, proxy)
        assert status == 200
    assert sim.state.refreshes == 1


async def test_refresh_rejected_with_invalid_grant_means_login_required_and_no_hammering(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    old = seed_tokens(sim, token_file, expires_in=-10)
    sim.state.revoke(str(old.refresh_token))
    for _ in range(5):
        status, body = await get_me(client, proxy)
        assert status == 401
        assert body["closeproxy_error"] == "login_required"
        assert "closeproxy login" in str(body["error"])
    assert sim.state.token_requests == 1
    dead = stored(token_file)
    assert dead.refresh_rejected == "invalid_grant"
    assert dead.refresh_token == old.refresh_token  # kept for the record, never sent again
    # a new login (another process replaces the file) brings the proxy back at once
    fresh = seed_tokens(sim, token_file)
    status, _ = await get_me(client, proxy)
    assert status == 200
    assert sim.state.api_log[-1].headers.count(("Authorization", f"Bearer {fresh.access_token}"))


async def test_token_endpoint_down_is_503_and_keeps_the_refresh_token(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    old = seed_tokens(sim, token_file, expires_in=-10)
    for mode in ("down", "drop"):
        sim.state.token_endpoint = mode
        status, body = await get_me(client, proxy)
        assert status == 503, mode
        assert body["closeproxy_error"] == "token_service_unavailable"
        assert stored(token_file).refresh_token == old.refresh_token
    # A 503 reply is retried (three attempts); a dropped connection may have reached
    # Close, so resending the refresh token could spend it twice: no retry.
    assert sim.state.token_requests == 4
    assert "may have replaced the refresh token" in str(body["error"])
    sim.state.token_endpoint = "ok"
    status, _ = await get_me(client, proxy)
    assert status == 200
    assert sim.state.refreshes == 1
    assert stored(token_file).refresh_token != old.refresh_token


async def test_token_endpoint_unreachable_is_503(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    old = seed_tokens(sim, token_file, expires_in=-10, api_url="http://127.0.0.1:9")
    async with start_proxy(api_url="http://127.0.0.1:9") as proxy:
        status, body = await get_me(client, proxy)
    assert status == 503
    assert body["closeproxy_error"] == "token_service_unavailable"
    assert stored(token_file) == old


# The proxy asks whether the token file changed at most once a second (grant_cache.py):
# a replacement shows within a second; this much leaves room for a busy machine.
NOTICED_WITHIN = 1.5


async def answers_until(
    client: aiohttp.ClientSession, proxy: Proxy, done: Callable[[int, dict[str, object]], bool]
) -> list[tuple[int, dict[str, object]]]:
    """GET /api/v1/me/ every 50 ms until `done(status, body)`; fails after NOTICED_WITHIN."""
    answers = []
    async with asyncio.timeout(NOTICED_WITHIN):
        while True:
            answers.append(await get_me(client, proxy))
            if done(*answers[-1]):
                return answers
            await asyncio.sleep(0.05)


async def test_file_replaced_by_another_process_is_picked_up_within_a_second(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    first = seed_tokens(sim, token_file)
    assert (await get_me(client, proxy))[0] == 200
    second = seed_tokens(sim, token_file)  # e.g. `closeproxy login` in another terminal

    def used() -> list[str]:
        return [
            value for r in sim.state.api_log for name, value in r.headers if name == "Authorization"
        ]

    answers = await answers_until(
        client, proxy, lambda status, _: used()[-1] == f"Bearer {second.access_token}"
    )
    assert [status for status, _ in answers] == [200] * len(answers)
    # The first token until the change is seen, then only the second.
    assert set(used()[:-1]) == {f"Bearer {first.access_token}"}
    token_file.unlink()  # e.g. `closeproxy revoke` elsewhere
    answers = await answers_until(client, proxy, lambda status, _: status != 200)
    status, body = answers[-1]
    assert (status, body["closeproxy_error"]) == (401, "login_required")


async def test_grant_without_refresh_token_works_until_expiry(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    reply = sim.state.issue_tokens()
    reply.pop("refresh_token")
    now = time.time()
    store = FileGrantStore(token_file)
    store.write(TokenSet.from_reply(reply, received_at=now - 3590, api_url=sim.url))
    assert (await get_me(client, proxy))[0] == 200  # inside the margin, still valid
    store.write(TokenSet.from_reply(reply, received_at=now - 4000, api_url=sim.url))
    status, body = (await answers_until(client, proxy, lambda status, _: status != 200))[-1]
    assert (status, body["closeproxy_error"]) == (401, "login_required")
    assert "refresh token" in str(body["error"])
    assert sim.state.token_requests == 0


async def test_without_client_credentials_an_expired_token_says_what_to_set(
    sim: RunningSim, token_file: Path, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file, expires_in=-10)
    settings = replace(make_settings(sim, token_file), client_id=None, client_secret=None)
    async with running(settings) as where, client.get(f"{where.url}/api/v1/me/") as resp:
        body = await resp.json()
    # 401, never 5xx: Close clients retry those for minutes, and no retry can fix this
    assert (resp.status, body["closeproxy_error"]) == (401, "client_not_configured")
    assert "CLOSEPROXY_CLIENT_ID" in body["error"]
    assert "client_secret_file" in body["error"]
    assert sim.state.token_requests == 0


async def test_status_shows_a_rejected_grant(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    old = seed_tokens(sim, token_file, expires_in=-10)
    sim.state.revoke(str(old.refresh_token))
    await get_me(client, proxy)
    async with client.get(f"{proxy.url}/admin/status") as resp:
        status = json.loads(await resp.text())
    assert status["logged_in"] is False
    assert "invalid_grant" in status["problem"]


async def test_a_grant_is_never_sent_to_a_server_that_did_not_issue_it(
    sim: RunningSim, token_file: Path, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Tokens from the simulator; a second simulator stands in for a wrong --api-url.
    tokens = seed_tokens(sim, token_file, expires_in=-10)
    async with run_sim() as other:
        settings = make_settings(sim, token_file, api_url=other.url)
        async with running(settings) as where:
            for path in ("/api/v1/me/", "/admin/refresh"):
                method = "POST" if path.startswith("/admin") else "GET"
                async with client.request(method, where.url + path) as resp:
                    body = await resp.json()
                assert resp.status == 401
                assert body["closeproxy_error"] == "login_required"
                assert sim.url in body["error"]
                assert other.url in body["error"]
        result = await run_cli_async(
            proxy_env(sim, token_file, CLOSEPROXY_API_URL=other.url), "revoke"
        )
    assert result.returncode == 2
    assert "closeproxy login" in result.stderr
    assert other.state.api_requests == other.state.token_requests == other.state.revokes == 0
    assert stored(token_file) == tokens  # untouched, not marked rejected, not wiped


class FlakyStore(FileGrantStore):
    """A token store whose disk refuses the next `failures` saves."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def write(self, tokens: TokenSet) -> Version:
        if self.failures:
            self.failures -= 1
            raise TokenStoreError(f"cannot write the token file {self.path}: No space left")
        return super().write(tokens)


async def test_tokens_that_cannot_be_saved_are_kept_and_saved_before_the_next_refresh(
    sim: RunningSim, token_file: Path
) -> None:
    old = seed_tokens(sim, token_file)
    store = FlakyStore(token_file, failures=1)
    async with client_session() as session:
        provider = token_provider(make_settings(sim, token_file), session, store=store)
        fresh = await provider.refresh(FORCE)  # rotated at Close, disk said no
        assert fresh.refresh_token != old.refresh_token
        assert stored(token_file) == old
        assert (await provider.current()).access_token == fresh.access_token  # from memory
        newer = await provider.refresh(FORCE)  # saves `fresh` first, then rotates
        await provider.aclose()
    assert sim.state.reuse_detected == 0
    assert sim.state.refreshes == 2
    assert stored(token_file).refresh_token == newer.refresh_token


async def test_refused_client_credentials_are_not_asked_again_at_request_rate(
    sim: RunningSim,
    token_file: Path,
    start_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    seed_tokens(sim, token_file, expires_in=-10)
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret")
    async with start_proxy(client_secret=str(wrong)) as proxy:
        for _ in range(10):
            status, body = await get_me(client, proxy)
            assert status == 401  # not 502: a retry by the client cannot fix the credentials
            assert body["closeproxy_error"] == "token_request_rejected"
            assert "client secret" in str(body["error"])
    assert sim.state.token_requests == 1
    assert stored(token_file).refresh_rejected is None  # the grant itself is fine


async def test_a_quirky_but_successful_token_reply_still_keeps_the_new_refresh_token(
    token_file: Path,
) -> None:
    # A token endpoint whose 200 reply bends the format (string expires_in, odd case).
    async def token(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "access_token": "acc-2",
                "refresh_token": "ref-2",
                "expires_in": "3600",
                "token_type": "bearer",
            }
        )

    async with provider_against_token_endpoint(token_file, token) as provider:
        fresh = await provider.current()
    assert fresh.access_token == "acc-2"
    assert stored(token_file).refresh_token == "ref-2"
    assert 3500 < stored(token_file).expires_in() <= 3600
