"""Helpers shared by the tests: seeding tokens, raw HTTP, closeproxy subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from closeproxy import testing
from closeproxy.config import Settings, load_settings
from closeproxy.file_store import FileGrantStore
from closeproxy.grant import TokenSet
from closeproxy.sim import RunningSim
from closeproxy.testing import LISTENING, Child, child_env, free_port, start_serve, store_grant

__all__ = ["LISTENING", "ServeProcess", "cli_env", "free_port", "start_serve"]

FAST_BACKOFF = (0.05, 0.1)
# The `fast` extra's event loop, for the tests that run on it too.
UVLOOP_INSTALLED = importlib.util.find_spec("uvloop") is not None


def seed_tokens(
    sim: RunningSim,
    token_file: Path,
    *,
    expires_in: float | None = None,
    api_url: str | None = None,
) -> TokenSet:
    """Log in at the simulator without a browser and store the grant like `login` would.

    `api_url` records another issuer, for proxies pointed somewhere else on purpose.
    """
    return store_grant(
        sim.state.issue_tokens(), token_file, api_url=api_url or sim.url, expires_in=expires_in
    )


def proxy_env(sim: RunningSim, token_file: Path, **extra: str) -> dict[str, str]:
    """CLOSEPROXY_* variables that point a proxy at the simulator."""
    config = sim.state.config
    return testing.proxy_env(
        sim.url,
        token_file,
        client_id=config.client_id,
        client_secret=config.client_secret,
        **extra,
    )


def make_settings(sim: RunningSim, token_file: Path, **flags: Any) -> Settings:
    return load_settings(flags, proxy_env(sim, token_file))


@dataclass
class Proxy:
    """A proxy running in the test's event loop on a real port."""

    url: str
    port: int
    settings: Settings


ProxyFactory = Callable[..., contextlib.AbstractAsyncContextManager[Proxy]]


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


async def raw_request(
    port: int, head: str, body: bytes = b"", *, read_timeout: float = 10.0
) -> RawResponse:
    """Send bytes exactly as given (no client-side normalization) and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode("latin-1") + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    _, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
    return RawResponse(int(status), reason, headers, rest)  # type: ignore[arg-type]


def get_request(target: str, port: int, **headers: str) -> str:
    """A raw HTTP/1.1 request head for raw_request, closing the connection after."""
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return "\n".join(lines) + "\n\n"


# --- closeproxy in subprocesses: closeproxy.testing, shared with the benchmark ---------

ServeProcess = Child
cli_env = child_env


def run_cli(
    env: dict[str, str], *args: str, input: str | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "closeproxy", *args],
        env=child_env(env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


async def run_cli_async(
    env: dict[str, str], *args: str, input: str | None = None, timeout: float = 60.0
) -> CliResult:
    """Run `closeproxy ARGS` without blocking the loop (an in-process simulator answers)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "closeproxy",
        *args,
        env=child_env(env),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            process.communicate(input.encode() if input is not None else b""), timeout
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def provider_against_token_endpoint(
    token_file: Path, reply: Callable[[Any], Awaitable[Any]]
) -> AsyncIterator[Any]:
    """A TokenProvider holding expired tokens, talking to a one-route token endpoint.

    `reply` answers POST /oauth2/token/: for replies the simulator would never give.
    """
    from aiohttp import web

    from closeproxy.upstream import client_session
    from closeproxy.wiring import token_provider

    app = web.Application()
    app.router.add_post("/oauth2/token/", reply)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        now = time.time()
        FileGrantStore(token_file).write(
            TokenSet(
                access_token="acc-1",
                refresh_token="ref-1",
                expires_at=now - 5,
                obtained_at=now - 3600,
                api_url=url,
            )
        )
        settings = load_settings(
            {"api_url": url, "client_id": "c", "token_file": str(token_file)},
            {"CLOSEPROXY_CLIENT_SECRET": "s"},
        )
        async with client_session() as session:
            provider = token_provider(settings, session)
            try:
                yield provider
            finally:
                await provider.aclose()
    finally:
        await runner.cleanup()


async def start_demo(*args: str) -> asyncio.subprocess.Process:
    """`closeproxy demo ARGS` in its own process, stdout and stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "closeproxy",
        "demo",
        *args,
        env=child_env({}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def start_refresh(env: dict[str, str]) -> asyncio.subprocess.Process:
    """`closeproxy refresh` in its own process: stdout dropped, stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "closeproxy",
        "refresh",
        env=child_env(env),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
