"""TokenProvider: the one place that hands out a current access token.

It refreshes once at a time inside the process (one shared task) and across processes
(the store's lock, then a re-read), and it is told which token Close rejected, so a
refresh that another request or another process already did is reused, not repeated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import LoginRequired, TokenRequestRejected, TokenServiceUnavailable
from .grant import GrantStore, LockLost, RefreshInFlight, TokenSet
from .grant_cache import GrantCache
from .oauth import OAuthClient
from .refresh_policy import (
    IF_DUE,
    Force,
    RefreshIntent,
    Rejected,
    cannot_refresh_error,
    must_refresh_at,
    refresh_due_at,
    satisfies,
    usable,
)

log = logging.getLogger("closeproxy.tokens")

# After a failed background refresh, wait this long before trying again in the
# background; requests keep using the still-valid token meanwhile.
BACKGROUND_RETRY = 30.0
# How long to answer a refusal of our client credentials without asking Close again.
REFUSAL_COOLDOWN = 10.0
DEFAULT_LOGIN_ADVICE = "run `closeproxy login`"
# How long a client-facing request waits for a refresh; the refresh itself goes on.
REQUEST_WAIT = 15.0
# How often an idle process retries saving tokens the store refused (their refresh
# token is only in its memory), and how long a refresh waits for another process that
# may hold such tokens (RefreshInFlight) before it fails.
UNSAVED_RETRY = 1.0
IN_FLIGHT_WAIT = 60.0


@dataclass
class Counters:
    """What the provider has done, for /admin/status."""

    refreshes: int = 0
    refresh_failures: int = 0
    refresh_rejected: int = 0  # of the failures: Close answered invalid_grant
    adopted_from_disk: int = 0


class TokenProvider:
    """Hands out access tokens; refreshes them single-flight across tasks and processes."""

    def __init__(
        self,
        store: GrantStore,
        oauth: OAuthClient | None,
        *,
        margin: float,
        api_url: str,
        clock: Callable[[], float] = time.time,
        login_advice: str = DEFAULT_LOGIN_ADVICE,
        log_failures: bool = True,
        request_wait: float | None = REQUEST_WAIT,
    ) -> None:
        self.store = store
        self.cache = GrantCache(store)
        # What a client that is not logged in is told to do (it depends on where we run).
        self.login_advice = login_advice
        # False where the caller reports a failed refresh itself (the CLI), not to say it twice.
        self.log_failures = log_failures
        self.oauth = oauth
        self.margin = margin
        self.api_url = api_url
        self._counters = Counters()
        # Why the latest refresh failed, until one succeeds (for the dashboard).
        self.last_refresh_error: str | None = None
        self._clock = clock
        self.request_wait = request_wait
        self._inflight: asyncio.Task[tuple[TokenSet, bool]] | None = None
        self._save_retry: asyncio.Task[None] | None = None
        self._background_after = 0.0
        # A token Close refused right after a refresh: refreshing again would not help.
        self._hopeless: str | None = None
        # Close refused our client credentials: answer the same until this time passes.
        self._refusal: tuple[float, TokenRequestRejected] | None = None

    def __repr__(self) -> str:
        return f"TokenProvider(store={self.store!r})"

    @property
    def counters(self) -> Counters:
        self._counters.adopted_from_disk = self.cache.adopted_from_store
        return self._counters

    @property
    def unsaved(self) -> TokenSet | None:
        """Tokens Close issued that the store refused, if any; their predecessors are spent."""
        return self.cache.unsaved

    @property
    def save_error(self) -> str | None:
        """Why the store last refused new tokens; names the store, never a token."""
        return self.cache.save_error

    async def snapshot(self) -> TokenSet | None:
        """The current tokens: a cheap change check of the store, a read only if it changed."""
        return await self.cache.snapshot()

    def usable(self, tokens: TokenSet | None) -> TokenSet:
        """The tokens if this proxy may use them, else the error that says why not."""
        return usable(tokens, store=self.store, api_url=self.api_url, advice=self.login_advice)

    # --- handing out tokens -------------------------------------------------------------

    async def current(self, *, wait_for_refresh: bool = False) -> TokenSet:
        """A token to send now, refreshed first if it is about to expire.

        Inside the refresh margin the refresh runs in the background and the still-valid
        token is used, unless `wait_for_refresh` asks for the new one.
        """
        tokens = self.usable(await self.snapshot())
        now = self._clock()
        if now < refresh_due_at(tokens, self.margin):
            return tokens  # unsaved tokens are retried by _save_unsaved_loop, not here
        if not self._can_refresh(tokens):
            if now < tokens.expires_at:
                return tokens
            raise cannot_refresh_error(tokens)
        if now < must_refresh_at(tokens) and not wait_for_refresh:
            if now >= self._background_after:
                log.debug(
                    "access token expires in %.0f s; refreshing in the background",
                    tokens.expires_in(now),
                )
                self._start_flight(Rejected(tokens.access_token))
            return tokens
        return await self.refresh(Rejected(tokens.access_token))

    async def refresh(self, intent: RefreshIntent) -> TokenSet:
        """New tokens for one intent: FORCE, IF_DUE or Rejected(<access token>).

        Every caller shares one refresh task. A caller that joins a refresh started for
        another intent checks the outcome against its own and, if it falls short (the
        token it holds came back, or a forced refresh found nothing to do), starts its own.
        """
        forced = isinstance(intent, Force)
        for _ in range(4):
            if self._inflight is None:
                if self._refusal is not None and self._clock() < self._refusal[0]:
                    raise TokenRequestRejected(str(self._refusal[1]))
                if not forced:
                    tokens = await self.snapshot()
                    if tokens is not None and self._satisfies(tokens, intent):
                        return tokens
                self._start_flight(intent)
            assert self._inflight is not None
            tokens, refreshed = await self._wait_for(self._inflight)
            if refreshed or (not forced and self._satisfies(tokens, intent)):
                return tokens
        raise TokenServiceUnavailable(
            "other refreshes kept finishing without the tokens this request needs: try again"
        )

    async def _wait_for(self, flight: asyncio.Task[tuple[TokenSet, bool]]) -> tuple[TokenSet, bool]:
        # shield: a client that hangs up or gives up must not cancel a refresh already sent
        # to Close, which has rotated the refresh token and will answer with the new one.
        if self.request_wait is None:
            return await asyncio.shield(flight)
        try:
            return await asyncio.wait_for(asyncio.shield(flight), self.request_wait)
        except TimeoutError:
            raise TokenServiceUnavailable(
                f"Close's token endpoint has not answered a token refresh for "
                f"{self.request_wait:g} s; the refresh is still in progress and its tokens "
                "will be saved when Close answers: retry in a few seconds"
            ) from None

    def note_replay_rejected(self, token: str) -> None:
        """Close refused a token we had just refreshed: stop refreshing on its 401s."""
        self._hopeless = token

    def should_refresh_on_401(self, token: str) -> bool:
        return token != self._hopeless

    async def aclose(self) -> None:
        """Let a refresh in progress finish writing its tokens; save unsaved ones if we can."""
        if self._save_retry is not None:
            self._save_retry.cancel()
            await asyncio.gather(self._save_retry, return_exceptions=True)
        if self._inflight is not None:
            await asyncio.gather(self._inflight, return_exceptions=True)
        await self.cache.flush()

    # --- the refresh itself ----------------------------------------------------------

    def _satisfies(self, tokens: TokenSet, intent: RefreshIntent) -> bool:
        return satisfies(tokens, intent, margin=self.margin, now=self._clock())

    def _can_refresh(self, tokens: TokenSet) -> bool:
        return self.oauth is not None and tokens.refresh_token is not None

    def _start_flight(self, intent: RefreshIntent) -> None:
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh_locked(intent))
            self._inflight.add_done_callback(self._flight_done)

    def _flight_done(self, task: asyncio.Task[tuple[TokenSet, bool]]) -> None:
        self._inflight = None
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here so a flight nobody awaited logs nothing twice
        if exc is None:
            self._refusal = None
            self.last_refresh_error = None
            return
        self._counters.refresh_failures += 1
        repeated = self.last_refresh_error == str(exc)
        self.last_refresh_error = str(exc)
        now = self._clock()
        self._background_after = now + BACKGROUND_RETRY
        if isinstance(exc, TokenRequestRejected):
            # Close will refuse the same credentials again: do not ask at request rate.
            self._refusal = (now + REFUSAL_COOLDOWN, exc)
        if self.log_failures:
            # The same failure again (a store down while its save is retried each second)
            # is logged once, at debug level after that.
            log.log(logging.DEBUG if repeated else logging.WARNING, "token refresh failed: %s", exc)

    def _retry_unsaved(self) -> None:
        """Retry saving unsaved tokens in the background, traffic or not, until they are
        saved or the store holds newer ones: until then only this process can refresh."""
        if self._save_retry is None or self._save_retry.done():
            self._save_retry = asyncio.ensure_future(self._save_unsaved_loop())

    async def _save_unsaved_loop(self) -> None:
        while self.cache.unsaved is not None:
            await asyncio.sleep(UNSAVED_RETRY)
            if self.cache.unsaved is None:
                return
            if self._inflight is None:
                self._start_flight(IF_DUE)  # saves them first, under the lock
            if self._inflight is not None:
                await asyncio.gather(asyncio.shield(self._inflight), return_exceptions=True)

    async def _refresh_locked(self, intent: RefreshIntent) -> tuple[TokenSet, bool]:
        """The tokens, and whether Close was asked for them; waits (lock released) while
        another process may hold unsaved tokens of this grant."""
        deadline = time.monotonic() + IN_FLIGHT_WAIT
        logged = False
        while True:
            try:
                return await self._refresh_once(intent)
            except RefreshInFlight as exc:
                if time.monotonic() + exc.retry_after > deadline:
                    raise
                if not logged:
                    log.warning("%s", exc)
                    logged = True
                await asyncio.sleep(exc.retry_after)

    async def _refresh_once(self, intent: RefreshIntent) -> tuple[TokenSet, bool]:
        async with self.store.locked() as lease:
            # Another process may have refreshed while we waited for the lock.
            tokens = self.usable(await self.cache.latest_under_lock())
            version = self.cache.version
            if not isinstance(intent, Force) and self._satisfies(tokens, intent):
                return tokens, False
            if self.oauth is None or tokens.refresh_token is None:
                raise cannot_refresh_error(tokens)
            try:
                await lease.confirm()  # never send a refresh token without holding the lock
            except LockLost as exc:
                # Paused past the lock's lifetime: another process may have refreshed and
                # spent this refresh token. Send nothing; the caller reads the store again.
                log.warning("%s", exc)
                return self.usable(await self.cache.latest_under_lock()), False
            sent_at = self._clock()
            try:
                reply = await self.oauth.refresh(tokens.refresh_token)
            except LoginRequired:
                self._counters.refresh_rejected += 1
                # Record it in the store so no process spends another request on it.
                if await self.cache.store_rejected(tokens, expected=version):
                    raise
                return self.usable(self.cache.tokens), True  # newer tokens in the store
            fresh = TokenSet.from_reply(
                reply, received_at=sent_at, api_url=self.api_url, previous=tokens
            )
            self._counters.refreshes += 1
            # Stored before anyone uses it where possible: a lost refresh token is a re-login.
            if not await self.cache.store_fresh(fresh, expected=version):
                self._retry_unsaved()
                return fresh, True
            log.info(
                "refreshed the access token; it expires in %.0f s", fresh.expires_in(self._clock())
            )
            return self.usable(self.cache.tokens), True
