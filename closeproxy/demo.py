"""`closeproxy demo`: the simulator, a proxy logged in to it, and curl lines to paste.

Works with no network and no Close account; nothing touches the user's real tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
from yarl import URL

from .config import CONFIG, Secret, Settings
from .errors import CloseProxyError, ConfigError
from .server import Listening, running
from .signals import STOP_SIGNALS, on_signals
from .sim import SimConfig, run_sim

DEMO_TOKEN_LIFETIME = 60.0
# One endpoint group limited low enough that a plain curl loop runs into it (SPEC §9).
DEMO_RATE_GROUP = "GET lead"
DEMO_RATE_LIMIT = 5  # per second
DEMO_LOOP_CALLS = 20


class DemoFailed(CloseProxyError):
    """The demo could not log in to its own simulator."""


async def _log_in_through_the_proxy(proxy_url: str) -> str:
    """What a browser does at /admin/login: consent (automatic here), land on the callback."""
    async with (
        aiohttp.ClientSession() as browser,
        browser.get(f"{proxy_url}/admin/login") as page,
    ):
        text = await page.text()
        if page.status != 200 or "Logged in to Close" not in text:
            raise DemoFailed(f"the demo login ended with HTTP {page.status}: {text[:200]}")
        return str(page.url)


def write_demo_config(directory: Path, sim_config: SimConfig, sim_url: str) -> Path:
    """A config file that points every other closeproxy command at the demo."""
    secret = directory / "client-secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(sim_config.client_secret + "\n")
    config = directory / "config.toml"
    # JSON strings are valid TOML basic strings; relative paths are relative to the file.
    config.write_text(
        "# written by `closeproxy demo`; removed when the demo stops\n"
        f"client_id = {json.dumps(sim_config.client_id)}\n"
        'client_secret_file = "client-secret"\n'
        f"api_url = {json.dumps(sim_url)}\n"
        f"app_url = {json.dumps(sim_url)}\n"
        'token_file = "tokens.json"\n',
        encoding="utf-8",
    )
    return config


def demo_commands(url: str) -> list[str]:
    return [
        f"curl {url}/api/v1/me/",
        f"curl '{url}/api/v1/lead/?_limit=2&_fields=id,display_name'",
        f"curl -X POST {url}/api/v1/lead/ -H 'Content-Type: application/json' "
        '-d \'{"name": "Acme"}\'',
        f"curl {url}/admin/status",
        f"curl -X POST {url}/admin/refresh",
    ]


async def demo(
    settings: Settings,
    *,
    exit_after: float | None,
    say: Callable[[str], None],
    seed: int | None = None,
) -> int:
    """Run until Ctrl-C (or `exit_after` seconds); the token file lives in a temp dir."""
    stop = asyncio.Event()
    with (
        on_signals(STOP_SIGNALS, lambda signum: stop.set()),
        tempfile.TemporaryDirectory(prefix="closeproxy-demo-") as tmp,
    ):
        sim_config = SimConfig(
            token_lifetime=DEMO_TOKEN_LIFETIME,
            group_rate_limits={DEMO_RATE_GROUP: DEMO_RATE_LIMIT},
            seed=seed,
        )
        async with run_sim(sim_config) as sim:
            demo_settings = Settings(
                client_id=sim_config.client_id,
                client_secret=Secret(sim_config.client_secret),
                api_url=URL(sim.url),
                app_url=URL(sim.url),
                host="127.0.0.1",
                port=settings.port,
                token_file=Path(tmp) / "tokens.json",
                log_level=settings.log_level,
                log_format=settings.log_format,
            )
            config = write_demo_config(Path(tmp), sim_config, sim.url)
            async with _running_somewhere(demo_settings, say) as where:
                await _log_in_through_the_proxy(where.url)
                say(
                    f"closeproxy demo: a simulated Close runs at {sim.url} and the proxy, "
                    f"logged in to it, at {where.url}\n"
                    f"listening on {where.url}\n\nTry:\n"
                    + "".join(f"  {line}\n" for line in demo_commands(where.url))
                    + "\nTo point closeproxy status, token, refresh and run -- CMD at the "
                    "demo (in another terminal):\n"
                    f"  export {CONFIG.env}={shlex.quote(str(config))}\n"
                    f"\nAccess tokens live {DEMO_TOKEN_LIFETIME:g} s here, so refreshes "
                    "show up in the log. Ctrl-C stops the demo."
                )
                say(rate_limit_demo(where.url))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), exit_after)
    return 0


def rate_limit_loop(url: str, *, wait: str | None = None) -> str:
    """A shell loop of curl calls that outruns the demo's limit; prints a count per status."""
    header = f"-H 'Closeproxy-Rate-Limit-Wait: {wait}' " if wait is not None else ""
    return (
        f"for i in $(seq {DEMO_LOOP_CALLS}); do curl -s -o /dev/null -w '%{{http_code}}\\n' "
        f"{header}'{url}/api/v1/lead/?_limit=1'; done | sort | uniq -c"
    )


def rate_limit_demo(url: str) -> str:
    """What the demo prints about Close's rate limits."""
    return (
        f"\nRate limits: this simulated Close allows {DEMO_RATE_LIMIT} {DEMO_RATE_GROUP} calls "
        f"a second, as Close limits each endpoint group.\nThis loop gets {DEMO_LOOP_CALLS} "
        "times 200, a little slower; the log says how long each call waited:\n"
        f"  {rate_limit_loop(url)}\n"
        "The same loop as it would fare without the proxy (the header hands Close's 429s "
        "straight through):\n"
        f"  {rate_limit_loop(url, wait='0')}\n"
    )


@contextlib.asynccontextmanager
async def _running_somewhere(
    settings: Settings, say: Callable[[str], None]
) -> AsyncIterator[Listening]:
    """The proxy on the wanted port, or on a free one if that is taken."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            where = await stack.enter_async_context(running(settings))
        except ConfigError as exc:
            if exc.setting != "port" or settings.port == 0:
                raise
            say(f"port {settings.port} is busy; using a free port instead")
            where = await stack.enter_async_context(running(replace(settings, port=0)))
        yield where
