"""Hostile tests of the Redis token store: real redis-server, real simulator, real
`closeproxy` processes. Each test documents a defence."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import redis as redis_py
from helpers import run_cli_async, start_serve
from test_redis_fleet import SECRET, seed, store_env, stored

from closeproxy.sim import RunningSim
from closeproxy.testing_redis import PASSWORD, RedisServer


def sync_client(redis: RedisServer) -> redis_py.Redis:
    return redis_py.Redis.from_url(redis.url, decode_responses=True)


def raw_grant(redis: RedisServer) -> dict[str, str]:
    client = sync_client(redis)
    try:
        value = client.hgetall("closeproxy:grant")
        assert isinstance(value, dict)
        return {str(k): str(v) for k, v in value.items()}
    finally:
        client.close()


def clean(text: str) -> None:
    assert PASSWORD not in text, text
    assert "Traceback" not in text, text


async def wait_in_flight(sim: RunningSim, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not sim.state.token_requests_in_flight:
        assert time.monotonic() < deadline, "the refresh never reached Close"
        await asyncio.sleep(0.01)


async def wait_answered(sim: RunningSim, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while sim.state.token_requests_in_flight:
        assert time.monotonic() < deadline, "Close never answered the refresh"
        await asyncio.sleep(0.01)


@pytest.mark.timeout(120)
async def test_redis_killed_between_close_reply_and_cas_write(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Tokens Close issued while Redis was down live only in an idle proxy's memory: it
    retries the save without traffic, and its in-flight mark stops another process from
    refreshing with the spent refresh token meanwhile (it failed before the mark)."""
    old = await seed(sim, redis_server)
    env_a = store_env(sim, redis_server, tmp_path / "a")
    env_b = store_env(sim, redis_server, tmp_path / "b")
    server = await asyncio.to_thread(start_serve, env_a)
    try:
        sim.state.token_stall = 2.0
        async with aiohttp.ClientSession() as client:
            forced = asyncio.ensure_future(client.post(f"{server.url}/admin/refresh"))
            await wait_in_flight(sim)
            redis_server.kill()  # SIGKILL while Close is about to answer
            await wait_answered(sim)
            sim.state.token_stall = 0
            resp = await forced
            forced_body = await resp.text()
            await asyncio.sleep(0.5)  # A tries its CAS write: Redis is gone
            redis_server.start()  # AOF: the old grant (spent refresh token) is back
            assert (await stored(redis_server)) == old
            # Another machine refreshes (cron job, second replica) while A is idle.
            other = await run_cli_async(env_b, "refresh", timeout=60)
            clean(other.stdout + other.stderr)
    finally:
        server.stop()
    clean(server.logs + forced_body)
    assert "could not be saved" in server.logs
    assert sim.state.reuse_detected == 0, (
        sim.state.reuse_detected,
        other.returncode,
        other.stderr[-400:],
    )


@pytest.mark.timeout(120)
async def test_redis_restarted_without_its_data_gives_login_required(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    await seed(sim, redis_server, lifetime=8)
    env = store_env(sim, redis_server, tmp_path / "box")
    server = await asyncio.to_thread(start_serve, env)
    try:
        async with aiohttp.ClientSession() as client:
            url = f"{server.url}/api/v1/me/"
            async with client.get(url) as resp:
                assert resp.status == 200
            redis_server.kill()
            shutil.rmtree(redis_server.directory / "appendonlydir", ignore_errors=True)
            for name in ("dump.rdb",):
                (redis_server.directory / name).unlink(missing_ok=True)
            redis_server.start()  # empty
            assert raw_grant(redis_server) == {}
            await asyncio.sleep(9)  # the held token expires
            statuses = []
            for _ in range(5):
                async with client.get(url) as resp:
                    body = await resp.text()
                    statuses.append(resp.status)
                await asyncio.sleep(0.3)
            assert statuses[-1] == 401, (statuses, body)
            assert json.loads(body)["closeproxy_error"] == "login_required", body
            assert "closeproxy login" in body, body
            assert server.process.poll() is None  # still running
            status = await run_cli_async(env, "status")
            assert status.returncode != 0
            clean(status.stdout + status.stderr)
    finally:
        server.stop()
    clean(server.logs + body)
    assert sim.state.reuse_detected == 0
    assert raw_grant(redis_server) == {}  # nothing invented


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda r: r.url.replace(PASSWORD, "wrong-pw-xyz"), id="wrong-password"),
        pytest.param(lambda r: r.url.rsplit("/", 1)[0] + "/7", id="wrong-db"),
        pytest.param(lambda r: r.url.replace("redis://", "rediss://"), id="tls-to-plain"),
        pytest.param(lambda r: r.url.replace("redis://", "redis-x://"), id="bad-scheme"),
    ],
)
async def test_misconfigured_store_urls_fail_clearly(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path, mangle: object
) -> None:
    await seed(sim, redis_server)
    url = mangle(redis_server)  # type: ignore[operator]
    env = store_env(sim, redis_server, tmp_path / "box")
    env["CLOSEPROXY_TOKEN_STORE"] = url
    for command in ("status", "token", "refresh"):
        started = time.monotonic()
        done = await run_cli_async(env, command, timeout=30)
        text = done.stdout + done.stderr
        assert done.returncode != 0, (command, text)
        assert time.monotonic() - started < 20, command
        clean(text)
        assert "wrong-pw-xyz" not in text
        named = f"127.0.0.1:{redis_server.port}" in text or "CLOSEPROXY_TOKEN_STORE" in text
        assert named, (command, text)
    assert sim.state.refreshes == 0 and sim.state.reuse_detected == 0


