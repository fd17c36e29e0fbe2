"""GrantCache: one process's copy of the stored grant, and the tokens the store refused.

Close rotates refresh tokens, so tokens it issued that the store could not save are
newer than the store's, whose refresh token is already spent. They are served from
memory and saved before any further refresh; a store that changed meanwhile (a new
login) wins over them.

Whether the store changed is asked at most once per CHECK_INTERVAL while the cached grant
is usable (not an os.stat per request); a missing or rejected grant is re-checked on every
use, so a new login elsewhere brings a failing proxy back at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from .errors import TokenServiceUnavailable, TokenStoreError
from .grant import GrantStore, StaleGrant, TokenSet, Version
from .logs import register_secret

log = logging.getLogger("closeproxy.tokens")

# Seconds a usable cached grant is trusted without asking the store whether it changed:
# a file replaced by another process (a new login, a refresh) is noticed within this.
CHECK_INTERVAL = 1.0
# Before exit, how long unsaved tokens are retried while the store is unreachable, and
# how often.
FLUSH_WAIT = 30.0
FLUSH_RETRY = 1.0


class GrantCache:
    """The tokens last read from or written to the store, with the version they had."""

    def __init__(
        self,
        store: GrantStore,
        *,
        check_interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.check_interval = check_interval
        self._clock = clock
        self._trusted_until = -math.inf  # no change check needed before this time
        self.tokens: TokenSet | None = None
        self.version: Version | None = None
        self.loaded = False
        # Tokens Close issued that could not be saved, and why the store refused them
        # (names the store, never a token).
        self.unsaved: TokenSet | None = None
        self.save_error: str | None = None
        self.adopted_from_store = 0

    async def snapshot(self) -> TokenSet | None:
        """The current tokens: a cheap change check (at most once per check_interval
        while the grant is usable), a read only if the store changed."""
        now = self._clock()
        held = self.current()
        if now < self._trusted_until and held is not None and not held.refresh_rejected:
            return held
        changed = await self.store.changed(self.version) if self.loaded else True
        self._trusted_until = now + self.check_interval
        if self.unsaved is not None:
            if not changed:
                return self.unsaved
            # Another process wrote the store after our save failed (a new login, most
            # likely): its tokens are newer than ours, which must never overwrite them.
            log.warning(
                "%s changed; dropping the tokens that could not be saved",
                self.store.describe(),
            )
            self.unsaved = None
        if changed:
            loaded = await self.store.load()
            if self.loaded:
                self.adopted_from_store += 1
                log.info("%s changed; using its tokens", self.store.describe())
            self.adopt(loaded.tokens, loaded.version)
        return self.tokens

    def current(self) -> TokenSet | None:
        """The tokens in memory, without asking the store."""
        return self.unsaved if self.unsaved is not None else self.tokens

    def adopt(self, tokens: TokenSet | None, version: Version | None) -> None:
        if tokens is not None and tokens is not self.tokens:
            register_secret(tokens.access_token)
            register_secret(tokens.refresh_token)
        self.tokens, self.version, self.loaded = tokens, version, True

    def forget(self) -> None:
        """After the grant was wiped."""
        self.unsaved = None
        self.adopt(None, None)

    async def latest_under_lock(self) -> TokenSet | None:
        """The newest tokens, with the lock held: unsaved ones saved first, else the store."""
        if self.unsaved is not None and not await self.store.changed(self.version):
            # Raises while the store still refuses: refreshing from the store would spend
            # a refresh token Close already rotated away.
            await self.save_unsaved()
            return self.tokens
        self.unsaved = None  # if set, newer tokens replaced it in the store: they win
        loaded = await self.store.load()
        self.adopt(loaded.tokens, loaded.version)
        return loaded.tokens

    async def save_unsaved(self) -> None:
        saved = self.unsaved
        assert saved is not None
        self.adopt(saved, await self.store.save(saved, expected=self.version))
        self.unsaved = None
        log.info("saved the tokens that could not be saved before to %s", self.store.describe())

    async def store_fresh(self, fresh: TokenSet, *, expected: Version | None) -> bool:
        """Save tokens Close just issued; False when the store refused (kept unsaved)."""
        try:
            version = await self.store.save(fresh, expected=expected)
        except StaleGrant:
            # Our lock ran out and another process stored newer tokens: they win.
            log.warning(
                "%s holds newer tokens than this refresh; using them", self.store.describe()
            )
            loaded = await self.store.load()
            self.adopt(loaded.tokens, loaded.version)
            return True
        except TokenStoreError as exc:
            self.save_error = str(exc)
            self.unsaved = fresh
            self.adopt(fresh, self.version)
            log.error(
                "Close issued new tokens but they could not be saved (%s); only this process "
                "holds them now, and it retries the save before any further refresh",
                exc,
            )
            return False
        self.adopt(fresh, version)
        return True

    async def store_rejected(self, tokens: TokenSet, *, expected: Version | None) -> bool:
        """Mark the grant dead after invalid_grant; False when the store holds newer tokens
        than the rejected ones (our lock ran out, another process refreshed): they live."""
        dead = tokens.rejected("invalid_grant")
        try:
            self.adopt(dead, await self.store.save(dead, expected=expected))
        except StaleGrant:
            loaded = await self.store.load()
            self.adopt(loaded.tokens, loaded.version)
            return False
        return True

    async def flush(self, wait: float = FLUSH_WAIT) -> None:
        """Before exit: save unsaved tokens unless the store changed, retrying for up to
        `wait` seconds while the store is unreachable (a Redis restarting)."""
        if self.unsaved is None:
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                await self._flush_once(max(deadline - time.monotonic(), 0.1))
                return
            except TokenStoreError as exc:
                # Only an unreachable store is worth waiting for (not a full disk).
                if (
                    not isinstance(exc, TokenServiceUnavailable)
                    or time.monotonic() + FLUSH_RETRY >= deadline
                ):
                    self._lost(exc)
                    return
                if self.save_error != str(exc):
                    log.warning(
                        "the newest tokens are not saved yet (%s); retrying for up to %.0f s",
                        exc,
                        deadline - time.monotonic(),
                    )
                self.save_error = str(exc)
                await asyncio.sleep(FLUSH_RETRY)

    async def _flush_once(self, wait: float) -> None:
        async with self.store.locked(wait=wait):
            if await self.store.changed(self.version):
                self.unsaved = None  # a newer login was written meanwhile: keep it
                return
            await self.save_unsaved()

    def _lost(self, exc: TokenStoreError) -> None:
        self.save_error = str(exc)
        log.error(
            "the newest tokens could still not be saved (%s): they are lost when this "
            "process exits, and %s holds a refresh token Close has already replaced, so "
            "the next start needs `closeproxy login`",
            exc,
            self.store.describe(),
        )
