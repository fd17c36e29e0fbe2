"""Opportunities: ``/opportunity/``.

Simulated fields: ``id``, ``lead_id``, ``lead_name``, ``contact_id``,
``contact_name``, ``user_id``, ``user_name``, ``status_id``, ``status_label``,
``status_type``, ``value`` (cents), ``value_period`` (``one_time``, ``monthly``,
``annual``), ``value_currency``, ``value_formatted``, ``confidence``, ``note``,
``date_won``, ``organization_id``, ``created_by``/``updated_by`` and the date stamps.
Listing filters on ``lead_id``, ``user_id``, ``status_id``, ``status_type``,
``status_label``, ``date_created__*``/``date_updated__*``; pages with ``_skip``/``_limit``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from closeproxy.sim import validate as v
from closeproxy.sim.gate import ApiCall
from closeproxy.sim.org import Organization, Record, new_id, now_iso
from closeproxy.sim.rest import NotFound, date_filtered, equal_filtered, json_object, one, paged

PERIODS: tuple[str, ...] = ("one_time", "monthly", "annual")
PERIOD_SUFFIX: dict[str, str] = {"one_time": "", "monthly": " monthly", "annual": " annually"}


def _checks(org: Organization) -> dict[str, v.Check]:
    return {
        "lead_id": v.reference(org.leads, "Lead"),
        "contact_id": v.reference(org.contacts, "Contact", nullable=True),
        "user_id": v.reference(org.users, "User", nullable=True),
        "status_id": v.reference(org.opportunity_statuses, "Opportunity status"),
        "value": v.integer(0),
        "value_period": v.choice(*PERIODS),
        "value_currency": v.text,
        "confidence": v.integer(0, 100),
        "note": v.optional_text,
        "date_won": v.day_or_moment,
    }


def shape(org: Organization, record: Record) -> Record:
    """Fill the fields Close derives from the ids and the value."""
    status = org.opportunity_statuses.get(record.get("status_id", ""))
    lead = org.leads.get(record.get("lead_id", ""))
    contact = org.contacts.get(record.get("contact_id") or "")
    value = record.get("value")
    period = record.get("value_period", "one_time")
    record.update(
        {
            "lead_name": None if lead is None else lead.get("name"),
            "contact_name": None if contact is None else contact.get("name"),
            "user_name": org.user_name(record.get("user_id")),
            "status_label": None if status is None else status["label"],
            "status_type": None if status is None else status["type"],
            "value_formatted": None
            if value is None
            else f"${value / 100:,.2f}{PERIOD_SUFFIX.get(period, '')}",
        }
    )
    if status is not None and status["type"] == "won" and not record.get("date_won"):
        record["date_won"] = now_iso()[:10]
    return record


def _opportunity(call: ApiCall, opportunity_id: str) -> Record:
    found = call.state.org.opportunities.get(opportunity_id)
    if found is None:
        raise NotFound("Opportunity")
    return found


async def opportunity_list(request: web.Request, call: ApiCall) -> web.StreamResponse:
    records = equal_filtered(
        request,
        call.state.org.opportunities,
        ("lead_id", "user_id", "status_id", "status_type", "status_label"),
    )
    return paged(request, date_filtered(request, records, ("date_created", "date_updated")))


async def opportunity_create(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    user_id = call.state.config.user_id
    fields = v.validated(await json_object(call.body), _checks(org), required=("lead_id",))
    status = org.opportunity_statuses.get(fields.get("status_id", "")) or next(
        iter(org.opportunity_statuses)
    )
    record: Record = {
        "id": new_id("oppo"),
        "contact_id": None,
        "user_id": user_id,
        "value": None,
        "value_period": "one_time",
        "value_currency": "USD",
        "confidence": 0,
        "note": "",
        "date_won": None,
        **fields,
        "status_id": status["id"],
    }
    org.stamp_new(shape(org, record), user_id)
    return web.json_response(org.created("opportunities", record, user_id=user_id))


async def opportunity_get(request: web.Request, call: ApiCall) -> web.StreamResponse:
    return one(request, _opportunity(call, request.match_info["opportunity_id"]))


async def opportunity_update(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    fields = v.validated(await json_object(call.body), _checks(org))
    record = _opportunity(call, request.match_info["opportunity_id"])
    org.update("opportunities", record, fields, user_id=call.state.config.user_id, shape=shape)
    return web.json_response(record)


async def opportunity_delete(request: web.Request, call: ApiCall) -> web.StreamResponse:
    record = _opportunity(call, request.match_info["opportunity_id"])
    call.state.org.deleted("opportunities", record, user_id=call.state.config.user_id)
    return web.json_response({})


def add_routes(router: web.UrlDispatcher, gated: Any) -> None:
    router.add_get("/api/v1/opportunity/", gated(opportunity_list))
    router.add_post("/api/v1/opportunity/", gated(opportunity_create))
    router.add_get("/api/v1/opportunity/{opportunity_id}/", gated(opportunity_get))
    router.add_put("/api/v1/opportunity/{opportunity_id}/", gated(opportunity_update))
    router.add_delete("/api/v1/opportunity/{opportunity_id}/", gated(opportunity_delete))
