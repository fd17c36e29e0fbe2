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
from datetime import UTC, datetime
from typing import Any

from .errors import LoginRequired, ServiceError, TokenRequestRejected
from .logs import register_secret
from .oauth import OAuthClient
from .store import Fingerprint, TokenSet, TokenStore

log = logging.getLogger("closeproxy.tokens")

# After a failed background refresh, wait this long before trying again in the
# background; requests keep using the still-valid token meanwhile.
BACKGROUND_RETRY = 30.0
# A token this close to expiry is refreshed before use, not in the background.
MIN_VALIDITY = 5.0


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
    ) -> None:
        self.store = store
        self.oauth = oauth
        self.margin = margin
        self.api_url = api_url
        self.counters = Counters()
        self._clock = clock
        self._tokens: TokenSet | None = None
        self._fingerprint: Fingerprint | None = None
        self._loaded = False
        self._inflight: asyncio.Task[TokenSet] | None = None
        self._background_after = 0.0
        # A token Close refused right after a refresh: refreshing again would not help.
        self._hopeless: str | None = None

    def __repr__(self) -> str:
        return f"TokenProvider(store={self.store!r})"

    # --- reading the current state ------------------------------------------------------

    def snapshot(self) -> TokenSet | None:
        """The tokens as they are on disk now (one stat; a read only if the file changed)."""
        fingerprint = self.store.fingerprint()
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

    # --- handing out tokens -------------------------------------------------------------

    async def current(self, *, wait_for_refresh: bool = False) -> TokenSet:
        """A token to send now, refreshed first if it is about to expire.

        Inside the refresh margin the refresh runs in the background and the still-valid
        token is used, unless `wait_for_refresh` asks for the new one.
        """
        tokens = self.snapshot()
        if tokens is None:
            raise LoginRequired(
                "not logged in to Close: run `closeproxy login`, or open /admin/login on "
                "this proxy in a browser"
            )
        if tokens.refresh_rejected:
            raise _rejected_error()
        now = self._clock()
        if now < refresh_due_at(tokens, self.margin):
            return tokens
        if not self._can_refresh(tokens):
            if now < tokens.expires_at:
                return tokens
            raise self._cannot_refresh_error(tokens)
        if now < must_refresh_at(tokens) and not wait_for_refresh:
            self._refresh_in_background(tokens)
            return tokens
        return await self.refresh(rejected=tokens.access_token)

    async def refresh(self, rejected: str | None = None) -> TokenSet:
        """Get tokens newer than `rejected`; None forces a refresh.

        Every caller shares one refresh task; callers that come after it finished see
        that the token they hold was already replaced and just take the new one.
        """
        if self._inflight is None:
            tokens = self.snapshot()
            if rejected is not None and tokens is not None and self._is_newer(tokens, rejected):
                return tokens
            self._inflight = asyncio.ensure_future(self._refresh_locked(rejected))
            self._inflight.add_done_callback(self._flight_done)
        # shield: a client that hangs up must not cancel a refresh others wait for, nor
        # leave a new refresh token unwritten.
        return await asyncio.shield(self._inflight)

    def note_replay_rejected(self, token: str) -> None:
        """Close refused a token we had just refreshed: stop refreshing on its 401s."""
        self._hopeless = token

    def should_refresh_on_401(self, token: str) -> bool:
        return token != self._hopeless

    async def revoke(self) -> RevokeOutcome:
        """Revoke the grant at Close and wipe the token file, whatever Close says."""
        if self._inflight is not None:
            await asyncio.gather(self._inflight, return_exceptions=True)
        async with self.store.locked():
            tokens, _ = self.store.load_with_fingerprint()
            if tokens is None:
                self._adopt(None, None)
                return RevokeOutcome(had_grant=False)
            problem: str | None = None
            revoked = False
            if self.oauth is None:
                problem = (
                    "no client id and secret are configured, so Close was not told: the grant "
                    "may still be active; remove the app's access in Close's settings"
                )
            else:
                try:
                    # The refresh token first: revoking it ends the whole grant.
                    for token in (tokens.refresh_token, tokens.access_token):
                        if token:
                            await self.oauth.revoke(token)
                    revoked = True
                except ServiceError as exc:
                    log.warning("revoking at Close failed: %s", exc)
                    problem = (
                        "Close could not be told (its revoke endpoint failed or was out of "
                        "reach); the local tokens were wiped anyway, but the grant may still be "
                        "active at Close: remove the app's access in Close's settings"
                    )
            wiped = self.store.clear()
            self._adopt(None, None)
        return RevokeOutcome(had_grant=True, revoked_at_close=revoked, wiped=wiped, problem=problem)

    async def aclose(self) -> None:
        """Let a refresh in progress finish writing its tokens."""
        if self._inflight is not None:
            await asyncio.gather(self._inflight, return_exceptions=True)

    # --- the refresh itself ----------------------------------------------------------

    def _is_newer(self, tokens: TokenSet, rejected: str) -> bool:
        return (
            tokens.access_token != rejected
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
        return TokenRequestRejected(
            "the access token expired and cannot be refreshed because no client id and "
            "secret are configured: set CLOSEPROXY_CLIENT_ID and CLOSEPROXY_CLIENT_SECRET"
        )

    def _refresh_in_background(self, tokens: TokenSet) -> None:
        if self._inflight is not None or self._clock() < self._background_after:
            return
        log.debug(
            "access token expires in %.0f s; refreshing in the background",
            tokens.expires_in(self._clock()),
        )
        self._inflight = asyncio.ensure_future(self._refresh_locked(tokens.access_token))
        self._inflight.add_done_callback(self._flight_done)

    def _flight_done(self, task: asyncio.Task[TokenSet]) -> None:
        self._inflight = None
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here so a flight nobody awaited logs nothing twice
        if exc is not None:
            self.counters.refresh_failures += 1
            self._background_after = self._clock() + BACKGROUND_RETRY
            log.warning("token refresh failed: %s", exc)

    async def _refresh_locked(self, rejected: str | None) -> TokenSet:
        async with self.store.locked():
            # Another process may have refreshed while we waited for the lock.
            tokens, fingerprint = self.store.load_with_fingerprint()
            self._adopt(tokens, fingerprint)
            if tokens is None:
                raise LoginRequired(
                    "not logged in to Close (the token file is gone): run `closeproxy login`"
                )
            if tokens.refresh_rejected:
                raise _rejected_error()
            if rejected is not None and self._is_newer(tokens, rejected):
                self.counters.adopted_from_disk += 1
                return tokens
            if self.oauth is None or tokens.refresh_token is None:
                raise self._cannot_refresh_error(tokens)
            sent_at = self._clock()
            try:
                reply = await self.oauth.refresh(tokens.refresh_token)
            except LoginRequired:
                # Record it in the file so no process spends another request on it.
                dead = tokens.rejected("invalid_grant")
                self._adopt(dead, await asyncio.to_thread(self.store.save, dead))
                raise
            fresh = TokenSet.from_reply(
                reply, received_at=sent_at, api_url=self.api_url, previous=tokens
            )
            # On disk before anyone uses it: losing the new refresh token means a re-login.
            self._adopt(fresh, await asyncio.to_thread(self.store.save, fresh))
            self.counters.refreshes += 1
            log.info(
                "refreshed the access token; it expires in %.0f s", fresh.expires_in(self._clock())
            )
            return fresh


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
