"""The event log: ``/event/``, read-only, newest first, cursor paged.

Simulated fields: ``id``, ``date_created``, ``date_updated``, ``organization_id``,
``user_id``, ``request_id``, ``api_key_id``, ``oauth_client_id``, ``oauth_scope``,
``lead_id``, ``object_type`` (``lead``, ``contact``, ``opportunity``, ``task.lead``,
``activity.note``/``call``/``email``, ``custom_field.lead``, ``status.lead``, ...),
``object_id``, ``action`` (``created``, ``updated``, ``deleted``),
``changed_fields``, ``meta``, ``data`` and ``previous_data``. Every change made
through the API records one; the seed records a ``created`` event per object.
Filters: ``object_type``, ``object_id``, ``lead_id``, ``user_id``, ``action``,
``date_created__*``/``date_updated__*``; ``_limit`` (at most 50) and ``_cursor``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from closeproxy.sim.gate import ApiCall
from closeproxy.sim.rest import NotFound, cursor_paged, date_filtered, equal_filtered, one

PAGE_DEFAULT: int = 50
PAGE_MAX: int = 50


async def event_list(request: web.Request, call: ApiCall) -> web.StreamResponse:
    records = equal_filtered(
        request,
        call.state.org.events,
        ("object_type", "object_id", "lead_id", "user_id", "action", "request_id"),
    )
    records = date_filtered(request, records, ("date_created", "date_updated"))
    # Newest first; events recorded within one instant keep their recorded order reversed.
    ordered = sorted(enumerate(records), key=lambda p: (str(p[1]["date_updated"]), p[0]))
    newest = [record for _, record in reversed(ordered)]
    response = cursor_paged(request, newest, default=PAGE_DEFAULT, maximum=PAGE_MAX)
    return response


async def event_get(request: web.Request, call: ApiCall) -> web.StreamResponse:
    event = call.state.org.events.get(request.match_info["event_id"])
    if event is None:
        raise NotFound("Event")
    return one(request, event)


def add_routes(router: web.UrlDispatcher, gated: Any) -> None:
    router.add_get("/api/v1/event/", gated(event_list))
    router.add_get("/api/v1/event/{event_id}/", gated(event_get))
