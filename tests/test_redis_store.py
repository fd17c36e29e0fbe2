"""The Redis token store against a real redis-server (password set, AOF on): store level."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from dataclasses import replace

import pytest

from closeproxy.errors import TokenServiceUnavailable, TokenStoreError
from closeproxy.grant import LockLost, RefreshInFlight, SealedGrant, StaleGrant, TokenSet
from closeproxy.redis_store import RedisGrantStore
from closeproxy.store_options import public_url
from closeproxy.testing_redis import PASSWORD, RedisServer

KEY = base64.b64encode(os.urandom(32)).decode()


def tokens(n: int = 1) -> TokenSet:
    now = time.time()
    return TokenSet(
        access_token=f"access-{n}-{os.urandom(6).hex()}",
        refresh_token=f"refresh-{n}-{os.urandom(6).hex()}",
        expires_at=now + 3600,
        obtained_at=now,
        organization_id="orga_1",
        user_id="user_1",
        api_url="http://127.0.0.1:1",
    )


def raw(server: RedisServer, key: str = "closeproxy:grant") -> dict[str, str]:
    """What anyone with the Redis password sees, read with redis-py's sync client."""
    import redis

    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        return client.hgetall(key)  # type: ignore[return-value]
    finally:
        client.close()


def test_the_url_shown_never_holds_the_password() -> None:
    assert public_url("redis://:pw@h:6379/0") == "redis://h:6379/0"
    assert public_url("redis://user:pw@h/1") == "redis://user@h/1"
    assert public_url("rediss://h:6380/2") == "rediss://h:6380/2"
    shown = public_url("unix:///run/redis.sock?db=3&password=pw")
    assert shown == "unix:///run/redis.sock?db=3"


async def test_save_load_and_compare_and_set(redis_server: RedisServer) -> None:
    store = RedisGrantStore(redis_server.url)
    other = RedisGrantStore(redis_server.url)
    try:
        assert await store.load() == (None, None)
        first = tokens(1)
        async with store.locked():
            v1 = await store.save(first, expected=None)
        assert await other.load() == (first, v1)
        async with other.locked():
            v2 = await other.save(tokens(2), expected=v1)
        assert v2 != v1
        # The first store still believes v1: its write must not land over v2.
        with pytest.raises(StaleGrant):
            async with store.locked():
                await store.save(tokens(3), expected=v1)
        assert (await store.load()).version == v2
        async with store.locked():
            assert await store.clear() is True
            assert await store.clear() is False
        assert await other.load() == (None, None)
        assert PASSWORD not in store.describe() and PASSWORD not in repr(store)
        assert store.status_fields() == {
            "token_store": redis_server.public_url,
            "token_store_key": "closeproxy:grant",
            "encrypted": False,
        }
    finally:
        await store.aclose()
        await other.aclose()


async def test_the_lock_excludes_others_and_is_kept_past_its_lifetime_while_held(
    redis_server: RedisServer,
) -> None:
    holder = RedisGrantStore(redis_server.url, lock_ttl=0.4)
    waiter = RedisGrantStore(redis_server.url, lock_ttl=0.4)
    order: list[str] = []
    try:
        async with holder.locked() as lease:
            task = asyncio.ensure_future(_take(waiter, order))
            await asyncio.sleep(1.2)  # three lifetimes: the holder's renewals keep it
            await lease.confirm()
            order.append("holder done")
        await asyncio.wait_for(task, 5)
        assert order == ["holder done", "waiter in"]
    finally:
        await holder.aclose()
        await waiter.aclose()


async def _take(store: RedisGrantStore, order: list[str]) -> None:
    async with store.locked():
        order.append("waiter in")


async def test_a_dead_holders_lock_runs_out_by_itself(redis_server: RedisServer) -> None:
    import redis.asyncio

    # What a SIGKILLed holder leaves behind: its lock, with no one to renew or release it.
    client = redis.asyncio.Redis.from_url(redis_server.url)
    await client.set("closeproxy:grant:lock", "dead-owner", px=800)
    await client.aclose()
    store = RedisGrantStore(redis_server.url)
    try:
        started = time.monotonic()
        async with store.locked():
            waited = time.monotonic() - started
        assert 0.3 < waited < 5
        with pytest.raises(TokenStoreError) as failed:
            async with store.locked(), store.locked(wait=0.3):
                pass
        assert "held the lock closeproxy:grant:lock" in str(failed.value)
    finally:
        await store.aclose()


