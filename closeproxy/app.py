"""create_app(settings) -> web.Application: routes, the front middleware, shared services."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from types import SimpleNamespace

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from . import admin
from .config import Settings
from .dashboard import PageTokens, Recent, RecentRequest
from .errors import TokenStoreError
from .guard import Guard, Handler
from .login import login_advice
from .logs import CURRENT_REQUEST_ID, REQUEST_ID, register_secret
from .metrics import Metrics, RefreshCounts
from .oauth import DEFAULT_BACKOFF, OAuthClient
from .proxy import API_PREFIX, Forwarder
from .responses import ERROR_CODE, error_response
from .services import KEY_NAME, SERVICES, WAITED, Services
from .store import TokenStore
from .tokens import TokenProvider

# aiohttp would otherwise add these to forwarded requests; the proxy must not invent
# an Accept-Encoding the client never sent (the body would come back compressed).
SKIP_AUTO_HEADERS: frozenset[str] = frozenset(
    {"Accept", "Accept-Encoding", "User-Agent", "Content-Type"}
)
UPSTREAM_CONNECTIONS = 256
UPSTREAM_READ_BUFFER = 256 * 1024


# A client that hangs up before its answer is complete (nginx's code for it).
CLIENT_CLOSED = 499


def upstream_timing(metrics: Metrics) -> aiohttp.TraceConfig:
    """Times each /api/v1/ request to Close up to its response head, from outside proxy.py."""

    async def start(
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        ctx.started = time.perf_counter()

    async def end(
        session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        if params.url.raw_path.startswith(API_PREFIX):
            metrics.upstream(time.perf_counter() - ctx.started)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(start)
    trace.on_request_end.append(end)
    return trace


def client_session(metrics: Metrics | None = None) -> aiohttp.ClientSession:
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
        trace_configs=[upstream_timing(metrics)] if metrics is not None else None,
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


def _watch(metrics: Metrics, provider: TokenProvider) -> None:
    """Refresh outcomes and expiry, read from the provider when Prometheus scrapes."""

    def refreshes() -> RefreshCounts:
        counts = provider.counters
        return RefreshCounts(
            ok=counts.refreshes,
            rejected=counts.refresh_rejected,
            failed=counts.refresh_failures - counts.refresh_rejected,
        )

    def expiry() -> float | None:
        try:
            tokens = provider.snapshot()
        except TokenStoreError:
            return None
        if tokens is None or tokens.refresh_rejected:
            return None
        return tokens.expires_at

    metrics.watch_provider(refreshes, expiry)


async def _services(
    settings: Settings,
    backoff: Sequence[float],
    browser_login: bool,
    metrics: Metrics,
    recent: Recent,
    app: web.Application,
) -> AsyncIterator[None]:
    session = client_session(metrics)
    store = TokenStore(settings.token_file)
    provider = TokenProvider(
        store,
        oauth_client(settings, session, backoff),
        margin=settings.refresh_margin,
        api_url=str(settings.api_url),
        login_advice=login_advice(settings, browser_login=browser_login),
    )
    forwarder = Forwarder(
        session,
        provider,
        api_url=settings.api_url,
        upstream_timeout=settings.upstream_timeout,
        max_body_size=settings.max_body_size,
    )
    _watch(metrics, provider)
    app[SERVICES] = Services(
        settings,
        session,
        store,
        provider,
        forwarder,
        metrics=metrics,
        recent=recent,
        page_tokens=PageTokens(),
    )
    try:
        yield
    finally:
        await provider.aclose()
        await session.close()


def _front_middleware(guard: Guard, metrics: Metrics, recent: Recent) -> Middleware:
    ids = itertools.count(1)
    prefix = f"{os.getpid():x}"
    clock = time.perf_counter

    @web.middleware
    async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = f"{prefix}-{next(ids)}"
        request[REQUEST_ID] = request_id
        # Every log line written while this request is handled carries its id.
        context = CURRENT_REQUEST_ID.set(request_id)
        try:
            response = guard.check(request)
            if response is None:
                if request.raw_path.startswith(API_PREFIX):
                    response = await proxied(request, handler)
                else:
                    response = await routed(request, handler)
            # Only the proxy's own errors carry a code; a 2xx/3xx never looks it up.
            if response.status >= 400 and (code := response.get(ERROR_CODE)) is not None:
                metrics.error(code)
            return response
        finally:
            CURRENT_REQUEST_ID.reset(context)

    async def proxied(request: web.Request, handler: Handler) -> web.StreamResponse:
        """A forwarded request: counted, timed and kept for the dashboard's table.

        The router sends every /api/v1/ target to the forwarder (any method), so no
        404/405 translation is needed here.
        """
        started = clock()
        status = CLIENT_CLOSED
        metrics.in_flight += 1
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            metrics.in_flight -= 1
            elapsed = clock() - started
            method = request.method
            metrics.request_done(method, status, elapsed)
            recent.add(
                RecentRequest(
                    time.time(),
                    method,
                    request.raw_path.partition("?")[0],
                    status,
                    elapsed,
                    request.get(WAITED, 0.0),
                    request.get(KEY_NAME),
                )
            )

    async def routed(request: web.Request, handler: Handler) -> web.StreamResponse:
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
                f"only {API_PREFIX} is forwarded to Close; admin routes are /healthz, "
                "/metrics, /admin/ (the dashboard), /admin/status, /admin/refresh, "
                "/admin/revoke, /admin/login",
            )

    return front


async def _forward(request: web.Request) -> web.StreamResponse:
    if not request.raw_path.startswith(API_PREFIX):
        raise web.HTTPNotFound()  # reached only through an encoded "/api/v1/" lookalike
    return await request.app[SERVICES].forwarder.handle(request)


def create_app(
    settings: Settings,
    *,
    oauth_backoff: Sequence[float] = DEFAULT_BACKOFF,
    browser_login: bool = True,
) -> web.Application:
    """The proxy; `browser_login=False` for one that dies with a command (`run`)."""
    for secret in (settings.client_secret, settings.proxy_key):
        if secret is not None:
            register_secret(secret.reveal(), permanent=True)
    guard = Guard(allowed_hosts=settings.allowed_hosts, proxy_key=settings.proxy_key)
    metrics, recent = Metrics(), Recent()
    app = web.Application(middlewares=[_front_middleware(guard, metrics, recent)])
    app.cleanup_ctx.append(
        partial(_services, settings, tuple(oauth_backoff), browser_login, metrics, recent)
    )
    admin.add_routes(app)
    app.router.add_route("*", API_PREFIX + "{tail:.*}", _forward)
    return app
