"""`ratelimit` (SPEC §9): a curl-style loop at 3x a group's limit, direct vs proxy."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from benchlib.common import (
    CLIENT_TIMEOUT,
    BenchError,
    Rig,
    Target,
    on_rig,
    say,
    session,
    targets,
)

RATELIMIT_GROUP: Final = "GET lead"
RATELIMIT_PATH: Final = "/api/v1/lead/?_limit=1&_fields=id"


@dataclass
class PacedRun:
    """Sequential requests, each started no earlier than its slot at the offered rate."""

    label: str
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failures(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)

    def line(self) -> str:
        seen = ", ".join(f"{status}: {count}" for status, count in sorted(self.statuses.items()))
        return f"  {self.label:<7} {self.seconds:7.2f} s, failures {self.failures} ({seen})"


async def paced(target: Target, *, requests: int, rate: float) -> PacedRun:
    """Like a shell loop of curl calls: one connection per request, a 429 is a failure."""
    run = PacedRun(target.name)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=CLIENT_TIMEOUT, trust_env=False
    ) as client:
        start = time.perf_counter()
        for index in range(requests):
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                async with client.get(target.base + RATELIMIT_PATH, headers=target.headers) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0  # no answer at all
            run.statuses[status] = run.statuses.get(status, 0) + 1
        run.seconds = time.perf_counter() - start
    return run


async def sim_call(client: aiohttp.ClientSession, rig: Rig, path: str, body: Any) -> Any:
    async with client.request(
        "POST" if body is not None else "GET", rig.sim.url + path, json=body
    ) as reply:
        if reply.status != 200:
            raise BenchError(f"simulator {path} answered {reply.status}: {await reply.text()}")
        return await reply.json()


async def ratelimit_figures(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    offered = 3 * args.limit
    ideal = args.requests / args.limit
    say(
        f"{RATELIMIT_GROUP} limited to {args.limit} per 1 s window at the simulator; "
        f"{args.requests} sequential requests per target offered at {offered}/s, "
        f"a new connection each; {os.cpu_count()} CPUs"
    )
    runs: dict[str, PacedRun] = {}
    stats: dict[str, Any] = {}
    async with session() as control:
        await sim_call(
            control,
            rig,
            "/_sim/control",
            {"group_rate_limits": {RATELIMIT_GROUP: args.limit}, "rate_window": 1.0},
        )
        for target in targets(rig):
            await sim_call(control, rig, "/_sim/reset", {})  # a fresh window for each run
            rig.require_running()
            run = await paced(target, requests=args.requests, rate=offered)
            runs[target.name] = run
            stats[target.name] = (await sim_call(control, rig, "/_sim/stats", None))[
                "rate_groups"
            ].get(RATELIMIT_GROUP, {})
            say(run.line() + f"; simulator saw {stats[target.name]}")
        async with control.get(rig.proxy.url + "/admin/status") as reply:
            proxy_view = (await reply.json())["rate_limits"].get(RATELIMIT_GROUP, {})
    proxy = runs["proxy"]
    over = proxy.seconds / ideal - 1
    say(
        f"  failures direct {runs['direct'].failures}, through the proxy {proxy.failures}; "
        f"proxy total {proxy.seconds:.2f} s vs ideal {ideal:.2f} s ({over:+.1%}); "
        f"proxy counted {proxy_view.get('waits')} waits, "
        f"{proxy_view.get('waited_seconds')} s waited, "
        f"{proxy_view.get('passed_through')} 429s passed through"
    )
    return {
        "requests": args.requests,
        "limit": args.limit,
        "offered_per_s": offered,
        "ideal_s": round(ideal, 3),
        "direct": {
            "seconds": round(runs["direct"].seconds, 3),
            "statuses": runs["direct"].statuses,
        },
        "proxy": {"seconds": round(proxy.seconds, 3), "statuses": proxy.statuses},
        "proxy_over_ideal": round(over, 4),
        "simulator": stats,
        "proxy_rate_limits": proxy_view,
    }


def run(args: argparse.Namespace) -> int:
    on_rig(args, "ratelimit", ratelimit_figures)
    return 0


HELP: Final = "sequential requests at 3x a group's limit: failures and time, direct vs proxy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=1000, help="requests per target")
    parser.add_argument(
        "--limit", type=int, default=20, help="the group's limit per second at the simulator"
    )
