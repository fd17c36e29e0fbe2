"""The simulated organization's data: every collection, ids, the event log, persistence.

Records are plain JSON-able dicts kept in insertion order (the order lists page
through). Each change goes through ``Organization.created/updated/deleted`` so that
the event log sees it, and, with ``SimConfig.data_dir``, is written to disk at once
(atomically: a temp file renamed over ``organization.json``), so a restarted
simulator serves the same data.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Record = dict[str, Any]

DATA_FILE: str = "organization.json"
# Changes within this many seconds are written together: a whole organization is
# megabytes of JSON, too much to rewrite for every call of a bulk script.
SAVE_DELAY: float = 0.2
DATA_VERSION: int = 1
COLLECTIONS: tuple[str, ...] = (
    "users",
    "lead_statuses",
    "opportunity_statuses",
    "custom_fields",
    "leads",
    "contacts",
    "opportunities",
    "tasks",
    "activities",
    "events",
)
# Event log object_type per collection (activities and tasks carry their own type).
OBJECT_TYPES: dict[str, str] = {
    "users": "user",
    "lead_statuses": "status.lead",
    "opportunity_statuses": "status.opportunity",
    "custom_fields": "custom_field.lead",
    "leads": "lead",
    "contacts": "contact",
    "opportunities": "opportunity",
}


class DataFileError(Exception):
    """The data directory holds a file that is not simulator data (or cannot be read)."""


# The id of the API request being answered: the events one request causes share it.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sim_request_id", default=None
)


def now_iso() -> str:
    return iso(datetime.now(UTC))


def iso(moment: datetime) -> str:
    """Close's timestamp form: ``2024-01-03T10:22:33.123000+00:00``."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)[:43]}"