async def test_a_frozen_holder_can_neither_send_nor_overwrite(redis_server: RedisServer) -> None:
    """A process paused past the lock's lifetime (the whole loop frozen, as SIGSTOP does)."""
    paused = RedisGrantStore(redis_server.url, lock_ttl=0.3)
    other = RedisGrantStore(redis_server.url)
    try:
        async with paused.locked():
            v1 = await paused.save(tokens(1), expected=None)
        async with paused.locked() as lease:
            _, version = await paused.load()
            time.sleep(0.6)  # frozen on purpose: no renewal can run
            async with other.locked(wait=1):
                newer = await other.save(tokens(2), expected=version)
            with pytest.raises(LockLost):
                await lease.confirm()  # what the provider asks before it sends a refresh
            with pytest.raises(StaleGrant):
                await paused.save(tokens(3), expected=v1)
        assert (await other.load()).version == newer
    finally:
        await paused.aclose()
        await other.aclose()


async def test_a_refresh_marked_in_flight_holds_back_every_other_process(
    redis_server: RedisServer,
) -> None:
    """The in-flight mark: written at confirm, renewed while held, kept when the write
    failed (tokens may exist only in the holder's memory), deleted by the write."""
    holder = RedisGrantStore(redis_server.url, lock_ttl=0.4)
    other = RedisGrantStore(redis_server.url, lock_ttl=0.4)
    try:
        async with holder.locked():
            version = await holder.save(tokens(1), expected=None)
        assert "inflight" not in raw(redis_server)
        async with holder.locked() as lease:
            await holder.load()
            await lease.confirm()  # about to send the refresh token: marked
            assert raw(redis_server)["inflight"].startswith(holder.lock.process_id + " ")
            redis_server.kill()  # Close answers, but the write cannot reach Redis
            with pytest.raises(TokenServiceUnavailable):
                await holder.save(tokens(2), expected=version)
        redis_server.start()  # AOF: the old grant, and the mark, are back
        assert raw(redis_server)["inflight"].startswith(holder.lock.process_id + " ")
        async with other.locked(wait=2) as theirs:
            await other.load()
            with pytest.raises(RefreshInFlight) as held_back:
                await theirs.confirm()
        assert 0 < held_back.value.retry_after <= 1
        assert "has not stored the new tokens yet" in str(held_back.value)
        # The holder's save retry succeeds: the mark goes with the write.
        async with holder.locked(wait=2):
            await holder.save(tokens(2), expected=version)
        assert "inflight" not in raw(redis_server)
        async with other.locked(wait=2) as theirs:
            await other.load()
            await theirs.confirm()
    finally:
        await holder.aclose()
        await other.aclose()


async def test_a_dead_owners_mark_is_taken_over_after_its_lifetime_and_abandon(
    redis_server: RedisServer,
) -> None:
    store = RedisGrantStore(redis_server.url, lock_ttl=0.3)
    store.lock.abandon = 0.5
    try:
        async with store.locked():
            await store.save(tokens(1), expected=None)
        # What a holder SIGKILLed mid-refresh leaves behind: its mark, beating no more.
        await store.client().hset("closeproxy:grant", "inflight", f"dead {_redis_ms(store)} 0")
        started = time.monotonic()
        while True:
            async with store.locked(wait=2) as lease:
                await store.load()
                try:
                    await lease.confirm()
                except RefreshInFlight as exc:
                    retry = exc.retry_after
                else:
                    assert raw(redis_server)["inflight"].startswith(store.lock.process_id + " ")
                    break
            await asyncio.sleep(retry)
        waited = time.monotonic() - started
        assert 0.7 < waited < 3, waited  # its lifetime (0.3 s), then abandon (0.5 s)
    finally:
        await store.aclose()


async def test_a_refresh_that_got_nothing_to_save_leaves_no_mark(redis_server: RedisServer) -> None:
    store = RedisGrantStore(redis_server.url)
    try:
        async with store.locked():
            await store.save(tokens(1), expected=None)
        async with store.locked() as lease:
            await store.load()
            await lease.confirm()
            assert "inflight" in raw(redis_server)
            # Close failed (5xx, timeout): no tokens, nothing to wait for.
        assert "inflight" not in raw(redis_server)
    finally:
        await store.aclose()


