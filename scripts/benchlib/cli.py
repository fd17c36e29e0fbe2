"""The command line: one sub-command per mode, each a `run(args) -> exit status`."""

from __future__ import annotations

import argparse
import signal
import sys

from benchlib.common import FAILURES, chunk_arg, size_arg
from benchlib.latency import cmd_latency
from benchlib.metrics_cost import cmd_metrics_cost
from benchlib.ratelimit import cmd_ratelimit
from benchlib.slow import cmd_slow
from benchlib.stream import cmd_stream


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

    stream = commands.add_parser(
        "stream",
        parents=[common],
        help="1 GiB download and upload: proxy RSS, throughput, first byte (PASS/FAIL)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    stream.add_argument("--size", type=size_arg, default="1G", help="bytes each way (1G, 512M)")
    stream.add_argument(
        "--chunk", type=chunk_arg, default="256k", help="simulator and upload chunk size"
    )
    stream.add_argument("--rss-limit", type=float, default=80.0, help="proxy peak RSS limit, MB")
    stream.add_argument(
        "--first-byte-chunks", type=int, default=40, help="64 KiB chunks in the slow download"
    )
    stream.add_argument(
        "--first-byte-delay", type=float, default=0.05, help="seconds between slow chunks"
    )
    stream.set_defaults(run=cmd_stream)

    latency = commands.add_parser(
        "latency",
        parents=[common],
        help="small GETs of /api/v1/me/ direct vs through the proxy",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    latency.add_argument("--requests", type=int, default=5000, help="measured requests per target")
    latency.add_argument("--concurrency", type=int, default=10, help="requests in flight")
    latency.set_defaults(run=cmd_latency)

    slow = commands.add_parser(
        "slow",
        parents=[common],
        help="non-reading downloads and trickling uploads, then ordinary GETs (PASS/FAIL)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    slow.add_argument("--downloads", type=int, default=300, help="downloads nobody reads")
    slow.add_argument("--uploads", type=int, default=260, help="uploads that trickle")
    slow.add_argument("--trickle-every", type=float, default=0.5, help="seconds between bytes")
    slow.add_argument("--settle", type=float, default=5.0, help="seconds before the probes")
    slow.add_argument("--probes", type=int, default=20, help="ordinary GETs, one at a time")
    slow.add_argument("--probe-timeout", type=float, default=30.0, help="seconds per GET")
    slow.set_defaults(run=cmd_slow)

    ratelimit = commands.add_parser(
        "ratelimit",
        parents=[common],
        help="sequential requests at 3x a group's limit: failures and time, direct vs proxy",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ratelimit.add_argument("--requests", type=int, default=1000, help="requests per target")
    ratelimit.add_argument(
        "--limit", type=int, default=20, help="the group's limit per second at the simulator"
    )
    ratelimit.set_defaults(run=cmd_ratelimit)

    cost = commands.add_parser(
        "metrics-cost",
        parents=[common],
        help="CPU the metrics, request id and recent-requests buffer add to a proxied request",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cost.add_argument("--rounds", type=int, default=200_000, help="requests per variant")
    cost.set_defaults(run=cmd_metrics_cost)
    return top


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM would otherwise end the benchmark without its cleanup, orphaning both children.
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


if __name__ == "__main__":
    raise SystemExit(main())
