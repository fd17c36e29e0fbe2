"""The token store's settings: which store (a URL that may hold a password) and its key.

A Redis URL is kept as StoreURL, a str whose repr leaves the password out, so a Settings
repr or a traceback never shows it; `public_url` is the form for messages and status.
"""

from __future__ import annotations

from dataclasses import dataclass

from yarl import URL

from .errors import ConfigError
from .parsing import Origin, SecretFile, _Kind
from .sealing import parse_key
from .secret import Secret

FILE_STORE = "file"
STORE_SCHEMES = frozenset({"redis", "rediss", "unix"})


def public_url(url: str) -> str:
    """The store URL for people: the password removed, from userinfo and from the query."""
    parsed = URL(url)
    query = {k: v for k, v in parsed.query.items() if k.lower() != "password"}
    if parsed.scheme == "unix":
        shown = f"unix://{parsed.path}"
        return f"{shown}?{URL.build(query=query).query_string}" if query else shown
    if parsed.password is not None:
        parsed = parsed.with_password(None)
        if not parsed.user:
            parsed = parsed.with_user(None)
    return str(parsed.with_query(query))


class StoreURL(str):
    """'file' or a Redis URL; its repr never shows a password."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(str(self) if self == FILE_STORE else public_url(self))


class TokenStore(_Kind[StoreURL]):
    """'file', or a redis://, rediss:// or unix:// URL as redis-py reads it."""

    metavar = "file|URL"

    def parse(self, raw: object, origin: Origin) -> StoreURL:
        value = raw.strip() if isinstance(raw, str) else ""
        if value == FILE_STORE:
            return StoreURL(value)
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme not in STORE_SCHEMES:
            # Never echo the value: a URL may carry a password.
            raise origin.fail(
                "expected 'file' or a redis://, rediss:// or unix:// URL "
                "(e.g. redis://:PASSWORD@host:6379/0)"
            )
        return StoreURL(value)

    def show(self, value: StoreURL) -> str:
        return value if value == FILE_STORE else public_url(value)


@dataclass(frozen=True)
class StoreSecret(SecretFile):
    """The AES-GCM key of the token store: 32 random bytes in base64."""

    what: str = "token store secret"

    def parse(self, raw: object, origin: Origin) -> Secret:
        secret = super().parse(raw, origin)
        try:
            parse_key(secret.reveal())
        except ConfigError as exc:
            raise origin.fail(str(exc)) from None
        return secret
