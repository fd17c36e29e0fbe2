"""Lead and opportunity statuses: ``/status/lead/`` and ``/status/opportunity/``.

Simulated fields: ``id``, ``label``, and for opportunity statuses ``type``
(``active``, ``won``, ``lost``), plus ``organization_id`` and the date stamps.
Renaming a status renames it on its leads or opportunities; a status still in use
cannot be deleted (400), as at Close.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from closeproxy.sim import validate as v
from closeproxy.sim.gate import ApiCall
from closeproxy.sim.org import Record, new_id
from closeproxy.sim.rest import BadRequest, NotFound, json_object, one, paged

KINDS: dict[str, tuple[str, str, str]] = {
    # kind in the URL: (statuses collection, objects that use them, name for errors)
    "lead": ("lead_statuses", "leads", "Lead status"),
    "opportunity": ("opportunity_statuses", "opportunities", "Opportunity status"),
}
OPPORTUNITY_TYPES: tuple[str, ...] = ("active", "won", "lost")


def _checks(kind: str) -> dict[str, v.Check]:
    checks: dict[str, v.Check] = {"label": v.name_text}
    if kind == "opportunity":
        checks["type"] = v.choice(*OPPORTUNITY_TYPES)
    return checks


def _status(call: ApiCall, kind: str, status_id: str) -> Record:
    collection, _, name = KINDS[kind]
    status = call.state.org.collection(collection).get(status_id)
    if status is None:
        raise NotFound(name)
    return status


def handlers(kind: str) -> dict[str, Any]:
    collection, users_of, _ = KINDS[kind]

    async def listing(request: web.Request, call: ApiCall) -> web.StreamResponse:
        return paged(request, list(call.state.org.collection(collection)))

    async def create(request: web.Request, call: ApiCall) -> web.StreamResponse:
        org = call.state.org
        required = ("label", "type") if kind == "opportunity" else ("label",)
        fields = v.validated(await json_object(call.body), _checks(kind), required=required)
        status: Record = {"id": new_id("stat"), **fields}
        org.stamp_new(status, call.state.config.user_id)
        return web.json_response(org.created(collection, status, user_id=call.state.config.user_id))

    async def get(request: web.Request, call: ApiCall) -> web.StreamResponse:
        return one(request, _status(call, kind, request.match_info["status_id"]))

    async def update(request: web.Request, call: ApiCall) -> web.StreamResponse:
        org = call.state.org
        user_id = call.state.config.user_id
        fields = v.validated(await json_object(call.body), _checks(kind))
        status = _status(call, kind, request.match_info["status_id"])
        previous = dict(status)
        status.update(fields)
        org.stamp_update(status, user_id)
        for record in org.collection(users_of):
            if record.get("status_id") == status["id"]:
                record["status_label"] = status["label"]
                if kind == "opportunity":
                    record["status_type"] = status["type"]
        org.updated(collection, status, previous, user_id=user_id)
        return web.json_response(status)

    async def delete(request: web.Request, call: ApiCall) -> web.StreamResponse:
        org = call.state.org
        status = _status(call, kind, request.match_info["status_id"])
        if any(r.get("status_id") == status["id"] for r in org.collection(users_of)):
            raise BadRequest(f"Status {status['label']!r} is in use; move its {users_of} first")
        org.deleted(collection, status, user_id=call.state.config.user_id)
        return web.json_response({})

    return {"list": listing, "create": create, "get": get, "update": update, "delete": delete}


def add_routes(router: web.UrlDispatcher, gated: Any) -> None:
    for kind in KINDS:
        found = handlers(kind)
        base = f"/api/v1/status/{kind}/"
        router.add_get(base, gated(found["list"]))
        router.add_post(base, gated(found["create"]))
        router.add_get(base + "{status_id}/", gated(found["get"]))
        router.add_put(base + "{status_id}/", gated(found["update"]))
        router.add_delete(base + "{status_id}/", gated(found["delete"]))
