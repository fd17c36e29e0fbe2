"""RedisGrantStore: one grant shared by processes on many machines, with fenced refresh.

Layout: the hash at `key` holds `version` (a random id, new with every write), `grant`
(the JSON form of the tokens, sealed with AES-GCM when a store secret is set) and, while
a refresh is in flight, `inflight` (redis_scripts.py); the lock is the string at
`key:lock` (redis_lock.py).

- Fencing: each write is a compare-and-set on the version the writer read, and the
  holder confirms, just before it sends a refresh token, that the lock is still its own
  and the grant still the version it read, and marks the refresh in flight. A process
  frozen past the lock's lifetime therefore neither sends a spent refresh token nor
  overwrites newer tokens, and no process sends a refresh token whose answer another
  live process may still be trying to store.
- Change detection costs no round trip per request: a background task reads the
  version every CHECK_INTERVAL seconds, so a process learns of new tokens within that
  time; with the lock held the check asks Redis directly.
- Redis unreachable: the version check keeps the last answer (the proxy serves the
  tokens it holds), and anything that must reach Redis raises TokenStoreUnavailable,
  which clients see as 503 token_service_unavailable naming the store, never its password.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from . import redis_scripts
from .errors import TokenServiceUnavailable, TokenStoreError
from .grant import (
    LOCK_TIMEOUT,
    Lease,
    Loaded,
    SealedGrant,
    StaleGrant,
    TokenSet,
    UnreadableGrant,
    Version,
)
from .redis_lock import RedisLock, stop_task
from .sealing import Sealer, is_sealed
from .settings import spelled
from .store_options import public_url

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("closeproxy.store")

DEFAULT_KEY = "closeproxy:grant"
LOCK_TTL = 10.0
CHECK_INTERVAL = 2.0
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 3.0


class TokenStoreUnavailable(TokenServiceUnavailable, TokenStoreError):
    """The shared store cannot be reached now; retrying later may work."""


class RedisGrantStore:
    """The GrantStore of one key in Redis (redis-py's asyncio client)."""

    def __init__(
        self,
        url: str,
        key: str = DEFAULT_KEY,
        *,
        secret: bytes | None = None,
        lock_ttl: float = LOCK_TTL,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.url = url
        self.key = key
        self.lock = RedisLock(self, lock_ttl)
        self.lock_key = self.lock.key
        self.check_interval = check_interval
        self._sealer = Sealer(secret) if secret is not None else None
        self._client: Redis | None = None
        self._seen: Version | None = None  # the version the store held at the last check
        self._checked = False
        self._poller: asyncio.Task[None] | None = None
        self.read_version: Version | None = None  # the version last read with load()
        self._unreachable_since: float | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisGrantStore({public_url(self.url)!r}, key={self.key!r})"

    def describe(self) -> str:
        return f"the Redis store {public_url(self.url)} (key {self.key})"

    def status_fields(self) -> dict[str, str | bool]:
        return {
            "token_store": public_url(self.url),
            "token_store_key": self.key,
            "encrypted": self._sealer is not None,
        }

    # --- the connection ---------------------------------------------------------------

    def client(self) -> Redis:
        if self._client is None:
            try:
                from redis.asyncio import Redis
            except ImportError:
                raise TokenStoreError(
                    "the Redis token store needs redis-py: pip install 'closeproxy[redis]'"
                ) from None
            try:
                self._client = Redis.from_url(
                    self.url,
                    decode_responses=True,
                    socket_connect_timeout=CONNECT_TIMEOUT,
                    socket_timeout=COMMAND_TIMEOUT,
                    retry=None,
                    client_name="closeproxy",
                )
            except ValueError:
                # redis-py's message may quote the URL, password and all.
                raise TokenStoreError(
                    f"cannot use {public_url(self.url)} as the token store: expected a "
                    "redis://, rediss:// or unix:// URL"
                ) from None
        return self._client

    async def call(self, what: str, command: Any) -> Any:
        from redis.exceptions import AuthenticationError, RedisError, ResponseError

        try:
            result = await command
        except AuthenticationError:
            raise TokenStoreError(
                f"{self.describe()} refused the password: check the password in the "
                "--token-store URL"
            ) from None
        except ResponseError as exc:
            # Redis's own error line (NOAUTH, WRONGTYPE, ...): never holds our values.
            raise TokenStoreError(f"{self.describe()} refused to {what}: {exc}") from None
        except (RedisError, OSError) as exc:
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
            raise TokenStoreUnavailable(
                f"cannot reach {self.describe()} to {what} ({type(exc).__name__}): "
                "check that Redis is running and reachable; closeproxy retries by itself"
            ) from None
        if self._unreachable_since is not None:
            log.info("%s is reachable again", self.describe())
            self._unreachable_since = None
        return result

    # --- reading ----------------------------------------------------------------------

    async def load(self) -> Loaded:
        version, value = await self.call(
            "read the tokens", self.client().hmget(self.key, ["version", "grant"])
        )
        self._note(version or None)
        self.read_version = version or None
        if not version or value is None:
            return Loaded(None, None)
        return Loaded(self._decode(value, version), version)

    def _decode(self, value: str, version: str) -> TokenSet:
        if is_sealed(value):
            if self._sealer is None:
                raise SealedGrant(
                    f"the tokens in {self.describe()} are encrypted and no token store "
                    f"secret is set: set {spelled('token_store_secret')} to the key they "
                    "were stored with"
                )
            raw = self._sealer.open(
                value, self._context(version), self.describe(), spelled("token_store_secret")
            )
        else:
            raw = value.encode()
        try:
            return TokenSet.from_json(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnreadableGrant(
                f"{self.describe()} does not hold closeproxy tokens ({exc}): "
                "run `closeproxy login` to replace them",
                version,
            ) from None

    def _context(self, version: str) -> str:
        return f"{self.key}\n{version}"

    async def changed(self, since: Version | None) -> bool:
        if self.lock.leases:
            version = await self.call("check the tokens", self.client().hget(self.key, "version"))
            self._note(version or None)
        else:
            self._start_poller()
        return self._seen != since

    def _note(self, version: Version | None) -> None:
        self._seen = version
        self._checked = True

    def _start_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        """Read the stored version every check_interval; keep the last answer on errors."""
        warned = False
        while not self._closed:
            await asyncio.sleep(self.check_interval)
            if self._closed:
                return
            try:
                version = await self.call(
                    "check the tokens", self.client().hget(self.key, "version")
                )
            except TokenStoreError as exc:
                if not warned:
                    log.warning("%s; serving with the tokens held in memory", exc)
                    warned = True
                continue
            if warned:
                warned = False
            self._note(version or None)

    # --- writing ----------------------------------------------------------------------

    async def save(self, tokens: TokenSet, *, expected: Version | None) -> Version:
        version = secrets.token_hex(16)
        plain = json.dumps(tokens.to_json(), sort_keys=True)
        value = (
            self._sealer.seal(plain.encode(), self._context(version))
            if self._sealer is not None
            else plain
        )
        self.lock.note_write()
        result = await self.call(
            "store the tokens",
            self.client().eval(redis_scripts.CAS, 1, self.key, expected or "", version, value),
        )
        if not isinstance(result, list):
            self._note(result or None)
            if self._sealer is None and result:
                await self._refuse_over_sealed()
            raise StaleGrant(
                f"{self.describe()} changed since this process read it: "
                + (
                    "another process stored newer tokens"
                    if result
                    else "it holds no tokens now (revoked, deleted, or Redis lost its data)"
                )
            )
        self._note(version)
        self.read_version = version
        return version

    async def _refuse_over_sealed(self) -> None:
        value = await self.call("read the tokens", self.client().hget(self.key, "grant"))
        if isinstance(value, str) and is_sealed(value):
            self._decode(value, "")  # raises SealedGrant: say which setting is missing

    async def clear(self) -> bool:
        if self._sealer is None:
            await self._refuse_over_sealed()
        removed = await self.call("delete the tokens", self.client().delete(self.key))
        self._note(None)
        self.read_version = None
        return bool(removed)

    # --- the lock ---------------------------------------------------------------------

    def locked(self, wait: float = LOCK_TIMEOUT) -> AbstractAsyncContextManager[Lease]:
        return self.lock.held(wait)

    async def aclose(self) -> None:
        self._closed = True
        if self._poller is not None:
            await stop_task(self._poller)
            self._poller = None
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.aclose()
