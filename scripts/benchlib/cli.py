"""The command line: one sub-command per mode module (its HELP, add_arguments and run)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Final, Protocol

from benchlib import compare, fleet, instructions, latency, metrics_cost, ratelimit, slow, stream
from benchlib.common import FAILURES


class Mode(Protocol):
    """What a mode module provides."""

    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


MODES: Final[dict[str, Mode]] = {
    "stream": stream,
    "latency": latency,
    "slow": slow,
    "ratelimit": ratelimit,
    "metrics-cost": metrics_cost,
    "compare": compare,
    "fleet": fleet,
    "instructions": instructions,
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python scripts/bench.py",
        description="Benchmark closeproxy against the simulator (separate processes, loopback).",
    )
    commands = top.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="also print a JSON summary line last")
    common.add_argument(
        "--log-level",
        default="info",
        help="the proxy's CLOSEPROXY_LOG_LEVEL (default: %(default)s)",
    )
    for name, mode in MODES.items():
        sub = commands.add_parser(
            name,
            parents=[common],
            help=mode.HELP,
            description=mode.HELP,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        mode.add_arguments(sub)
        sub.set_defaults(run=mode.run)
    return top


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM would otherwise end the benchmark without its cleanup, orphaning its children.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        status: int = args.run(args)
    except FAILURES as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return status
