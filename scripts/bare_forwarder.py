"""The floor for `bench.py compare`: aiohttp forwarding with no guard, no token, no log.

    python scripts/bare_forwarder.py UPSTREAM_URL 'Authorization: Bearer ...' [--port 0] [--uvloop]

One shared ClientSession, bodies streamed both ways, one fixed header set on the way up.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

from aiohttp import ClientSession, ClientTimeout, web

DROPPED = frozenset({"connection", "keep-alive", "transfer-encoding", "host", "content-length"})
CLIENT = web.AppKey("client", ClientSession)


def make_app(upstream: str, name: str, value: str) -> web.Application:
    async def client(app: web.Application) -> AsyncIterator[None]:
        app[CLIENT] = ClientSession(upstream, timeout=ClientTimeout(), auto_decompress=False)
        yield
        await app[CLIENT].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
        headers[name] = value
        data = request.content if request.body_exists else None
        method, target = request.method, request.rel_url
        async with app[CLIENT].request(method, target, headers=headers, data=data) as up:
            reply = web.StreamResponse(status=up.status)
            reply.headers.extend((k, v) for k, v in up.headers.items() if k.lower() not in DROPPED)
            if up.content_length is not None:
                reply.content_length = up.content_length
            await reply.prepare(request)
            async for chunk in up.content.iter_any():
                await reply.write(chunk)
            await reply.write_eof()
            return reply

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(upstream: str, header: str, port: int) -> None:
    name, _, value = header.partition(":")
    runner = web.AppRunner(make_app(upstream, name.strip(), value.strip()), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    loop = "uvloop" if uvloop else "asyncio"
    print(f"listening on http://127.0.0.1:{runner.addresses[0][1]} (event loop {loop})", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream")
    parser.add_argument("header", help="'Name: value' set on every request")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    factory = None
    if args.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.upstream, args.header, args.port))
