"""Test helpers under /api/v1/_sim/: echo, downloads, uploads, gzip, statuses, redirects.

They pass the same gate as Close's resources, so they are authenticated, logged and
rate limited like any API call.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from multidict import CIMultiDict

from closeproxy.sim import payloads
from closeproxy.sim.gate import ApiCall, gated
from closeproxy.sim.rest import BadRequest, float_param, int_param

ECHO_TEXT_LIMIT: int = 64 * 1024
REDIRECT_STATUSES: frozenset[int] = frozenset({301, 302, 303, 307, 308})
BODYLESS_STATUSES: frozenset[int] = frozenset({204, 304})


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
    total = int_param(request, "bytes", 0, 0, 1 << 50)
    chunk = int_param(request, "chunk", payloads.DEFAULT_CHUNK, 1, payloads.MAX_CHUNK)
    delay = float_param(request, "delay", 0.0, 60.0)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") in {"1", "true", "yes"}:
        response.enable_chunked_encoding()
    else:
        response.content_length = total
    # cut_after=N: hang up after N body bytes, as a dying upstream would.
    cut_after: int | None = int_param(request, "cut_after", -1, 0, 1 << 50)
    if cut_after == -1:
        cut_after = None
    await response.prepare(request)
    # StreamResponse does not suppress writes for HEAD; a body here would corrupt the stream.
    if request.method != "HEAD":
        sent = 0
        for index, piece in enumerate(payloads.download_chunks(total, chunk)):
            if index and delay:
                await asyncio.sleep(delay)
            if cut_after is not None and sent + len(piece) >= cut_after:
                await response.write(piece[: cut_after - sent])
                _hang_up(request)
                return response
            await response.write(piece)
            sent += len(piece)
    await response.write_eof()
    return response


def _hang_up(request: web.Request) -> None:
    """Close the connection mid-body, as a dying upstream does; what was written is flushed."""
    transport = request.transport
    if transport is not None:
        transport.close()


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
    total = int_param(request, "bytes", 1024 * 1024, 0, 1 << 40)
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
    code = int_param(request, "status", 302, 300, 399)
    if code not in REDIRECT_STATUSES:
        raise BadRequest(f"status must be one of {sorted(REDIRECT_STATUSES)}")
    return web.json_response({"location": target}, status=code, headers={"Location": target})


async def sleep(request: web.Request, call: ApiCall) -> web.StreamResponse:
    seconds = float_param(request, "seconds", 0.0, 3600.0)
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


def add_routes(router: web.UrlDispatcher) -> None:
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
