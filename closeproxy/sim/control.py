"""/_sim/ control routes: let a test in another process drive the simulator.

No auth on purpose: the simulator is a test fake that only ever listens on loopback.
"""

from __future__ import annotations

import dataclasses
import json

from aiohttp import web

from closeproxy.sim.state import SIM_STATE


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def _json_object(request: web.Request) -> dict[str, object] | None:
    try:
        data = json.loads(await request.read())
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def control(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    changes = await _json_object(request)
    if changes is None:
        return _bad("expected a JSON object of knob values")
    try:
        state.set_knobs(changes)
    except ValueError as exc:
        return _bad(str(exc))
    return web.json_response(state.knobs())


async def stats(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    return web.json_response(
        {
            "counters": state.counters(),
            "knobs": state.knobs(),
            "refresh_times": state.refresh_times,
            "rate_groups": state.rate.snapshot(),
            "data": state.org.counts(),
        }
    )


async def logs(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    return web.json_response(
        {
            "api_log": [dataclasses.asdict(record) for record in state.api_log],
            "token_log": state.token_log,
            "revoke_log": state.revoke_log,
        }
    )


async def reset(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    state.reset_counters()
    return web.json_response({"counters": state.counters(), "knobs": state.knobs()})


async def issue(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_STATE].issue_tokens())


async def expire(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    body = await _json_object(request)
    token = None if body is None else body.get("access_token")
    if not isinstance(token, str):
        return _bad('expected {"access_token": "..."}')
    try:
        state.expire_access_token(token)
    except KeyError:
        return web.json_response({"error": "unknown access token"}, status=404)
    return web.json_response({})


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/_sim/control", control)
    router.add_get("/_sim/stats", stats)
    router.add_get("/_sim/logs", logs)
    router.add_post("/_sim/reset", reset)
    router.add_post("/_sim/issue", issue)
    router.add_post("/_sim/expire", expire)
