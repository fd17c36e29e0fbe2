"""Who may talk to the proxy, and with what: request target, method, Host, Origin, key.

Whatever reaches the proxy acts as the user in Close, so every request passes here
before any route runs. Each refusal is a JSON error that says what to change.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from aiohttp import HttpVersion10, web
from multidict import CIMultiDictProxy

from .admin_routes import CROSS_SITE_ROUTES, KEYLESS_PATHS
from .config import LOOPBACK_NAMES, PROXY_KEY_NAME, ScopedKey, Secret
from .logs import KEY_NAME
from .proxy import API_PREFIX
from .responses import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MIN_HTTP_VERSION: Final = HttpVersion10
REFUSED_METHODS: frozenset[str] = frozenset({"CONNECT", "TRACE", "TRACK"})
CROSS_SITE: frozenset[str] = frozenset({"cross-site", "same-site"})
DEFAULT_PORTS: dict[str, str] = {"http": "80", "https": "443"}
# Paths: visible ASCII without backslash, and every % starts a valid escape. Queries
# reach Close as sent (a literal `50%` included), so they only need to be visible ASCII.
_PATH_OK = re.compile(r"(?:[!-$&-\[\]-~]|%[0-9A-Fa-f]{2})*")
_QUERY_OK = re.compile(r"[!-~]*")
_HOST_RE = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(?P<port>[0-9]{1,5}))?")
_DECODE_ROUNDS = 3
_HOSTS_REMEMBERED = 64
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


def _plain(text: str) -> bool:
    """Visible ASCII only (no space, no control character)."""
    return text.isascii() and text.isprintable() and " " not in text


def check_target(path: str, query: str) -> str | None:
    """Why this request target (split at its first `?`) must not be served, or None."""
    if (
        path.startswith("/")
        and _plain(path)
        and "%" not in path
        and "\\" not in path
        and "/." not in path
        and _plain(query)
    ):
        # The common plain target, in string methods instead of the regexes: what the
        # full check would accept without decoding anything.
        return None
    return full_target_check(path, query)


def full_target_check(path: str, query: str) -> str | None:
    """check_target without its fast path."""
    if not path.startswith("/"):
        return (
            "only origin-form request targets like /api/v1/me/ are accepted; "
            "this is a reverse proxy, not a forward proxy"
        )
    if not _PATH_OK.fullmatch(path):
        return (
            "the path has spaces, control or non-ASCII characters, backslashes or a stray %: "
            "percent-encode them"
        )
    if not _QUERY_OK.fullmatch(query):
        return "the query has spaces, control or non-ASCII characters: percent-encode them"
    # Decode a few times so double-encoded dots (%252e) cannot smuggle a `..` either.
    for _ in range(_DECODE_ROUNDS):
        if any(segment in {".", ".."} for segment in path.split("/")):
            return "the path contains . or .. segments: send the normalized path"
        if "\\" in path or "\x00" in path:
            return "the path contains a backslash or NUL: remove it"
        decoded = unquote(path, errors="replace") if "%" in path else path
        if decoded == path:
            return None
        path = decoded
    return "the path is percent-encoded too many times: send it encoded once"


def host_name(host_header: str) -> str | None:
    """The lower-case host name of a Host header, or None when it is malformed."""
    match = _HOST_RE.fullmatch(host_header.strip())
    if match is None:
        return None
    return match.group("name").lower()


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


class Guard:
    """The middleware that refuses what the proxy must not serve."""

    def __init__(
        self,
        *,
        allowed_hosts: tuple[str, ...],
        proxy_key: Secret | None,
        keys: Sequence[ScopedKey] = (),
    ) -> None:
        self.allowed_hosts: frozenset[str] = LOOPBACK_NAMES | frozenset(allowed_hosts)
        # Host header values already found allowed: a set lookup instead of the regex.
        self._hosts_seen: set[str] = set()
        self._key = proxy_key.reveal().encode() if proxy_key is not None else None
        # Every key, each with what it is: the proxy key first, then the scoped ones.
        self._keys: tuple[tuple[bytes, RequestKey], ...] = (
            ((self._key, RequestKey(PROXY_KEY_NAME)),) if self._key is not None else ()
        ) + tuple((k.key.reveal().encode(), RequestKey(k.name, k)) for k in keys)

    def __repr__(self) -> str:
        key = "[secure]" if self._key else None
        names = [who.name for _, who in self._keys if who.scoped is not None]
        return (
            f"Guard(allowed_hosts={sorted(self.allowed_hosts)!r}, proxy_key={key}, keys={names!r})"
        )

    def check(self, request: web.Request) -> web.StreamResponse | None:
        """The refusal for this request, or None to let it through."""
        if request.version < MIN_HTTP_VERSION:
            # An HTTP/0.9 line has no version: what follows it must not become headers.
            refusal = error_response(
                400,
                "bad_request_line",
                "the request line has no HTTP version (HTTP/0.9): send `METHOD /path HTTP/1.1`",
            )
            refusal.force_close()
            return refusal
        method = request.method
        headers = request.headers
        if method in REFUSED_METHODS or "Upgrade" in headers:
            refusal = (
                error_response(
                    405, "method_not_allowed", f"{method} is not supported by closeproxy"
                )
                if method in REFUSED_METHODS
                else error_response(
                    400,
                    "upgrade_not_supported",
                    "protocol upgrades (WebSocket, h2c) are not supported: use plain HTTP/1.1",
                )
            )
            # The client may already be sending tunnel bytes: end the connection with it.
            refusal.force_close()
            return refusal
        path, _, query = request.raw_path.partition("?")
        problem = check_target(path, query)
        if problem is not None:
            return error_response(400, "bad_path", problem)
        hosts = headers.getall("Host", ())
        if not (len(hosts) == 1 and (hosts[0] in self._hosts_seen or self._host_ok(hosts[0]))):
            return error_response(
                403,
                "forbidden_origin",
                "this Host name is not allowed (DNS rebinding protection): connect to "
                "127.0.0.1 or localhost, or add the name with --allow-host",
            )
        if (path, method) not in CROSS_SITE_ROUTES and self._cross_site(request):
            return error_response(
                403,
                "forbidden_origin",
                "cross-site browser requests are refused: a web page may not use your "
                "Close account through this proxy",
            )
        if self._keys and path not in KEYLESS_PATHS:
            return self._key_check(request, path)
        return None

    def _host_ok(self, host_header: str) -> bool:
        name = host_name(host_header)
        if name is None or name not in self.allowed_hosts:
            return False
        if len(self._hosts_seen) < _HOSTS_REMEMBERED:
            self._hosts_seen.add(host_header)  # the same few Host values, request after request
        return True

    def _cross_site(self, request: web.Request) -> bool:
        headers = request.headers
        site = headers.get("Sec-Fetch-Site", "").strip().lower()
        if site in CROSS_SITE:
            return True
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in headers:
            return True
        origins = headers.getall("Origin", ())
        if len(origins) > 1:
            return True
        if not origins or site == "same-origin":
            return False
        return not self._same_origin(origins[0], request)

    def _same_origin(self, origin: str, request: web.Request) -> bool:
        """SPEC §11: an Origin whose host is allowed and whose port is the proxy's own."""
        scheme, sep, rest = origin.strip().lower().partition("://")
        if not sep or scheme != request.scheme:
            return False
        theirs = _HOST_RE.fullmatch(rest)
        ours = _HOST_RE.fullmatch(request.headers.get("Host", "").strip().lower())
        if theirs is None or ours is None or theirs.group("name") not in self.allowed_hosts:
            return False
        default = DEFAULT_PORTS.get(scheme)
        return (theirs.group("port") or default) == (ours.group("port") or default)

    def _key_check(self, request: web.Request, path: str) -> web.StreamResponse | None:
        """Who presented which key, and whether that key may make this request."""
        who = self._key_ok(request)
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

    def _key_ok(self, request: web.Request) -> RequestKey | None:
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


def scope_refusal(
    key: ScopedKey, method: str, headers: CIMultiDictProxy[str], path: str
) -> web.StreamResponse | None:
    """Why `key` may not make this request, or None. `path` is the raw path (no query)."""
    if not path.startswith(API_PREFIX):
        # Data-driven: whatever is not the API (the admin routes, /metrics, and any route
        # added later) takes the proxy key.
        return _not_allowed(key, f"use {path} (the admin routes and /metrics take the proxy key)")
    decoded = path
    for _ in range(_DECODE_ROUNDS + 1):
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
