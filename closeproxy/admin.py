"""/healthz and /admin/* routes: status, refresh, revoke (login lives in login.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from aiohttp import web

from . import __version__
from .errors import ServiceError
from .responses import json_response, service_error_response
from .services import SERVICES, Services
from .tokens import status_document

log = logging.getLogger("closeproxy.admin")


def status(services: Services) -> dict[str, Any]:
    """`closeproxy status --json` plus what this process has counted."""
    doc = status_document(services.provider.snapshot(), services.store)
    doc["counters"] = {
        **asdict(services.forwarder.counters),
        **asdict(services.provider.counters),
    }
    doc["version"] = __version__
    doc["uptime"] = round(time.monotonic() - services.started, 1)
    return doc


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def admin_status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        return json_response(status(services))
    except ServiceError as exc:
        return service_error_response(exc)


async def admin_refresh(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        await services.provider.refresh(rejected=None)
        return json_response(status(services))
    except ServiceError as exc:
        return service_error_response(exc)


async def admin_revoke(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        outcome = await services.provider.revoke()
    except ServiceError as exc:
        return service_error_response(exc)
    body: dict[str, Any] = {"revoked": outcome.revoked_at_close, "wiped": outcome.wiped}
    if outcome.problem:
        body["error"] = outcome.problem
        body["closeproxy_error"] = "revoke_incomplete"
    return json_response(body, status=200 if outcome.revoked_at_close else 502)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/admin/status", admin_status)
    app.router.add_post("/admin/refresh", admin_refresh)
    app.router.add_post("/admin/revoke", admin_revoke)
