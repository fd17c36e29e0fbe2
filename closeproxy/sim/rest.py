"""What every Close-like resource shares: error shapes, parameters, paging, projection.

Close's error bodies, as its clients read them: a bad request is 400
``{"error": "...", "errors": [...], "field-errors": {"name": "..."}}`` (the
``closeio`` client raises ``ValidationError`` with ``errors``/``field-errors``), an
unknown object is 404 ``{"error": "Empty query: Lead matching query does not exist."}``.
Lists page with ``_skip``/``_limit`` and answer ``data``, ``has_more`` and
``total_results``; the event log and activities also page with ``_cursor`` and answer
``cursor_next``. ``_fields=a,b`` keeps only those fields of each object.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web

from closeproxy.sim.org import Record

JSON_BODY_LIMIT: int = 1024 * 1024
LIST_LIMIT_DEFAULT: int = 100
LIST_LIMIT_MAX: int = 200
DATE_OPERATORS: dict[str, str] = {"__gt": ">", "__gte": ">=", "__lt": "<", "__lte": "<="}
TRUE_WORDS: frozenset[str] = frozenset({"true", "1", "yes"})
FALSE_WORDS: frozenset[str] = frozenset({"false", "0", "no"})


class ApiError(Exception):
    """A Close-shaped 4xx answer: ``status`` and a JSON ``body``."""

    def __init__(self, status: int, body: Mapping[str, object]) -> None:
        super().__init__(str(body.get("error", body)))
        self.status = status
        self.body = dict(body)


class BadRequest(ApiError):
    """A malformed query or body: 400 with one message."""

    def __init__(self, message: str) -> None:
        super().__init__(400, {"error": message, "errors": [message], "field-errors": {}})


class ValidationFailed(ApiError):
    """Fields that do not validate: 400 with ``field-errors`` naming each one."""

    def __init__(self, field_errors: Mapping[str, str]) -> None:
        names = ", ".join(sorted(field_errors))
        self.field_errors = dict(field_errors)
        super().__init__(
            400,
            {
                "error": f"Invalid value for {names}.",
                "errors": [],
                "field-errors": dict(field_errors),
            },
        )


class NotFound(ApiError):
    """Close's 404 for an id that names nothing."""

    def __init__(self, kind: str) -> None:
        super().__init__(404, {"error": f"Empty query: {kind} matching query does not exist."})


class BodySource(Protocol):
    async def read(self, limit: int) -> bytes | None: ...


async def json_object(body: BodySource) -> dict[str, Any]:
    raw = await body.read(JSON_BODY_LIMIT)
    if raw is None:
        raise BadRequest("Request body too large")
    if not raw.strip():
        raise BadRequest("Request body must be a JSON object")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("Request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("Request body must be a JSON object")
    return data


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return value


def float_param(request: web.Request, name: str, default: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    if not 0 <= value <= high:
        raise BadRequest(f"{name} must be between 0 and {high}")
    return value


def fields_param(request: web.Request) -> list[str] | None:
    raw = request.query.get("_fields")
    return None if raw is None else [name for name in raw.split(",") if name]


def project(record: Record, fields: Iterable[str] | None) -> Record:
    """Keep only the requested fields, as Close's ``_fields`` does."""
    if fields is None:
        return dict(record)
    return {name: record[name] for name in fields if name in record}


def one(request: web.Request, record: Record) -> web.Response:
    return web.json_response(project(record, fields_param(request)))


def moment(text: str, name: str) -> datetime:
    """An ISO date or date-time; naive ones are UTC, as Close reads them."""
    try:
        value = datetime.fromisoformat(text.strip().replace(" ", "T"))
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 date or date-time") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def compare(value: object, operator: str, bound: datetime) -> bool:
    if not isinstance(value, str):
        return False
    try:
        actual = moment(value, "value")
    except BadRequest:
        return False
    return {
        ">": actual > bound,
        ">=": actual >= bound,
        "<": actual < bound,
        "<=": actual <= bound,
    }[operator]


def date_filtered(
    request: web.Request, records: Iterable[Record], names: Sequence[str]
) -> list[Record]:
    """Apply ``date_created__gt=...`` style filters for each of ``names``."""
    kept = list(records)
    for name in names:
        for suffix, operator in DATE_OPERATORS.items():
            raw = request.query.get(name + suffix)
            if raw is not None:
                bound = moment(raw, name + suffix)
                kept = [record for record in kept if compare(record.get(name), operator, bound)]
    return kept


def boolean_param(raw: str, name: str) -> bool:
    if raw.lower() in TRUE_WORDS:
        return True
    if raw.lower() in FALSE_WORDS:
        return False
    raise BadRequest(f"{name} must be true or false")


def equal_filtered(
    request: web.Request, records: Iterable[Record], names: Sequence[str]
) -> list[Record]:
    """Keep records whose field equals the query parameter of the same name."""
    kept = list(records)
    for name in names:
        raw = request.query.get(name)
        if raw is None:
            continue
        sample = next((record[name] for record in kept if record.get(name) is not None), None)
        wanted: object = boolean_param(raw, name) if isinstance(sample, bool) else raw
        kept = [record for record in kept if record.get(name) == wanted]
    return kept


def skip_limit(request: web.Request, maximum: int = LIST_LIMIT_MAX) -> tuple[int, int]:
    skip = int_param(request, "_skip", 0, 0, 10**9)
    # Close caps the page size rather than refusing a large one.
    limit = min(int_param(request, "_limit", LIST_LIMIT_DEFAULT, 0, 10**9), maximum)
    return skip, limit


def paged(
    request: web.Request, records: Sequence[Record], *, maximum: int = LIST_LIMIT_MAX
) -> web.Response:
    """``_skip``/``_limit`` paging with ``has_more`` and ``total_results``."""
    skip, limit = skip_limit(request, maximum)
    fields = fields_param(request)
    return web.json_response(
        {
            "data": [project(record, fields) for record in records[skip : skip + limit]],
            "has_more": skip + limit < len(records),
            "total_results": len(records),
        }
    )


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"sim:{offset}".encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> int:
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        prefix, _, number = text.partition(":")
        offset = int(number)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("_cursor is not a cursor this API handed out") from None
    if prefix != "sim" or offset < 0:
        raise BadRequest("_cursor is not a cursor this API handed out")
    return offset


def cursor_paged(
    request: web.Request, records: Sequence[Record], *, default: int, maximum: int
) -> web.Response:
    """Cursor paging (``_cursor`` -> ``cursor_next``); ``_skip`` works too."""
    raw = request.query.get("_cursor")
    start = decode_cursor(raw) if raw else int_param(request, "_skip", 0, 0, 10**9)
    limit = min(int_param(request, "_limit", default, 0, 10**9), maximum)
    end = start + limit
    more = end < len(records)
    fields = fields_param(request)
    return web.json_response(
        {
            "data": [project(record, fields) for record in records[start:end]],
            "has_more": more,
            "cursor_next": encode_cursor(end) if more and limit else None,
        }
    )
