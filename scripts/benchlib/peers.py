"""The targets `compare` loads: direct, the bare forwarder, closeproxy variants, nginx, mitmproxy.

Each `start_*` spawns one process on a port chosen beforehand (so start-up is timed to
the first proxied answer, not to a log line) that adds the simulator's bearer token.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from benchlib.common import ME_PATH, Sim, closeproxy_child
from benchlib.procfs import rss_bytes
from closeproxy.testing import Child, NotReady, child_env, free_port

SCRIPTS: Final = Path(__file__).resolve().parent.parent
NGINX: Final = "/usr/sbin/nginx"
START_TIMEOUT: Final = 20.0
# closeproxy's and the bare forwarder's start lines both end "(event loop NAME)".
EVENT_LOOP: Final = re.compile(r"\(event loop (\w+)\)")
MITM_ADDON: Final = """\
import os

TOKEN = os.environ["BENCH_AUTHORIZATION"]


def request(flow):
    flow.request.headers["Authorization"] = TOKEN
"""


@dataclass(frozen=True)
class Variant:
    """One target: its kind, and for closeproxy the extra `serve` arguments.

    Python targets run on the standard loop unless `uvloop`: closeproxy's own `auto`
    would pick uvloop whenever it is installed, and a ratio is only fair between two
    targets on the same loop. A --variant that names --event-loop itself keeps it.
    """

    name: str
    kind: str  # direct | bare | closeproxy | nginx | mitmproxy
    args: tuple[str, ...] = ()
    uvloop: bool = False

    def serve_args(self) -> tuple[str, ...]:
        """closeproxy's `serve` arguments, the event loop pinned unless given."""
        if any(arg == "--event-loop" or arg.startswith("--event-loop=") for arg in self.args):
            return self.args
        return ("--event-loop", "uvloop" if self.uvloop else "asyncio", *self.args)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`NAME=ARGS`: closeproxy with `serve ARGS` (shell words): `quiet=--log-level warning`."""
        name, sep, args = text.partition("=")
        if not sep or not name.strip():
            raise ValueError(
                f"expected NAME=ARGS like \"quiet='--log-level warning'\", got {text!r}"
            )
        return cls(name.strip(), "closeproxy", tuple(shlex.split(args)))


@dataclass
class Running:
    """A started target, timed from spawn to its first proxied 200."""

    url: str
    headers: dict[str, str]  # what the client itself must send
    child: Child | None = None
    start_seconds: float | None = None
    idle_rss: int | None = None

    @property
    def pid(self) -> int | None:
        return self.child.process.pid if self.child is not None else None

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(10.0)


def start(
    variant: Variant, sim: Sim, workdir: Path, *, tools: dict[str, str], settle: float
) -> Running:
    """Spawn, wait for the first proxied 200, idle `settle` seconds, read the RSS."""
    bearer = f"Bearer {sim.access_token}"
    if variant.kind == "direct":
        return Running(sim.url, {"Authorization": bearer})
    port = free_port()
    began = time.perf_counter()
    child = spawn(variant, sim, workdir, port=port, bearer=bearer, tools=tools)
    running = Running(f"http://127.0.0.1:{port}", {}, child)
    try:
        first_answer(running)
    except BaseException:
        child.stop(5.0)
        raise
    running.start_seconds = time.perf_counter() - began
    time.sleep(settle)
    running.idle_rss = rss_bytes(child.process.pid)
    return running


def bare_argv(sim: Sim, port: int, *, uvloop: bool) -> list[str]:
    """scripts/bare_forwarder.py in front of `sim`, adding its bearer token."""
    argv = [sys.executable, str(SCRIPTS / "bare_forwarder.py"), sim.url]
    argv += [f"Authorization: Bearer {sim.access_token}", "--port", str(port)]
    return argv + (["--uvloop"] if uvloop else [])


def spawn(
    variant: Variant, sim: Sim, workdir: Path, *, port: int, bearer: str, tools: dict[str, str]
) -> Child:
    name = variant.name
    if variant.kind == "closeproxy":
        return closeproxy_child(sim, workdir, name=name, args=variant.serve_args(), port=port)
    if variant.kind == "bare":
        argv = bare_argv(sim, port, uvloop=variant.uvloop)
        return Child.spawn(argv, child_env({}), name=name, log_dir=workdir)
    if variant.kind == "nginx":
        prefix = workdir / name
        prefix.mkdir(exist_ok=True)
        config = prefix / "nginx.conf"
        config.write_text(nginx_config(prefix, port, sim.url, bearer))
        argv = [
            tools["nginx"],
            "-p",
            str(prefix),
            "-c",
            str(config),
            "-e",
            str(prefix / "error.log"),
        ]
        return Child.spawn(argv, child_env({}), name=name, log_dir=workdir)
    if variant.kind == "mitmproxy":
        addon = workdir / "mitm_addon.py"
        addon.write_text(MITM_ADDON)
        argv = [tools["mitmproxy"], "--mode", f"reverse:{sim.url}", "--listen-host", "127.0.0.1"]
        argv += ["--listen-port", str(port), "-s", str(addon), "--set", "flow_detail=0"]
        argv += ["--set", f"confdir={workdir / 'mitmproxy'}", "--set", "termlog_verbosity=warn"]
        env = child_env({"BENCH_AUTHORIZATION": bearer})
        return Child.spawn(argv, env, name=name, log_dir=workdir)
    raise ValueError(f"unknown kind {variant.kind!r}")


def loop_of(running: Running) -> str | None:
    """The loop named in a stopped target's start line ("event loop uvloop"), if any."""
    if running.child is None:
        return None
    found = EVENT_LOOP.search("".join(running.child.stdout) + running.child.logs)
    return found.group(1) if found else None


def first_answer(running: Running, timeout: float = START_TIMEOUT) -> None:
    """Poll GET ME_PATH until it answers 200; fail with the log if the process exits."""
    assert running.child is not None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(running.url + ME_PATH, headers=running.headers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running.child.process.poll() is not None:
            break
        try:
            with opener.open(request, timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.005)
    child = running.child
    raise NotReady(f"{child.name} gave no 200 for {ME_PATH} in time:\n{child.log_tail()}")


def nginx_config(prefix: Path, port: int, upstream: str, bearer: str) -> str:
    """nginx as the same reverse proxy: one worker, keep-alive upstream, access log on."""
    host = upstream.removeprefix("http://")
    temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy"))
    temp += " " + " ".join(
        f"{kind}_temp_path {prefix}/{kind};" for kind in ("fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    {temp}
    upstream simulator {{ server {host}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://simulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {host};
            proxy_set_header Authorization "{bearer}";
        }}
    }}
}}
"""


def find_tool(explicit: str | None, default: str) -> str | None:
    """An executable given by flag, at `default`'s path, or on PATH by its name."""
    for candidate in (explicit, default, shutil.which(Path(default).name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None
