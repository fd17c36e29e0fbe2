"""`stream`: SPEC §4.1's acceptance run; 1 GiB each way, RSS, first byte (PASS/FAIL)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Final

from benchlib.common import (
    MB,
    MIB,
    Rig,
    chunk_arg,
    count_arg,
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
from closeproxy.settings import EVENT_LOOPS


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


def rss_check(checks: Checks, transfers: list[Transfer], limit_mb: float) -> None:
    """The highest peak of one kind of proxied transfer, over every repetition."""
    peaks = [t.peak_rss for t in transfers if t.peak_rss is not None]
    failed = any(t.error for t in transfers)
    ok = bool(peaks) and not failed and max(peaks) < limit_mb * MB
    detail = "not measured" if not peaks else f"peak {max(peaks) / MB:.1f} MB"
    if failed:
        detail += " but a transfer failed, so the peak proves nothing"
    checks.add(f"{transfers[0].label} peak RSS < {limit_mb:g} MB", ok, detail)


def creep_check(checks: Checks, transfers: list[Transfer], limit_mb: float) -> None:
    """RSS after the last of several transfers against RSS after the first: no creep."""
    first, last = transfers[0].after_rss, transfers[-1].after_rss
    name = (
        f"{transfers[0].label} RSS after the last of {len(transfers)} within {limit_mb:g} MB "
        "of after the first"
    )
    if first is None or last is None:
        checks.add(name, False, "not measured")
        return
    detail = f"{first / MB:.1f} MB after the first, {last / MB:.1f} MB after the last"
    checks.add(name, last - first <= limit_mb * MB, detail)


def intact_check(checks: Checks, transfers: list[Transfer]) -> None:
    broken = [t for t in transfers if not t.intact]
    detail = broken[0].problem() if broken else "ok"
    if len(transfers) > 1:
        detail += f" ({len(transfers) - len(broken)} of {len(transfers)} intact)"
    checks.add(f"{transfers[0].label} bytes and sha256 match", not broken, detail)


async def stream_figures(args: argparse.Namespace, rig: Rig, checks: Checks) -> dict[str, Any]:
    size: int = args.size
    chunk: int = args.chunk
    reps: int = args.reps
    both = targets(rig)
    say(f"expected sha256 of the {size / MIB:.0f} MiB download: computing…")
    expected = await asyncio.to_thread(pattern_sha256, size)
    say(f"  {expected}")
    slow_size = args.first_byte_chunks * FIRST_BYTE_CHUNK
    slow_sha = pattern_sha256(slow_size)
    upstream_time = (args.first_byte_chunks - 1) * args.first_byte_delay

    # kind -> target name -> one transfer per repetition
    runs: dict[str, dict[str, list[Transfer]]] = {
        kind: {target.name: [] for target in both} for kind in ("download", "upload")
    }
    slow_runs: dict[str, FirstByte] = {}
    async with session(read_bufsize=chunk) as client:
        for rep in range(reps):
            # Interleaved, and the order flipped each time: neither side always goes first.
            order = both if rep % 2 == 0 else both[::-1]
            say(
                f"repetition {rep + 1}/{reps}: {size / MIB:.0f} MiB down (simulator chunk "
                f"{chunk // 1024} KiB), then up from a generator ({chunk // 1024} KiB, chunked)"
            )
            for target in order:
                rig.require_running()
                runs["download"][target.name].append(
                    await download(client, target, size=size, chunk=chunk, expected_sha256=expected)
                )
            for target in order:
                rig.require_running()
                runs["upload"][target.name].append(
                    await upload(client, target, size=size, chunk=chunk, expected_sha256=expected)
                )
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
    slow_direct, slow_proxy = slow_runs["direct"], slow_runs["proxy"]

    say(f"ratios (proxy / direct{', medians of ' + str(reps) if reps > 1 else ''})")
    ratios: dict[str, float | None] = {}
    for kind, by_target in runs.items():
        pairs = list(zip(by_target["proxy"], by_target["direct"], strict=True))
        if not all(p.intact and d.intact for p, d in pairs):
            say(f"  {kind:<8} n/a (a transfer failed)")
            ratios[kind] = None
            continue
        proxy_rate = statistics.median(p.mb_per_s for p, _ in pairs)
        direct_rate = statistics.median(d.mb_per_s for _, d in pairs)
        each = [p.mb_per_s / d.mb_per_s for p, d in pairs]
        ratios[kind] = statistics.median(each)
        spread = f" (each: {', '.join(f'{r:.2f}' for r in each)})" if reps > 1 else ""
        say(f"  {kind:<8} {proxy_rate:7.1f} / {direct_rate:7.1f} MB/s = {ratios[kind]:.2f}{spread}")

    for by_target in runs.values():
        for transfers in by_target.values():
            intact_check(checks, transfers)
    for by_target in runs.values():
        rss_check(checks, by_target["proxy"], args.rss_limit)
        if reps > 1:
            creep_check(checks, by_target["proxy"], args.creep_limit)
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
        "reps": reps,
        "cpus": os.cpu_count(),
        **{
            kind: {name: [t.summary() for t in transfers] for name, transfers in by_target.items()}
            | {"ratio_median": ratios[kind]}
            for kind, by_target in runs.items()
        },
        "first_byte": {"direct": slow_direct.summary(), "proxy": slow_proxy.summary()},
    }


def run(args: argparse.Namespace) -> int:
    checks = Checks()
    with rig(args.log_level, ("--event-loop", args.event_loop)) as running:
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
    parser.add_argument(
        "--event-loop",
        choices=sorted(EVENT_LOOPS),
        default="auto",
        help="the proxy's --event-loop (auto: uvloop when installed, as for a user)",
    )
    parser.add_argument(
        "--reps", type=count_arg, default=3, help="interleaved repetitions (medians are reported)"
    )
    parser.add_argument("--rss-limit", type=float, default=80.0, help="proxy peak RSS limit, MB")
    parser.add_argument(
        "--creep-limit",
        type=float,
        default=8.0,
        help="most the proxy's RSS may grow from after the first transfer to after the last, MB",
    )
    parser.add_argument(
        "--first-byte-chunks", type=int, default=40, help="64 KiB chunks in the slow download"
    )
    parser.add_argument(
        "--first-byte-delay", type=float, default=0.05, help="seconds between slow chunks"
    )