def _redis_ms(store: RedisGrantStore) -> int:
    import redis

    client = redis.Redis.from_url(store.url)
    try:
        seconds, micros = client.time()
        return int(seconds) * 1000 + int(micros) // 1000
    finally:
        client.close()


async def test_sealed_tokens_are_not_readable_and_never_overwritten_without_the_key(
    redis_server: RedisServer,
) -> None:
    sealed = RedisGrantStore(redis_server.url, secret=base64.b64decode(KEY))
    keyless = RedisGrantStore(redis_server.url)
    wrong = RedisGrantStore(redis_server.url, secret=os.urandom(32))
    grant = tokens()
    try:
        async with sealed.locked():
            version = await sealed.save(grant, expected=None)
        value = raw(redis_server)["grant"]
        assert grant.access_token not in value and str(grant.refresh_token) not in value
        assert "orga_1" not in value  # nothing of the grant in clear text
        assert await sealed.load() == (grant, version)
        for store in (keyless, wrong):
            with pytest.raises(TokenStoreError) as failed:
                await store.load()
            assert "--token-store-key-file" in str(failed.value)
        with pytest.raises(SealedGrant):
            async with keyless.locked():
                await keyless.save(tokens(2), expected=None)
        with pytest.raises(SealedGrant):
            async with keyless.locked():
                await keyless.clear()
        assert await sealed.load() == (grant, version)  # untouched
        # A value moved to another version (or key) does not open: it is bound to both.
        import redis

        client = redis.Redis.from_url(redis_server.url)
        client.hset("closeproxy:grant", "version", "forged")
        client.close()
        with pytest.raises(TokenStoreError, match="do not open"):
            await sealed.load()
    finally:
        for store in (sealed, keyless, wrong):
            await store.aclose()


async def test_an_unreachable_store_is_a_503_naming_it_without_the_password(
    redis_server: RedisServer,
) -> None:
    store = RedisGrantStore(redis_server.url, check_interval=0.1)
    try:
        async with store.locked():
            version = await store.save(tokens(), expected=None)
        assert await store.changed(version) is False
        redis_server.kill()
        await asyncio.sleep(0.3)  # a few failed background checks
        assert await store.changed(version) is False  # serve on with what is held
        for attempt in (store.load(), _lock(store)):
            with pytest.raises(TokenServiceUnavailable) as failed:
                await attempt
            message = str(failed.value)
            assert redis_server.public_url in message and PASSWORD not in message
            assert failed.value.code == "token_service_unavailable"
            assert failed.value.status == 503
        redis_server.start()  # AOF on: the grant is still there
        assert (await store.load()).version == version
    finally:
        await store.aclose()


async def _lock(store: RedisGrantStore) -> None:
    async with store.locked():
        pass


async def test_a_wrong_password_says_so(redis_server: RedisServer) -> None:
    store = RedisGrantStore(redis_server.url.replace(PASSWORD, "wrong"))
    try:
        with pytest.raises(TokenStoreError) as failed:
            await store.load()
        assert "refused the password" in str(failed.value)
        assert "wrong" not in str(failed.value)
    finally:
        await store.aclose()


async def test_changes_are_seen_within_the_check_interval_without_a_read_per_use(
    redis_server: RedisServer,
) -> None:
    reader = RedisGrantStore(redis_server.url, check_interval=0.2)
    writer = RedisGrantStore(redis_server.url)
    try:
        async with writer.locked():
            v1 = await writer.save(tokens(1), expected=None)
        assert (await reader.load()).version == v1
        assert await reader.changed(v1) is False
        async with writer.locked():
            await writer.save(replace(tokens(2)), expected=v1)
        deadline = time.monotonic() + 2
        while not await reader.changed(v1):
            assert time.monotonic() < deadline, "the change went unnoticed"
            await asyncio.sleep(0.05)
    finally:
        await reader.aclose()
        await writer.aclose()


def test_the_redis_value_is_a_hash_with_version_and_grant(redis_server: RedisServer) -> None:
    async def save() -> str:
        store = RedisGrantStore(redis_server.url)
        try:
            async with store.locked():
                return await store.save(tokens(), expected=None)
        finally:
            await store.aclose()

    version = asyncio.run(save())
    stored = raw(redis_server)
    assert stored["version"] == version
    assert TokenSet.from_json(json.loads(stored["grant"])).user_id == "user_1"
