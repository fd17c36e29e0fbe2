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
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from .errors import (
    ClientNotConfigured,
    GrantMismatch,
    LoginRequired,
    ServiceError,
    TokenRequestRejected,
    TokenServiceUnavailable,
    TokenStoreError,
)
from .logs import register_secret
from .oauth import OAuthClient
from .store import Fingerprint, TokenSet, TokenStore

log = logging.getLogger("closeproxy.tokens")

# After a failed background refresh, wait this long before trying again in the
# background; requests keep using the still-valid token meanwhile.
BACKGROUND_RETRY = 30.0
# A token this close to expiry is refreshed before use, not in the background.
MIN_VALIDITY = 5.0
# How often to retry saving tokens the disk refused, and how long to answer a refusal of
# our client credentials without asking Close again.
SAVE_RETRY = 5.0
REFUSAL_COOLDOWN = 10.0
DEFAULT_LOGIN_ADVICE = "run `closeproxy login`"
# How long a client-facing request waits for a refresh; the refresh itself goes on.
REQUEST_WAIT = 15.0


@dataclass(frozen=True)
class RefreshIntent:
    """Why new tokens are wanted, which decides what tokens at hand already satisfy.

    force     ask Close for new tokens whatever the ones at hand look like
    rejected  Close refused this access token: any other, not yet due, will do
    neither   refresh only if the tokens at hand are due
    """

    force: bool = False
    rejected: str | None = None


IF_DUE = RefreshIntent()
FORCE = RefreshIntent(force=True)


@dataclass(frozen=True)
class RevokeOutcome:
    """What `revoke` managed: Close told, local state wiped, and if not, why."""

    had_grant: bool
    revoked_at_close: bool = False
    wiped: bool = False
    problem: str | None = None


@dataclass
class Counters:
    """What the provider has done, for /admin/status."""

    refreshes: int = 0
    refresh_failures: int = 0
    refresh_rejected: int = 0  # of the failures: Close answered invalid_grant
    adopted_from_disk: int = 0


def refresh_due_at(tokens: TokenSet, margin: float) -> float:
    """When to start refreshing; never more than half the lifetime early."""
    return tokens.expires_at - min(margin, max(tokens.lifetime, 0.0) / 2)


def must_refresh_at(tokens: TokenSet) -> float:
    """After this a request waits for the refresh instead of using the old token."""
    return tokens.expires_at - min(MIN_VALIDITY, max(tokens.lifetime, 0.0) / 10)


