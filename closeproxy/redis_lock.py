"""The Redis token store's lock, and the in-flight mark that fences a refresh token.

- The lock is `SET NX PX` with a random owner value, released and extended only by its
  owner (server-side scripts). It lives `ttl` seconds and is extended every ttl / 4
  while the holder lives, so an alive holder keeps it for as long as its refresh runs
  and a dead one frees it within `ttl`.
- Confirming, just before a refresh token is sent, checks that the lock is still ours and
  the grant still the version we read, and writes the in-flight mark
  (redis_scripts.py): the lock alone cannot protect tokens Close issued that did not
  reach Redis (it crashed, or someone deleted the lock key), the mark does.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from . import redis_scripts
from .errors import TokenStoreError
from .grant import LockLost, RefreshInFlight

if TYPE_CHECKING:
    from .redis_store import RedisGrantStore

# After a stale mark is first seen, how long its owner has to come back (it retries its
# save every second) before another process may send the refresh token.
ABANDON = 4.0


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait for it, but never forever: a cancellation that a
    library swallows (redis-py inside its own timeouts) must not hang a release or exit;
    the task also checks a flag and ends by itself at its next wake-up."""
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: it was logged where it happened


class RedisLease:
    """The lock, held by one `async with store.locked()`."""

    def __init__(self, lock: RedisLock, owner: str) -> None:
        self._lock = lock
        self.owner = owner
        self.lost = False
        self.released = False
        self.marked = False  # our in-flight mark is written
        self.wrote = False  # a write was tried while held: the mark is the write's to clear

    async def confirm(self) -> None:
        if self.lost:
            raise LockLost(f"the lock in {self._lock.store.describe()} ran out while it was held")
        await self._lock.confirm(self)


class RedisLock:
    """The lock at `<key>:lock` and the mark in the grant hash, for one store."""

    def __init__(self, store: RedisGrantStore, ttl: float, abandon: float = ABANDON) -> None:
        self.store = store
        self.key = f"{store.key}:lock"
        self.ttl = ttl
        self.abandon = abandon
        # Names this process in marks: its own mark (left by a refresh that failed with
        # nothing to save) never holds it back.
        self.process_id = secrets.token_hex(8)
        self.leases: set[RedisLease] = set()

    @contextlib.asynccontextmanager
    async def held(self, wait: float) -> AsyncIterator[RedisLease]:
        owner = secrets.token_hex(16)
        ttl_ms = int(self.ttl * 1000)
        deadline = time.monotonic() + wait
        delay = 0.01
        redis = self.store.client()
        while not await self.store.call(
            "take the lock", redis.set(self.key, owner, nx=True, px=ttl_ms)
        ):
            if time.monotonic() >= deadline:
                raise TokenStoreError(
                    f"another closeproxy process has held the lock {self.key} in "
                    f"{self.store.describe()} for over {wait:g} s: check for a stuck process"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        lease = RedisLease(self, owner)
        keeper = asyncio.ensure_future(self._keep(lease, ttl_ms))
        self.leases.add(lease)
        try:
            yield lease
        finally:
            self.leases.discard(lease)
            lease.released = True
            await stop_task(keeper)
            # Unreachable: the lock runs out by itself within ttl, a mark is abandoned.
            with contextlib.suppress(TokenStoreError):
                if lease.marked and not lease.wrote:
                    await self.store.call(
                        "clear the in-flight mark",
                        redis.eval(redis_scripts.UNMARK, 1, self.store.key, self.process_id),
                    )
                await self.store.call(
                    "release the lock", redis.eval(redis_scripts.RELEASE, 1, self.key, owner)
                )

    def note_write(self) -> None:
        """A write was tried: if it failed, the mark must stay (unsaved tokens exist)."""
        for lease in self.leases:
            lease.wrote = True

    async def _keep(self, lease: RedisLease, ttl_ms: int) -> None:
        """Extend the lock and renew our mark's beat while the holder lives."""
        while not lease.released:
            await asyncio.sleep(self.ttl / 4)
            if lease.released:
                return
            try:
                kept = await self.store.call(
                    "extend the lock",
                    self.store.client().eval(
                        redis_scripts.EXTEND,
                        2,
                        self.key,
                        self.store.key,
                        lease.owner,
                        ttl_ms,
                        self.process_id,
                    ),
                )
            except TokenStoreError:
                continue  # it may still hold; confirm() asks Redis before anything is sent
            if not kept and not lease.lost:
                lease.lost = True  # keep beating: a refresh sent before may still answer

    async def confirm(self, lease: RedisLease) -> None:
        """Raise LockLost unless the lock is the lease's and the grant as last read,
        RefreshInFlight while another process's mark stands; else write our mark."""
        describe = self.store.describe()
        answer = await self.store.call(
            "check the lock",
            self.store.client().eval(
                redis_scripts.CONFIRM,
                2,
                self.key,
                self.store.key,
                lease.owner,
                self.store.read_version or "",
                self.process_id,
                int(self.ttl * 1000),
                int(self.abandon * 1000),
            ),
        )
        state = answer[0]
        if state == "lost":
            raise LockLost(
                f"the lock in {describe} ran out while this process held it (was it "
                "paused?): it sends nothing and reads the store again"
            )
        if state == "changed":
            raise LockLost(f"{describe} changed while this process held its lock")
        if state == "busy":
            raise RefreshInFlight(
                f"another closeproxy process sent the refresh token in {describe} to Close "
                "and has not stored the new tokens yet (was Redis restarted, or its lock "
                "deleted?): this process does not spend the same refresh token; it waits "
                f"for that process, or at most {self.ttl + self.abandon:g} s if it died",
                retry_after=min(1.0, max(0.05, float(answer[1]) / 1000)),
            )
        lease.marked = True
