"""The gate every /api/v1/ call passes: record it, authenticate, forced 401s, rate limit.

Handlers behind it get an ``ApiCall`` and may raise ``rest.ApiError`` for Close-shaped
4xx answers; a client hanging up mid-body is not a server error.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from closeproxy.sim import ratelimit
from closeproxy.sim.org import REQUEST_ID, new_id
from closeproxy.sim.ratelimit import RateVerdict
from closeproxy.sim.rest import ApiError
from closeproxy.sim.state import SIM_STATE, RecordedRequest, SimState

API_PREFIX: str = "/api/v1/"
READ_CHUNK: int = 256 * 1024
RATE_GROUP = web.RequestKey("sim_rate_group", str)  # the endpoint group of the request


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


def _too_many(verdict: RateVerdict, state: SimState) -> web.Response:
    config = state.config
    return web.json_response(
        ratelimit.too_many_body(verdict, config),
        status=429,
        headers=ratelimit.too_many_headers(verdict, config),
    )


def _refusal(request: web.Request, state: SimState, group: str) -> web.Response | None:
    token = _bearer_token(request)
    if token is None or not state.access_token_valid(token):
        state.rejected_api_requests += 1
        return error("Unauthorized", 401)
    if state.force_401 > 0:
        state.force_401 -= 1
        state.rejected_api_requests += 1
        return error("Unauthorized", 401)
    verdict = state.rate.take(group)
    if verdict is not None and not verdict.allowed:
        return _too_many(verdict, state)
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
        group = request[RATE_GROUP] = state.rate.group(request.method, request.path)
        REQUEST_ID.set(new_id("req"))  # task-local: each request runs in its own task
        body = BodyMeter(request, record)
        if not request.can_read_body:
            # Completes the record before a streaming handler sends its last byte.
            await body.drain()
        if state.api_delay > 0:
            await asyncio.sleep(state.api_delay)
        response: web.StreamResponse | None = _refusal(request, state, group)
        try:
            if response is None:
                try:
                    response = await handler(request, ApiCall(state, record, body))
                except ApiError as exc:
                    response = web.json_response(exc.body, status=exc.status)
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
    state = request.app[SIM_STATE]
    group = request.get(RATE_GROUP) or state.rate.group(request.method, request.path)
    verdict = state.rate.status(group)
    if verdict is not None:
        response.headers["RateLimit"] = ratelimit.ratelimit_header(verdict, state.config)
