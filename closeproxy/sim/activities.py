"""Activities: ``/activity/`` and its typed sub-resources ``note``, ``call``, ``email``.

Simulated fields, all types: ``id``, ``_type`` (``Note``, ``Call``, ``Email``),
``lead_id``, ``contact_id``, ``user_id``, ``user_name``, ``organization_id``,
``created_by``/``updated_by`` and the date stamps. Note: ``note``, ``note_html``.
Call: ``direction`` (``inbound``/``outbound``), ``duration``, ``phone``, ``status``,
``disposition``, ``note``, ``recording_url``. Email: ``direction``
(``incoming``/``outgoing``), ``status`` (``inbox``, ``draft``, ``scheduled``,
``outbox``, ``sent``), ``subject``, ``body_text``, ``body_html``, ``sender``, ``to``,
``cc``, ``bcc``, ``attachments``, ``thread_id``, ``date_sent``.
Listing, newest first, filters on ``lead_id``, ``contact_id``, ``user_id``, ``_type``
and ``date_created__gt``/``__gte``/``__lt``/``__lte``; pages with ``_skip``/``_limit``
or ``_cursor`` (answering ``cursor_next``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from closeproxy.sim import validate as v
from closeproxy.sim.gate import ApiCall
from closeproxy.sim.org import Organization, Record, new_id
from closeproxy.sim.rest import (
    BadRequest,
    NotFound,
    cursor_paged,
    date_filtered,
    equal_filtered,
    json_object,
    one,
)

TYPES: tuple[str, ...] = ("Note", "Call", "Email")
PATHS: dict[str, str] = {"note": "Note", "call": "Call", "email": "Email"}
PAGE_DEFAULT: int = 100
PAGE_MAX: int = 100
DEFAULTS: dict[str, Record] = {
    "Note": {"note": "", "note_html": ""},
    "Call": {
        "direction": "outbound",
        "duration": 0,
        "phone": None,
        "status": "completed",
        "disposition": "answered",
        "note": "",
        "recording_url": None,
    },
    "Email": {
        "direction": "outgoing",
        "status": "draft",
        "subject": "",
        "body_text": "",
        "body_html": "",
        "sender": None,
        "to": [],
        "cc": [],
        "bcc": [],
        "attachments": [],
        "thread_id": None,
        "date_sent": None,
    },
}


def _checks(org: Organization, kind: str) -> dict[str, v.Check]:
    common: dict[str, v.Check] = {
        "lead_id": v.reference(org.leads, "Lead"),
        "contact_id": v.reference(org.contacts, "Contact", nullable=True),
        "user_id": v.reference(org.users, "User", nullable=True),
    }
    typed: dict[str, dict[str, v.Check]] = {
        "Note": {"note": v.text, "note_html": v.text},
        "Call": {
            "direction": v.choice("inbound", "outbound"),
            "duration": v.integer(0, nullable=False),
            "phone": v.optional_text,
            "status": v.choice("completed", "in-progress", "no-answer", "busy", "failed"),
            "note": v.optional_text,
        },
        "Email": {
            "direction": v.choice("incoming", "outgoing"),
            "status": v.choice("inbox", "draft", "scheduled", "outbox", "sent"),
            "subject": v.text,
            "body_text": v.text,
            "body_html": v.text,
            "sender": v.optional_text,
            "to": v.list_of(v.email_address),
            "cc": v.list_of(v.email_address),
            "bcc": v.list_of(v.email_address),
        },
    }
    return {**common, **typed[kind]}


def shape(org: Organization, record: Record) -> Record:
    kind = record["_type"]
    for name, value in DEFAULTS[kind].items():
        record.setdefault(name, list(value) if isinstance(value, list) else value)
    record["user_name"] = org.user_name(record.get("user_id"))
    if kind == "Note" and not record.get("note_html"):
        record["note_html"] = f"<p>{record.get('note', '')}</p>"
    return record


def _listing(call: ApiCall, request: web.Request, kind: str | None) -> web.StreamResponse:
    records = list(call.state.org.activities)
    if kind is not None:
        records = [record for record in records if record["_type"] == kind]
    wanted_type = request.query.get("_type")
    if wanted_type is not None and wanted_type not in TYPES:
        raise BadRequest(f"_type must be one of {', '.join(TYPES)}")
    records = equal_filtered(request, records, ("lead_id", "contact_id", "user_id", "_type"))
    records = date_filtered(request, records, ("date_created", "date_updated"))
    records.sort(key=lambda record: str(record["date_created"]), reverse=True)
    return cursor_paged(request, records, default=PAGE_DEFAULT, maximum=PAGE_MAX)


def _activity(call: ApiCall, activity_id: str, kind: str | None) -> Record:
    found = call.state.org.activities.get(activity_id)
    if found is None or (kind is not None and found["_type"] != kind):
        raise NotFound(f"{kind or ''}Activity".strip())
    return found


async def activity_list(request: web.Request, call: ApiCall) -> web.StreamResponse:
    return _listing(call, request, None)


def typed_handlers(kind: str) -> dict[str, Any]:
    async def listing(request: web.Request, call: ApiCall) -> web.StreamResponse:
        return _listing(call, request, kind)

    async def create(request: web.Request, call: ApiCall) -> web.StreamResponse:
        org = call.state.org
        user_id = call.state.config.user_id
        fields = v.validated(
            await json_object(call.body), _checks(org, kind), required=("lead_id",)
        )
        record: Record = {"id": new_id("acti"), "_type": kind, "user_id": user_id, **fields}
        org.stamp_new(shape(org, record), user_id)
        if kind == "Email" and record["status"] == "sent":
            record["date_sent"] = record["date_created"]
        return web.json_response(org.created("activities", record, user_id=user_id))

    async def get(request: web.Request, call: ApiCall) -> web.StreamResponse:
        return one(request, _activity(call, request.match_info["activity_id"], kind))

    async def update(request: web.Request, call: ApiCall) -> web.StreamResponse:
        org = call.state.org
        fields = v.validated(await json_object(call.body), _checks(org, kind))
        record = _activity(call, request.match_info["activity_id"], kind)
        org.update("activities", record, fields, user_id=call.state.config.user_id, shape=shape)
        return web.json_response(record)

    async def delete(request: web.Request, call: ApiCall) -> web.StreamResponse:
        record = _activity(call, request.match_info["activity_id"], kind)
        call.state.org.deleted("activities", record, user_id=call.state.config.user_id)
        return web.json_response({})

    return {"list": listing, "create": create, "get": get, "update": update, "delete": delete}


def add_routes(router: web.UrlDispatcher, gated: Any) -> None:
    router.add_get("/api/v1/activity/", gated(activity_list))
    for path, kind in PATHS.items():
        found = typed_handlers(kind)
        base = f"/api/v1/activity/{path}/"
        router.add_get(base, gated(found["list"]))
        router.add_post(base, gated(found["create"]))
        router.add_get(base + "{activity_id}/", gated(found["get"]))
        router.add_put(base + "{activity_id}/", gated(found["update"]))
        router.add_delete(base + "{activity_id}/", gated(found["delete"]))
