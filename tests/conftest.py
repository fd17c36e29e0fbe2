"""Shared fixtures: a simulator on a real port, seeded token files, running proxies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import (
    FAST_BACKOFF,
    UVLOOP_INSTALLED,
    Proxy,
    ProxyFactory,
    ServeProcess,
    make_settings,
)

from closeproxy.server import running
from closeproxy.services import SERVICES
from closeproxy.sim import RunningSim, SimConfig, SimState, run_sim
from closeproxy.testing_redis import RedisServer
from closeproxy.upstream_proxy import PROXY_ENV_NAMES


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the real user's config, tokens or CLOSEPROXY_* variables."""
    for name in list(os.environ):
        if name.startswith("CLOSEPROXY_"):
            monkeypatch.delenv(name)
    for name in PROXY_ENV_NAMES:  # the machine's own proxy must not steer the tests
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server with a password and AOF on, on a free port (tests/redis_server.py)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def sim() -> AsyncIterator[RunningSim]:
    async with run_sim(SimConfig()) as running_sim:
        AUDIT.sims.append(running_sim.state)
        yield running_sim


class SecretAudit(logging.Handler):
    """Keeps every log line and every body closeproxy served, to search them for secrets."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.bodies: list[bytes] = []
        self.sims: list[SimState] = []
        self.proxies = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)

    def findings(self, secrets: set[str]) -> list[str]:
        logs = "\n".join(self.lines)
        found = []
        for secret in secrets:
            where = [
                name
                for name, hit in (
                    ("a log line", secret in logs),
                    ("a response body", any(secret.encode() in body for body in self.bodies)),
                )
                if hit
            ]
            if where:
                found.append(f"{secret[:10]}… in {' and '.join(where)}")
        return found


AUDIT = SecretAudit()
# Bodies of closeproxy's own responses, kept while small enough to search.
_AUDIT_BODY_LIMIT = 256 * 1024


@pytest.fixture(scope="session", autouse=True)
def _secret_audit() -> Iterator[None]:
    """The whole suite runs with debug logging; afterwards no log line and no response
    body of the proxy may contain a token, code or client secret any simulator issued."""
    loggers = [logging.getLogger(name) for name in ("closeproxy", "aiohttp")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(AUDIT)
    original_write = web.StreamResponse.write
    original_eof = web.StreamResponse.write_eof

    def served_by_proxy(response: web.StreamResponse) -> bool:
        request = getattr(response, "_req", None)
        if getattr(request, "_match_info", None) is None:
            return False  # refused by the HTTP parser before any app saw it
        return SERVICES in request.app  # type: ignore[union-attr]

    async def write(self: web.StreamResponse, data: Any) -> None:
        if served_by_proxy(self) and len(data) <= _AUDIT_BODY_LIMIT:
            AUDIT.bodies.append(bytes(data))
        await original_write(self, data)

    async def write_eof(self: web.StreamResponse, data: bytes = b"") -> None:
        if data and served_by_proxy(self):
            AUDIT.bodies.append(bytes(data))
        await original_eof(self, data)

    web.StreamResponse.write = write  # type: ignore[method-assign]
    web.StreamResponse.write_eof = write_eof  # type: ignore[method-assign]
    try:
        yield
    finally:
        web.StreamResponse.write = original_write  # type: ignore[method-assign]
        web.StreamResponse.write_eof = original_eof  # type: ignore[method-assign]
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
            logger.removeHandler(AUDIT)
    secrets = {s for state in AUDIT.sims for s in state.issued_secrets() if len(s) >= 8}
    if AUDIT.proxies:  # proxies ran: the audit must have seen their output
        assert AUDIT.lines, "debug logging captured nothing"
        assert AUDIT.bodies, "no proxy response body was captured"
    findings = AUDIT.findings(secrets)
    assert not findings, f"secrets leaked: {findings}"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "tokens.json"


@pytest.fixture
def start_proxy(sim: RunningSim, token_file: Path) -> ProxyFactory:
    """`async with start_proxy(refresh_margin=..., ...) as proxy:` — flags as keywords."""

    @contextlib.asynccontextmanager
    async def start(**flags: Any) -> AsyncIterator[Proxy]:
        settings = make_settings(sim, token_file, **flags)
        async with running(settings, oauth_backoff=FAST_BACKOFF) as where:
            AUDIT.proxies += 1
            yield Proxy(where.url, where.port or 0, settings)

    return start


@pytest.fixture
async def proxy(start_proxy: ProxyFactory) -> AsyncIterator[Proxy]:
    async with start_proxy() as running_proxy:
        yield running_proxy


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # Bounded: a stall fails the test in a minute instead of hanging CI.
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as session:
        yield session


@pytest.fixture(
    params=[
        "asyncio",
        pytest.param(
            "uvloop",
            marks=pytest.mark.skipif(
                not UVLOOP_INSTALLED, reason="uvloop is not installed (closeproxy[fast])"
            ),
        ),
    ]
)
def serve_loop(request: pytest.FixtureRequest) -> str:
    """The event loop a `closeproxy serve` process is told to use (--event-loop)."""
    loop: str = request.param
    return loop


@pytest.fixture
async def serve_processes() -> AsyncIterator[list[ServeProcess]]:
    """Collects started servers and stops every one of them at the end of the test.

    Stopped off the event loop, so an in-process simulator keeps answering meanwhile.
    """
    started: list[ServeProcess] = []
    yield started
    await asyncio.gather(*(asyncio.to_thread(server.stop) for server in started))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Show what the chaos test measured, with or without -s."""
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, value in getattr(report, "user_properties", []):
                if name == "chaos":
                    terminalreporter.write_line(f"chaos ({outcome}): {value}")
