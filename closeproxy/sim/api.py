"""The /api/v1/ surface: the gate every call passes, Close-like resources, test helpers."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from closeproxy.sim import payloads
from closeproxy.sim.leads import project
from closeproxy.sim.state import SIM_STATE, RateVerdict, RecordedRequest, SimState

API_PREFIX: str = "/api/v1/"
ECHO_TEXT_LIMIT: int = 64 * 1024
JSON_BODY_LIMIT: int = 1024 * 1024
READ_CHUNK: int = 256 * 1024
LIST_LIMIT_DEFAULT: int = 100
LIST_LIMIT_MAX: int = 200
REDIRECT_STATUSES: frozenset[int] = frozenset({301, 302, 303, 307, 308})
BODYLESS_STATUSES: frozenset[int] = frozenset({204, 304})


class BadRequest(Exception):
    """A malformed query or body; answered as 400 ``{"error": ...}``."""


class BodyMeter:
    """Reads a request body as a stream, counting and hashing it into the request record."""

    def __init__(self, request: web.Request, record: RecordedRequest) -> None:
        self._content = request.content
        self._record = record
        self._hash = hashlib.sha256()

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._content.iter_chunked(READ_CHUNK):
            self._hash.update(chunk)
            self._record.body_size += len(chunk)
            yield chunk
        self._record.body_sha256 = self._hash.hexdigest()
        self._record.body_complete = True

    async def read(self, limit: int) -> bytes | None:
        """The whole body if it fits in ``limit`` bytes, else None (still read to the end)."""
        kept: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size <= limit:
                kept.append(chunk)
        return b"".join(kept) if size <= limit else None

    async def drain(self) -> None:
        async for _ in self.chunks():
            pass


@dataclass
class ApiCall:
    """What a gated handler gets besides the request."""

    state: SimState
    record: RecordedRequest
    body: BodyMeter


ApiHandler = Callable[[web.Request, ApiCall], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _bearer_token(request: web.Request) -> str | None:
    values = request.headers.getall("Authorization", [])
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def _too_many(verdict: RateVerdict) -> web.Response:
    # Close's (now deprecated) body shape; the headers are what clients should read.
    body = {
        "error": {
            "message": "API call count exceeded for this period",
            "rate_reset": round(verdict.reset, 3),
            "rate_limit": verdict.limit,
        }
    }
    headers = {"Retry-After": str(verdict.retry_after()), "RateLimit": verdict.header()}
    return web.json_response(body, status=429, headers=headers)


def _refusal(request: web.Request, state: SimState) -> web.Response | None:
    token = _bearer_token(request)
    if token is None or not state.access_token_valid(token):
        state.rejected_api_requests += 1
        return error("Unauthorized", 401)
    if state.force_401 > 0:
        state.force_401 -= 1
        state.rejected_api_requests += 1
        return error("Unauthorized", 401)
    verdict = state.take_rate_slot()
    if verdict is not None and not verdict.allowed:
        return _too_many(verdict)
    return None


def gated(handler: ApiHandler) -> Handler:
    """Wrap an /api/v1/ handler: record the call, then auth, forced 401s, rate limit."""

    async def gate(request: web.Request) -> web.StreamResponse:
        state = request.app[SIM_STATE]
        record = RecordedRequest(
            method=request.method,
            raw_path=request.raw_path,
            headers=[
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in request.raw_headers
            ],
        )
        state.log_api(record)
        state.api_requests += 1
        body = BodyMeter(request, record)
        if not request.can_read_body:
            # Completes the record before a streaming handler sends its last byte.
            await body.drain()
        if state.api_delay > 0:
            await asyncio.sleep(state.api_delay)
        response: web.StreamResponse | None = _refusal(request, state)
        try:
            if response is None:
                try:
                    response = await handler(request, ApiCall(state, record, body))
                except BadRequest as exc:
                    response = error(str(exc), 400)
            # Read whatever the handler left so the record always has the full size and hash.
            await body.drain()
        except ConnectionError:
            # The client went away mid-body or mid-download: nobody is left to answer,
            # and aborted transfers are routine in proxy tests, not server errors.
            response = web.Response(status=499)
        return response

    return gate


async def add_rate_limit_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: every /api/v1/ answer says where the rate limit stands."""
    if not request.path.startswith(API_PREFIX) or "RateLimit" in response.headers:
        return
    verdict = request.app[SIM_STATE].rate_status()
    if verdict is not None:
        response.headers["RateLimit"] = verdict.header()


