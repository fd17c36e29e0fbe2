"""``python -m closeproxy.sim``: run the simulator standalone until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from closeproxy.signals import on_signals
from closeproxy.sim.app import SimConfig, run_sim
from closeproxy.sim.org import DataFileError

MAX_SEED: int = 100_000


def _seed(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {MAX_SEED}")
    return int(text)


def _group_limit(text: str) -> tuple[str, int]:
    group, _, limit = text.rpartition("=")
    if not group.strip() or not limit.isdigit():
        raise argparse.ArgumentTypeError(f'expected GROUP=N like "GET lead=20", got {text!r}')
    return group.strip(), int(limit)


def _parser() -> argparse.ArgumentParser:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(
        prog="python -m closeproxy.sim",
        description="Run the Close simulator (OAuth endpoints and /api/v1/) on one port.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one")
    parser.add_argument(
        "--token-lifetime",
        type=float,
        default=defaults.token_lifetime,
        help="seconds an access token stays valid (expires_in)",
    )
    parser.add_argument("--client-id", default=defaults.client_id, help="OAuth client id")
    parser.add_argument(
        "--client-secret", default=defaults.client_secret, help="OAuth client secret"
    )
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=None,
        help="requests per window on /api/v1/ before 429; off when not given",
    )
    parser.add_argument(
        "--rate-window", type=float, default=defaults.rate_window, help="rate limit window, seconds"
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="build an organization with this many leads (and their contacts, "
        "opportunities, tasks, activities, events), the same for the same number; "
        "default: the five classic demo leads",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        default=None,
        help="keep the data in DIR/organization.json and the logins in DIR/tokens.json: "
        "loaded at start if present (then --seed is not used), saved after every change; "
        "default: memory only",
    )
    parser.add_argument(
        "--group-rate-limit",
        metavar="GROUP=N",
        action="append",
        type=_group_limit,
        default=argparse.SUPPRESS,
        help='requests per window for one endpoint group, e.g. "GET lead=20"; "*=N" covers '
        "every group not named; repeatable (default: no group limits)",
    )
    parser.add_argument(
        "--no-auto-consent",
        dest="auto_consent",
        action="store_false",
        default=argparse.SUPPRESS,
        help="show a consent page instead of redirecting at once "
        "(default: redirect at once, as if the user clicked Allow)",
    )

    return parser


async def _serve(config: SimConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    with on_signals((signal.SIGINT, signal.SIGTERM), lambda signum: stop.set()):
        async with run_sim(config, host, port) as sim:
            print(f"simulator listening on {sim.url}", flush=True)
            await stop.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    # Defaults of the SUPPRESSed options, whose generated "(default: ...)" would mislead.
    for name, value in (("auto_consent", True), ("group_rate_limit", [])):
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = SimConfig(
        client_id=args.client_id,
        client_secret=args.client_secret,
        token_lifetime=args.token_lifetime,
        auto_consent=args.auto_consent,
        rate_limit=args.rate_limit,
        rate_window=args.rate_window,
        group_rate_limits=dict(args.group_rate_limit),
        seed=args.seed,
        data_dir=args.data,
    )
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except DataFileError as exc:
        print(f"{exc}; move it away or pick another --data DIR", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
