"""The grant: TokenSet, its JSON form, and GrantStore, the interface every store implements.

A store holds one grant (the tokens of one login) that several processes share. Close
rotates refresh tokens, so the store's job is that a refresh token Close issued is
never lost and a spent one never sent again: refreshes run under the store's lock
across processes, and each write names the version it replaces (compare-and-set).
The file store (file_store.py) is the first implementation; see the docstring of
each method of GrantStore for what it must guarantee.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from .errors import TokenServiceUnavailable, TokenStoreError

FILE_VERSION = 1  # of the JSON form, not of a stored grant
# Longer than a holder may wait for Close to answer a refresh (oauth.REFRESH_REPLY_TIMEOUT):
# a slow Close is not a stuck process.
LOCK_TIMEOUT = 330.0

# One stored state of the grant, as the store names it: opaque, compared only for
# equality. None means "nothing stored". The file store uses device, inode, mtime and
# size of the file; a shared store uses a counter it raises with every write.
Version = str


@dataclass(frozen=True)
class TokenSet:
    """One grant as stored: the tokens, who they belong to and when they expire."""

    access_token: str
    refresh_token: str | None
    expires_at: float  # seconds since the epoch, computed from the local receipt time
    obtained_at: float
    scope: str = ""
    organization_id: str = ""
    user_id: str = ""
    token_type: str = "Bearer"  # noqa: S105 - a scheme name, not a password
    api_url: str = ""
    # Set when Close answered invalid_grant: the grant is dead, nobody may try it again.
    refresh_rejected: str | None = None

    def __repr__(self) -> str:
        return (
            f"TokenSet(access_token='[secure]', refresh_token="
            f"{'[secure]' if self.refresh_token else None!r}, expires_at={self.expires_at!r}, "
            f"organization_id={self.organization_id!r}, user_id={self.user_id!r}, "
            f"refresh_rejected={self.refresh_rejected!r})"
        )

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.obtained_at

    def expires_in(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)

    def rejected(self, reason: str) -> TokenSet:
        return replace(self, refresh_rejected=reason)

    @classmethod
    def from_reply(
        cls,
        reply: Mapping[str, Any],
        *,
        received_at: float,
        api_url: str,
        previous: TokenSet | None = None,
    ) -> TokenSet:
        """Build from a token endpoint reply already checked by oauth_reply.parse_token_reply."""
        expires_in = float(reply.get("expires_in") or 3600)
        refresh = reply.get("refresh_token")
        # A reply without a new refresh token leaves the old one in force (RFC 6749 §6).
        if not refresh and previous is not None:
            refresh = previous.refresh_token
        return cls(
            access_token=str(reply["access_token"]),
            refresh_token=str(refresh) if refresh else None,
            expires_at=received_at + expires_in,
            obtained_at=received_at,
            scope=str(reply.get("scope") or (previous.scope if previous else "")),
            organization_id=str(
                reply.get("organization_id") or (previous.organization_id if previous else "")
            ),
            user_id=str(reply.get("user_id") or (previous.user_id if previous else "")),
            token_type=str(reply.get("token_type") or "Bearer"),
            api_url=api_url,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FILE_VERSION,
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "token_type": self.token_type,
            "scope": self.scope,
            "organization_id": self.organization_id,
            "user_id": self.user_id,
            "expires_at": self.expires_at,
            "obtained_at": self.obtained_at,
            "api_url": self.api_url,
            "refresh_rejected": self.refresh_rejected,
        }

    @classmethod
    def from_json(cls, data: Any) -> TokenSet:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("version") != FILE_VERSION:
            raise ValueError(f"it is not version {FILE_VERSION}")
        access = data.get("access_token")
        if not isinstance(access, str) or not access:
            raise ValueError("no access_token")
        refresh = data.get("refresh_token")
        if refresh is not None and not isinstance(refresh, str):
            raise ValueError("refresh_token is not a string")
        try:
            expires_at = float(data["expires_at"])
            obtained_at = float(data.get("obtained_at", expires_at))
        except (KeyError, TypeError, ValueError):
            raise ValueError("expires_at missing or not a number") from None
        rejected = data.get("refresh_rejected")
        return cls(
            access_token=access,
            refresh_token=refresh or None,
            expires_at=expires_at,
            obtained_at=obtained_at,
            scope=str(data.get("scope") or ""),
            organization_id=str(data.get("organization_id") or ""),
            user_id=str(data.get("user_id") or ""),
            token_type=str(data.get("token_type") or "Bearer"),
            api_url=str(data.get("api_url") or ""),
            refresh_rejected=str(rejected) if rejected else None,
        )


class Loaded(NamedTuple):
    """What a store holds now: the tokens (None: not logged in) and their version."""

    tokens: TokenSet | None
    version: Version | None


class StaleGrant(TokenStoreError):
    """A compare-and-set write found another version than the one it was to replace."""


class UnreadableGrant(TokenStoreError):
    """The store holds a value that is not a grant; a new login may replace `version`."""

    def __init__(self, message: str, version: Version | None) -> None:
        super().__init__(message)
        self.version = version


class SealedGrant(TokenStoreError):
    """The grant is encrypted and this process lacks the key: never overwrite it."""


class LockLost(TokenStoreError):
    """The store's lock ran out while held (a paused process): nothing may be sent."""


class RefreshInFlight(TokenServiceUnavailable, TokenStoreError):
    """Another process sent the stored refresh token to Close and may hold the tokens Close
    answered with, not yet saved: sending the same refresh token would spend it twice.
    Release the lock and try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Lease(Protocol):
    """The store's lock, held; what `GrantStore.locked()` yields."""

    async def confirm(self) -> None:
        """Raise LockLost unless the lock is still ours, RefreshInFlight while another
        process may hold unsaved tokens of this grant; called just before a refresh token
        is sent to Close. A lock the kernel holds for us (a file) never ends."""


class GrantStore(Protocol):
    """Where the one grant lives, shared by every process configured with the same store.

    Methods raise TokenStoreError (or a subclass) with a message that names the store
    by `describe()` and never contains a token or a password.
    """

    def describe(self) -> str:
        """The store for messages, logs and status: "the token file /x/tokens.json",
        "redis://host:6379/0 key closeproxy:grant"; never a password."""

    def status_fields(self) -> dict[str, str | bool]:
        """What `closeproxy status --json` shows of the store (e.g. token_file)."""

    async def load(self) -> Loaded:
        """The stored grant and its version, read now (not from a cache)."""

    async def changed(self, since: Version | None) -> bool:
        """Cheap: True when the stored version is not `since` any more. May answer from
        a recent check (a shared store: within 5 s) but never misses a change for long;
        no full read. The provider calls it before every use of its cached tokens."""

    async def save(self, tokens: TokenSet, *, expected: Version | None) -> Version:
        """Store `tokens` durably, replacing version `expected` (None: nothing stored);
        return the new version. Call only with the lock held. Raises StaleGrant when
        the stored version is no longer `expected` (the file store's lock already rules
        that out, so it need not check), TokenStoreError when it cannot write; after
        any error the store holds the complete old or the complete new grant."""

    async def clear(self) -> bool:
        """Delete the grant; True when there was one. Call only with the lock held."""

    def locked(self, wait: float = LOCK_TIMEOUT) -> AbstractAsyncContextManager[Lease]:
        """Hold the store's lock across processes and machines for the `async with`
        body; wait up to `wait` seconds for it, then raise TokenStoreError. Released
        when the body ends, and by itself when the holder dies."""

    async def aclose(self) -> None:
        """Release connections and background tasks (the file store has none)."""