# --- query parsing ----------------------------------------------------------


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
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


def _float_param(request: web.Request, name: str, default: float, high: float) -> float:
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


def _fields(request: web.Request) -> list[str] | None:
    raw = request.query.get("_fields")
    return None if raw is None else [name for name in raw.split(",") if name]


async def _json_object(call: ApiCall) -> dict[str, Any]:
    raw = await call.body.read(JSON_BODY_LIMIT)
    if raw is None:
        raise BadRequest("Request body too large")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("Request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("Request body must be a JSON object")
    return data


# --- Close-like resources ---------------------------------------------------


async def me(request: web.Request, call: ApiCall) -> web.StreamResponse:
    config = call.state.config
    return web.json_response(
        {
            "id": config.user_id,
            "organizations": [{"id": config.organization_id, "name": "Simulated Org"}],
            "email": "sim@example.com",
            "first_name": "Sim",
            "last_name": "User",
        }
    )


async def lead_list(request: web.Request, call: ApiCall) -> web.StreamResponse:
    leads = call.state.leads
    skip = _int_param(request, "_skip", 0, 0, 10**9)
    # Close caps the page size rather than refusing a large one.
    limit = min(_int_param(request, "_limit", LIST_LIMIT_DEFAULT, 0, 10**9), LIST_LIMIT_MAX)
    fields = _fields(request)
    return web.json_response(
        {
            "data": [project(lead, fields) for lead in leads.page(skip, limit)],
            "has_more": skip + limit < len(leads),
            "total_results": len(leads),
        }
    )


async def lead_create(request: web.Request, call: ApiCall) -> web.StreamResponse:
    return web.json_response(call.state.leads.create(await _json_object(call)))


async def lead_get(request: web.Request, call: ApiCall) -> web.StreamResponse:
    lead = call.state.leads.get(request.match_info["lead_id"])
    if lead is None:
        return error("Lead not found", 404)
    return web.json_response(project(lead, _fields(request)))


async def lead_update(request: web.Request, call: ApiCall) -> web.StreamResponse:
    fields = await _json_object(call)
    lead = call.state.leads.update(request.match_info["lead_id"], fields)
    if lead is None:
        return error("Lead not found", 404)
    return web.json_response(lead)


async def lead_delete(request: web.Request, call: ApiCall) -> web.StreamResponse:
    if not call.state.leads.delete(request.match_info["lead_id"]):
        return error("Lead not found", 404)
    return web.json_response({})


async def not_found(request: web.Request, call: ApiCall) -> web.StreamResponse:
    return error("Not found", 404)


# --- test helpers under /api/v1/_sim/ ---------------------------------------


MASKED = "[masked]"


async def echo(request: web.Request, call: ApiCall) -> web.StreamResponse:
    """Describe the request exactly as received; HEAD gets the same head and no body."""
    text = await call.body.read(ECHO_TEXT_LIMIT)
    record = call.record
    document = {
        "method": record.method,
        "raw_path": record.raw_path,
        # The bearer token stays out of bodies, as Close keeps it out of its own answers;
        # tests that need it read state.api_log.
        "headers": [
            [name, MASKED if name.lower() == "authorization" else value]
            for name, value in record.headers
        ],
        "body_size": record.body_size,
        "body_sha256": record.body_sha256,
        "body_text": None if text is None else text.decode("utf-8", "replace"),
    }
    # aiohttp sends Content-Length but no body for HEAD when given a plain Response.
    return web.json_response(document)


async def download(request: web.Request, call: ApiCall) -> web.StreamResponse:
    await call.body.drain()
    total = _int_param(request, "bytes", 0, 0, 1 << 50)
    chunk = _int_param(request, "chunk", payloads.DEFAULT_CHUNK, 1, payloads.MAX_CHUNK)
    delay = _float_param(request, "delay", 0.0, 60.0)
    # cut_after=N: drop the connection after N body bytes, as a failing upstream would.
    cut_after = _int_param(request, "cut_after", -1, 0, 1 << 50)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") in {"1", "true", "yes"}:
        response.enable_chunked_encoding()
    else:
        response.content_length = total
    await response.prepare(request)
    # StreamResponse does not suppress writes for HEAD; a body here would corrupt the stream.
    sent = 0
    if request.method != "HEAD":
        for index, piece in enumerate(payloads.download_chunks(total, chunk)):
            if index and delay:
                await asyncio.sleep(delay)
            if 0 <= cut_after < sent + len(piece):
                await response.write(piece[: cut_after - sent])
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write(piece)
            sent += len(piece)
    await response.write_eof()
    return response


async def upload(request: web.Request, call: ApiCall) -> web.StreamResponse:
    await call.body.drain()
    return web.json_response({"bytes": call.record.body_size, "sha256": call.record.body_sha256})


async def gzip_document(request: web.Request, call: ApiCall) -> web.StreamResponse:
    headers = {"ETag": payloads.GZIP_ETAG, "Content-Encoding": "gzip"}
    if payloads.GZIP_ETAG in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers={"ETag": payloads.GZIP_ETAG})
    return web.Response(body=payloads.GZIP_BODY, content_type="application/json", headers=headers)


