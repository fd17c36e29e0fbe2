"""The simulator app: one port serving Close's API base and app base."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from closeproxy.sim import api, control, gate, oauth
from closeproxy.sim.config import SimConfig
from closeproxy.sim.state import SIM_STATE, RecordedRequest, SimState

__all__ = [
    "SIM_STATE",
    "RecordedRequest",
    "RunningSim",
    "SimConfig",
    "SimState",
    "create_sim_app",
    "run_sim",
]

# Streaming handlers (slow downloads) must not hold up a test's teardown for long.
SHUTDOWN_TIMEOUT: float = 1.0


@web.middleware
async def json_errors(request: web.Request, handler: gate.Handler) -> web.StreamResponse:
    """Answer routing misses the way Close does: JSON, not aiohttp's text page."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return gate.error("Not found", 404)
    except web.HTTPMethodNotAllowed as exc:
        return web.json_response(
            {"error": "Method not allowed"},
            status=405,
            headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
        )


def create_sim_app(config: SimConfig | None = None) -> web.Application:
    """Build the simulator; its state is at ``app[SIM_STATE]``."""
    app = web.Application(middlewares=[json_errors])
    app[SIM_STATE] = SimState(config)
    app.router.add_get("/oauth2/authorize/", oauth.authorize_get)
    app.router.add_post("/oauth2/authorize/", oauth.authorize_post)
    app.router.add_post("/oauth2/token/", oauth.token)
    app.router.add_post("/oauth2/revoke/", oauth.revoke)
    api.add_routes(app)
    control.add_routes(app)
    app.on_response_prepare.append(gate.add_rate_limit_header)
    app.on_cleanup.append(_flush_data)
    return app


async def _flush_data(app: web.Application) -> None:
    """Whatever changed in the last moments reaches the data directory before exit."""
    app[SIM_STATE].org.flush()


@dataclass(frozen=True)
class RunningSim:
    """A simulator listening on a real port."""

    url: str
    state: SimState
    port: int


@asynccontextmanager
async def run_sim(
    config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSim]:
    """Serve the simulator on ``host:port`` (0 picks a free port) until the block exits."""
    app = create_sim_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_port = int(runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        yield RunningSim(
            url=f"http://{url_host}:{bound_port}", state=app[SIM_STATE], port=bound_port
        )
    finally:
        await runner.cleanup()
