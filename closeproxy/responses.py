"""Responses the proxy makes itself, shaped like Close's errors."""

from __future__ import annotations

import json

from aiohttp import web

from .errors import ServiceError

# The closeproxy_error code of a response the proxy made, for the errors metric.
ERROR_CODE = web.ResponseKey("closeproxy_error", str)

# Nothing the proxy says about itself may be cached or sniffed into something else.
_HEADERS: dict[str, str] = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


def error_response(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """`{"error": message, "closeproxy_error": code}`; `error` is what Close clients show."""
    body = json.dumps({"error": message, "closeproxy_error": code}).encode()
    response = web.Response(
        status=status,
        body=body,
        content_type="application/json",
        headers={**_HEADERS, **(headers or {})},
    )
    response[ERROR_CODE] = code
    return response


def service_error_response(exc: ServiceError) -> web.Response:
    return error_response(exc.status, exc.code, str(exc))


def json_response(data: object, *, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, indent=2).encode() + b"\n",
        content_type="application/json",
        headers=_HEADERS,
    )
