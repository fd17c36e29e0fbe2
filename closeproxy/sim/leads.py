"""Leads and their contacts: ``/lead/`` and ``/contact/``.

Simulated lead fields: ``id``, ``name``, ``display_name``, ``description``, ``url``,
``status_id``, ``status_label``, ``contacts`` (full contact objects), ``addresses``
(``label``, ``address_1``, ``address_2``, ``city``, ``state``, ``zipcode``,
``country``), ``opportunities`` and ``tasks`` of the lead, ``custom`` (by field name)
and ``custom.<field id>`` keys, ``integration_links``, ``html_url``,
``organization_id``, ``created_by``/``updated_by`` (and ``_name``),
``date_created``, ``date_updated``. Contacts: ``id``, ``lead_id``, ``name``,
``display_name``, ``title``, ``emails``, ``phones``, ``urls`` and the same stamps.
Listing takes ``query`` (see ``query.py``), ``_skip``/``_limit``, ``_fields``.
Creating a lead with ``contacts`` creates them; a contact without ``lead_id`` gets a
new lead named after it, as at Close. Deleting a lead deletes what belongs to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from closeproxy.sim import query as lead_query
from closeproxy.sim import validate as v
from closeproxy.sim.org import Organization, Record, new_id
from closeproxy.sim.rest import NotFound, ValidationFailed, json_object, one, paged

if TYPE_CHECKING:  # the gate needs SimState, which holds Leads
    from closeproxy.sim.gate import ApiCall

APP_URL: str = "https://app.close.com"
CONTACT_CHECKS: dict[str, v.Check] = {
    "name": v.optional_text,
    "title": v.optional_text,
    "emails": v.list_of(v.EMAIL),
    "phones": v.list_of(v.PHONE),
    "urls": v.list_of(v.URL),
}
CONTACT = v.object_with(CONTACT_CHECKS)


class Leads:
    """The leads of an organization with Close's derived fields; what tests create into."""

    def __init__(self, org: Organization, user_id: str) -> None:
        self.org = org
        self.user_id = user_id

    def __len__(self) -> int:
        return len(self.org.leads)

    def create(self, fields: Mapping[str, Any]) -> Record:
        """Create a lead from an API payload (validated); returns its Close view."""
        return self.view(create_lead(self.org, dict(fields), self.user_id))

    def view(self, lead: Record) -> Record:
        return lead_view(self.org, lead)


def _by_lead(org: Organization) -> dict[str, dict[str, list[Record]]]:
    index: dict[str, dict[str, list[Record]]] = {}
    for name in ("contacts", "opportunities", "tasks"):
        for record in org.collection(name):
            entry = index.setdefault(str(record.get("lead_id")), {})
            entry.setdefault(name, []).append(dict(record))
    return index


def lead_views(org: Organization, leads: list[Record]) -> list[Record]:
    """Close's view of each lead, with its contacts, opportunities and tasks."""
    fields = {field["id"]: field for field in org.custom_fields}
    index = _by_lead(org)
    views = []
    for lead in leads:
        view = dict(lead)
        view["display_name"] = lead.get("name") or ""
        related = index.get(lead["id"], {})
        for name in ("contacts", "opportunities", "tasks"):
            view[name] = related.get(name, [])
        custom = lead.get("custom", {})
        view["custom"] = {
            fields[field_id]["name"]: value
            for field_id, value in custom.items()
            if field_id in fields
        }
        for field_id, value in custom.items():
            view[f"custom.{field_id}"] = value
        view["html_url"] = f"{APP_URL}/lead/{lead['id']}/"
        views.append(view)
    return views


def lead_view(org: Organization, lead: Record) -> Record:
    return lead_views(org, [lead])[0]


def _custom_check(org: Organization, field: Record, value: object) -> object:
    if value is None:
        return None
    kind = field.get("type")
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("Not a valid number.")
    elif kind == "choices":
        if value not in (field.get("choices") or []):
            raise ValueError(f"Must be one of: {', '.join(field.get('choices') or [])}.")
    elif kind in {"date", "datetime"}:
        return v.day_or_moment(value)
    elif kind == "user":
        return v.reference(org.users, "User")(value)
    elif not isinstance(value, str):
        raise ValueError("Not a valid string.")
    return value


