"""The people: ``/me/`` and ``/user/``.

Simulated user fields: ``id``, ``first_name``, ``last_name``, ``display_name``,
``email``, ``image``, ``last_used_timezone``, ``organizations`` (ids; ``/me/`` expands
them to ``{"id", "name"}``), ``date_created``, ``date_updated``. The token's user is
``SimConfig.user_id``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from closeproxy.sim.gate import ApiCall
from closeproxy.sim.rest import NotFound, one, paged

ORGANIZATION_NAME: str = "Simulated Org"


async def me(request: web.Request, call: ApiCall) -> web.StreamResponse:
    config = call.state.config
    user = call.state.org.users.get(config.user_id) or {}
    return web.json_response(
        {
            **user,
            "id": config.user_id,
            "organizations": [{"id": config.organization_id, "name": ORGANIZATION_NAME}],
            "email": user.get("email", "sim@example.com"),
            "first_name": user.get("first_name", "Sim"),
            "last_name": user.get("last_name", "User"),
        }
    )


async def user_list(request: web.Request, call: ApiCall) -> web.StreamResponse:
    return paged(request, list(call.state.org.users))


async def user_get(request: web.Request, call: ApiCall) -> web.StreamResponse:
    user = call.state.org.users.get(request.match_info["user_id"])
    if user is None:
        raise NotFound("User")
    return one(request, user)


def add_routes(router: web.UrlDispatcher, gated: Any) -> None:
    router.add_get("/api/v1/me/", gated(me))
    router.add_get("/api/v1/user/", gated(user_list))
    router.add_get("/api/v1/user/{user_id}/", gated(user_get))
