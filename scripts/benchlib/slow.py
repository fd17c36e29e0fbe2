"""`slow`: downloads nobody reads and trickling uploads, then ordinary GETs (PASS/FAIL)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import time
from typing import Any, Final

import aiohttp

from benchlib.common import (
    DOWNLOAD_PATH,
    MB,
    ME_PATH,
    UPLOAD_PATH,
    Rig,
    on_rig,
    say,
)
from benchlib.rss import RssSampler


async def open_slow_clients(
    host: str, port: int, downloads: int, uploads: int
) -> list[asyncio.StreamWriter]:
    """Downloads nobody reads and 5 MB uploads that have sent 1 kB: raw sockets."""
    writers: list[asyncio.StreamWriter] = []
    for index in range(downloads + uploads):
        _, writer = await asyncio.open_connection(host, port)
        if index < downloads:
            head = f"GET {DOWNLOAD_PATH}?bytes=1000000000&chunk=65536 HTTP/1.1\r\n"
            body = b""
        else:
            head = f"POST {UPLOAD_PATH} HTTP/1.1\r\nContent-Length: 5000000\r\n"
            body = b"u" * 1000
        writer.write(f"{head}Host: {host}:{port}\r\n\r\n".encode() + body)
        writers.append(writer)
    return writers


async def trickle(writers: list[asyncio.StreamWriter], every: float) -> None:
    """One byte per upload every `every` seconds, never a pause near a timeout."""
    while True:
        for writer in writers:
            if not writer.is_closing():
                writer.write(b"u")
        await asyncio.sleep(every)


async def probe(client: aiohttp.ClientSession, base: str, count: int) -> list[tuple[int, float]]:
    """`count` ordinary GETs one after another: (status, seconds) each; 0 = no answer."""
    results: list[tuple[int, float]] = []
    for _ in range(count):
        started = time.perf_counter()
        try:
            async with client.get(base + ME_PATH) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        results.append((status, time.perf_counter() - started))
    return results


async def slow_client_figures(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    url = rig.proxy.url
    host, _, port_text = url.removeprefix("http://").rpartition(":")
    timeout = aiohttp.ClientTimeout(total=args.probe_timeout)
    say(
        f"{args.downloads} downloads nobody reads + {args.uploads} uploads trickling 1 byte "
        f"every {args.trickle_every:g} s; then {args.probes} ordinary GETs {ME_PATH}"
    )
    sampler = RssSampler(rig.proxy.process.pid)
    baseline = sampler.rss()
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as client:
        with sampler:
            writers = await open_slow_clients(host, int(port_text), args.downloads, args.uploads)
            trickling = asyncio.create_task(trickle(writers[args.downloads :], args.trickle_every))
            try:
                await asyncio.sleep(args.settle)
                rig.require_running()
                results = await probe(client, url, args.probes)
                async with client.get(url + "/admin/status") as resp:
                    counters = (await resp.json())["counters"]
            finally:
                trickling.cancel()
                for writer in writers:
                    writer.transport.abort()
        await asyncio.sleep(2)  # the proxy lets go of the cut transfers
        after = sampler.rss()
    ok = [seconds for status, seconds in results if status == 200]
    statuses = sorted({status for status, _ in results})
    say(
        f"  ordinary GETs: {len(ok)}/{len(results)} answered 200 (statuses {statuses}); "
        f"slowest {max(seconds for _, seconds in results) * 1000:.0f} ms, "
        f"median {sorted(seconds for _, seconds in results)[len(results) // 2] * 1000:.0f} ms"
    )
    say(
        f"  proxy RSS: baseline {baseline / MB:.1f} MB, peak {sampler.peak / MB:.1f} MB, "
        f"2 s after the slow clients left {after / MB:.1f} MB"
    )
    say(
        f"  counters: slow_clients_cut {counters.get('slow_clients_cut')}, "
        f"proxy_busy {counters.get('proxy_busy')}, upstream_errors {counters['upstream_errors']}"
    )
    say(f"{'PASS' if len(ok) == len(results) else 'FAIL'}  every ordinary GET answered 200")
    return {
        "downloads": args.downloads,
        "uploads": args.uploads,
        "probes": [{"status": status, "seconds": round(s, 4)} for status, s in results],
        "rss_mb": {
            "baseline": round(baseline / MB, 1),
            "peak": round(sampler.peak / MB, 1),
            "after": round(after / MB, 1),
        },
        "counters": counters,
        "all_ok": len(ok) == len(results),
    }


def run(args: argparse.Namespace) -> int:
    # Our side holds every slow socket: lift this process's own open-file limit first.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    figures = on_rig(args, "slow", slow_client_figures)
    return 0 if figures["all_ok"] else 1


HELP: Final = "non-reading downloads and trickling uploads, then ordinary GETs (PASS/FAIL)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--downloads", type=int, default=300, help="downloads nobody reads")
    parser.add_argument("--uploads", type=int, default=260, help="uploads that trickle")
    parser.add_argument("--trickle-every", type=float, default=0.5, help="seconds between bytes")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before the probes")
    parser.add_argument("--probes", type=int, default=20, help="ordinary GETs, one at a time")
    parser.add_argument("--probe-timeout", type=float, default=30.0, help="seconds per GET")
