"""The HTTP clients that talk to Close: the pooled session and the OAuth client on it.

The proxy app, the CLI commands and the tests all build their clients here, so every
request to Close (API call, token refresh, revoke) goes out with the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp

from .config import Settings
from .logs import register_secret
from .oauth import DEFAULT_BACKOFF, OAuthClient
from .upstream_proxy import UpstreamRoute

# aiohttp would otherwise add these to forwarded requests; the proxy must not invent
# an Accept-Encoding the client never sent (the body would come back compressed).
SKIP_AUTO_HEADERS: frozenset[str] = frozenset(
    {"Accept", "Accept-Encoding", "User-Agent", "Content-Type"}
)
UPSTREAM_READ_BUFFER = 256 * 1024
# Beyond the forwarder's own connections (which it counts itself): room for token
# requests, so that a pool full of API calls never delays a refresh.
TOKEN_CONNECTIONS = 8


def client_session(
    route: UpstreamRoute | None = None,
    connections: int = 256,
) -> aiohttp.ClientSession:
    """The one pooled, keep-alive session that carries every upstream request.

    `route` names the outbound proxy, if any. The environment is never consulted here
    (trust_env=False): it would also bring ~/.netrc credentials onto requests to Close.
    """
    if route is not None and route.proxy is not None:
        register_secret(route.proxy.password, permanent=True)
    connector = aiohttp.TCPConnector(
        limit=connections + TOKEN_CONNECTIONS, ttl_dns_cache=300, keepalive_timeout=30
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        # Cookies Close sets must never ride along on another client's request.
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=SKIP_AUTO_HEADERS,
        read_bufsize=UPSTREAM_READ_BUFFER,
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
        proxy=route.session_proxy() if route is not None else None,
    )


def oauth_client(
    settings: Settings, session: aiohttp.ClientSession, backoff: Sequence[float] = DEFAULT_BACKOFF
) -> OAuthClient | None:
    """The OAuth client when credentials are configured; without, tokens just can't refresh."""
    if not settings.client_id or settings.client_secret is None:
        return None
    return OAuthClient(
        session,
        api_url=settings.api_url,
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        backoff=backoff,
    )
