"""`instructions`: machine instructions per proxied GET, counted by callgrind.

Timings on a shared 2-core machine move by a tenth between runs; callgrind's count of
the instructions a process executed does not (the same target twice: within 0.1 %).
Each target runs under `valgrind --tool=callgrind` against one simulator; after a
warm-up the count is zeroed, --requests GETs of /api/v1/me/ are sent (--concurrency at
once), and the count is read. The kernel's share (socket calls) is not in it, so the
ratios here are of the Python side, which is where closeproxy differs from the bare
forwarder (both make the same system calls per request but one getpid).

Targets: the bare forwarder, closeproxy at `info` and at `warning`, and with --parts,
closeproxy with one part of its request path switched off at a time (stripped.py), then
with every part off at `warning` and `--metrics off`: what the structure itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from benchlib.common import BenchError, Sim, closeproxy_child, count_arg, say, session, start_sim
from benchlib.common import Target as Endpoint
from benchlib.latency import hammer
from benchlib.peers import SCRIPTS, bare_argv
from benchlib.stripped import PARTS
from closeproxy.testing import Child, child_env, free_port

# Python under callgrind runs some 50 times slower: starting closeproxy takes ~20 s.
START_TIMEOUT: Final = 240.0
WARMUP: Final = 100
TOTAL = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # bare | closeproxy
    parts: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    note: str = ""


def targets(parts: list[str]) -> list[Target]:
    chosen = [
        Target("bare", "bare", note="the floor: scripts/bare_forwarder.py"),
        Target("closeproxy", "closeproxy", note="default: info, access line per request"),
        Target(
            "closeproxy-quiet",
            "closeproxy",
            args=("--log-level", "warning"),
            note="--log-level warning",
        ),
    ]
    for part in parts:
        chosen.append(Target(f"without {part}", "closeproxy", (part,), note=PARTS[part]))
    if parts:
        chosen.append(
            Target("without metrics", "closeproxy", args=("--metrics", "off"), note="--metrics off")
        )
        chosen.append(
            Target(
                "without all",
                "closeproxy",
                tuple(PARTS),
                ("--log-level", "warning", "--metrics", "off"),
                "every part above off, metrics off, warning",
            )
        )
    return chosen


def spawn(
    target: Target, sim: Sim, workdir: Path, port: int, args: argparse.Namespace, out: str
) -> Child:
    """The target under callgrind, its counts dumped to workdir/OUT.PID.N."""
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir / out}.%p"]
    if target.kind == "bare":
        argv = bare_argv(sim, port, uvloop=args.loop == "uvloop")
        return Child.spawn([*valgrind, *argv], child_env({}), name=target.name, log_dir=workdir)
    launcher = [sys.executable, str(SCRIPTS / "benchlib" / "stripped.py"), ",".join(target.parts)]
    return closeproxy_child(
        sim,
        workdir,
        name=target.name,
        args=("--event-loop", args.loop, *target.args),
        port=port,
        serve=[*valgrind, *launcher, "serve"],
    )


async def get_many(base: str, count: int, concurrency: int) -> int:
    """GET /api/v1/me/ `count` times, `concurrency` at once (latency's hammer); the 200s."""
    async with session() as client:
        done = await hammer(
            client, Endpoint("target", base, {}, None), requests=count, concurrency=concurrency
        )
    return len(done.latencies)


def callgrind_control(*args: str) -> None:
    done = subprocess.run(["callgrind_control", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)} failed: {done.stderr or done.stdout}")


def measure(target: Target, sim: Sim, workdir: Path, args: argparse.Namespace) -> float:
    """Instructions per request of one target, from spawn under callgrind to its stop."""
    port = free_port()
    out_name = f"callgrind.{target.name.replace(' ', '-')}"
    child = spawn(target, sim, workdir, port, args, out_name)
    try:
        child.wait_ready(timeout=START_TIMEOUT)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(get_many(url, WARMUP, args.concurrency))
        pid = str(child.process.pid)
        callgrind_control("--zero", pid)
        ok = asyncio.run(get_many(url, args.requests, args.concurrency))
        callgrind_control("--dump", pid)
        if ok != args.requests:
            raise BenchError(f"{target.name}: {args.requests - ok} requests did not get a 200")
        deadline = time.monotonic() + 30
        while not (dumps := sorted(workdir.glob(f"{out_name}.{pid}.*"))):
            if time.monotonic() > deadline:
                raise BenchError(f"{target.name}: callgrind wrote no dump")
            time.sleep(0.2)
        found = TOTAL.search(dumps[-1].read_text())
        if found is None:
            raise BenchError(f"{target.name}: no instruction total in {dumps[-1]}")
        return int(found.group(1)) / ok
    except BaseException:
        say(f"{target.name} log tail:\n{child.log_tail()}")
        raise
    finally:
        child.stop(60.0)


def run(args: argparse.Namespace) -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise BenchError("needs valgrind (Debian: apt-get install valgrind)")
    parts = list(PARTS) if args.parts == "all" else [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise BenchError(
            f"--parts: no such part {', '.join(sorted(unknown))}; known: {', '.join(PARTS)}"
        )
    chosen = targets(parts)
    if args.only:
        names = {name.strip() for name in args.only.split(",")}
        unknown = names - {target.name for target in chosen}
        if unknown:
            known = ", ".join(target.name for target in chosen)
            raise BenchError(f"--only: no target {', '.join(sorted(unknown))}; here: {known}")
        chosen = [target for target in chosen if target.name in names]
    figures: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="closeproxy-bench-")))
        sim = start_sim(stack, workdir)
        say(
            f"instructions per proxied GET under callgrind: {args.requests} requests, "
            f"{args.concurrency} at once, {args.loop} loop ({len(chosen)} targets, ~30 s each)"
        )
        for target in chosen:
            figures[target.name] = measure(target, sim, workdir, args)
            say(f"  measured {target.name}: {figures[target.name]:,.0f}")
    say()
    say(f"{'target':<22} {'instr/req':>10} {'vs bare':>8} {'saved':>9}  what")
    floor, default = figures.get("bare"), figures.get("closeproxy")
    for target in chosen:
        value = figures[target.name]
        ratio = "-" if floor is None else f"{value / floor:.2f}x"
        saved = "" if target.kind == "bare" or default is None else f"{default - value:,.0f}"
        say(f"{target.name:<22} {value:>10,.0f} {ratio:>8} {saved:>9}  {target.note}")
    if args.json:
        say(json.dumps({"bench": "instructions", "loop": args.loop, "per_request": figures}))
    return 0


HELP: Final = "instructions per proxied GET under callgrind, and what each part costs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests", type=count_arg, default=1000, help="measured requests per target"
    )
    parser.add_argument("--concurrency", type=count_arg, default=16, help="requests in flight")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of every target",
    )
    parser.add_argument(
        "--only", default="", help="measure only these targets (comma list of table names)"
    )
    parser.add_argument(
        "--parts",
        default="",
        help=f"parts to switch off one at a time (comma list, or 'all': {', '.join(PARTS)})",
    )
