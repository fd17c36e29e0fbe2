"""revoke(provider): wipe the local grant under the store's lock, then revoke it at Close."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import ServiceError, TokenStoreError
from .grant import SealedGrant

if TYPE_CHECKING:
    from .tokens import TokenProvider

log = logging.getLogger("closeproxy.tokens")


@dataclass(frozen=True)
class RevokeOutcome:
    """What `revoke` managed: Close told, local state wiped, and if not, why."""

    had_grant: bool
    revoked_at_close: bool = False
    wiped: bool = False
    problem: str | None = None


async def revoke(provider: TokenProvider) -> RevokeOutcome:
    """Wipe the local grant, then revoke it at Close.

    The wipe comes first and under the lock; telling Close happens after, so a Close
    that does not answer holds up nobody, and an interrupted revoke still leaves
    nothing usable behind.
    """
    await provider.aclose()
    cache, store = provider.cache, provider.store
    async with store.locked():
        try:
            tokens = cache.unsaved or (await store.load()).tokens
        except SealedGrant as exc:
            # Encrypted with a key this process lacks: the grant of every process that
            # has the key. Wiping it would log them all out; leave it, say how to proceed.
            cache.forget()
            return RevokeOutcome(
                had_grant=True,
                problem=f"{exc}; nothing was revoked or wiped",
            )
        except TokenStoreError:
            wiped = await store.clear()
            cache.forget()
            return RevokeOutcome(
                had_grant=True,
                wiped=wiped,
                problem=f"{store.describe()} could not be read, so Close was not told; it "
                "was wiped, but a grant may still be active at Close: remove the app's "
                "access in Close's settings",
            )
        if tokens is None:
            cache.forget()
            return RevokeOutcome(had_grant=False)
        provider.usable(replace(tokens, refresh_rejected=None))  # never to a foreign server
        wiped = await store.clear()
        cache.forget()
    if provider.oauth is None:
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
                await provider.oauth.revoke(token)
    except ServiceError as exc:
        log.warning("revoking at Close failed: %s", exc)
        return RevokeOutcome(
            had_grant=True,
            wiped=wiped,
            problem=f"{exc}; the local tokens were wiped anyway, but the grant may still "
            "be active at Close: remove the app's access in Close's settings",
        )
    return RevokeOutcome(had_grant=True, revoked_at_close=True, wiped=wiped)
