"""Shared fixtures: a simulator on a real port, seeded token files, running proxies."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import FAST_BACKOFF, Proxy, ProxyFactory, ServeProcess, make_settings

from closeproxy.server import running
from closeproxy.sim import RunningSim, SimConfig, run_sim


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the real user's config, tokens or CLOSEPROXY_* variables."""
    for name in list(os.environ):
        if name.startswith("CLOSEPROXY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture
async def sim() -> AsyncIterator[RunningSim]:
    async with run_sim(SimConfig()) as running_sim:
        yield running_sim


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
            yield Proxy(where.url, where.port or 0, settings)

    return start


@pytest.fixture
async def proxy(start_proxy: ProxyFactory) -> AsyncIterator[Proxy]:
    async with start_proxy() as running_proxy:
        yield running_proxy


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def serve_processes() -> AsyncIterator[list[ServeProcess]]:
    """Collects started servers and stops every one of them at the end of the test.

    Stopped off the event loop, so an in-process simulator keeps answering meanwhile.
    """
    started: list[ServeProcess] = []
    yield started
    await asyncio.gather(*(asyncio.to_thread(server.stop) for server in started))