@pytest.mark.parametrize("junk", ["hash-field", "wrong-type"])
async def test_garbage_in_the_redis_key_is_refused_and_never_overwritten(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path, junk: str
) -> None:
    await seed(sim, redis_server)
    client = sync_client(redis_server)
    if junk == "hash-field":
        client.hset("closeproxy:grant", "grant", "junk")
    else:
        client.delete("closeproxy:grant")
        client.set("closeproxy:grant", "junk")
    client.close()

    def snapshot() -> object:
        c = sync_client(redis_server)
        try:
            kind = c.type("closeproxy:grant")
            return (
                kind,
                c.hgetall("closeproxy:grant") if kind == "hash" else c.get("closeproxy:grant"),
            )
        finally:
            c.close()

    before = snapshot()
    env = store_env(sim, redis_server, tmp_path / "box")
    for command in ("status", "token", "refresh"):
        done = await run_cli_async(env, command, timeout=30)
        text = done.stdout + done.stderr
        assert done.returncode != 0, (command, text)
        clean(text)
        assert "closeproxy:grant" in text or redis_server.public_url in text, (command, text)
        assert snapshot() == before, command
    server = await asyncio.to_thread(start_serve, env)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/api/v1/me/") as resp:
                body = await resp.text()
                assert resp.status in (401, 500, 503), body
                clean(body)
    finally:
        server.stop()
    clean(server.logs)
    assert snapshot() == before
    assert sim.state.refreshes == 0
    # revoke is the one command that wipes what it cannot read, and says so.
    done = await run_cli_async(env, "revoke", timeout=30)
    clean(done.stdout + done.stderr)
    if snapshot() != before:
        assert "could not be read" in done.stdout + done.stderr, done