async def gzip_export(request: web.Request, call: ApiCall) -> web.StreamResponse:
    await call.body.drain()
    total = _int_param(request, "bytes", 1024 * 1024, 0, 1 << 40)
    response = web.StreamResponse(
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    if request.method != "HEAD":
        for piece in payloads.export_chunks(total):
            await response.write(piece)
    await response.write_eof()
    return response


async def status(request: web.Request, call: ApiCall) -> web.StreamResponse:
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        raise BadRequest("status must be between 200 and 599")
    if code in BODYLESS_STATUSES:
        headers = {"ETag": payloads.GZIP_ETAG} if code == 304 else {}
        return web.Response(status=code, headers=headers)
    body: dict[str, object] = {"status": code}
    if code >= 400:
        body["error"] = f"Simulated status {code}"
    return web.json_response(body, status=code)


async def redirect(request: web.Request, call: ApiCall) -> web.StreamResponse:
    target = request.query.get("to")
    if not target:
        raise BadRequest("to is required")
    code = _int_param(request, "status", 302, 300, 399)
    if code not in REDIRECT_STATUSES:
        raise BadRequest(f"status must be one of {sorted(REDIRECT_STATUSES)}")
    return web.json_response({"location": target}, status=code, headers={"Location": target})


async def sleep(request: web.Request, call: ApiCall) -> web.StreamResponse:
    seconds = _float_param(request, "seconds", 0.0, 3600.0)
    await asyncio.sleep(seconds)
    return web.json_response({"slept": seconds})


async def hop_headers(request: web.Request, call: ApiCall) -> web.StreamResponse:
    """Headers a proxy must drop (hop-by-hop, named in Connection) or pass along."""
    headers = CIMultiDict(
        [
            ("Connection", "X-Hop"),
            ("X-Hop", "secret-hop"),
            ("Keep-Alive", "timeout=5"),
            ("Set-Cookie", "a=b"),
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Credentials", "true"),
            ("X-Custom", "yes"),
        ]
    )
    return web.json_response({"headers": "set"}, headers=headers)


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/api/v1/me/", gated(me))
    router.add_get("/api/v1/lead/", gated(lead_list))
    router.add_post("/api/v1/lead/", gated(lead_create))
    router.add_get("/api/v1/lead/{lead_id}/", gated(lead_get))
    router.add_put("/api/v1/lead/{lead_id}/", gated(lead_update))
    router.add_delete("/api/v1/lead/{lead_id}/", gated(lead_delete))
    router.add_route("*", "/api/v1/_sim/echo", gated(echo))
    router.add_route("*", "/api/v1/_sim/echo/{tail:.*}", gated(echo))
    router.add_get("/api/v1/_sim/download", gated(download))
    router.add_post("/api/v1/_sim/upload", gated(upload))
    router.add_get("/api/v1/_sim/gzip", gated(gzip_document))
    router.add_get("/api/v1/_sim/export.json.gz", gated(gzip_export))
    router.add_route("*", r"/api/v1/_sim/status/{code:\d{3}}", gated(status))
    router.add_get("/api/v1/_sim/redirect", gated(redirect))
    router.add_get("/api/v1/_sim/sleep", gated(sleep))
    router.add_get("/api/v1/_sim/headers", gated(hop_headers))
    # Unknown paths under /api/v1/ still pass the gate: logged, authenticated, then 404.
    router.add_route("*", "/api/v1/{tail:.*}", gated(not_found))
