"""Deterministic sample data: one seed, one believable organization, byte for byte.

Every id, name and date comes from ``random.Random(seed)`` and a fixed start date,
never from the clock, so two simulators started with the same seed serve the same
data. Without a seed the simulator keeps its classic five demo leads.
"""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime, timedelta
from typing import Any

from closeproxy.sim.org import Organization, Record, iso

CLASSIC_NAMES: tuple[str, ...] = (
    "Acme Corporation",
    "Globex",
    "Initech",
    "Umbrella Ltd",
    "Stark Industries",
)
CLASSIC_SEED: int = 0
EPOCH: datetime = datetime(2024, 1, 1, 9, 0, tzinfo=UTC)
SPAN_DAYS: int = 365
ID_ALPHABET: str = string.ascii_letters + string.digits

LEAD_STATUSES: tuple[str, ...] = ("Potential", "Bad Fit", "Qualified", "Customer")
OPPORTUNITY_STATUSES: tuple[tuple[str, str], ...] = (
    ("Active", "active"),
    ("Won", "won"),
    ("Lost", "lost"),
)
INDUSTRIES: tuple[str, ...] = ("Software", "Manufacturing", "Retail", "Healthcare", "Finance")
FIRST_NAMES: tuple[str, ...] = (
    "Ada", "Ben", "Chloe", "Dev", "Elena", "Femi", "Grace", "Hiro", "Ines", "Jonas",
    "Kira", "Luis", "Maya", "Nils", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
)  # fmt: skip
LAST_NAMES: tuple[str, ...] = (
    "Adams", "Baker", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Hansen", "Ito",
    "Jensen", "Kowalski", "Lopez", "Meyer", "Novak", "Okafor", "Petrov", "Rossi", "Silva",
)  # fmt: skip
NAME_WORDS: tuple[str, ...] = (
    "Blue", "Harbor", "Summit", "Northwind", "Cedar", "Granite", "Lumen", "Vertex", "Maple",
    "Orbit", "Pioneer", "Quartz", "River", "Silver", "Tidal", "Union", "Willow", "Zenith",
)  # fmt: skip
NAME_SUFFIXES: tuple[str, ...] = ("Labs", "Logistics", "Systems", "Foods", "Partners", "Inc.")
CITIES: tuple[tuple[str, str, str], ...] = (
    ("Berlin", "BE", "DE"),
    ("Austin", "TX", "US"),
    ("Lisbon", "11", "PT"),
    ("Toronto", "ON", "CA"),
    ("Osaka", "27", "JP"),
)
NOTE_TEXTS: tuple[str, ...] = (
    "Asked for a pricing sheet.",
    "Decision expected next quarter.",
    "Champion moved to another team.",
    "Wants a pilot with two seats.",
)
TASK_TEXTS: tuple[str, ...] = ("Follow up", "Send proposal", "Book a demo", "Check in")


class Seeder:
    """Draws everything from one RNG in one fixed order."""

    def __init__(self, org: Organization, seed: int) -> None:
        self.org = org
        self.rng = random.Random(seed)  # noqa: S311 -- sample data, not secrets

    def ident(self, prefix: str) -> str:
        return prefix + "_" + "".join(self.rng.choices(ID_ALPHABET, k=43))

    def moment(self, after: datetime | None = None, days: int = SPAN_DAYS) -> datetime:
        start = after or EPOCH
        return start + timedelta(seconds=self.rng.randrange(days * 86400))

    def stamp(self, record: Record, created: datetime, user: Record) -> None:
        updated = created + timedelta(seconds=self.rng.randrange(30 * 86400))
        record.update(
            {
                "organization_id": self.org.organization_id,
                "date_created": iso(created),
                "date_updated": iso(updated),
                "created_by": user["id"],
                "updated_by": user["id"],
                "created_by_name": user["display_name"],
                "updated_by_name": user["display_name"],
            }
        )

    def add(self, collection: str, record: Record) -> None:
        self.org.collection(collection).add(record)
        self.org.log_event(
            "created",
            collection,
            record,
            user_id=record.get("created_by") or record.get("id"),
            data=record,
            when=record["date_created"],
            event_id=self.ident("ev"),
        )


def user_record(user_id: str, first: str, last: str, organization_id: str, when: str) -> Record:
    email = f"{first}.{last}@example.com".lower()
    return {
        "id": user_id,
        "first_name": first,
        "last_name": last,
        "display_name": f"{first} {last}",
        "email": email,
        "image": None,
        "last_used_timezone": "UTC",
        "organizations": [organization_id],
        "date_created": when,
        "date_updated": when,
    }


