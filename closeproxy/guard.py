"""Who may talk to the proxy, and with what: request target, method, Host, Origin, key.

Whatever reaches the proxy acts as the user in Close, so every request passes here
before any route runs. Each refusal is a JSON error that says what to change. The
target rules live in guard_target.py, the keys and their scopes in guard_keys.py.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from aiohttp import HttpVersion10, web

from .admin_routes import CROSS_SITE_ROUTES, KEYLESS_PATHS
from .config import LOOPBACK_NAMES, ScopedKey, Secret
from .guard_keys import Keys
from .guard_target import check_target
from .responses import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MIN_HTTP_VERSION: Final = HttpVersion10
REFUSED_METHODS: frozenset[str] = frozenset({"CONNECT", "TRACE", "TRACK"})
CROSS_SITE: frozenset[str] = frozenset({"cross-site", "same-site"})
DEFAULT_PORTS: dict[str, str] = {"http": "80", "https": "443"}
_HOST_RE = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(?P<port>[0-9]{1,5}))?")
_HOSTS_REMEMBERED = 64


def host_name(host_header: str) -> str | None:
    """The lower-case host name of a Host header, or None when it is malformed."""
    match = _HOST_RE.fullmatch(host_header.strip())
    if match is None:
        return None
    return match.group("name").lower()


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
        self._keys = Keys(proxy_key, keys)

    def __repr__(self) -> str:
        key = "[secure]" if self._keys.has_proxy_key else None
        names = self._keys.scoped_names
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
            return self._keys.refusal(request, path)
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
