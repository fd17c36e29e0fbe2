"""`metrics-cost`: in process, the CPU the front middleware adds to a proxied request."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Final

from benchlib.common import say


async def metrics_cost_figures(rounds: int) -> dict[str, float]:
    """The front middleware around a proxied request vs the guard alone, in process.

    Same request, same trivial handler; the difference is what metrics, the request id
    and the dashboard's ring buffer add to every proxied request. (Upstream timing rides
    on the client session's trace hooks and is not in this figure.)
    """
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from closeproxy.app import Front
    from closeproxy.dashboard import Recent
    from closeproxy.guard import Guard
    from closeproxy.metrics import Metrics

    guard = Guard(allowed_hosts=(), proxy_key=None)
    front = Front(guard, Metrics(), Recent()).middleware
    request = make_mocked_request("GET", "/api/v1/me/?x=1", headers={"Host": "127.0.0.1:8730"})
    answer = web.Response(status=200)

    async def handler(request: web.Request) -> web.StreamResponse:
        return answer

    async def bare() -> None:
        if guard.check(request) is None:
            await handler(request)

    async def wrapped() -> None:
        await front(request, handler)

    figures: dict[str, float] = {}
    for name, call in (("guard only", bare), ("front middleware", wrapped)) * 2:
        start = time.process_time()
        for _ in range(rounds):
            await call()
        figures[name] = (time.process_time() - start) / rounds * 1e6  # the second pass counts
    figures["added"] = figures["front middleware"] - figures["guard only"]
    return figures


def run(args: argparse.Namespace) -> int:
    figures = asyncio.run(metrics_cost_figures(args.rounds))
    say(f"per proxied request, CPU, {args.rounds} rounds in process:")
    for name, value in figures.items():
        say(f"  {name:<17} {value:6.2f} us")
    say(
        "  compare 'added' with `latency`'s proxy CPU per request: that ratio is the share "
        "of the proxy's work spent on metrics"
    )
    if args.json:
        say(json.dumps({"bench": "metrics-cost", **{k: round(v, 2) for k, v in figures.items()}}))
    return 0


HELP: Final = "CPU the metrics, request id and recent-requests buffer add to a proxied request"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=200_000, help="requests per variant")
