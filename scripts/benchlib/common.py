"""What every mode shares: units, paths, the simulator + proxy rig, client sessions."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from closeproxy.errors import ConfigError
from closeproxy.parsing import Count, Origin
from closeproxy.sim import SimConfig, payloads
from closeproxy.testing import (
    SIM_LISTENING,
    Child,
    NotReady,
    child_env,
    issue_over_http,
    parse_size,
    proxy_env,
    serve_argv,
    store_grant,
)

MIB: Final = 1024 * 1024
MB: Final = 1_000_000
# The proxy drains in-flight requests on SIGTERM; a benchmark has none left by then.
STOP_TIMEOUT: Final = 10.0

DOWNLOAD_PATH: Final = "/api/v1/_sim/download"
UPLOAD_PATH: Final = "/api/v1/_sim/upload"
ME_PATH: Final = "/api/v1/me/"
CLIENT_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)


class BenchError(Exception):
    """The benchmark could not run or a transfer went wrong."""


# A child that does not come up is the benchmark's failure to run, reported the same way.
FAILURES: Final = (BenchError, NotReady)


def size_arg(text: str) -> int:
    """parse_size for argparse: its message, not "invalid value"."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def count_arg(text: str) -> int:
    """closeproxy's Count (a whole number, 1 or more) for argparse: its message."""
    try:
        return Count(high=1_000_000).parse(text, Origin("flag", "count"))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("count: ")) from None


def chunk_arg(text: str) -> int:
    size = size_arg(text)
    if size > payloads.MAX_CHUNK:
        raise argparse.ArgumentTypeError(
            f"at most {payloads.MAX_CHUNK // 1024}k, the simulator's largest chunk"
        )
    return size


def say(line: str = "") -> None:
    print(line, flush=True)


# --- the simulator and closeproxy in their own processes ---------------------------


@dataclass
class Sim:
    """The simulator running, and a token file logged in to it."""

    child: Child
    token_file: Path
    access_token: str

    @property
    def url(self) -> str:
        return self.child.url


def start_sim(stack: contextlib.ExitStack, workdir: Path, *args: str) -> Sim:
    """`python -m closeproxy.sim` on a free port, stopped when `stack` closes; seeded."""
    child = Child.spawn(
        [sys.executable, "-m", "closeproxy.sim", "--port", "0", *args],
        child_env({}),
        name="simulator",
        log_dir=workdir,
    )
    stack.callback(child.stop, STOP_TIMEOUT)
    child.wait_ready(ready=SIM_LISTENING)
    token_file = workdir / "tokens.json"
    tokens = store_grant(issue_over_http(child.url), token_file, api_url=child.url)
    return Sim(child, token_file, tokens.access_token)


def closeproxy_child(
    sim: Sim,
    workdir: Path,
    *,
    name: str = "proxy",
    log_level: str = "info",
    args: Sequence[str] = (),
    port: int = 0,
    serve: Sequence[str] | None = None,
) -> Child:
    """Spawn `closeproxy serve ARGS` logged in to `sim` (not yet waited for).

    `serve`: the command that stands for `closeproxy serve` (default serve_argv())."""
    config = SimConfig()
    env = proxy_env(
        sim.url,
        sim.token_file,
        client_id=config.client_id,
        client_secret=config.client_secret,
        CLOSEPROXY_LOG_LEVEL=log_level,
    )
    command = [*(serve_argv() if serve is None else serve), "--port", str(port), *args]
    return Child.spawn(command, child_env(env), name=name, log_dir=workdir)


@dataclass
class Rig:
    """The simulator and a proxy logged in to it, both running."""

    sim: Child
    proxy: Child
    access_token: str

    @property
    def children(self) -> tuple[Child, ...]:
        return (self.proxy, self.sim)

    def require_running(self) -> None:
        """Fail loudly if a child died: later figures would only say "connection refused"."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise BenchError(f"the {child.name} exited (code {code}) during the benchmark")

    def stop(self) -> dict[str, Any]:
        """Stop the proxy first (it talks to the simulator), then the simulator."""
        return {
            child.name: {"exit": child.stop(STOP_TIMEOUT), "stopped_by": child.stopped_by}
            for child in self.children
        }


@contextlib.contextmanager
def rig(log_level: str, args: Sequence[str] = ()) -> Iterator[Rig]:
    """Start both processes in a private temporary directory; always stop and clean up.

    `args`: more `closeproxy serve` arguments."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="closeproxy-bench-")))
        sim = start_sim(stack, workdir)
        proxy = closeproxy_child(sim, workdir, log_level=log_level, args=args)
        stack.callback(proxy.stop, STOP_TIMEOUT)
        proxy.wait_ready()
        say(
            f"simulator {sim.url} (pid {sim.child.process.pid}), "
            f"proxy {proxy.url} (pid {proxy.process.pid})"
        )
        try:
            yield Rig(sim.child, proxy, sim.access_token)
        except Exception:
            say("proxy log tail:\n" + proxy.log_tail())
            raise


def report_shutdown(shutdown: dict[str, Any]) -> None:
    for name, how in shutdown.items():
        say(f"info  {name} stopped: exit {how['exit']} ({how['stopped_by']})")


Figures = Callable[[argparse.Namespace, Rig], Coroutine[Any, Any, dict[str, Any]]]


def on_rig(args: argparse.Namespace, bench: str, figures: Figures) -> dict[str, Any]:
    """Run `figures` against a fresh rig, report the shutdown, print the JSON line if asked."""
    with rig(args.log_level) as running:
        result = asyncio.run(figures(args, running))
        shutdown = running.stop()
    report_shutdown(shutdown)
    if args.json:
        say(json.dumps({"bench": bench, **result, "shutdown": shutdown}))
    return result


# --- clients -----------------------------------------------------------------------


def session(limit: int = 100, read_bufsize: int = 2**16) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=CLIENT_TIMEOUT,
        read_bufsize=read_bufsize,
        auto_decompress=False,
        trust_env=False,
    )


@dataclass(frozen=True)
class Target:
    """Where a transfer goes: straight to the simulator, or through the proxy."""

    name: str  # "direct" or "proxy"
    base: str
    headers: dict[str, str]
    proxy_pid: int | None  # whose RSS to sample; None for direct


def targets(rig: Rig) -> tuple[Target, Target]:
    # Direct calls carry the token themselves; through the proxy they carry nothing.
    bearer = {"Authorization": f"Bearer {rig.access_token}"}
    return (
        Target("direct", rig.sim.url, bearer, None),
        Target("proxy", rig.proxy.url, {}, rig.proxy.process.pid),
    )
