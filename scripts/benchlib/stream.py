"""`stream`: SPEC §4.1's acceptance run; 1 GiB each way, RSS, first byte (PASS/FAIL)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any, Final

from benchlib.common import (
    MB,
    MIB,
    Rig,
    chunk_arg,
    report_shutdown,
    rig,
    say,
    session,
    size_arg,
    targets,
)
from benchlib.transfers import (
    FIRST_BYTE_CHUNK,
    FIRST_BYTE_FRACTION,
    FirstByte,
    Transfer,
    download,
    first_byte,
    pattern_sha256,
    upload,
)


@dataclass
class Checks:
    """PASS/FAIL lines; the exit status is 0 only if every one passed."""

    results: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.results.append((name, ok, detail))

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.results)

    def print(self) -> None:
        for name, ok, detail in self.results:
            say(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")

    def summary(self) -> dict[str, bool]:
        return {name: ok for name, ok, _ in self.results}


def rss_check(checks: Checks, transfer: Transfer, limit_mb: float) -> None:
    peak = transfer.peak_rss
    ok = peak is not None and not transfer.error and peak < limit_mb * MB
    detail = "not measured" if peak is None else f"peak {peak / MB:.1f} MB"
    if transfer.error:
        detail += " but the transfer failed, so the peak proves nothing"
    checks.add(f"{transfer.label} peak RSS < {limit_mb:g} MB", ok, detail)


async def stream_figures(args: argparse.Namespace, rig: Rig, checks: Checks) -> dict[str, Any]:
    size: int = args.size
    chunk: int = args.chunk
    both = targets(rig)
    say(f"expected sha256 of the {size / MIB:.0f} MiB download: computing…")
    expected = await asyncio.to_thread(pattern_sha256, size)
    say(f"  {expected}")
    slow_size = args.first_byte_chunks * FIRST_BYTE_CHUNK
    slow_sha = pattern_sha256(slow_size)
    upstream_time = (args.first_byte_chunks - 1) * args.first_byte_delay

    downloads: dict[str, Transfer] = {}
    uploads: dict[str, Transfer] = {}
    slow_runs: dict[str, FirstByte] = {}
    async with session(read_bufsize=chunk) as client:
        say(f"download {size / MIB:.0f} MiB, simulator chunk {chunk // 1024} KiB")
        for target in both:
            rig.require_running()
            downloads[target.name] = await download(
                client, target, size=size, chunk=chunk, expected_sha256=expected
            )
        say(f"upload {size / MIB:.0f} MiB from a generator, {chunk // 1024} KiB chunks (chunked)")
        for target in both:
            rig.require_running()
            uploads[target.name] = await upload(client, target, size=size, chunk=chunk)
        say(
            f"slow download: {args.first_byte_chunks} x {FIRST_BYTE_CHUNK // 1024} KiB, "
            f"{args.first_byte_delay * 1000:g} ms apart (upstream needs ~{upstream_time:.2f} s)"
        )
        for target in both:
            rig.require_running()
            slow_runs[target.name] = await first_byte(
                client,
                target,
                chunks=args.first_byte_chunks,
                delay=args.first_byte_delay,
                expected_sha256=slow_sha,
            )
    down_direct, down_proxy = downloads["direct"], downloads["proxy"]
    up_direct, up_proxy = uploads["direct"], uploads["proxy"]
    slow_direct, slow_proxy = slow_runs["direct"], slow_runs["proxy"]

    say("ratios (proxy / direct)")
    for name, via_proxy, straight in (
        ("download", down_proxy, down_direct),
        ("upload", up_proxy, up_direct),
    ):
        if not (via_proxy.intact and straight.intact):
            say(f"  {name:<8} n/a (a transfer failed)")
            continue
        ratio = via_proxy.mb_per_s / straight.mb_per_s
        say(f"  {name:<8} {via_proxy.mb_per_s:7.1f} / {straight.mb_per_s:7.1f} MB/s = {ratio:.2f}")

    for transfer in (down_direct, down_proxy, up_direct, up_proxy):
        checks.add(
            f"{transfer.label} bytes and sha256 match",
            transfer.intact,
            "ok" if transfer.intact else transfer.problem(),
        )
    rss_check(checks, down_proxy, args.rss_limit)
    rss_check(checks, up_proxy, args.rss_limit)
    for slow in (slow_direct, slow_proxy):
        checks.add(f"{slow.label} bytes and sha256 match", slow.intact, slow.error or "ok")
    first = "never" if slow_proxy.first is None else f"{slow_proxy.first * 1000:.0f} ms"
    checks.add(
        f"first byte through the proxy before {FIRST_BYTE_FRACTION:.0%} of the last byte's time",
        slow_proxy.streamed,
        f"first {first}, last {slow_proxy.last * 1000:.0f} ms "
        f"(limit {FIRST_BYTE_FRACTION * slow_proxy.last * 1000:.0f} ms)",
    )
    return {
        "size": size,
        "chunk": chunk,
        "cpus": os.cpu_count(),
        "download": {"direct": down_direct.summary(), "proxy": down_proxy.summary()},
        "upload": {"direct": up_direct.summary(), "proxy": up_proxy.summary()},
        "first_byte": {"direct": slow_direct.summary(), "proxy": slow_proxy.summary()},
    }


def run(args: argparse.Namespace) -> int:
    checks = Checks()
    with rig(args.log_level) as running:
        figures = asyncio.run(stream_figures(args, running, checks))
        shutdown = running.stop()
    say()
    checks.print()
    report_shutdown(shutdown)
    verdict = "PASS" if checks.passed else "FAIL"
    say(
        f"{verdict}  streaming acceptance ({sum(ok for _, ok, _ in checks.results)}"
        f"/{len(checks.results)} checks)"
    )
    if args.json:
        say(
            json.dumps(
                {
                    "bench": "stream",
                    **figures,
                    "checks": checks.summary(),
                    "passed": checks.passed,
                    "shutdown": shutdown,
                }
            )
        )
    return 0 if checks.passed else 1


HELP: Final = "1 GiB download and upload: proxy RSS, throughput, first byte (PASS/FAIL)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=size_arg, default="1G", help="bytes each way (1G, 512M)")
    parser.add_argument(
        "--chunk", type=chunk_arg, default="256k", help="simulator and upload chunk size"
    )
    parser.add_argument("--rss-limit", type=float, default=80.0, help="proxy peak RSS limit, MB")
    parser.add_argument(
        "--first-byte-chunks", type=int, default=40, help="64 KiB chunks in the slow download"
    )
    parser.add_argument(
        "--first-byte-delay", type=float, default=0.05, help="seconds between slow chunks"
    )