def build(org: Organization, *, seed: int | None, user_id: str) -> None:
    """Fill an empty organization from ``seed`` (None: the classic five leads)."""
    from closeproxy.sim import activities, opportunities, tasks

    org.seed = seed
    classic = seed is None
    seeder = Seeder(org, CLASSIC_SEED if seed is None else seed)
    rng = seeder.rng
    stamp = iso(EPOCH)

    owner = user_record(user_id, "Sim", "User", org.organization_id, stamp)
    users = [owner]
    for _ in range(0 if classic else 2 + min(8, (seed or 0) % 7)):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        users.append(user_record(seeder.ident("user"), first, last, org.organization_id, stamp))
    for user in users:
        seeder.add("users", user)

    for label in LEAD_STATUSES:
        record: Record = {"id": seeder.ident("stat"), "label": label}
        seeder.stamp(record, EPOCH, owner)
        seeder.add("lead_statuses", record)
    for label, kind in OPPORTUNITY_STATUSES:
        record = {"id": seeder.ident("stat"), "label": label, "type": kind}
        seeder.stamp(record, EPOCH, owner)
        seeder.add("opportunity_statuses", record)
    fields: list[tuple[str, str, list[str] | None]] = [
        ("Industry", "choices", list(INDUSTRIES)),
        ("Employees", "number", None),
        ("Source", "text", None),
        ("Renewal date", "date", None),
    ]
    for name, kind, choices in fields:
        record = {
            "id": seeder.ident("cf"),
            "name": name,
            "type": kind,
            "choices": choices,
            "accepts_multiple_values": False,
            "editable_with_roles": [],
            "description": None,
        }
        seeder.stamp(record, EPOCH, owner)
        seeder.add("custom_fields", record)
    custom = {field["name"]: field["id"] for field in org.custom_fields}

    count = len(CLASSIC_NAMES) if classic else seed or 0
    lead_statuses = list(org.lead_statuses)
    opportunity_statuses = list(org.opportunity_statuses)
    for index in range(count):
        user = rng.choice(users)
        created = seeder.moment()
        if classic:
            name = CLASSIC_NAMES[index]
        else:
            words = rng.sample(NAME_WORDS, 2)
            name = f"{words[0]} {words[1]} {rng.choice(NAME_SUFFIXES)}"
        status = rng.choice(lead_statuses)
        city, state, country = rng.choice(CITIES)
        lead: Record = {
            "id": seeder.ident("lead"),
            "name": name,
            "display_name": name,
            "description": "",
            "url": None if classic else f"https://{name.split()[0].lower()}.example.com",
            "status_id": status["id"],
            "status_label": status["label"],
            "addresses": []
            if classic
            else [
                {
                    "label": "business",
                    "address_1": f"{rng.randrange(1, 200)} Main Street",
                    "address_2": "",
                    "city": city,
                    "state": state,
                    "zipcode": f"{rng.randrange(10000, 99999)}",
                    "country": country,
                }
            ],
            "custom": {}
            if classic
            else {
                custom["Industry"]: rng.choice(INDUSTRIES),
                custom["Employees"]: rng.randrange(5, 5000),
                custom["Source"]: rng.choice(("Referral", "Website", "Event")),
            },
            "integration_links": [],
        }
        seeder.stamp(lead, created, user)
        seeder.add("leads", lead)
        if classic:
            continue
        contacts = []
        for _ in range(rng.randrange(1, 4)):
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            domain = name.split()[0].lower()
            contact: Record = {
                "id": seeder.ident("cont"),
                "lead_id": lead["id"],
                "name": f"{first} {last}",
                "display_name": f"{first} {last}",
                "title": rng.choice(("CEO", "CTO", "Buyer", "Office Manager")),
                "emails": [{"type": "office", "email": f"{first}.{last}@{domain}.example".lower()}],
                "phones": [
                    {
                        "type": "office",
                        "phone": f"+1555{rng.randrange(1000000, 9999999)}",
                    }
                ],
                "urls": [],
            }
            contact["phones"][0]["phone_formatted"] = contact["phones"][0]["phone"]
            seeder.stamp(contact, created, user)
            seeder.add("contacts", contact)
            contacts.append(contact)
        for _ in range(rng.randrange(0, 3)):
            status = rng.choice(opportunity_statuses)
            opportunity: Record = opportunities.shape(
                org,
                {
                    "id": seeder.ident("oppo"),
                    "lead_id": lead["id"],
                    "contact_id": rng.choice(contacts)["id"],
                    "user_id": user["id"],
                    "status_id": status["id"],
                    "value": rng.randrange(10, 500) * 10000,
                    "value_period": rng.choice(("one_time", "monthly", "annual")),
                    "value_currency": "USD",
                    "confidence": rng.randrange(0, 101),
                    "note": "",
                    "date_won": None,
                },
            )
            seeder.stamp(opportunity, seeder.moment(created, 60), user)
            seeder.add("opportunities", opportunity)
        for _ in range(rng.randrange(0, 3)):
            due = seeder.moment(created, 90)
            task: Record = tasks.shape(
                org,
                {
                    "id": seeder.ident("task"),
                    "_type": "lead",
                    "lead_id": lead["id"],
                    "assigned_to": user["id"],
                    "text": rng.choice(TASK_TEXTS),
                    "date": due.date().isoformat(),
                    "is_complete": rng.random() < 0.4,
                },
            )
            seeder.stamp(task, created, user)
            seeder.add("tasks", task)
        for _ in range(rng.randrange(1, 5)):
            kind = rng.choice(activities.TYPES)
            contact = rng.choice(contacts)
            fields_of: dict[str, Any] = {
                "Note": {"note": rng.choice(NOTE_TEXTS)},
                "Call": {
                    "direction": rng.choice(("inbound", "outbound")),
                    "duration": rng.randrange(0, 1800),
                    "phone": contact["phones"][0]["phone"],
                    "status": "completed",
                    "note": rng.choice(NOTE_TEXTS),
                },
                "Email": {
                    "direction": rng.choice(("incoming", "outgoing")),
                    "status": "sent",
                    "subject": f"Re: {rng.choice(TASK_TEXTS)}",
                    "body_text": rng.choice(NOTE_TEXTS),
                    "sender": f"{user['display_name']} <{user['email']}>",
                    "to": [contact["emails"][0]["email"]],
                },
            }
            activity: Record = activities.shape(
                org,
                {
                    "id": seeder.ident("acti"),
                    "_type": kind,
                    "lead_id": lead["id"],
                    "contact_id": contact["id"],
                    "user_id": user["id"],
                    **fields_of[kind],
                },
            )
            seeder.stamp(activity, seeder.moment(created, 120), user)
            if kind == "Email":
                activity["date_sent"] = activity["date_created"]
            seeder.add("activities", activity)
