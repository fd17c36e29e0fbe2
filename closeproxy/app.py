"""create_app(settings) -> web.Application: routes, the front middleware, shared services."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Sequence
from functools import partial

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from . import admin
from .config import Settings
from .guard import Guard, Handler
from .logs import REQUEST_ID, register_secret
from .oauth import DEFAULT_BACKOFF, OAuthClient
from .proxy import API_PREFIX, Forwarder
from .responses import error_response
from .services import SERVICES, Services
from .store import TokenStore
from .tokens import TokenProvider

# aiohttp would otherwise add these to forwarded requests; the proxy must not invent
# an Accept-Encoding the client never sent (the body would come back compressed).
SKIP_AUTO_HEADERS: frozenset[str] = frozenset(
    {"Accept", "Accept-Encoding", "User-Agent", "Content-Type"}
)
UPSTREAM_CONNECTIONS = 256
UPSTREAM_READ_BUFFER = 256 * 1024


def client_session() -> aiohttp.ClientSession:
    """The one pooled, keep-alive session that carries every upstream request."""
    connector = aiohttp.TCPConnector(
        limit=UPSTREAM_CONNECTIONS, ttl_dns_cache=300, keepalive_timeout=30
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


async def _services(
    settings: Settings, backoff: Sequence[float], app: web.Application
) -> AsyncIterator[None]:
    session = client_session()
    store = TokenStore(settings.token_file)
    provider = TokenProvider(
        store,
        oauth_client(settings, session, backoff),
        margin=settings.refresh_margin,
        api_url=str(settings.api_url),
    )
    forwarder = Forwarder(
        session,
        provider,
        api_url=settings.api_url,
        upstream_timeout=settings.upstream_timeout,
        max_body_size=settings.max_body_size,
        rate_limit_wait=settings.rate_limit_wait,
    )
    app[SERVICES] = Services(settings, session, store, provider, forwarder)
    try:
        yield
    finally:
        await provider.aclose()
        await session.close()


def _front_middleware(guard: Guard) -> Middleware:
    ids = itertools.count(1)
    prefix = f"{os.getpid():x}"

    @web.middleware
    async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[REQUEST_ID] = f"{prefix}-{next(ids)}"
        refusal = guard.check(request)
        if refusal is not None:
            return refusal
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            return error_response(
                405, "method_not_allowed", f"{request.method} is not allowed here; use {allowed}"
            )
        except web.HTTPNotFound:
            return error_response(
                404,
                "not_proxied",
                f"only {API_PREFIX} is forwarded to Close; admin routes are /healthz and "
                "/admin/status, /admin/refresh, /admin/revoke, /admin/login",
            )

    return front


async def _forward(request: web.Request) -> web.StreamResponse:
    if not request.raw_path.startswith(API_PREFIX):
        raise web.HTTPNotFound()  # reached only through an encoded "/api/v1/" lookalike
    return await request.app[SERVICES].forwarder.handle(request)


def create_app(
    settings: Settings, *, oauth_backoff: Sequence[float] = DEFAULT_BACKOFF
) -> web.Application:
    for secret in (settings.client_secret, settings.proxy_key):
        if secret is not None:
            register_secret(secret.reveal(), permanent=True)
    guard = Guard(allowed_hosts=settings.allowed_hosts, proxy_key=settings.proxy_key)
    app = web.Application(middlewares=[_front_middleware(guard)])
    app.cleanup_ctx.append(partial(_services, settings, tuple(oauth_backoff)))
    admin.add_routes(app)
    app.router.add_route("*", API_PREFIX + "{tail:.*}", _forward)
    return app
