"""Helpers for the tests and the benchmark, like aiohttp.test_utils; the proxy never imports it.

- `Child`: a process (a `closeproxy serve`, the simulator, nginx...) whose output is kept,
  drained from pipes by threads or written to files, with `wait_ready` for its listening
  line and a `stop` that sends SIGTERM and kills only if it will not go.
- `start_serve`, `child_env`, `proxy_env`: `closeproxy serve` pointed at a simulator,
  never inheriting the caller's own CLOSEPROXY_* settings.
- `store_grant`, `issue_over_http`: a logged-in token file without a browser.
- `parse_size`, `free_port`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Final

from closeproxy.file_store import FileGrantStore
from closeproxy.grant import TokenSet

LISTENING: Final = re.compile(r"listening on (http://\S+|unix:\S+)")
SIM_LISTENING: Final = re.compile(r"^simulator listening on (http://\S+)")
READY_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 30.0
LOG_TAIL_LINES: Final = 20

MIB: Final = 1024 * 1024
SIZE_UNITS: Final[dict[str, int]] = {"": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}
SIZE_PATTERN: Final = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)


class NotReady(Exception):
    """A child process exited, or did not print its listening line in time."""


class Child:
    """A process whose stdout and stderr are kept as lines, from pipes or from files.

    Pipes are drained by reader threads (a full pipe would stall the child's log writer);
    files cost the parent nothing, which a benchmark under a chatty access log wants.
    """

    def __init__(
        self,
        process: subprocess.Popen[str],
        name: str = "closeproxy serve",
        *,
        files: tuple[Path, Path] | None = None,
    ) -> None:
        self.process = process
        self.name = name
        self.url = ""
        self.stopped_by = ""
        self._files = files
        self._lines: tuple[list[str], list[str]] = ([], [])
        self._readers: list[threading.Thread] = []
        if files is None:
            for stream, sink in zip((process.stdout, process.stderr), self._lines, strict=True):
                thread = threading.Thread(target=_drain, args=(stream, sink), daemon=True)
                thread.start()
                self._readers.append(thread)

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        name: str = "closeproxy serve",
        log_dir: Path | None = None,
    ) -> Child:
        """Start `argv`; with `log_dir`, its output goes to NAME.stdout and NAME.stderr there."""
        if log_dir is None:
            process = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            return cls(process, name)
        paths = (log_dir / f"{name}.stdout", log_dir / f"{name}.stderr")
        with paths[0].open("w") as out, paths[1].open("w") as err:
            process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True
            )
        return cls(process, name, files=paths)

    def _read(self, index: int) -> list[str]:
        if self._files is None:
            return list(self._lines[index])
        path = self._files[index]
        return path.read_text(errors="replace").splitlines(keepends=True) if path.exists() else []

    @property
    def stdout(self) -> list[str]:
        return self._read(0)

    @property
    def stderr(self) -> list[str]:
        return self._read(1)

    @property
    def logs(self) -> str:
        return "".join(self.stderr)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def wait_ready(self, timeout: float = READY_TIMEOUT, ready: re.Pattern[str] = LISTENING) -> str:
        """Wait for the line `ready` matches on stdout; its first group becomes `url`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stdout:
                if match := ready.search(line):
                    self.url = match.group(1)
                    return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        code = self.process.poll()
        self.stop(timeout=0)
        why = f"exited with {code}" if code is not None else f"not ready within {timeout:g} s"
        raise NotReady(f"{self.name} {why}:\n{self.log_tail()}")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = [line.rstrip("\n") for line in self.stderr[-lines:]]
        return (
            "\n".join(f"    {self.name}| {line}" for line in tail)
            or f"    ({self.name}: no output)"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait for the drain, kill if it will not go; blocking, safe to repeat."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
                self.stopped_by = "SIGTERM"
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.stopped_by = f"kill (no exit {timeout:g} s after SIGTERM)"
        elif not self.stopped_by:
            self.stopped_by = "had already exited"
        self.join()
        return self.process.returncode

    def join(self) -> None:
        for thread in self._readers:
            thread.join(5)


def _drain(stream: IO[str] | None, sink: list[str]) -> None:
    if stream is None:
        return
    for line in stream:
        sink.append(line)
    stream.close()


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without CLOSEPROXY_* (the caller's own settings), plus env."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLOSEPROXY_")}
    return {**base, **env, "PYTHONUNBUFFERED": "1"}


def proxy_env(
    api_url: str, token_file: Path, *, client_id: str, client_secret: str, **extra: str
) -> dict[str, str]:
    """CLOSEPROXY_* variables that point a proxy at a simulator."""
    return {
        "CLOSEPROXY_CLIENT_ID": client_id,
        "CLOSEPROXY_CLIENT_SECRET": client_secret,
        "CLOSEPROXY_API_URL": api_url,
        "CLOSEPROXY_APP_URL": api_url,
        "CLOSEPROXY_TOKEN_FILE": str(token_file),
        "CLOSEPROXY_PORT": "0",
        **extra,
    }


def serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "closeproxy", "serve", *args]


def start_serve(
    env: Mapping[str, str],
    *args: str,
    timeout: float = READY_TIMEOUT,
    name: str = "closeproxy serve",
    log_dir: Path | None = None,
) -> Child:
    """Start `closeproxy serve ARGS` and wait for its listening line (blocking)."""
    server = Child.spawn(serve_argv(*args), child_env(env), name=name, log_dir=log_dir)
    server.wait_ready(timeout)
    return server


def store_grant(
    reply: Mapping[str, Any], token_file: Path, *, api_url: str, expires_in: float | None = None
) -> TokenSet:
    """Store a token endpoint reply like `login` would; `expires_in` backdates the grant."""
    now = time.time()
    tokens = TokenSet.from_reply(reply, received_at=now, api_url=api_url)
    if expires_in is not None:
        tokens = replace(tokens, expires_at=now + expires_in, obtained_at=now - 3600)
    FileGrantStore(token_file).write(tokens)
    return tokens


def issue_over_http(sim_url: str) -> dict[str, Any]:
    """A fresh grant from a simulator in another process (POST /_sim/issue), no browser."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore http_proxy
    if not sim_url.startswith("http://"):
        raise ValueError(f"not a simulator URL: {sim_url!r}")
    request = urllib.request.Request(sim_url + "/_sim/issue", data=b"", method="POST")  # noqa: S310
    with opener.open(request, timeout=10) as reply:
        document: dict[str, Any] = json.load(reply)
    return document


def parse_size(text: str) -> int:
    """`1G`, `256k`, `512MiB`, `1048576` -> bytes (binary units); ValueError otherwise."""
    match = SIZE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (try 1G, 256k, 65536)")
    size = int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


def free_port() -> int:
    """A loopback port nothing listens on right now (another process may take it later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