class Collection:
    """Records of one kind by id, in insertion order."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self.records.values()))

    def get(self, record_id: str) -> Record | None:
        return self.records.get(record_id)

    def add(self, record: Record) -> Record:
        self.records[record["id"]] = record
        return record

    def remove(self, record_id: str) -> Record | None:
        return self.records.pop(record_id, None)


class Organization:
    """All collections of one organization, its event log and where it is saved."""

    def __init__(self, organization_id: str, data_dir: Path | None = None) -> None:
        self.organization_id = organization_id
        self.data_dir = data_dir
        self.seed: int | None = None
        self._dirty = False
        self._pending: asyncio.TimerHandle | None = None
        self.users = Collection()
        self.lead_statuses = Collection()
        self.opportunity_statuses = Collection()
        self.custom_fields = Collection()
        self.leads = Collection()
        self.contacts = Collection()
        self.opportunities = Collection()
        self.tasks = Collection()
        self.activities = Collection()
        self.events = Collection()

    def stamp_new(self, record: Record, user_id: str | None) -> Record:
        """Fill what Close sets on create: organization, dates, who did it."""
        stamp = now_iso()
        name = self.user_name(user_id)
        record.update(
            {
                "organization_id": self.organization_id,
                "date_created": stamp,
                "date_updated": stamp,
                "created_by": user_id,
                "updated_by": user_id,
                "created_by_name": name,
                "updated_by_name": name,
            }
        )
        return record

    def stamp_update(self, record: Record, user_id: str | None) -> None:
        record.update(
            {
                "date_updated": now_iso(),
                "updated_by": user_id,
                "updated_by_name": self.user_name(user_id),
            }
        )

    def user_name(self, user_id: str | None) -> str | None:
        user = None if user_id is None else self.users.get(user_id)
        return None if user is None else str(user["display_name"])

    def counts(self) -> dict[str, int]:
        return {name: len(self.collection(name)) for name in COLLECTIONS}

    def collection(self, name: str) -> Collection:
        found: Collection = getattr(self, name)
        return found

    # --- changes, each one an event -------------------------------------------

    def object_type(self, collection: str, record: Record) -> str:
        if collection == "activities":
            return "activity." + str(record.get("_type", "")).lower()
        if collection == "tasks":
            return "task.lead"
        return OBJECT_TYPES[collection]

    def created(self, collection: str, record: Record, *, user_id: str | None) -> Record:
        self.collection(collection).add(record)
        self.log_event("created", collection, record, user_id=user_id, data=record)
        self.save()
        return record

    def updated(
        self, collection: str, record: Record, previous: Record, *, user_id: str | None
    ) -> Record:
        changed = sorted(
            name
            for name in set(record) | set(previous)
            if name not in {"date_updated", "updated_by", "updated_by_name"}
            and record.get(name) != previous.get(name)
        )
        self.log_event(
            "updated",
            collection,
            record,
            user_id=user_id,
            data={name: record.get(name) for name in changed},
            previous={name: previous.get(name) for name in changed},
            changed=changed,
        )
        self.save()
        return record

    def update(
        self,
        collection: str,
        record: Record,
        fields: Record,
        *,
        user_id: str | None,
        shape: Callable[[Organization, Record], Record],
    ) -> Record:
        """A validated partial update, as Close's PUT does: fields not sent are kept, the
        record is re-shaped and stamped, and the change goes into the event log."""
        previous = dict(record)
        record.update(fields)
        self.stamp_update(shape(self, record), user_id)
        return self.updated(collection, record, previous, user_id=user_id)

    def deleted(self, collection: str, record: Record, *, user_id: str | None) -> None:
        self.collection(collection).remove(record["id"])
        self.log_event("deleted", collection, record, user_id=user_id, previous=record)
        self.save()

    def log_event(
        self,
        action: str,
        collection: str,
        record: Record,
        *,
        user_id: str | None,
        data: Record | None = None,
        previous: Record | None = None,
        changed: list[str] | None = None,
        when: str | None = None,
        event_id: str | None = None,
    ) -> Record:
        stamp = when or now_iso()
        lead_id = record["id"] if collection == "leads" else record.get("lead_id")
        event: Record = {
            "id": event_id or new_id("ev"),
            "date_created": stamp,
            "date_updated": stamp,
            "organization_id": self.organization_id,
            "user_id": user_id,
            "request_id": f"req_{event_id[3:]}"
            if event_id is not None
            else REQUEST_ID.get() or new_id("req"),
            "api_key_id": None,
            "oauth_client_id": None,
            "oauth_scope": None,
            "lead_id": lead_id,
            "object_type": self.object_type(collection, record),
            "object_id": record["id"],
            "action": action,
            "changed_fields": changed or [],
            "meta": {},
            "data": dict(data or {}),
            "previous_data": dict(previous or {}),
        }
        self.events.add(event)
        return event

    # --- persistence ------------------------------------------------------------

    def path(self) -> Path | None:
        return None if self.data_dir is None else self.data_dir / DATA_FILE

    def save(self) -> None:
        """Write the data soon (at once outside an event loop); ``flush`` forces it."""
        if self.path() is None:
            return
        self._dirty = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._pending is None:
            self._pending = loop.call_later(SAVE_DELAY, self.flush)

    def flush(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        path = self.path()
        if path is None or not self._dirty:
            return
        self._dirty = False
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "version": DATA_VERSION,
            "organization_id": self.organization_id,
            "seed": self.seed,
            **{name: list(self.collection(name).records.values()) for name in COLLECTIONS},
        }
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            json.dump(document, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    def load(self) -> bool:
        """Read the saved data if there is any; DataFileError if the file is not ours."""
        path = self.path()
        if path is None or not path.exists():
            return False
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataFileError(f"{path} is not simulator data: {exc}") from None
        if not isinstance(document, dict) or document.get("version") != DATA_VERSION:
            raise DataFileError(f"{path} is not simulator data of version {DATA_VERSION}")
        self.seed = document.get("seed")
        for name in COLLECTIONS:
            collection = self.collection(name)
            collection.records = {record["id"]: record for record in document.get(name, [])}
        return True
