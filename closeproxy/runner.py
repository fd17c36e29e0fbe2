"""`closeproxy run -- CMD`: a private proxy for one command that thinks it has an API key."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace

from .config import OPTIONS_BY_NAME, PROXY_KEY_NAME, ScopedKey, Secret, Settings
from .errors import CloseProxyError
from .server import running, warn_at_start
from .signals import on_signals

FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
# The child needs none of these; the client secret above all must not leak into it.
WITHHELD_ENV: frozenset[str] = frozenset(
    OPTIONS_BY_NAME[name].env for name in ("client_secret", "proxy_key")
)


class CommandFailed(CloseProxyError):
    """The command could not be started."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def child_environment(base: Mapping[str, str], proxy_url: str, key: str) -> dict[str, str]:
    env = {name: value for name, value in base.items() if name not in WITHHELD_ENV}
    env.update(
        CLOSE_API_URL=f"{proxy_url}/api/v1/",
        CLOSEPROXY_URL=proxy_url,
        CLOSE_API_KEY=key,
    )
    return env


def _terminal_delivers_sigint() -> bool:
    """True when Ctrl-C already reaches the child through the terminal's process group."""
    try:
        return sys.stdin.isatty() and os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except OSError:
        return False


RUN_KEY_NAME = "run"


async def run_command(
    settings: Settings,
    argv: Sequence[str],
    *,
    methods: frozenset[str] | None = None,
    paths: tuple[str, ...] = (),
) -> int:
    """Serve on a free loopback port with a fresh key, run `argv`, return its exit status.

    With `methods` or `paths` the key is scoped (`run --read-only`): the child gets no
    proxy key at all, so it cannot use the admin routes either. The config file's
    [keys.NAME] are not served here: this proxy is the child's alone.
    """
    key = secrets.token_urlsafe(32)
    scoped = methods is not None or bool(paths)
    private = replace(
        settings,
        host="127.0.0.1",
        port=0,
        unix_socket=None,
        proxy_key=None if scoped else Secret(key),
        keys=(ScopedKey(RUN_KEY_NAME, Secret(key), methods, paths),) if scoped else (),
    )
    assert RUN_KEY_NAME != PROXY_KEY_NAME
    async with running(private, browser_login=False) as where:
        await warn_at_start(private, browser_login=False, proxy_url=where.url)
        try:
            child = await asyncio.create_subprocess_exec(
                *argv, env=child_environment(os.environ, where.url, key)
            )
        except FileNotFoundError:
            raise CommandFailed(f"command not found: {argv[0]}", exit_code=127) from None
        except PermissionError:
            raise CommandFailed(f"permission denied: {argv[0]}", exit_code=126) from None
        skip_sigint = _terminal_delivers_sigint()

        def forward(signum: signal.Signals) -> None:
            if signum == signal.SIGINT and skip_sigint:
                return
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

        try:
            with on_signals(FORWARDED_SIGNALS, forward):
                status = await child.wait()
        finally:
            if child.returncode is None:  # we are failing ourselves: take the child along
                with contextlib.suppress(ProcessLookupError):
                    child.terminate()
                await child.wait()
    # A child killed by a signal exits like a shell reports it: 128 + the signal number.
    return status if status >= 0 else 128 - status
