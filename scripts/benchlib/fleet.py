"""`fleet`: N closeproxy processes sharing one grant in Redis, under load, across expiries.

For each N: a simulator with short-lived tokens, a real redis-server (password, AOF),
N `closeproxy serve --token-store redis://...` processes with separate home
directories, and a client spreading small GETs over them for a few token lifetimes.
It prints, per N:
- refreshes per expiry: the simulator's refreshes grouped by expiry (refreshes closer
  together than a quarter of the token lifetime count as one expiry); must be 1;
- spent refresh tokens sent again (reuse); must be 0;
- p50/p99 latency overall, and p99 of requests started within 1 s of a refresh (the
  added p99 at expiry);
- Redis commands per proxied request (INFO commandstats before/after, minus the
  benchmark's own); should be about 0: the proxies read the version every 2 s, not per
  request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Final

import aiohttp

from benchlib.common import ME_PATH, STOP_TIMEOUT, BenchError, say, session, start_sim
from closeproxy.grant import TokenSet
from closeproxy.redis_store import RedisGrantStore
from closeproxy.sim import SimConfig
from closeproxy.testing import Child, child_env, issue_over_http, proxy_env, serve_argv
from closeproxy.testing_redis import RedisServer

HELP: Final = "N proxies sharing one grant in Redis: refreshes per expiry, p99 at expiry"
WINDOW: Final = 1.0  # seconds around a refresh that count as "at expiry"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proxies", default="2,4,8", help="comma-separated fleet sizes")
    parser.add_argument(
        "--lifetime", type=float, default=20.0, help="access token lifetime (seconds)"
    )
    parser.add_argument(
        "--expiries", type=int, default=3, help="token lifetimes' refreshes to run through"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--secret", action="store_true", help="encrypt the tokens in Redis")


def run(args: argparse.Namespace) -> int:
    sizes = [int(n) for n in args.proxies.split(",") if n.strip()]
    results = [asyncio.run(_one(args, n)) for n in sizes]
    say()
    say(
        f"{'proxies':>7} {'requests':>9} {'errors':>6} {'refreshes':>9} {'expiries':>8} "
        f"{'per expiry':>10} {'reuse':>5} {'p50 ms':>7} {'p99 ms':>7} {'p99 at expiry':>13} "
        f"{'redis cmds/req':>14}"
    )
    failed = False
    for r in results:
        say(
            f"{r['proxies']:>7} {r['requests']:>9,} {r['errors']:>6} {r['refreshes']:>9} "
            f"{r['expiries']:>8} {r['max_refreshes_per_expiry']:>10} {r['reuse']:>5} "
            f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['p99_at_expiry_ms']:>13.2f} "
            f"{r['redis_commands_per_request']:>14.4f}"
        )
        failed |= r["max_refreshes_per_expiry"] != 1 or r["reuse"] != 0 or r["errors"] != 0
    if args.json:
        say(json.dumps({"bench": "fleet", "results": results}))
    return 1 if failed else 0


async def _one(args: argparse.Namespace, n: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="closeproxy-fleet-")))
        sim = start_sim(stack, workdir, "--token-lifetime", str(args.lifetime))
        redis = RedisServer(workdir / "redis")
        redis.start()
        stack.callback(redis.kill)
        secret = base64.b64encode(os.urandom(32)).decode() if args.secret else None
        await _seed(sim.url, redis.url, secret)
        proxies = []
        for i in range(n):
            home = workdir / f"machine{i}"
            config = SimConfig()
            env = proxy_env(
                sim.url,
                home / "tokens.json",
                client_id=config.client_id,
                client_secret=config.client_secret,
                CLOSEPROXY_LOG_LEVEL="warning",
                CLOSEPROXY_TOKEN_STORE=redis.url,
                **({"CLOSEPROXY_TOKEN_STORE_SECRET": secret} if secret else {}),
            )
            env |= {"XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "cfg")}
            child = Child.spawn(
                [*serve_argv(), "--port", "0"], child_env(env), name=f"proxy{i}", log_dir=workdir
            )
            stack.callback(child.stop, STOP_TIMEOUT)
            proxies.append(child)
        for child in proxies:
            await asyncio.to_thread(child.wait_ready)
        say(f"fleet of {n}: simulator {sim.url}, Redis on port {redis.port}")
        before = _redis_commands(redis)
        started = time.time()
        latencies, errors = await _load(
            [c.url for c in proxies], args.concurrency, args.lifetime / 2 * args.expiries + 2
        )
        after = _redis_commands(redis)
        stats = _sim_stats(sim.url)
        refresh_times = [t for t in stats["refresh_times"] if t >= started]
    groups = _group(refresh_times, args.lifetime / 4)
    near = [lat for start, lat in latencies if any(abs(start - t) <= WINDOW for t in refresh_times)]
    all_lat = [lat for _, lat in latencies]
    return {
        "proxies": n,
        "requests": len(latencies),
        "errors": errors,
        "refreshes": len(refresh_times),
        "expiries": len(groups),
        "max_refreshes_per_expiry": max((len(g) for g in groups), default=0),
        "reuse": stats["counters"]["reuse_detected"],
        "p50_ms": _pct(all_lat, 0.5) * 1000,
        "p99_ms": _pct(all_lat, 0.99) * 1000,
        "p99_at_expiry_ms": _pct(near, 0.99) * 1000,
        # The INFO call that reads "after" is itself one command.
        "redis_commands_per_request": max(after - before - 1, 0) / max(len(latencies), 1),
    }


async def _seed(sim_url: str, redis_url: str, secret: str | None) -> None:
    now = time.time()
    tokens = TokenSet.from_reply(issue_over_http(sim_url), received_at=now, api_url=sim_url)
    store = RedisGrantStore(redis_url, secret=base64.b64decode(secret) if secret else None)
    try:
        async with store.locked():
            await store.save(tokens, expected=(await store.load()).version)
    finally:
        await store.aclose()


async def _load(
    urls: list[str], concurrency: int, seconds: float
) -> tuple[list[tuple[float, float]], int]:
    """Small GETs round-robin over the proxies: (wall-clock start, latency) each."""
    latencies: list[tuple[float, float]] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker(client: aiohttp.ClientSession, offset: int) -> None:
        nonlocal errors
        i = offset
        while time.monotonic() < deadline:
            url = urls[i % len(urls)] + ME_PATH
            i += 1
            wall, t0 = time.time(), time.perf_counter()
            try:
                async with client.get(url) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append((wall, time.perf_counter() - t0))
            else:
                errors += 1

    async with session(limit=concurrency) as client:
        await asyncio.gather(*(worker(client, k) for k in range(concurrency)))
    return latencies, errors


def _redis_commands(redis: RedisServer) -> int:
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    try:
        info: dict[str, Any] = client.info("stats")
        return int(info["total_commands_processed"])
    finally:
        client.close()


def _sim_stats(sim_url: str) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(sim_url + "/_sim/stats", timeout=10) as reply:
        stats: dict[str, Any] = json.load(reply)
    if "refresh_times" not in stats:
        raise BenchError("the simulator does not report refresh_times")
    return stats


def _group(times: list[float], gap: float) -> list[list[float]]:
    groups: list[list[float]] = []
    for t in sorted(times):
        if groups and t - groups[-1][-1] < gap:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]
