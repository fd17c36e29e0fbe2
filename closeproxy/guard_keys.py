"""Which key a request presented, and what that key may do (the proxy key: everything).

A key travels as the API key (Basic user name) or as `Authorization: Bearer KEY`; every
known key is compared in constant time. A scoped key (a `[keys.NAME]` table) is held to
its methods and path prefixes, checked on the path Close will see.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDictProxy

from .config import PROXY_KEY_NAME, ScopedKey, Secret
from .guard_target import DECODE_ROUNDS
from .logs import KEY_NAME
from .proxy import API_PREFIX
from .responses import error_response

# For a scoped key, an encoded / . or \\ could make Close see another path than the one
# its prefixes were checked against: refused outright, at any depth of encoding.
_ENCODED_SEPARATOR = re.compile(r"%(?:2[eEfF]|5[cC])")
# Headers through which a request asks Close to treat it as another method.
METHOD_OVERRIDES: tuple[str, ...] = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")


@dataclass(frozen=True)
class RequestKey:
    """The key a request presented: its name (for logs and metrics), never its value.

    `scoped` is None for the proxy key, which may use every route.
    """

    name: str
    scoped: ScopedKey | None = None


REQUEST_KEY = web.RequestKey("request_key", RequestKey)


class Keys:
    """Every key the proxy accepts, each with what it is: the proxy key first."""

    def __init__(self, proxy_key: Secret | None, keys: Sequence[ScopedKey] = ()) -> None:
        own = proxy_key.reveal().encode() if proxy_key is not None else None
        self.has_proxy_key = own is not None
        self._keys: tuple[tuple[bytes, RequestKey], ...] = (
            ((own, RequestKey(PROXY_KEY_NAME)),) if own is not None else ()
        ) + tuple((k.key.reveal().encode(), RequestKey(k.name, k)) for k in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    @property
    def scoped_names(self) -> list[str]:
        return [who.name for _, who in self._keys if who.scoped is not None]

    def refusal(self, request: web.Request, path: str) -> web.StreamResponse | None:
        """Who presented which key, and whether that key may make this request."""
        who = self._presented(request)
        if who is None:
            return error_response(
                401,
                "proxy_key_required",
                "this proxy needs a key: send the proxy key (or a key from a [keys.NAME] "
                "table) as the API key (Basic user name) or as Authorization: Bearer KEY",
                headers={"WWW-Authenticate": 'Basic realm="closeproxy", charset="UTF-8"'},
            )
        request[REQUEST_KEY] = who
        request[KEY_NAME] = who.name
        if who.scoped is None:
            return None
        return scope_refusal(who.scoped, request.method, request.headers, path)

    def _presented(self, request: web.Request) -> RequestKey | None:
        values = request.headers.getall("Authorization", ())
        if len(values) != 1:
            return None
        presented = _presented_key(values[0])
        if presented is None:
            return None
        given = presented.encode()
        found: RequestKey | None = None
        for value, who in self._keys:  # every key compared, in constant time each
            if hmac.compare_digest(given, value) and found is None:
                found = who
        return found


def _presented_key(authorization: str) -> str | None:
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        # Close API-key tools send KEY: (user name, empty password).
        return decoded.partition(":")[0]
    return None


def scope_refusal(
    key: ScopedKey, method: str, headers: CIMultiDictProxy[str], path: str
) -> web.StreamResponse | None:
    """Why `key` may not make this request, or None. `path` is the raw path (no query)."""
    if not path.startswith(API_PREFIX):
        # Data-driven: whatever is not the API (the admin routes, /metrics, and any route
        # added later) takes the proxy key.
        return _not_allowed(key, f"use {path} (the admin routes and /metrics take the proxy key)")
    decoded = path
    for _ in range(DECODE_ROUNDS + 1):
        if _ENCODED_SEPARATOR.search(decoded):
            return error_response(
                400,
                "bad_path",
                f"key {key.name!r} is limited to some paths, so its requests may not "
                "percent-encode /, . or \\ in the path: send them unencoded",
            )
        if "%" not in decoded:
            break
        decoded = unquote(decoded, errors="replace")
    # A method override's value is the client's text: only a short piece of it is quoted.
    asked = [
        method,
        *(v.strip().upper()[:16] for n in METHOD_OVERRIDES for v in headers.getall(n, ())),
    ]
    if key.methods is not None:
        for wanted in asked:
            if wanted not in key.methods:
                return _not_allowed(key, f"make {wanted} requests")
    if key.paths and not any(within(decoded, prefix) for prefix in key.paths):
        return _not_allowed(key, f"reach {path}")
    return None


def within(path: str, prefix: str) -> bool:
    """True when `path` lies at or under `prefix` (which ends in /), whole segments only."""
    return path == prefix[:-1] or path.startswith(prefix)


def _not_allowed(key: ScopedKey, why: str) -> web.Response:
    return error_response(
        403,
        "key_not_allowed",
        f"key {key.name!r} may not {why}: it may only make {key.scope()}; use a key "
        "whose scope allows it",
    )