class TokenProvider:
    """Hands out access tokens; refreshes them single-flight across tasks and processes."""

    def __init__(
        self,
        store: TokenStore,
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
        # What a client that is not logged in is told to do (it depends on where we run).
        self.login_advice = login_advice
        # False where the caller reports a failed refresh itself (the CLI), not to say it twice.
        self.log_failures = log_failures
        self.oauth = oauth
        self.margin = margin
        self.api_url = api_url
        self.counters = Counters()
        # Why the latest refresh failed, until one succeeds (for the dashboard).
        self.last_refresh_error: str | None = None
        self._clock = clock
        self.request_wait = request_wait
        # Why the disk last refused new tokens; names the file, never a token.
        self.save_error: str | None = None
        self._tokens: TokenSet | None = None
        self._fingerprint: Fingerprint | None = None
        self._loaded = False
        # Tokens Close issued that could not be saved: newer than the file, whose refresh
        # token is already spent. Served from memory; saved before any further refresh.
        self._unsaved: TokenSet | None = None
        self._next_save_attempt = 0.0
        self._inflight: asyncio.Task[tuple[TokenSet, bool]] | None = None
        self._background_after = 0.0
        # A token Close refused right after a refresh: refreshing again would not help.
        self._hopeless: str | None = None
        # Close refused our client credentials: answer the same until this time passes.
        self._refusal: tuple[float, TokenRequestRejected] | None = None

    def __repr__(self) -> str:
        return f"TokenProvider(store={self.store!r})"

    # --- reading the current state ------------------------------------------------------

    def snapshot(self) -> TokenSet | None:
        """The current tokens: one stat of the file, a read only if it changed."""
        fingerprint = self.store.fingerprint()
        if self._unsaved is not None:
            if fingerprint == self._fingerprint:
                return self._unsaved
            # Another process wrote the file after our save failed (a new login, most
            # likely): its tokens are newer than ours, which must never overwrite them.
            log.warning(
                "token file %s changed on disk; dropping the tokens that could not be saved",
                self.store.path,
            )
            self._unsaved = None
        if not self._loaded or fingerprint != self._fingerprint:
            tokens, fingerprint = self.store.load_with_fingerprint()
            if self._loaded:
                self.counters.adopted_from_disk += 1
                log.info("token file %s changed on disk; using its tokens", self.store.path)
            self._adopt(tokens, fingerprint)
        return self._tokens

    def _adopt(self, tokens: TokenSet | None, fingerprint: Fingerprint | None) -> None:
        if tokens is not None and tokens is not self._tokens:
            register_secret(tokens.access_token)
            register_secret(tokens.refresh_token)
        self._tokens, self._fingerprint, self._loaded = tokens, fingerprint, True

    def _usable(self, tokens: TokenSet | None) -> TokenSet:
        """The tokens if this proxy may use them, else the error that says why not."""
        if tokens is None:
            raise LoginRequired(f"not logged in to Close: {self.login_advice}")
        issuer = tokens.api_url.rstrip("/")
        if issuer and issuer != self.api_url.rstrip("/"):
            # Never send a grant to a server that did not issue it.
            raise GrantMismatch(
                f"the stored tokens were issued by {issuer}, but this closeproxy talks to "
                f"{self.api_url}: set --api-url back to {issuer}, or run `closeproxy login` "
                f"to log in to {self.api_url}"
            )
        if tokens.refresh_rejected:
            raise _rejected_error()
        return tokens

    # --- handing out tokens -------------------------------------------------------------

    async def current(self, *, wait_for_refresh: bool = False) -> TokenSet:
        """A token to send now, refreshed first if it is about to expire.

        Inside the refresh margin the refresh runs in the background and the still-valid
        token is used, unless `wait_for_refresh` asks for the new one.
        """
        tokens = self._usable(self.snapshot())
        now = self._clock()
        if now < refresh_due_at(tokens, self.margin):
            if self._unsaved is not None and now >= self._next_save_attempt:
                self._start_flight(IF_DUE)  # try to save them again, in the background
            return tokens
        if not self._can_refresh(tokens):
            if now < tokens.expires_at:
                return tokens
            raise self._cannot_refresh_error(tokens)
        if now < must_refresh_at(tokens) and not wait_for_refresh:
            if now >= self._background_after:
                log.debug(
                    "access token expires in %.0f s; refreshing in the background",
                    tokens.expires_in(now),
                )
                self._start_flight(RefreshIntent(rejected=tokens.access_token))
            return tokens
        return await self.refresh(rejected=tokens.access_token)

    async def refresh(self, rejected: str | None = None, *, force: bool = False) -> TokenSet:
        """New tokens for one intent: `force`, `rejected=<access token>`, or neither (if due).

        Every caller shares one refresh task. A caller that joins a refresh started for
        another intent checks the outcome against its own and, if it falls short (the
        token it holds came back, or a forced refresh found nothing to do), starts its own.
        """
        intent = RefreshIntent(force=force, rejected=rejected)
        for _ in range(4):
            if self._inflight is None:
                if self._refusal is not None and self._clock() < self._refusal[0]:
                    raise TokenRequestRejected(str(self._refusal[1]))
                if not intent.force:
                    tokens = self.snapshot()
                    if tokens is not None and self._satisfies(tokens, intent):
                        return tokens
                self._start_flight(intent)
            assert self._inflight is not None
            tokens, refreshed = await self._wait_for(self._inflight)
            if refreshed or (not intent.force and self._satisfies(tokens, intent)):
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

    @property
    def unsaved(self) -> TokenSet | None:
        """Tokens Close issued that the disk refused, if any; their predecessors are spent."""
        return self._unsaved

    def note_replay_rejected(self, token: str) -> None:
        """Close refused a token we had just refreshed: stop refreshing on its 401s."""
        self._hopeless = token

    def should_refresh_on_401(self, token: str) -> bool:
        return token != self._hopeless

    async def revoke(self) -> RevokeOutcome:
        """Wipe the local grant, then revoke it at Close.

        The wipe comes first and under the lock; telling Close happens after, so a
        Close that does not answer holds up nobody, and an interrupted revoke still
        leaves nothing usable behind.
        """
        await self.aclose()
        async with self.store.locked():
            try:
                tokens = self._unsaved or self.store.load()
            except TokenStoreError:
                wiped = self.store.clear()
                self._unsaved = None
                self._adopt(None, None)
                return RevokeOutcome(
                    had_grant=True,
                    wiped=wiped,
                    problem="the token file could not be read, so Close was not told; it was "
                    "wiped, but a grant may still be active at Close: remove the app's access "
                    "in Close's settings",
                )
            if tokens is None:
                self._adopt(None, None)
                return RevokeOutcome(had_grant=False)
            self._usable(replace(tokens, refresh_rejected=None))  # never to a foreign server
            wiped = self.store.clear()
            self._unsaved = None
            self._adopt(None, None)
        if self.oauth is None:
            return RevokeOutcome(
                had_grant=True,
                wiped=wiped,
                problem="no client id and secret are configured, so Close was not told: the "
                "local tokens were wiped, but the grant may still be active at Close: remove "
                "the app's access in Close's settings",
            )
        try:
            # The refresh token first: revoking it ends the whole grant.
            for token in (tokens.refresh_token, tokens.access_token):
                if token:
                    await self.oauth.revoke(token)
        except ServiceError as exc:
            log.warning("revoking at Close failed: %s", exc)
            return RevokeOutcome(
                had_grant=True,
                wiped=wiped,
                problem=f"{exc}; the local tokens were wiped anyway, but the grant may still "
                "be active at Close: remove the app's access in Close's settings",
            )
        return RevokeOutcome(had_grant=True, revoked_at_close=True, wiped=wiped)

    async def aclose(self) -> None:
        """Let a refresh in progress finish writing its tokens."""
        if self._inflight is not None:
            await asyncio.gather(self._inflight, return_exceptions=True)
        if self._unsaved is None:
            return
        try:
            async with self.store.locked(wait=5.0):
                if self.store.fingerprint() != self._fingerprint:
                    self._unsaved = None  # a newer login was written meanwhile: keep it
                    return
                saved = self._unsaved
                self._adopt(saved, await asyncio.to_thread(self.store.save, saved))
                self._unsaved = None
            log.info("saved the tokens that could not be saved before to %s", self.store.path)
        except TokenStoreError as exc:
            self.save_error = str(exc)
            log.error(
                "the newest tokens could still not be saved (%s): they are lost when this "
                "process exits, and %s holds a refresh token Close has already replaced, so "
                "the next start needs `closeproxy login`",
                exc,
                self.store.path,
            )

    # --- the refresh itself ----------------------------------------------------------

    def _satisfies(self, tokens: TokenSet, intent: RefreshIntent) -> bool:
        """True when `tokens` already meet a non-forced intent."""
        return (
            tokens.access_token != intent.rejected
            and not tokens.refresh_rejected
            and self._clock() < refresh_due_at(tokens, self.margin)
        )

    def _can_refresh(self, tokens: TokenSet) -> bool:
        return self.oauth is not None and tokens.refresh_token is not None

    def _cannot_refresh_error(self, tokens: TokenSet) -> ServiceError:
        if tokens.refresh_token is None:
            return LoginRequired(
                "the access token expired and Close gave no refresh token (the OAuth app "
                "lacks offline_access): run `closeproxy login` again"
            )
        return ClientNotConfigured(
            "the access token expired and cannot be refreshed because no OAuth client is "
            "configured: set the client id and secret of your Close OAuth app "
            "(CLOSEPROXY_CLIENT_ID and CLOSEPROXY_CLIENT_SECRET, or client_id and "
            "client_secret_file in the config file) and start closeproxy again"
        )

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
        self.counters.refresh_failures += 1
        self.last_refresh_error = str(exc)
        now = self._clock()
        self._background_after = now + BACKGROUND_RETRY
        self._next_save_attempt = now + SAVE_RETRY
        if isinstance(exc, TokenRequestRejected):
            # Close will refuse the same credentials again: do not ask at request rate.
            self._refusal = (now + REFUSAL_COOLDOWN, exc)
        if self.log_failures:
            log.warning("token refresh failed: %s", exc)

    async def _latest_under_lock(self) -> TokenSet | None:
        """The newest tokens, with the lock held: unsaved ones saved first, else the file."""
        if self._unsaved is not None and self.store.fingerprint() == self._fingerprint:
            # Raises while the disk still refuses: refreshing from the file would spend a
            # refresh token Close already rotated away.
            saved = self._unsaved
            self._adopt(saved, await asyncio.to_thread(self.store.save, saved))
            self._unsaved = None
            log.info("saved the tokens that could not be saved before to %s", self.store.path)
            return saved
        self._unsaved = None  # if set, a newer file replaced it: the file wins
        on_disk, fingerprint = self.store.load_with_fingerprint()
        self._adopt(on_disk, fingerprint)
        return on_disk

    async def _refresh_locked(self, intent: RefreshIntent) -> tuple[TokenSet, bool]:
        """The tokens, and whether Close was asked for them."""
        async with self.store.locked():
            # Another process may have refreshed while we waited for the lock.
            tokens = self._usable(await self._latest_under_lock())
            if not intent.force and self._satisfies(tokens, intent):
                return tokens, False
            if self.oauth is None or tokens.refresh_token is None:
                raise self._cannot_refresh_error(tokens)
            sent_at = self._clock()
            try:
                reply = await self.oauth.refresh(tokens.refresh_token)
            except LoginRequired:
                self.counters.refresh_rejected += 1
                # Record it in the file so no process spends another request on it.
                dead = tokens.rejected("invalid_grant")
                self._adopt(dead, await asyncio.to_thread(self.store.save, dead))
                raise
            fresh = TokenSet.from_reply(
                reply, received_at=sent_at, api_url=self.api_url, previous=tokens
            )
            self.counters.refreshes += 1
            # On disk before anyone uses it where possible: a lost refresh token is a re-login.
            try:
                fingerprint = await asyncio.to_thread(self.store.save, fresh)
            except TokenStoreError as exc:
                self.save_error = str(exc)
                self._unsaved = fresh
                self._adopt(fresh, self._fingerprint)
                self._next_save_attempt = self._clock() + SAVE_RETRY
                log.error(
                    "Close issued new tokens but they could not be saved (%s); only this process "
                    "holds them now, and it retries the save before any further refresh",
                    exc,
                )
                return fresh, True
            self._adopt(fresh, fingerprint)
            log.info(
                "refreshed the access token; it expires in %.0f s", fresh.expires_in(self._clock())
            )
            return fresh, True


def _rejected_error() -> LoginRequired:
    return LoginRequired(
        "Close rejected the stored refresh token (invalid_grant), so the grant is gone: "
        "run `closeproxy login` to log in again"
    )


def status_document(
    tokens: TokenSet | None, store: TokenStore, now: float | None = None
) -> dict[str, Any]:
    """What `closeproxy status --json` prints; never a secret."""
    now = time.time() if now is None else now
    doc: dict[str, Any] = {"logged_in": False, "token_file": str(store.path)}
    if tokens is None:
        doc["problem"] = "not logged in: run `closeproxy login`"
        return doc
    expires_in = tokens.expires_in(now)
    doc.update(
        logged_in=tokens.refresh_rejected is None,
        organization_id=tokens.organization_id or None,
        user_id=tokens.user_id or None,
        scope=tokens.scope or None,
        api_url=tokens.api_url or None,
        expires_at=datetime.fromtimestamp(tokens.expires_at, UTC).isoformat(timespec="seconds"),
        expires_in=int(expires_in),
        access_token_valid=expires_in > 0 and tokens.refresh_rejected is None,
        can_refresh=tokens.refresh_token is not None and tokens.refresh_rejected is None,
    )
    if tokens.refresh_rejected:
        doc["problem"] = "Close rejected the refresh token (invalid_grant): run `closeproxy login`"
    elif tokens.refresh_token is None:
        doc["problem"] = (
            "no refresh token (the OAuth app lacks offline_access): the session ends when "
            "the access token expires"
        )
    return doc
