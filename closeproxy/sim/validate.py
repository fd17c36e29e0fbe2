"""Payload validation with Close's answer: every bad field named in ``field-errors``.

A check takes the sent value and returns the value to store, or raises ``ValueError``
with the message for that field. Fields nobody checks are ignored (Close ignores
unknown keys too), read-only ones (``id``, dates, ``organization_id``) never stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime
from typing import Any

from closeproxy.sim.org import Collection
from closeproxy.sim.rest import ValidationFailed

Check = Callable[[object], object]


def validated(
    payload: Mapping[str, Any], checks: Mapping[str, Check], *, required: Iterable[str] = ()
) -> dict[str, Any]:
    """The checked fields of ``payload``; ValidationFailed listing every bad one."""
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for name in required:
        if payload.get(name) is None:
            errors[name] = "This field is required."
    for name, check in checks.items():
        if name not in payload or name in errors:
            continue
        try:
            clean[name] = check(payload[name])
        except ValueError as exc:
            errors[name] = str(exc)
    if errors:
        raise ValidationFailed(errors)
    return clean


def text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("Not a valid string.")
    return value


def optional_text(value: object) -> str | None:
    return None if value is None else text(value)


def name_text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("Not a valid string." if not isinstance(value, str) else "Required.")
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("Not a valid boolean.")
    return value


def integer(low: int, high: int | None = None, *, nullable: bool = True) -> Check:
    def check(value: object) -> int | None:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("Not a valid integer.")
        if value < low or (high is not None and value > high):
            limit = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"Must be {limit}.")
        return value

    return check


def choice(*options: str) -> Check:
    def check(value: object) -> str:
        if value not in options:
            raise ValueError(f"Must be one of: {', '.join(options)}.")
        return str(value)

    return check


def reference(collection: Collection, kind: str, *, nullable: bool = False) -> Check:
    def check(value: object) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or collection.get(value) is None:
            raise ValueError(f"{kind} does not exist.")
        return value

    return check


def day_or_moment(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("Not a valid date.")
    try:
        if len(value) == 10:
            return date.fromisoformat(value).isoformat()
        return datetime.fromisoformat(value.replace("Z", "+00:00")).isoformat()
    except ValueError:
        raise ValueError("Not a valid date.") from None


def email_address(value: object) -> str:
    if not isinstance(value, str) or "@" not in value or value.startswith("@"):
        raise ValueError("Not a valid email address.")
    return value


def list_of(item: Check) -> Check:
    def check(value: object) -> list[Any]:
        if not isinstance(value, list):
            raise ValueError("Not a valid list.")
        out = []
        for index, entry in enumerate(value):
            try:
                out.append(item(entry))
            except ValueError as exc:
                raise ValueError(f"Item {index}: {exc}") from None
        return out

    return check


def object_with(checks: Mapping[str, Check], *, required: Iterable[str] = ()) -> Check:
    """A nested object (an email of a contact, an address); its errors name the key."""
    needed = tuple(required)

    def check(value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError("Not a valid object.")
        for name in needed:
            if value.get(name) is None:
                raise ValueError(f"{name}: This field is required.")
        clean: dict[str, Any] = {}
        for name, inner in checks.items():
            if name in value:
                try:
                    clean[name] = inner(value[name])
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        return clean

    return check


ADDRESS = object_with(
    {
        name: optional_text
        for name in ("label", "address_1", "address_2", "city", "state", "zipcode", "country")
    }
)
EMAIL = object_with({"email": email_address, "type": optional_text}, required=("email",))
PHONE = object_with({"phone": text, "type": optional_text}, required=("phone",))
URL = object_with({"url": text, "type": optional_text}, required=("url",))
