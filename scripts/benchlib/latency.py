"""`latency`: many small GETs direct vs through the proxy; percentiles, CPU per request."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import psutil

from benchlib.common import ME_PATH, Rig, Target, on_rig, say, session, targets

WARMUP_MIN: Final = 500


@dataclass
class LatencyRun:
    """Many small GETs with a fixed number in flight."""

    label: str
    latencies: list[float]
    seconds: float
    errors: int

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile, seconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]

    def line(self) -> str:
        ms = {name: self.percentile(q) * 1000 for name, q in PERCENTILES.items()}
        return (
            f"  {self.label:<7} {self.rate:8.0f} req/s, "
            + ", ".join(f"{name} {value:6.2f} ms" for name, value in ms.items())
            + f", max {max(self.latencies, default=float('nan')) * 1000:6.2f} ms"
            + f", errors {self.errors}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies),
            "errors": self.errors,
            "req_per_s": round(self.rate, 1),
            **{
                f"{name}_ms": round(self.percentile(q) * 1000, 3) for name, q in PERCENTILES.items()
            },
        }


PERCENTILES: Final[dict[str, float]] = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


async def hammer(
    client: aiohttp.ClientSession, target: Target, *, requests: int, concurrency: int
) -> LatencyRun:
    """GET /api/v1/me/ `requests` times with `concurrency` in flight; time each one."""
    url = target.base + ME_PATH
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))

    async def worker() -> None:
        nonlocal errors
        for _ in remaining:  # shared: each request is taken by exactly one worker
            start = time.perf_counter()
            try:
                async with client.get(url, headers=target.headers) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LatencyRun(target.name, latencies, time.perf_counter() - start, errors)


async def latency_figures(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    both = targets(rig)
    # Pools, caches and the first token check settle in the warm-up; it is not measured.
    warmup = min(args.requests, max(args.concurrency * 50, WARMUP_MIN))
    say(
        f"GET {ME_PATH}: {args.requests} requests per target, concurrency {args.concurrency}, "
        f"{warmup} warm-up requests first, {os.cpu_count()} CPUs, proxy log level {args.log_level}"
    )
    runs: dict[str, LatencyRun] = {}
    proxy_process = psutil.Process(rig.proxy.process.pid)
    cpu_per_request = 0.0
    async with session(limit=args.concurrency) as client:
        for target in both:
            await hammer(client, target, requests=warmup, concurrency=args.concurrency)
        for target in both:
            rig.require_running()
            cpu_before = proxy_process.cpu_times()
            run = await hammer(client, target, requests=args.requests, concurrency=args.concurrency)
            cpu_after = proxy_process.cpu_times()
            runs[target.name] = run
            say(run.line())
            if target.name == "proxy" and run.latencies:
                # CPU the proxy process spent per request: steadier than req/s on a busy
                # machine, so it is the figure to compare two builds of the proxy by.
                spent = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
                cpu_per_request = spent / len(run.latencies)
                say(f"  proxy CPU per request: {cpu_per_request * 1e6:.0f} us (user + system)")
    direct, proxy = runs["direct"], runs["proxy"]
    added = {
        name: (proxy.percentile(q) - direct.percentile(q)) * 1000 for name, q in PERCENTILES.items()
    }
    ratio = proxy.rate / direct.rate if direct.rate else 0.0
    say(
        "  added by the proxy: "
        + ", ".join(f"{name} {value:+.2f} ms" for name, value in added.items())
        + f"; throughput {ratio:.2f}x direct"
    )
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "cpus": os.cpu_count(),
        "direct": direct.summary(),
        "proxy": proxy.summary(),
        "added_ms": {name: round(value, 3) for name, value in added.items()},
        "throughput_ratio": round(ratio, 3),
        "proxy_cpu_us_per_request": round(cpu_per_request * 1e6, 1),
    }


def run(args: argparse.Namespace) -> int:
    figures = on_rig(args, "latency", latency_figures)
    failed = figures["direct"]["errors"] or figures["proxy"]["errors"]
    return 1 if failed else 0


HELP: Final = "small GETs of /api/v1/me/ direct vs through the proxy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=5000, help="measured requests per target")
    parser.add_argument("--concurrency", type=int, default=10, help="requests in flight")
