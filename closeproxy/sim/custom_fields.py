"""Lead custom fields: ``/custom_field/lead/`` (and the older ``/custom_fields/lead/``).

Simulated fields: ``id``, ``name``, ``type`` (``text``, ``number``, ``date``,
``datetime``, ``choices``, ``user``, ``hidden``), ``choices``,
``accepts_multiple_values``, ``editable_with_roles``, ``description``,
``organization_id``, ``created_by``/``updated_by`` and the date stamps. Values live
on leads (see ``leads.py``) and are validated against the field's type.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from closeproxy.sim import validate as v
from closeproxy.sim.gate import ApiCall
from closeproxy.sim.org import Record, new_id
from closeproxy.sim.rest import NotFound, ValidationFailed, json_object, one, paged

TYPES: tuple[str, ...] = ("text", "number", "date", "datetime", "choices", "user", "hidden")
CHECKS: dict[str, v.Check] = {
    "name": v.name_text,
    "type": v.choice(*TYPES),
    "choices": v.list_of(v.text),
    "accepts_multiple_values": v.boolean,
    "description": v.optional_text,
}


def _field(call: ApiCall, field_id: str) -> Record:
    field = call.state.org.custom_fields.get(field_id)
    if field is None:
        raise NotFound("Custom field")
    return field


async def field_list(request: web.Request, call: ApiCall) -> web.StreamResponse:
    return paged(request, list(call.state.org.custom_fields))


async def field_create(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    fields = v.validated(await json_object(call.body), CHECKS, required=("name", "type"))
    if fields["type"] == "choices" and not fields.get("choices"):
        raise ValidationFailed({"choices": "A choices field needs at least one choice."})
    if any(field["name"] == fields["name"] for field in org.custom_fields):
        raise ValidationFailed({"name": "A custom field with this name already exists."})
    record: Record = {
        "id": new_id("cf"),
        "choices": None,
        "accepts_multiple_values": False,
        "editable_with_roles": [],
        "description": None,
        **fields,
    }
    org.stamp_new(record, call.state.config.user_id)
    return web.json_response(
        org.created("custom_fields", record, user_id=call.state.config.user_id)
    )


async def field_get(request: web.Request, call: ApiCall) -> web.StreamResponse:
    return one(request, _field(call, request.match_info["field_id"]))


async def field_update(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    user_id = call.state.config.user_id
    changes = v.validated(await json_object(call.body), {**CHECKS, "type": v.text})
    field = _field(call, request.match_info["field_id"])
    if "type" in changes and changes["type"] != field["type"]:
        raise ValidationFailed({"type": "The type of a custom field cannot change."})
    previous = dict(field)
    field.update(changes)
    org.stamp_update(field, user_id)
    org.updated("custom_fields", field, previous, user_id=user_id)
    return web.json_response(field)


async def field_delete(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    field = _field(call, request.match_info["field_id"])
    for lead in org.leads:
        lead.get("custom", {}).pop(field["id"], None)
    org.deleted("custom_fields", field, user_id=call.state.config.user_id)
    return web.json_response({})


def add_routes(router: web.UrlDispatcher, gated: Any) -> None:
    for base in ("/api/v1/custom_field/lead/", "/api/v1/custom_fields/lead/"):
        router.add_get(base, gated(field_list))
        router.add_post(base, gated(field_create))
        router.add_get(base + "{field_id}/", gated(field_get))
        router.add_put(base + "{field_id}/", gated(field_update))
        router.add_delete(base + "{field_id}/", gated(field_delete))