@pytest.mark.timeout(120)
async def test_a_process_with_the_wrong_store_secret_refuses_and_writes_nothing(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    await seed(sim, redis_server, secret=SECRET, lifetime=3)
    before = raw_grant(redis_server)
    wrong = base64.b64encode(os.urandom(32)).decode()
    env = store_env(sim, redis_server, tmp_path / "box", CLOSEPROXY_TOKEN_STORE_SECRET=wrong)
    server = await asyncio.to_thread(start_serve, env)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/api/v1/me/") as resp:
                body = await resp.text()
                assert resp.status >= 400, body
                clean(body)
    finally:
        server.stop()
    clean(server.logs)
    assert raw_grant(redis_server) == before
    assert sim.state.refreshes == 0


@pytest.mark.timeout(120)
async def test_lock_key_deleted_by_hand_mid_refresh(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    """With the lock key gone, the in-flight mark still stops a second send of the same
    refresh token (it failed before the mark)."""
    await seed(sim, redis_server)
    env_a = store_env(sim, redis_server, tmp_path / "a")
    env_b = store_env(sim, redis_server, tmp_path / "b")
    servers = await asyncio.gather(
        asyncio.to_thread(start_serve, env_a), asyncio.to_thread(start_serve, env_b)
    )
    try:
        sim.state.token_stall = 2.0
        async with aiohttp.ClientSession() as http:
            first = asyncio.ensure_future(http.post(f"{servers[0].url}/admin/refresh"))
            await wait_in_flight(sim)
            client = sync_client(redis_server)
            client.delete("closeproxy:grant:lock")
            client.close()
            second = asyncio.ensure_future(http.post(f"{servers[1].url}/admin/refresh"))
            for task in (first, second):
                resp = await task
                await resp.text()
            sim.state.token_stall = 0
    finally:
        for s in servers:
            s.stop()
    assert sim.state.reuse_detected == 0, sim.state.reuse_detected


@pytest.mark.timeout(150)
async def test_redis_sigstopped_for_15s_during_traffic(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    sim.state.config.token_lifetime = 12
    await seed(sim, redis_server, lifetime=12)
    env = store_env(sim, redis_server, tmp_path / "box")
    server = await asyncio.to_thread(start_serve, env)
    statuses: list[int] = []
    bodies: list[str] = []
    assert redis_server.process is not None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            url = f"{server.url}/api/v1/me/"
            async with http.get(url) as resp:
                assert resp.status == 200  # the tokens are now held in memory
            os.kill(redis_server.process.pid, signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                while time.monotonic() - stopped < 15:
                    async with http.get(url) as resp:
                        statuses.append(resp.status)
                        if resp.status != 200:
                            bodies.append(await resp.text())
                    await asyncio.sleep(0.2)
            finally:
                os.kill(redis_server.process.pid, signal.SIGCONT)
            deadline = time.monotonic() + 15
            while True:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        break
                    bodies.append(await resp.text())
                assert time.monotonic() < deadline, ("stuck after SIGCONT", bodies[-1:])
                await asyncio.sleep(0.2)
            # and later refreshes work too (the store is not wedged)
            done = await run_cli_async(env, "refresh", timeout=60)
            assert done.returncode == 0, done.stderr
    finally:
        server.stop()
    for body in bodies:
        clean(body)
    clean(server.logs)
    assert sim.state.reuse_detected == 0
    assert statuses.count(200) > 0
    assert all(s in (200, 503) for s in statuses), statuses
    print(
        f"\nSIGSTOP: {len(statuses)} requests, {statuses.count(200)} x 200, "
        f"{statuses.count(503)} x 503; refreshes {sim.state.refreshes}"
    )


@pytest.mark.parametrize("command", ["status", "token", "revoke", "refresh"])
async def test_cli_against_a_down_redis_names_the_store_without_password(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path, command: str
) -> None:
    await seed(sim, redis_server)
    redis_server.kill()
    env = store_env(sim, redis_server, tmp_path / "box")
    done = await run_cli_async(env, command, timeout=30)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    clean(text)
    assert redis_server.public_url in text, text
    assert sim.state.refreshes == 0 and sim.state.reuse_detected == 0


@pytest.mark.timeout(60)
async def test_revoke_with_the_wrong_store_secret_does_not_wipe_the_grant(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    await seed(sim, redis_server, secret=SECRET)
    before = raw_grant(redis_server)
    wrong = base64.b64encode(os.urandom(32)).decode()
    env = store_env(sim, redis_server, tmp_path / "box", CLOSEPROXY_TOKEN_STORE_SECRET=wrong)
    done = await run_cli_async(env, "revoke", timeout=30)
    clean(done.stdout + done.stderr)
    assert raw_grant(redis_server) == before, (done.returncode, done.stdout, done.stderr)
    assert done.returncode == 1
    assert "do not open with this token store secret" in done.stderr
    assert "nothing was revoked or wiped" in done.stderr


@pytest.mark.timeout(120)
async def test_redis_killed_before_cas_with_traffic_saves_before_another_refresh(
    sim: RunningSim, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The same kill, but proxy A keeps serving traffic: another process's refresh waits
    for A's save rather than racing it (a race A lost in some runs before the mark)."""
    await seed(sim, redis_server)
    env_a = store_env(sim, redis_server, tmp_path / "a")
    env_b = store_env(sim, redis_server, tmp_path / "b")
    server = await asyncio.to_thread(start_serve, env_a)
    stop = asyncio.Event()
    try:
        sim.state.token_stall = 2.0
        async with aiohttp.ClientSession() as client:

            async def traffic() -> None:
                while not stop.is_set():
                    async with client.get(f"{server.url}/api/v1/me/") as resp:
                        await resp.read()
                    await asyncio.sleep(0.1)

            forced = asyncio.ensure_future(client.post(f"{server.url}/admin/refresh"))
            await wait_in_flight(sim)
            redis_server.kill()
            await wait_answered(sim)
            sim.state.token_stall = 0
            await (await forced).text()
            await asyncio.sleep(0.5)
            redis_server.start()
            load = asyncio.ensure_future(traffic())
            other = await run_cli_async(env_b, "refresh", timeout=60)
            stop.set()
            await load
    finally:
        server.stop()
    clean(server.logs + other.stdout + other.stderr)
    assert sim.state.reuse_detected == 0, (sim.state.reuse_detected, other.stderr[-300:])
