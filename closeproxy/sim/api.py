"""The /api/v1/ surface: Close's resources, one module per family, and the test helpers.

Every route passes ``gate.gated`` (record, authenticate, forced 401s, rate limit).
"""

from __future__ import annotations

from aiohttp import web

from closeproxy.sim import (
    activities,
    custom_fields,
    events,
    leads,
    opportunities,
    statuses,
    tasks,
    testing,
    users,
)
from closeproxy.sim.gate import ApiCall, error, gated

RESOURCE_FAMILIES = (
    users,
    leads,
    statuses,
    custom_fields,
    opportunities,
    tasks,
    activities,
    events,
)


async def not_found(request: web.Request, call: ApiCall) -> web.StreamResponse:
    return error("Not found", 404)


def add_routes(app: web.Application) -> None:
    router = app.router
    for family in RESOURCE_FAMILIES:
        family.add_routes(router, gated)
    testing.add_routes(router)
    # Unknown paths under /api/v1/ still pass the gate: logged, authenticated, then 404.
    router.add_route("*", "/api/v1/{tail:.*}", gated(not_found))
