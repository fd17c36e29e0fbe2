"""An in-memory lead collection shaped like Close's /api/v1/lead/ resource."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

Lead = dict[str, Any]

SEED_NAMES: tuple[str, ...] = (
    "Acme Corporation",
    "Globex",
    "Initech",
    "Umbrella Ltd",
    "Stark Industries",
)
READ_ONLY_FIELDS: frozenset[str] = frozenset(
    {"id", "organization_id", "date_created", "date_updated"}
)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def project(lead: Lead, fields: Iterable[str] | None) -> Lead:
    """Keep only the requested fields, as Close's ``_fields`` does."""
    if fields is None:
        return dict(lead)
    return {name: lead[name] for name in fields if name in lead}


class LeadStore:
    """Leads in insertion order, which is the order listing pages through."""

    def __init__(self, organization_id: str) -> None:
        self._organization_id = organization_id
        self._leads: dict[str, Lead] = {}
        for name in SEED_NAMES:
            self.create({"name": name})

    def __len__(self) -> int:
        return len(self._leads)

    def page(self, skip: int, limit: int) -> list[Lead]:
        return list(self._leads.values())[skip : skip + limit]

    def get(self, lead_id: str) -> Lead | None:
        return self._leads.get(lead_id)

    def create(self, fields: Mapping[str, Any]) -> Lead:
        stamp = _now()
        lead: Lead = {
            "name": None,
            "description": "",
            "url": None,
            "status_label": "Potential",
            "contacts": [],
            "custom": {},
        }
        lead.update({k: v for k, v in fields.items() if k not in READ_ONLY_FIELDS})
        lead["id"] = "lead_" + secrets.token_urlsafe(24)
        lead["display_name"] = lead["name"] or ""
        lead["organization_id"] = self._organization_id
        lead["date_created"] = stamp
        lead["date_updated"] = stamp
        self._leads[lead["id"]] = lead
        return lead

    def update(self, lead_id: str, fields: Mapping[str, Any]) -> Lead | None:
        """Partial update: fields not sent are kept, as Close's PUT does."""
        lead = self._leads.get(lead_id)
        if lead is None:
            return None
        lead.update({k: v for k, v in fields.items() if k not in READ_ONLY_FIELDS})
        if "name" in fields:
            lead["display_name"] = lead["name"] or ""
        lead["date_updated"] = _now()
        return lead

    def delete(self, lead_id: str) -> bool:
        return self._leads.pop(lead_id, None) is not None
