"""Several closeproxy processes sharing one grant in a real redis-server (SPEC §10).

Every process here runs the real command line against the simulator; "machines" are
processes with separate home directories, so nothing but Redis is shared.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from helpers import ServeProcess, cli_env, proxy_env, run_cli_async, start_serve
from test_chaos import sim_ports
from test_login import LoginProcess, consent

from closeproxy.config import load_settings
from closeproxy.grant import TokenSet
from closeproxy.redis_lock import RedisLease, RedisLock
from closeproxy.redis_store import RedisGrantStore
from closeproxy.refresh_policy import Rejected
from closeproxy.sim import RunningSim
from closeproxy.testing_redis import PASSWORD, RedisServer
from closeproxy.tokens import TokenProvider
from closeproxy.upstream import client_session, oauth_client

SECRET = base64.b64encode(os.urandom(32)).decode()
# What a legacy tool under `closeproxy run` does: its "API key" against CLOSE_API_URL.
CHILD_GETS_ME = """
import base64, os, urllib.request
key = base64.b64encode((os.environ["CLOSE_API_KEY"] + ":").encode()).decode()
request = urllib.request.Request(
    os.environ["CLOSE_API_URL"] + "me/", headers={"Authorization": "Basic " + key}
)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(opener.open(request, timeout=20).status)
"""


def store_env(sim: RunningSim, redis: RedisServer, home: Path, **extra: str) -> dict[str, str]:
    """A process on its own "machine" (home directory) using the shared store."""
    env = proxy_env(sim, home / "tokens.json", CLOSEPROXY_TOKEN_STORE=redis.url, **extra)
    return {**env, "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config")}


@contextlib.asynccontextmanager
async def redis_store(
    redis: RedisServer, secret: str | None = None
) -> AsyncIterator[RedisGrantStore]:
    store = RedisGrantStore(redis.url, secret=base64.b64decode(secret) if secret else None)
    try:
        yield store
    finally:
        await store.aclose()


async def seed(
    sim: RunningSim, redis: RedisServer, *, lifetime: float | None = None, secret: str | None = None
) -> TokenSet:
    """Log in at the simulator without a browser and store the grant in Redis."""
    now = time.time()
    tokens = TokenSet.from_reply(sim.state.issue_tokens(), received_at=now, api_url=sim.url)
    if lifetime is not None:
        tokens = replace(tokens, expires_at=now + lifetime, obtained_at=now)
    async with redis_store(redis, secret) as store, store.locked():
        loaded = await store.load()
        await store.save(tokens, expected=loaded.version)
    return tokens


async def stored(redis: RedisServer, secret: str | None = None) -> TokenSet | None:
    async with redis_store(redis, secret) as store:
        return (await store.load()).tokens


async def test_login_into_redis_leaves_no_file_and_no_clear_token(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = store_env(sim, redis_server, tmp_path / "laptop", CLOSEPROXY_TOKEN_STORE_SECRET=SECRET)
    login = await LoginProcess.start(env, "--no-browser")
    landed = await consent(await login.authorize_url())
    code, out, err = await login.finish(landed + "\n")
    assert code == 0, err
    assert redis_server.public_url in out and PASSWORD not in out + err
    assert not (tmp_path / "laptop" / "tokens.json").exists()
    tokens = await stored(redis_server, SECRET)
    assert tokens is not None and tokens.user_id == sim.state.config.user_id
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    value = str(client.hget("closeproxy:grant", "grant"))
    client.close()
    assert tokens.access_token not in value and str(tokens.refresh_token) not in value

    status = await run_cli_async(env, "status")
    assert status.returncode == 0, status.stderr
    assert redis_server.public_url in status.stdout and "(encrypted)" in status.stdout
    doc = json.loads((await run_cli_async(env, "status", "--json")).stdout)
    assert doc["token_store"] == redis_server.public_url and doc["encrypted"] is True
    assert doc["user_id"] == sim.state.config.user_id
    printed = await run_cli_async(env, "token")
    assert printed.returncode == 0 and printed.stdout.strip() == tokens.access_token

    ran = await run_cli_async(env, "run", "--", sys.executable, "-c", CHILD_GETS_ME)
    assert ran.returncode == 0 and ran.stdout.strip() == "200", (ran.stdout, ran.stderr)

    # Another machine without the key is told which setting is missing, and changes nothing.
    keyless = store_env(sim, redis_server, tmp_path / "other")
    for command in ("status", "refresh", "revoke"):
        refused = await run_cli_async(keyless, command)
        assert refused.returncode != 0, command
        assert "CLOSEPROXY_TOKEN_STORE_SECRET" in refused.stdout + refused.stderr, command
    exchanges = sim.state.code_exchanges
    login = await LoginProcess.start(keyless, "--no-browser")
    landed = await consent(await login.authorize_url())
    code, out, err = await login.finish(landed + "\n")
    assert code != 0 and "CLOSEPROXY_TOKEN_STORE_SECRET" in err, (out, err)
    assert sim.state.code_exchanges == exchanges  # refused before the code was spent
    assert await stored(redis_server, SECRET) == tokens

    refreshed = await run_cli_async(env, "refresh")
    assert refreshed.returncode == 0, refreshed.stderr
    assert (await stored(redis_server, SECRET)) != tokens
    revoked = await run_cli_async(env, "revoke")
    assert revoked.returncode == 0, revoked.stderr
    assert await stored(redis_server, SECRET) is None
    for text in (status.stdout, status.stderr, refreshed.stdout, refreshed.stderr, revoked.stdout):
        assert PASSWORD not in text
    assert sim.state.reuse_detected == 0


async def test_a_redis_outage_serves_the_held_token_then_503_then_recovers(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    # A refresh before Redis goes (a slow start on a loaded machine) also brings 6 s tokens.
    sim.state.config.token_lifetime = 6
    await seed(sim, redis_server, lifetime=6)
    env = store_env(sim, redis_server, tmp_path / "box")
    server = await asyncio.to_thread(start_serve, env)
    try:
        async with aiohttp.ClientSession() as client:
            url = f"{server.url}/api/v1/me/"
            async with client.get(url) as resp:
                assert resp.status == 200
            redis_server.kill()
            for _ in range(5):
                async with client.get(url) as resp:
                    assert resp.status == 200  # the access token in memory still works
                await asyncio.sleep(0.2)
            await asyncio.sleep(6)  # now the token must be refreshed, and Redis is gone
            async with client.get(url) as resp:
                body = await resp.text()
                assert resp.status == 503, body
                assert json.loads(body)["closeproxy_error"] == "token_service_unavailable"
                assert redis_server.public_url in body and PASSWORD not in body
            redis_server.start()
            deadline = time.monotonic() + 10
            while True:
                async with client.get(url) as resp:
                    if resp.status == 200:
                        break
                assert time.monotonic() < deadline, "no recovery after Redis came back"
                await asyncio.sleep(0.2)
    finally:
        server.stop()
    assert PASSWORD not in server.logs
    assert "cannot reach the Redis store" in server.logs
    assert sim.state.reuse_detected == 0 and sim.state.refreshes == 1


async def test_a_redis_restart_between_refreshes_loses_nothing(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    await seed(sim, redis_server)
    env = store_env(sim, redis_server, tmp_path / "box")
    first = await run_cli_async(env, "refresh")
    assert first.returncode == 0, first.stderr
    kept = await stored(redis_server)
    redis_server.kill()  # SIGKILL: only what the AOF (appendfsync always) holds survives
    redis_server.start()
    assert await stored(redis_server) == kept
    second = await run_cli_async(env, "refresh")
    assert second.returncode == 0, second.stderr
    assert sim.state.refreshes == 2 and sim.state.reuse_detected == 0


class FrozenAtConfirm(RedisGrantStore):
    """The real store, with the whole process frozen (as by SIGSTOP) just before it would
    send the refresh token, while another process takes the expired lock and refreshes."""

    def __init__(self, url: str, other: list[str], env: dict[str, str]) -> None:
        super().__init__(url)
        self.lock = FrozenLock(self, other, env)

    @property
    def other(self) -> subprocess.CompletedProcess[str] | None:
        assert isinstance(self.lock, FrozenLock)
        return self.lock.other


class FrozenLock(RedisLock):
    def __init__(self, store: RedisGrantStore, other: list[str], env: dict[str, str]) -> None:
        super().__init__(store, ttl=0.5)
        self.command, self.env = other, env
        self.other: subprocess.CompletedProcess[str] | None = None

    async def confirm(self, lease: RedisLease) -> None:
        if self.other is None:
            # Blocking on purpose: no renewal of our lock can run, like a stopped process.
            self.other = subprocess.run(
                self.command, env=cli_env(self.env), capture_output=True, text=True, timeout=60
            )
        await super().confirm(lease)


async def test_a_refresh_frozen_past_its_lock_neither_sends_nor_overwrites(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    old = await seed(sim, redis_server)
    env = store_env(sim, redis_server, tmp_path / "b")
    store = FrozenAtConfirm(redis_server.url, [sys.executable, "-m", "closeproxy", "refresh"], env)
    settings = load_settings({}, store_env(sim, redis_server, tmp_path / "a"))

    async def refresh_in_process_a() -> TokenSet:
        async with client_session() as session:
            provider = TokenProvider(
                store, oauth_client(settings, session), margin=300, api_url=sim.url
            )
            try:
                return await provider.refresh(Rejected(old.access_token))
            finally:
                await provider.aclose()
                await store.aclose()

    # Process A's loop runs in a thread of its own, so freezing it leaves the simulator
    # (on this test's loop) answering the other process.
    tokens = await asyncio.to_thread(asyncio.run, refresh_in_process_a())
    assert store.other is not None and store.other.returncode == 0, store.other
    newer = await stored(redis_server)
    assert newer is not None and newer.refresh_token != old.refresh_token
    # Only the other process spoke to Close; the frozen one adopted its tokens.
    assert [entry["refresh_token"] for entry in sim.state.token_log] == [old.refresh_token]
    assert sim.state.reuse_detected == 0
    assert tokens == newer


@pytest.mark.chaos
@pytest.mark.timeout(240)
async def test_four_machines_share_one_grant_through_kills_mid_refresh(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    sim.state.config.token_lifetime = 30
    sim.state.revoke_old_access_on_refresh = True  # a refresh elsewhere kills our token
    await seed(sim, redis_server, lifetime=30)
    homes = [tmp_path / f"machine{i}" for i in range(4)]
    envs = [store_env(sim, redis_server, home, CLOSEPROXY_LOG_LEVEL="warning") for home in homes]
    servers: list[ServeProcess | None] = list(
        await asyncio.gather(*(asyncio.to_thread(start_serve, env) for env in envs))
    )
    stop = asyncio.Event()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    loop_results: Counter[int] = Counter()
    sim_port = int(sim.url.rsplit(":", 1)[1])

    async def refresh_loop() -> None:
        while not stop.is_set():
            done = await run_cli_async(envs[0], "refresh", timeout=60)
            loop_results[done.returncode] += 1
            if done.returncode != 0:
                failures.append(f"refresh loop: {done.stderr}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 20)

    async def traffic(client: aiohttp.ClientSession, index: int) -> None:
        while not stop.is_set():
            server = servers[index]
            if server is not None:
                try:
                    async with client.get(f"{server.url}/api/v1/me/") as resp:
                        statuses[resp.status] += 1
                        if resp.status != 200 and servers[index] is server:
                            failures.append(f"proxy {index}: {resp.status} {await resp.text()}")
                except aiohttp.ClientError as exc:
                    if servers[index] is server:
                        failures.append(f"proxy {index}: {exc!r}")
            await asyncio.sleep(0.1)

    async def kill_one_mid_refresh(client: aiohttp.ClientSession) -> None:
        await asyncio.sleep(25)
        victim = servers[1]
        assert victim is not None
        sim.state.token_stall = 3.0
        forced = asyncio.ensure_future(client.post(f"{victim.url}/admin/refresh"))
        deadline = time.monotonic() + 10
        while not (
            sim_ports(victim.process.pid, sim_port) & set(sim.state.token_requests_in_flight)
        ):
            assert time.monotonic() < deadline, "the forced refresh never reached Close"
            await asyncio.sleep(0.01)
        servers[1] = None
        os.kill(victim.process.pid, signal.SIGKILL)
        await asyncio.to_thread(victim.process.wait)
        victim.join()
        with contextlib.suppress(aiohttp.ClientError):
            await forced
        await asyncio.sleep(3.5)  # the simulator drops the request nobody waits for
        sim.state.token_stall = 0
        servers[1] = await asyncio.to_thread(start_serve, envs[1])

    started = time.monotonic()
    async with aiohttp.ClientSession() as client:
        tasks = [asyncio.ensure_future(traffic(client, i)) for i in range(4)]
        tasks.append(asyncio.ensure_future(refresh_loop()))
        await kill_one_mid_refresh(client)
        await asyncio.sleep(max(0.0, 60 - (time.monotonic() - started)))
        stop.set()
        await asyncio.gather(*tasks)
        for server in servers:
            assert server is not None
            async with client.get(f"{server.url}/api/v1/me/") as resp:
                assert resp.status == 200  # the grant is alive everywhere
    for server in servers:
        assert server is not None
        server.stop()
    # The figures README's "Running several proxies" quotes (pytest -s shows them).
    print(
        f"\nfleet: {sum(statuses.values())} requests, {statuses[200]} answered 200, "
        f"{len(failures)} failed; {sim.state.refreshes} refreshes "
        f"({loop_results[0]} by the refresh loop), {sim.state.reuse_detected} reused refresh "
        f"tokens, {sim.state.token_requests_abandoned} refresh killed in flight"
    )
    assert sim.state.token_requests_abandoned == 1
    assert sim.state.reuse_detected == 0, sim.state.reused_refresh_tokens
    assert failures == [], failures[:5]
    assert statuses[200] > 1000, statuses
    assert sim.state.refreshes >= 3, sim.state.refreshes
    assert loop_results[0] >= 3
