"""`compare`: the same load against direct, a bare forwarder, closeproxy variants and peers.

Every repetition starts each target afresh, in an order rotated per repetition (so
no target always runs first or last), times it from spawn to its first proxied 200, reads
its idle RSS, warms it up, then measures req/s at c32 (--connections), with the CPU the
target's processes spent (read from /proc), and the p50 latency at c1. Medians over the
repetitions are printed, with ratios to the baseline (the bare forwarder unless
--baseline says otherwise).

Extra closeproxy variants are `--variant NAME=ARGS` (ARGS: `closeproxy serve` flags, as
shell words), e.g. the cost of a switch: `--only closeproxy --variant off='--metrics off'`
`--baseline closeproxy`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from benchlib import load
from benchlib.common import MB, ME_PATH, BenchError, Sim, count_arg, say, start_sim
from benchlib.peers import NGINX, Variant, find_tool, loop_of, start
from benchlib.procfs import cpu_seconds

BUILT_IN: Final = (
    Variant("direct", "direct"),
    Variant("bare", "bare"),
    Variant("closeproxy", "closeproxy"),
    Variant("closeproxy-quiet", "closeproxy", ("--log-level", "warning")),
    Variant("bare-uvloop", "bare", uvloop=True),
    Variant("closeproxy-uvloop", "closeproxy", uvloop=True),
    Variant("nginx", "nginx"),
    Variant("mitmproxy", "mitmproxy"),
)


@dataclass
class Sample:
    """One repetition of one target."""

    busy_rate: float
    c1_p50: float
    errors: int
    cpu_per_request: float | None
    start_seconds: float | None
    idle_rss: int | None
    loop: str | None = None


# Peers found on the machine: variant kind -> (option, default path or name on PATH).
PEER_TOOLS: Final[dict[str, tuple[str, str]]] = {
    "nginx": ("nginx", NGINX),
    "mitmproxy": ("mitmdump", "mitmdump"),
}


def available(args: argparse.Namespace) -> tuple[list[Variant], dict[str, str]]:
    """The variants asked for that can run here; a one-line note for each that cannot.

    --only picks among the built-in ones; every --variant given runs.
    """
    wanted = list(BUILT_IN)
    if args.only:
        names = {name.strip() for name in args.only.split(",")}
        unknown = names - {variant.name for variant in wanted}
        if unknown:
            raise BenchError(f"--only names no built-in variant: {', '.join(sorted(unknown))}")
        wanted = [variant for variant in wanted if variant.name in names]
    taken = {variant.name for variant in wanted}
    for extra in args.variant:
        if extra.name in taken:
            raise BenchError(f"--variant {extra.name}: that name is taken")
        taken.add(extra.name)
        wanted.append(extra)
    tools: dict[str, str] = {}
    runnable: list[Variant] = []
    for variant in wanted:
        if variant.uvloop and importlib.util.find_spec("uvloop") is None:
            say(f"skip {variant.name}: uvloop is not importable here (pip install uvloop)")
            continue
        if variant.kind in PEER_TOOLS:
            option, default = PEER_TOOLS[variant.kind]
            found = find_tool(getattr(args, option), default)
            if found is None:
                say(f"skip {variant.name}: no {option} at {default} or on PATH (--{option} PATH)")
                continue
            tools[variant.kind] = found
        runnable.append(variant)
    return runnable, tools


def repetition(
    variant: Variant, sim: Sim, workdir: Path, args: argparse.Namespace, tools: dict[str, str]
) -> Sample:
    """Start, time the start, warm up, measure c32 (with CPU) and c1, stop."""
    running = start(variant, sim, workdir, tools=tools, settle=args.settle)
    try:
        url, headers, pid = running.url + ME_PATH, running.headers, running.pid
        load.run(args.wrk, url, headers, connections=args.connections, seconds=args.warmup)
        cpu_before = cpu_seconds(pid) if pid is not None else 0.0
        busy = load.run(args.wrk, url, headers, connections=args.connections, seconds=args.duration)
        cpu = cpu_seconds(pid) - cpu_before if pid is not None else None
        single = load.run(args.wrk, url, headers, connections=1, seconds=args.duration)
    finally:
        running.stop()
    return Sample(
        busy_rate=busy.rate,
        c1_p50=single.p50,
        errors=busy.errors + single.errors,
        cpu_per_request=cpu / busy.requests if cpu is not None and busy.requests else None,
        start_seconds=running.start_seconds,
        idle_rss=running.idle_rss,
        loop=loop_of(running),
    )


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


MEASURED: Final = ("busy_rate", "c1_p50", "cpu_per_request", "start_seconds", "idle_rss")


def medians(samples: list[Sample]) -> dict[str, float | None]:
    return {name: median([getattr(sample, name) for sample in samples]) for name in MEASURED}


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def number(value: float | None, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value * scale:,.{digits}f}"


COLUMNS: Final = (
    ("target", 18),
    ("cN req/s", 10),
    ("ratio", 6),
    ("c1 p50 ms", 9),
    ("ratio", 6),
    ("+us p50", 8),
    ("CPU us/req", 10),
    ("ratio", 6),
    ("start s", 7),
    ("idle RSS MB", 11),
    ("errors", 6),
    ("loop", 7),
)


def table(results: dict[str, list[Sample]], baseline: str, connections: int) -> list[str]:
    """One row per target of medians, ratios to the baseline's medians."""
    base = medians(results[baseline]) if baseline in results else dict.fromkeys(MEASURED)
    rows = [[title.replace("cN", f"c{connections}") for title, _ in COLUMNS]]
    for name, samples in results.items():
        mine = medians(samples)
        added = None
        if mine["c1_p50"] is not None and base["c1_p50"] is not None:
            added = mine["c1_p50"] - base["c1_p50"]
        rows.append(
            [
                name,
                number(mine["busy_rate"], 1, 0),
                ratio(mine["busy_rate"], base["busy_rate"]),
                number(mine["c1_p50"], 1e3, 3),
                ratio(mine["c1_p50"], base["c1_p50"]),
                "-" if added is None else f"{added * 1e6:+,.0f}",
                number(mine["cpu_per_request"], 1e6, 0),
                ratio(mine["cpu_per_request"], base["cpu_per_request"]),
                number(mine["start_seconds"], 1, 2),
                number(mine["idle_rss"], 1 / MB, 1),
                str(sum(sample.errors for sample in samples)),
                ",".join(sorted({sample.loop for sample in samples if sample.loop})) or "-",
            ]
        )
    return [
        "  ".join(
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, (_, width)) in enumerate(zip(row, COLUMNS, strict=True))
        )
        for row in rows
    ]


