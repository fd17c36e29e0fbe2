"""GrantCache: how often it asks the store whether the grant changed."""

from __future__ import annotations

import time
from pathlib import Path

from closeproxy.file_store import FileGrantStore
from closeproxy.grant import TokenSet, Version
from closeproxy.grant_cache import CHECK_INTERVAL, GrantCache


class CountingStore(FileGrantStore):
    """A token file whose change checks are counted."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.checks = 0

    async def changed(self, since: Version | None) -> bool:
        self.checks += 1
        return await super().changed(since)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def grant(access_token: str) -> TokenSet:
    now = time.time()
    return TokenSet(
        access_token=access_token,
        refresh_token=f"refresh-{access_token}",
        expires_at=now + 3600,
        obtained_at=now,
        api_url="https://api.close.com",
    )


async def test_a_usable_grant_is_checked_at_most_once_per_interval(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "tokens.json")
    store.write(grant("first-access-token"))
    clock = Clock()
    cache = GrantCache(store, clock=clock)
    for _ in range(1000):  # a thousand requests within the same instant
        assert (await cache.snapshot()) == store.read()
    assert store.checks == 0  # the first use reads the file; no check needed
    store.write(grant("second-access-token"))  # another process logs in
    clock.now += CHECK_INTERVAL / 2
    held = await cache.snapshot()
    assert held is not None and held.access_token == "first-access-token"
    assert store.checks == 0
    clock.now += CHECK_INTERVAL / 2
    held = await cache.snapshot()
    assert held is not None and held.access_token == "second-access-token"
    assert store.checks == 1
    for _ in range(1000):
        await cache.snapshot()
    assert store.checks == 1


async def test_a_missing_or_rejected_grant_is_checked_on_every_use(tmp_path: Path) -> None:
    """A proxy answering 401 comes back with the very next request after a login."""
    store = CountingStore(tmp_path / "tokens.json")
    clock = Clock()
    cache = GrantCache(store, clock=clock)
    assert await cache.snapshot() is None
    assert await cache.snapshot() is None
    assert store.checks == 1
    store.write(grant("first-access-token").rejected("invalid_grant"))
    held = await cache.snapshot()
    assert held is not None and held.refresh_rejected == "invalid_grant"
    store.write(grant("second-access-token"))
    held = await cache.snapshot()
    assert held is not None and held.access_token == "second-access-token"
    assert store.checks == 3
