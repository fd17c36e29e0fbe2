"""/healthz and /admin/* routes: status, refresh, revoke (login lives in login.py)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web
from yarl import URL

from . import __version__, admin_routes, dashboard
from .admin_routes import ADMIN_ROUTES, CALLBACK_PATH, AdminRoute
from .errors import CloseProxyError, ConfigError, ServiceError, TokenStoreError
from .login import (
    PAGE_HEADERS,
    Callback,
    callback_page,
    check_callback,
    finish_login,
    retire_previous,
    start_login,
    success_page,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .refresh_policy import FORCE
from .responses import error_response, json_response, service_error_response
from .revoke import revoke
from .services import SERVICES, Services
from .settings import spelled
from .status import status_document

log = logging.getLogger("closeproxy.admin")

ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


async def status(services: Services) -> dict[str, Any]:
    """`closeproxy status --json` plus what this process has counted."""
    tokens = await services.provider.snapshot()
    doc = status_document(tokens, services.store)
    if tokens is not None:
        doc["last_refresh"] = datetime.fromtimestamp(tokens.obtained_at, UTC).isoformat(
            timespec="seconds"
        )
    if services.provider.last_refresh_error is not None:
        doc["last_refresh_error"] = services.provider.last_refresh_error
    if services.upstream_route is not None:
        doc["upstream_proxy"] = services.upstream_route.document()
    doc["counters"] = {
        **asdict(services.forwarder.counters),
        **asdict(services.provider.counters),
    }
    doc["rate_limits"] = services.forwarder.rate_limits.status()
    doc["version"] = __version__
    doc["uptime"] = round(time.monotonic() - services.started, 1)
    return doc


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def admin_status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        return json_response(await status(services))
    except ServiceError as exc:
        return service_error_response(exc)


async def metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.metrics is None:
        return error_response(
            404,
            "not_found",
            f"metrics are turned off here ({spelled('metrics')} set to off): start closeproxy "
            "with metrics on to serve /metrics",
        )
    with contextlib.suppress(TokenStoreError):  # the expiry gauge: the stored tokens now
        await services.provider.snapshot()
    body = services.metrics.exposition()
    return web.Response(
        body=body,
        headers={"Content-Type": METRICS_CONTENT_TYPE, "Cache-Control": "no-store"},
    )


async def admin_page(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        doc = await status(services)
    except ServiceError as exc:
        doc = {"logged_in": False, "problem": str(exc), "version": __version__}
    page = dashboard.render(
        doc,
        services.recent.newest_first(),
        page_token=services.page_tokens.issue(),
        notice=services.notice,
        metrics=services.metrics is not None,
    )
    return web.Response(text=page, content_type="text/html", headers=dashboard.PAGE_HEADERS)


async def admin_redirect(request: web.Request) -> web.Response:
    return web.Response(status=308, headers={"Location": "/admin/"})


def from_browser(request: web.Request) -> bool:
    """Browsers say where a request comes from; curl and scripts send neither header."""
    return "Origin" in request.headers or "Sec-Fetch-Site" in request.headers


async def _page_token_refusal(request: web.Request) -> web.Response | None:
    """None when this browser POST carries a token of a page this proxy served."""
    form = await request.post() if request.content_type in _FORM_TYPES else None
    presented = form.get(dashboard.PAGE_TOKEN_FIELD) if form is not None else None
    if isinstance(presented, str) and request.app[SERVICES].page_tokens.valid(presented):
        return None
    return error_response(
        403,
        "forbidden_origin",
        "a browser may press Refresh and Revoke only on this proxy's own /admin/ page: "
        "reload /admin/ and press the button there",
    )


_FORM_TYPES: frozenset[str] = frozenset(
    {"application/x-www-form-urlencoded", "multipart/form-data"}
)


def _back_to_page(services: Services, notice: str) -> web.Response:
    services.notice = f"{datetime.now(UTC).strftime('%H:%M:%S')} UTC: {notice}"
    # 303: the browser follows with a GET, so reloading the page never re-posts.
    return web.Response(status=303, headers={"Location": "/admin/", "Cache-Control": "no-store"})


async def admin_refresh(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    page = from_browser(request)
    if page and (refusal := await _page_token_refusal(request)) is not None:
        return refusal
    try:
        await services.provider.refresh(FORCE)
    except ServiceError as exc:
        if page:
            return _back_to_page(services, f"refresh failed: {exc}")
        return service_error_response(exc)
    if page:
        return _back_to_page(services, "the access token was refreshed")
    return json_response(await status(services))


async def admin_revoke(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    page = from_browser(request)
    if page and (refusal := await _page_token_refusal(request)) is not None:
        return refusal
    try:
        outcome = await revoke(services.provider)
    except ServiceError as exc:
        if page:
            return _back_to_page(services, f"revoke failed: {exc}")
        return service_error_response(exc)
    if page:
        if not outcome.had_grant:
            said = "not logged in: there was nothing to revoke"
        elif outcome.problem:
            said = outcome.problem
        else:
            said = "revoked at Close and wiped the local tokens"
        return _back_to_page(services, said)
    body: dict[str, Any] = {"revoked": outcome.revoked_at_close, "wiped": outcome.wiped}
    if not outcome.had_grant:
        body["message"] = "not logged in: there was nothing to revoke"
    elif outcome.problem:
        body["error"] = outcome.problem
        body["closeproxy_error"] = "revoke_incomplete"
        return json_response(body, status=502)
    return json_response(body)


async def admin_login(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    if services.provider.oauth is None:
        try:
            services.settings.require_client()
            missing = "the OAuth client is not configured"
        except ConfigError as exc:
            missing = str(exc)
        # 409, not 5xx: nothing is broken and retrying will not help until it is configured.
        return callback_page(
            409,
            "Login needs your Close OAuth app",
            f"This proxy cannot log in yet: {missing}. Use the client id and secret of "
            "your OAuth app (Close: Settings, Developer, OAuth Apps), then restart closeproxy "
            "and open /admin/login again.",
        )
    redirect_uri = services.settings.redirect_uri or f"http://{request.host}{CALLBACK_PATH}"
    if URL(redirect_uri).path != CALLBACK_PATH:
        # Close would send the browser elsewhere, and this proxy would never see the code.
        return callback_page(
            409,
            "Use closeproxy login",
            f"The configured redirect URI ({redirect_uri}) does not lead back to this proxy's "
            f"{CALLBACK_PATH}, so browser login through the proxy cannot finish. Run "
            "`closeproxy login` in a terminal: it lets you paste the address the browser "
            "lands on.",
        )
    pending = start_login(services.settings, redirect_uri=redirect_uri)
    services.pending.add(pending)
    return web.Response(status=302, headers={"Location": pending.url, **PAGE_HEADERS})


async def admin_callback(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    received = Callback.from_query(parse_qs(request.query_string, keep_blank_values=True))
    pending = services.pending.take(received.state)
    if pending is None or services.provider.oauth is None:
        return callback_page(
            400,
            "Login link not valid",
            "This login link is unknown, expired or was already used: start again at "
            "/admin/login on this proxy.",
        )
    try:
        code = check_callback(pending, received)
        result = await finish_login(services.provider.oauth, services.store, pending, code)
    except CloseProxyError as exc:
        return callback_page(400, "Login failed", str(exc))
    tokens = result.tokens
    log.info(
        "logged in through /admin/login: organization %s, user %s",
        tokens.organization_id,
        tokens.user_id,
    )
    retired = await retire_previous(services.provider.oauth, result)
    return success_page(tokens, services.store.describe(), note=retired.message)


def add_routes(app: web.Application, *, expect_handler: ExpectHandler) -> None:
    """The admin routes; `expect_handler` checks an `Expect: 100-continue` request first."""
    handlers: dict[AdminRoute, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
        admin_routes.HEALTHZ: healthz,
        admin_routes.METRICS: metrics,
        admin_routes.PAGE: admin_page,
        admin_routes.PAGE_REDIRECT: admin_redirect,
        admin_routes.STATUS: admin_status,
        admin_routes.REFRESH: admin_refresh,
        admin_routes.REVOKE: admin_revoke,
        admin_routes.LOGIN: admin_login,
        admin_routes.CALLBACK: admin_callback,
    }
    for route in ADMIN_ROUTES:
        handler = handlers[route]  # a route declared without its handler fails at start
        if route.method == "GET":
            app.router.add_get(route.path, handler, expect_handler=expect_handler)
        else:
            app.router.add_route(route.method, route.path, handler, expect_handler=expect_handler)