def run(args: argparse.Namespace) -> int:
    variants, tools = available(args)
    args.wrk = load.find_wrk(args.load)
    generator = f"wrk ({args.wrk})" if args.wrk else "the built-in aiohttp generator"
    say(
        f"GET {ME_PATH} with {generator}: per target and repetition {args.warmup:g} s warm-up, "
        f"{args.duration:g} s at c{args.connections}, {args.duration:g} s at c1; "
        f"{args.reps} repetitions, {os.cpu_count()} CPUs"
    )
    results: dict[str, list[Sample]] = {variant.name: [] for variant in variants}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="closeproxy-bench-")))
        sim = start_sim(stack, workdir)
        for rep in range(args.reps):
            shift = rep % len(variants) if variants else 0
            for variant in variants[shift:] + variants[:shift]:
                sample = repetition(variant, sim, workdir, args, tools)
                results[variant.name].append(sample)
                say(
                    f"  rep {rep + 1} {variant.name:<18} {sample.busy_rate:9,.0f} req/s "
                    f"c{args.connections}, c1 p50 {sample.c1_p50 * 1e3:6.3f} ms, "
                    f"errors {sample.errors}"
                )
    say(f"medians of {args.reps}; ratios and +us against {args.baseline!r}")
    for line in table(results, args.baseline, args.connections):
        say(line)
    if args.json:
        document = {
            name: [asdict(sample) for sample in samples] for name, samples in results.items()
        }
        say(json.dumps({"bench": "compare", "baseline": args.baseline, "samples": document}))
    failed = any(sample.errors for samples in results.values() for sample in samples)
    return 1 if failed else 0


HELP: Final = "one load against direct, a bare forwarder, closeproxy variants, nginx, mitmproxy"


def variant_arg(text: str) -> Variant:
    try:
        return Variant.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=float,
        default=5.0,
        help="seconds per measured run (wrk rounds up to whole seconds)",
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of c32 load before each measurement"
    )
    parser.add_argument(
        "--reps", type=count_arg, default=3, help="repetitions, interleaved across targets"
    )
    parser.add_argument("--connections", type=int, default=32, help="connections of the busy run")
    parser.add_argument(
        "--load",
        choices=("auto", "wrk", "builtin"),
        default="auto",
        help="load generator: wrk when installed, or the built-in one",
    )
    parser.add_argument(
        "--only", help="comma-separated variant names to run (default: all that can run)"
    )
    parser.add_argument(
        "--variant",
        type=variant_arg,
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="an extra closeproxy target, its `serve` flags as shell words "
        "(repeatable), e.g. quiet='--log-level warning'",
    )
    parser.add_argument(
        "--settle", type=float, default=0.5, help="idle seconds after the first answer, then RSS"
    )
    parser.add_argument("--baseline", default="bare", help="the target ratios are taken against")
    parser.add_argument("--nginx", help=f"nginx binary (default: {NGINX}, else on PATH)")
    parser.add_argument("--mitmdump", help="mitmproxy's mitmdump binary (default: on PATH)")
