"""Running the proxy: bind, say where, serve until told to stop, drain, close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .access_log import AccessLogger
from .admission import Admission, client_budget, raise_open_file_limit
from .app import create_app
from .config import Settings
from .errors import ConfigError, TokenServiceUnavailable, TokenStoreError
from .login import login_advice
from .logs import ACCESS_LOGGER
from .loop import loop_name
from .oauth import DEFAULT_BACKOFF
from .settings import client_hint
from .signals import STOP_SIGNALS, on_signals
from .wiring import open_store

log = logging.getLogger("closeproxy.server")

# Bounded so a stuck client cannot hold shutdown (and a token write) forever.
DRAIN_SECONDS = 30.0
MAX_REQUEST_LINE = 16 * 1024
MAX_HEADER_FIELD = 16 * 1024
MAX_HEADERS = 100
LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class Listening:
    """Where a started proxy can be reached."""

    url: str  # http://HOST:PORT, or unix:PATH
    port: int | None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    *,
    oauth_backoff: Sequence[float] = DEFAULT_BACKOFF,
    browser_login: bool = True,
) -> AsyncIterator[Listening]:
    """The proxy, started and listening, for as long as the block runs."""
    settings.check_serve()
    app = create_app(settings, oauth_backoff=oauth_backoff, browser_login=browser_login)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger(ACCESS_LOGGER),
        shutdown_timeout=DRAIN_SECONDS,
        handle_signals=False,
        # A client gets this long to send a request head; idle keep-alive ends then too.
        keepalive_timeout=settings.header_timeout,
        max_line_size=MAX_REQUEST_LINE,
        max_field_size=MAX_HEADER_FIELD,
        max_headers=MAX_HEADERS,
    )
    await runner.setup()
    assert runner.server is not None
    limit = raise_open_file_limit()
    admission = Admission(runner.server, client_budget(limit, settings.upstream_connections))
    log.debug(
        "admitting at most %d client connections (open-file limit %d)", admission.budget, limit
    )
    listener: asyncio.Server | None = None
    try:
        if settings.unix_socket is not None:
            listener = await _listen_private_socket(admission, str(settings.unix_socket))
            where = Listening(f"unix:{settings.unix_socket}", None)
        else:
            try:
                listener = await asyncio.get_running_loop().create_server(
                    admission, settings.host, settings.port, backlog=LISTEN_BACKLOG
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {settings.host}:{settings.port} "
                    f"({exc.strerror or exc}): pick another port with --port (0 picks a free one)",
                    setting="port",
                ) from None
            port = _bound_port([sock.getsockname() for sock in listener.sockets], settings.port)
            where = Listening(f"http://{_url_host(settings.host)}:{port}", port)
        yield where
    finally:
        if listener is not None:
            listener.close()  # no new connections; the runner drains the open ones
        await runner.cleanup()
        if settings.unix_socket is not None:
            _remove_own_socket(settings.unix_socket)


async def _listen_private_socket(admission: Admission, path: str) -> asyncio.Server:
    _remove_stale_socket(path)
    # Created 0600 from the start (umask), not chmod-ed after: no window where another
    # local user could connect.
    old = os.umask(0o177)
    try:
        listener = await asyncio.get_running_loop().create_unix_server(
            admission, path, backlog=LISTEN_BACKLOG
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on unix socket {path} ({exc.strerror or exc}): choose another "
            "path with --unix-socket",
            setting="unix_socket",
        ) from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return listener


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left by a process that died; refuse to touch anything else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(
            f"{path} exists and is not a socket: choose another path with --unix-socket",
            setting="unix_socket",
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise ConfigError(
        f"unix socket {path} is in use by another process: stop it or choose another path",
        setting="unix_socket",
    )


def _remove_own_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def _bound_port(addresses: list[object], wanted: int) -> int:
    for address in addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return wanted


async def warn_at_start(settings: Settings, *, browser_login: bool, proxy_url: str | None) -> None:
    """One warning at start when /api/v1/ answers, or soon will answer, only 401s."""
    store = open_store(settings)
    try:
        tokens = (await store.load()).tokens
    except TokenStoreError as exc:
        if isinstance(exc, TokenServiceUnavailable):
            log.warning("%s", exc)  # serving starts anyway, and recovers when it is back
        return  # every request reports this one, with its own fix
    finally:
        await store.aclose()
    if tokens is not None and not tokens.refresh_rejected:
        if tokens.refresh_token is not None and (
            not settings.client_id or settings.client_secret is None
        ):
            log.warning(
                "no client id and secret are configured, so the access token cannot be "
                "refreshed and /api/v1/ answers 401 client_not_configured once it expires "
                "(in %.0f s): set %s",
                max(tokens.expires_in(), 0),
                client_hint(),
            )
        return
    what = "not logged in" if tokens is None else "the stored grant was rejected by Close"
    advice = login_advice(settings, browser_login=browser_login, proxy_url=proxy_url)
    log.warning(
        "%s (%s), so /api/v1/ answers 401 login_required: %s",
        what,
        store.describe(),
        advice,
    )


async def serve(
    settings: Settings,
    *,
    on_ready: Callable[[Listening], None],
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGINT, SIGTERM or SIGHUP (or `stop`), then drain in-flight requests."""
    stop = stop or asyncio.Event()
    with on_signals(STOP_SIGNALS, lambda signum: stop.set()):
        async with running(settings) as where:
            on_ready(where)
            log.info(
                "proxy for %s listening on %s (event loop %s)",
                settings.api_url,
                where.url,
                loop_name(asyncio.get_running_loop()),
            )
            for scoped in settings.keys:
                log.info("key %r may make %s", scoped.name, scoped.scope())
            await warn_at_start(
                settings,
                browser_login=True,
                proxy_url=where.url if where.port is not None else None,
            )
            await stop.wait()
            log.info("stopping: draining in-flight requests (at most %.0f s)", DRAIN_SECONDS)
