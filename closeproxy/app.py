"""create_app(settings) -> web.Application: routes, the front middleware, shared services."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from functools import partial

from aiohttp import HttpVersion11, hdrs, web

from . import admin
from .admin_routes import LISTED
from .config import Settings
from .dashboard import PageTokens, Recent, RecentRequest
from .guard import Guard, Handler
from .login import login_advice
from .logs import CURRENT_REQUEST_ID, KEY_NAME, REQUEST_ID, register_secret
from .metrics import Metrics, RefreshCounts
from .oauth import DEFAULT_BACKOFF
from .pacing import ClientLimits
from .proxy import API_PREFIX, Forwarder
from .ratelimit import WAITED
from .responses import ERROR_CODE, error_response
from .services import SERVICES, Services
from .tokens import TokenProvider
from .upstream import client_session
from .wiring import token_provider

log = logging.getLogger("closeproxy.app")
OTHER_PATHS = r"/{tail:(?!admin/|healthz$|api/v1/).*}"


# A client that hangs up before its answer is complete (nginx's code for it).
CLIENT_CLOSED = 499


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
        # In memory: /metrics checks the store for changes before it asks (admin.metrics).
        tokens = provider.cache.current()
        if tokens is None or tokens.refresh_rejected:
            return None
        return tokens.expires_at

    metrics.watch_provider(refreshes, expiry)


async def _services(
    settings: Settings,
    backoff: Sequence[float],
    browser_login: bool,
    metrics: Metrics | None,
    recent: Recent,
    app: web.Application,
) -> AsyncIterator[None]:
    route = settings.upstream_route()
    log.info("connections to Close at %s go %s", settings.api_url, route.label)
    session = client_session(route, settings.upstream_connections)
    provider = token_provider(
        settings,
        session,
        backoff=backoff,
        login_advice=login_advice(settings, browser_login=browser_login),
    )
    forwarder = Forwarder(
        session,
        provider,
        api_url=settings.api_url,
        upstream_timeout=settings.upstream_timeout,
        max_body_size=settings.max_body_size,
        upstream_route=route,
        client_limits=ClientLimits(settings.client_timeout, settings.client_min_rate),
        connections=settings.upstream_connections,
        pool_timeout=settings.pool_timeout,
        rate_limit_wait=settings.rate_limit_wait,
    )
    if metrics is not None:
        _watch(metrics, provider)
        forwarder.rate_limits.on_wait = metrics.rate_limit_wait
        forwarder.rate_limits.on_remaining = metrics.rate_limit_remaining
        forwarder.on_upstream(metrics.upstream)
    app[SERVICES] = Services(
        settings,
        session,
        provider.store,
        provider,
        forwarder,
        upstream_route=route,
        metrics=metrics,
        recent=recent,
        page_tokens=PageTokens(),
    )

    async def stop_waiting(app: web.Application) -> None:
        # Runs before the drain: requests waiting for a rate-limit reset end now.
        forwarder.rate_limits.stop()

    app.on_shutdown.append(stop_waiting)
    try:
        yield
    finally:
        await provider.aclose()
        await session.close()


class BodyNotWanted(TimeoutError):
    """The body of a request refused before its upload: reading it ends at once."""


class Front:
    """What every request meets before any route: a request id, then the guard.

    aiohttp answers `Expect: 100-continue` before any middleware runs, so the same
    checks run in `expect` too: a refused client learns it before it uploads."""

    def __init__(self, guard: Guard, metrics: Metrics | None, recent: Recent) -> None:
        self._guard = guard
        self._metrics = metrics
        self._recent = recent
        self._ids = itertools.count(1)

    def _tag(self, request: web.Request) -> None:
        if REQUEST_ID not in request:
            request[REQUEST_ID] = next(self._ids)
            # Set before the guard names a key, so that every reader finds them: a key
            # missing from a request costs a KeyError raised and caught at each lookup.
            request[KEY_NAME] = None
            request[WAITED] = 0.0

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        self._tag(request)
        refusal = self._guard.check(request)
        if refusal is None and request.raw_path.startswith(API_PREFIX):
            refusal = await request.app[SERVICES].forwarder.refusal_before_body(request)
        if refusal is None:
            if request.version != HttpVersion11:
                return None  # HTTP/1.0 has no 100 Continue (RFC 9110 §10.1.1)
            if request.headers.get(hdrs.EXPECT, "").strip().lower() != "100-continue":
                refusal = error_response(
                    417,
                    "expectation_failed",
                    "the only Expect this proxy knows is 100-continue: drop the header",
                )
            else:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0  # the answer proper has not started
                return None
        # The client holds its body back as asked: end the connection after the answer
        # instead of waiting (aiohttp's lingering read) for a body that will not come.
        refusal.force_close()
        request.content.set_exception(BodyNotWanted())
        return refusal

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._tag(request)
        # Every log line written while this request is handled carries its id.
        context = CURRENT_REQUEST_ID.set(request[REQUEST_ID])
        try:
            response = self._guard.check(request)
            if response is None:
                if request.raw_path.startswith(API_PREFIX):
                    response = await self._proxied(request, handler)
                else:
                    response = await self._routed(request, handler)
            # Only the proxy's own errors carry a code; a 2xx/3xx never looks it up.
            if (
                response.status >= 400
                and self._metrics is not None
                and (code := response.get(ERROR_CODE)) is not None
            ):
                self._metrics.error(code)
            return response
        finally:
            CURRENT_REQUEST_ID.reset(context)

    async def _proxied(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A forwarded request: counted, timed and kept for the dashboard's table.

        The router sends every /api/v1/ target to the forwarder (any method), so no
        404/405 translation is needed here.
        """
        metrics = self._metrics
        started = time.perf_counter()
        status = CLIENT_CLOSED
        if metrics is not None:
            metrics.in_flight += 1
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            elapsed = time.perf_counter() - started
            method = request.method
            if metrics is not None:
                metrics.in_flight -= 1
                metrics.request_done(method, status, elapsed, request.get(KEY_NAME))
            self._recent.add(
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

    async def _routed(self, request: web.Request, handler: Handler) -> web.StreamResponse:
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
                f"only {API_PREFIX} is forwarded to Close; admin routes are {LISTED}",
            )


async def _not_found(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


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
    for secret in (settings.client_secret, settings.proxy_key, *(k.key for k in settings.keys)):
        if secret is not None:
            register_secret(secret.reveal(), permanent=True)
    guard = Guard(
        allowed_hosts=settings.allowed_hosts, proxy_key=settings.proxy_key, keys=settings.keys
    )
    metrics, recent = (Metrics() if settings.metrics == "on" else None), Recent()
    front = Front(guard, metrics, recent)
    app = web.Application(middlewares=[front.middleware])
    app.cleanup_ctx.append(
        partial(_services, settings, tuple(oauth_backoff), browser_login, metrics, recent)
    )
    admin.add_routes(app, expect_handler=front.expect)
    app.router.add_route("*", API_PREFIX + "{tail:.*}", _forward, expect_handler=front.expect)
    # Everything else is 404, but through a route, so that Expect is checked there too
    # (admin paths are left out: a wrong method on them stays 405).
    app.router.add_route("*", OTHER_PATHS, _not_found, expect_handler=front.expect)
    return app
