"""Tasks: ``/task/``.

Simulated fields: ``id``, ``_type`` (``lead``), ``lead_id``, ``lead_name``,
``assigned_to``, ``assigned_to_name``, ``text``, ``date`` (due; a date or date-time),
``due_date``, ``is_complete``, ``is_dateless``, ``view``, ``object_type``,
``object_id``, ``organization_id``, ``created_by``/``updated_by`` and the date stamps.
Listing filters on ``lead_id``, ``assigned_to``, ``is_complete``, ``_type`` and the
date stamps; pages with ``_skip``/``_limit``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from closeproxy.sim import validate as v
from closeproxy.sim.gate import ApiCall
from closeproxy.sim.org import Organization, Record, new_id
from closeproxy.sim.rest import NotFound, date_filtered, equal_filtered, json_object, one, paged


def _checks(org: Organization) -> dict[str, v.Check]:
    return {
        "_type": v.choice("lead"),
        "lead_id": v.reference(org.leads, "Lead"),
        "assigned_to": v.reference(org.users, "User", nullable=True),
        "text": v.name_text,
        "date": v.day_or_moment,
        "is_complete": v.boolean,
    }


def shape(org: Organization, record: Record) -> Record:
    lead = org.leads.get(record.get("lead_id", ""))
    due = record.get("date")
    record.update(
        {
            "lead_name": None if lead is None else lead.get("name"),
            "assigned_to_name": org.user_name(record.get("assigned_to")),
            "due_date": due,
            "is_dateless": due is None,
            "view": "archive" if record.get("is_complete") else "inbox",
            "object_type": None,
            "object_id": None,
        }
    )
    return record


def _task(call: ApiCall, task_id: str) -> Record:
    found = call.state.org.tasks.get(task_id)
    if found is None:
        raise NotFound("Task")
    return found


async def task_list(request: web.Request, call: ApiCall) -> web.StreamResponse:
    records = equal_filtered(
        request, call.state.org.tasks, ("lead_id", "assigned_to", "is_complete", "_type")
    )
    return paged(request, date_filtered(request, records, ("date_created", "date_updated")))


async def task_create(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    user_id = call.state.config.user_id
    fields = v.validated(await json_object(call.body), _checks(org), required=("lead_id", "text"))
    record: Record = {
        "id": new_id("task"),
        "_type": "lead",
        "assigned_to": user_id,
        "date": None,
        "is_complete": False,
        **fields,
    }
    org.stamp_new(shape(org, record), user_id)
    return web.json_response(org.created("tasks", record, user_id=user_id))


async def task_get(request: web.Request, call: ApiCall) -> web.StreamResponse:
    return one(request, _task(call, request.match_info["task_id"]))


async def task_update(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    fields = v.validated(await json_object(call.body), _checks(org))
    record = _task(call, request.match_info["task_id"])
    org.update("tasks", record, fields, user_id=call.state.config.user_id, shape=shape)
    return web.json_response(record)


async def task_delete(request: web.Request, call: ApiCall) -> web.StreamResponse:
    record = _task(call, request.match_info["task_id"])
    call.state.org.deleted("tasks", record, user_id=call.state.config.user_id)
    return web.json_response({})


def add_routes(router: web.UrlDispatcher, gated: Any) -> None:
    router.add_get("/api/v1/task/", gated(task_list))
    router.add_post("/api/v1/task/", gated(task_create))
    router.add_get("/api/v1/task/{task_id}/", gated(task_get))
    router.add_put("/api/v1/task/{task_id}/", gated(task_update))
    router.add_delete("/api/v1/task/{task_id}/", gated(task_delete))