def _lead_fields(org: Organization, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a lead payload into stored fields (custom values keyed by field id)."""
    checks: dict[str, v.Check] = {
        "name": v.optional_text,
        "description": v.optional_text,
        "url": v.optional_text,
        "status_id": v.reference(org.lead_statuses, "Lead status"),
        "addresses": v.list_of(v.ADDRESS),
        "contacts": v.list_of(CONTACT),
    }
    errors: dict[str, str] = {}
    try:
        clean = v.validated(payload, checks)
    except ValidationFailed as exc:
        errors.update(exc.field_errors)
        clean = {}
    labels = {str(s["label"]).lower(): s for s in org.lead_statuses}
    for key in ("status", "status_label"):
        if key in payload:
            status = labels.get(str(payload[key]).lower())
            if status is None:
                errors[key] = "Lead status does not exist."
            else:
                clean["status_id"] = status["id"]
    by_id = {field["id"]: field for field in org.custom_fields}
    by_name = {field["name"]: field for field in org.custom_fields}
    custom: dict[str, object] = {}
    sent: list[tuple[str, str, object]] = []
    raw_custom = payload.get("custom")
    if raw_custom is not None:
        if isinstance(raw_custom, dict):
            sent += [(f"custom.{name}", str(name), value) for name, value in raw_custom.items()]
        else:
            errors["custom"] = "Not a valid object."
    sent += [
        (key, key[len("custom.") :], value)
        for key, value in payload.items()
        if key.startswith("custom.")
    ]
    for key, name, value in sent:
        field = by_id.get(name) or by_name.get(name)
        if field is None:
            errors[key] = "Custom field does not exist."
            continue
        try:
            custom[field["id"]] = _custom_check(org, field, value)
        except ValueError as exc:
            errors[key] = str(exc)
    if errors:
        raise ValidationFailed(errors)
    if sent:
        clean["custom"] = custom
    if "description" in clean and clean["description"] is None:
        clean["description"] = ""
    return clean


def create_lead(org: Organization, payload: dict[str, Any], user_id: str) -> Record:
    fields = _lead_fields(org, payload)
    contacts = fields.pop("contacts", [])
    status = org.lead_statuses.get(fields.get("status_id", "")) or next(iter(org.lead_statuses))
    lead: Record = {
        "id": new_id("lead"),
        "name": None,
        "display_name": "",
        "description": "",
        "url": None,
        "addresses": [],
        "custom": {},
        "integration_links": [],
        **fields,
    }
    lead["status_id"] = status["id"]
    lead["status_label"] = status["label"]
    lead["display_name"] = lead["name"] or ""
    org.stamp_new(lead, user_id)
    org.created("leads", lead, user_id=user_id)
    for contact_fields in contacts:
        _create_contact(org, {**contact_fields, "lead_id": lead["id"]}, user_id)
    return lead


def _create_contact(org: Organization, fields: dict[str, Any], user_id: str) -> Record:
    contact: Record = {
        "id": new_id("cont"),
        "name": None,
        "title": None,
        "emails": [],
        "phones": [],
        "urls": [],
        **fields,
    }
    contact["display_name"] = contact["name"] or ""
    for phone in contact["phones"]:
        phone.setdefault("phone_formatted", phone["phone"])
        phone.setdefault("type", "office")
    for email in contact["emails"]:
        email.setdefault("type", "office")
    org.stamp_new(contact, user_id)
    return org.created("contacts", contact, user_id=user_id)


def _lead(org: Organization, lead_id: str) -> Record:
    lead = org.leads.get(lead_id)
    if lead is None:
        raise NotFound("Lead")
    return lead


# --- /lead/ -----------------------------------------------------------------------


async def lead_list(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    parsed = lead_query.parse(request.query.get("query", ""))
    views = parsed.apply(lead_views(org, list(org.leads)))
    return paged(request, views)


async def lead_create(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    lead = create_lead(org, await json_object(call.body), call.state.config.user_id)
    return web.json_response(lead_view(org, lead))


async def lead_get(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    return one(request, lead_view(org, _lead(org, request.match_info["lead_id"])))


async def lead_update(request: web.Request, call: ApiCall) -> web.StreamResponse:
    """Partial update: fields not sent are kept, as Close's PUT does."""
    org = call.state.org
    user_id = call.state.config.user_id
    payload = await json_object(call.body)
    lead = _lead(org, request.match_info["lead_id"])
    fields = _lead_fields(org, payload)
    fields.pop("contacts", None)  # Close edits contacts through /contact/
    previous = dict(lead)
    if "custom" in fields:
        fields["custom"] = {**lead.get("custom", {}), **fields["custom"]}
        fields["custom"] = {k: value for k, value in fields["custom"].items() if value is not None}
    lead.update(fields)
    status = org.lead_statuses.get(lead["status_id"])
    if status is not None:
        lead["status_label"] = status["label"]
    lead["display_name"] = lead.get("name") or ""
    org.stamp_update(lead, user_id)
    org.updated("leads", lead, previous, user_id=user_id)
    return web.json_response(lead_view(org, lead))


async def lead_delete(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    user_id = call.state.config.user_id
    lead = _lead(org, request.match_info["lead_id"])
    for collection in ("contacts", "opportunities", "tasks", "activities"):
        for record in org.collection(collection):
            if record.get("lead_id") == lead["id"]:
                org.deleted(collection, record, user_id=user_id)
    org.deleted("leads", lead, user_id=user_id)
    return web.json_response({})


# --- /contact/ --------------------------------------------------------------------


def _contact(org: Organization, contact_id: str) -> Record:
    contact = org.contacts.get(contact_id)
    if contact is None:
        raise NotFound("Contact")
    return contact


async def contact_list(request: web.Request, call: ApiCall) -> web.StreamResponse:
    contacts = list(call.state.org.contacts)
    lead_id = request.query.get("lead_id")
    if lead_id is not None:
        contacts = [contact for contact in contacts if contact.get("lead_id") == lead_id]
    return paged(request, contacts)


async def contact_create(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    user_id = call.state.config.user_id
    payload = await json_object(call.body)
    checks = {**CONTACT_CHECKS, "lead_id": v.reference(org.leads, "Lead")}
    fields = v.validated(payload, checks)
    if "lead_id" not in fields:
        lead = create_lead(org, {"name": fields.get("name")}, user_id)
        fields["lead_id"] = lead["id"]
    return web.json_response(_create_contact(org, fields, user_id))


async def contact_get(request: web.Request, call: ApiCall) -> web.StreamResponse:
    return one(request, _contact(call.state.org, request.match_info["contact_id"]))


async def contact_update(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    user_id = call.state.config.user_id
    payload = await json_object(call.body)
    contact = _contact(org, request.match_info["contact_id"])
    fields = v.validated(payload, CONTACT_CHECKS)
    previous = dict(contact)
    contact.update(fields)
    contact["display_name"] = contact.get("name") or ""
    org.stamp_update(contact, user_id)
    org.updated("contacts", contact, previous, user_id=user_id)
    return web.json_response(contact)


async def contact_delete(request: web.Request, call: ApiCall) -> web.StreamResponse:
    org = call.state.org
    contact = _contact(org, request.match_info["contact_id"])
    org.deleted("contacts", contact, user_id=call.state.config.user_id)
    return web.json_response({})


def add_routes(router: web.UrlDispatcher, gated: Any) -> None:
    router.add_get("/api/v1/lead/", gated(lead_list))
    router.add_post("/api/v1/lead/", gated(lead_create))
    router.add_get("/api/v1/lead/{lead_id}/", gated(lead_get))
    router.add_put("/api/v1/lead/{lead_id}/", gated(lead_update))
    router.add_delete("/api/v1/lead/{lead_id}/", gated(lead_delete))
    router.add_get("/api/v1/contact/", gated(contact_list))
    router.add_post("/api/v1/contact/", gated(contact_create))
    router.add_get("/api/v1/contact/{contact_id}/", gated(contact_get))
    router.add_put("/api/v1/contact/{contact_id}/", gated(contact_update))
    router.add_delete("/api/v1/contact/{contact_id}/", gated(contact_delete))
