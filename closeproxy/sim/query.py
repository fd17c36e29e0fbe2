"""The simple forms of Close's lead search ``query``, enough for the tools people run.

Simulated: free text (name, description, contacts' names, emails and phones, cities),
``name:…``, ``status:…`` / ``lead_status:…`` (the status label), ``email:…``,
``phone:…``, ``id:…``, ``custom.Name:…``, date comparisons on ``date_created`` /
``date_updated`` (``date_updated>="2024-01-01T00:00"``) and ``sort:field`` /
``sort:-field``; ``AND`` between terms is allowed and implied. Values may be quoted.
Anything else (``OR``, parentheses, other fields) is a 400, never silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from closeproxy.sim.org import Record
from closeproxy.sim.rest import BadRequest, compare, moment

TOKEN: re.Pattern[str] = re.compile(r'[^\s"]*"[^"]*"|\S+')
COMPARISON: re.Pattern[str] = re.compile(r"(date_created|date_updated)(>=|<=|>|<)(.+)")
FIELD: re.Pattern[str] = re.compile(r"([a-z_]+(?:\.[^:]+)?):(.+)")
SORTABLE: frozenset[str] = frozenset({"date_created", "date_updated", "name", "display_name"})
Predicate = Callable[[Record], bool]


@dataclass
class LeadQuery:
    """A parsed query: every predicate must hold; then an optional sort."""

    predicates: list[Predicate] = field(default_factory=list)
    sort: str | None = None
    descending: bool = False

    def apply(self, leads: list[Record]) -> list[Record]:
        kept = [lead for lead in leads if all(test(lead) for test in self.predicates)]
        if self.sort is not None:
            key = self.sort
            kept.sort(key=lambda lead: str(lead.get(key) or ""), reverse=self.descending)
        return kept


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if '"' in value:
        raise BadRequest(f"Invalid query: unbalanced quote in {value!r}")
    return value


def _texts(lead: Record) -> list[str]:
    texts = [str(lead.get("name") or ""), str(lead.get("description") or "")]
    for contact in lead.get("contacts", []):
        texts.append(str(contact.get("name") or ""))
        texts += [str(entry.get("email", "")) for entry in contact.get("emails", [])]
        texts += [str(entry.get("phone", "")) for entry in contact.get("phones", [])]
    texts += [str(address.get("city") or "") for address in lead.get("addresses", [])]
    return [text.lower() for text in texts]


def _contains(getter: Callable[[Record], list[str]], wanted: str) -> Predicate:
    needle = wanted.lower()
    return lambda lead: any(needle in text.lower() for text in getter(lead))


def _field_predicate(name: str, value: str) -> Predicate:
    wanted = value.lower()
    if name == "name":
        return _contains(lambda lead: [str(lead.get("name") or "")], value)
    if name in {"status", "lead_status"}:
        return lambda lead: str(lead.get("status_label", "")).lower() == wanted
    if name == "id":
        return lambda lead: lead.get("id") == value
    if name == "email":
        return _contains(
            lambda lead: [
                str(entry.get("email", ""))
                for contact in lead.get("contacts", [])
                for entry in contact.get("emails", [])
            ],
            value,
        )
    if name == "phone":
        return _contains(
            lambda lead: [
                str(entry.get("phone", ""))
                for contact in lead.get("contacts", [])
                for entry in contact.get("phones", [])
            ],
            value,
        )
    if name.startswith("custom."):
        custom_name = name[len("custom.") :]
        return lambda lead: str(lead.get("custom", {}).get(custom_name, "")).lower() == wanted
    raise BadRequest(f"Invalid query: unknown field {name!r}")


def _comparison(name: str, operator: str, bound: datetime) -> Predicate:
    return lambda lead: compare(lead.get(name), operator, bound)


def _free_text(needle: str) -> Predicate:
    return lambda lead: any(needle in text for text in _texts(lead))


def parse(query: str) -> LeadQuery:
    """Parse ``query``; BadRequest names the part that is not understood."""
    parsed = LeadQuery()
    for token in TOKEN.findall(query):
        if token.upper() == "AND":
            continue
        if token.upper() in {"OR", "NOT"} or token.startswith("("):
            raise BadRequest(f"Invalid query: {token!r} is not supported by the simulator")
        if token.startswith("sort:"):
            key = _unquote(token[len("sort:") :])
            parsed.descending = key.startswith("-")
            parsed.sort = key.lstrip("-")
            if parsed.sort not in SORTABLE:
                raise BadRequest(f"Invalid query: cannot sort by {parsed.sort!r}")
            continue
        if match := COMPARISON.fullmatch(token):
            name, operator, raw = match.groups()
            parsed.predicates.append(_comparison(name, operator, moment(_unquote(raw), name)))
            continue
        if (match := FIELD.fullmatch(token)) and not token.startswith('"'):
            name, raw = match.groups()
            parsed.predicates.append(_field_predicate(name, _unquote(raw)))
            continue
        parsed.predicates.append(_free_text(_unquote(token).lower()))
    return parsed
