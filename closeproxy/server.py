"""Running the proxy: bind, say where, serve until told to stop, drain, close."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from aiohttp import web

from .access_log import AccessLogger
from .app import create_app
from .config import Settings
from .errors import ConfigError, TokenServiceUnavailable, TokenStoreError
from .login import login_advice
from .logs import ACCESS_LOGGER
from .loop import loop_name
from .oauth import DEFAULT_BACKOFF
from .signals import STOP_SIGNALS, on_signals
from .wiring import open_store

log = logging.getLogger("closeproxy.server")

# Bounded so a stuck client cannot hold shutdown (and a token write) forever.
DRAIN_SECONDS = 30.0
MAX_REQUEST_LINE = 16 * 1024
MAX_HEADER_FIELD = 16 * 1024
MAX_HEADERS = 100
LISTEN_BACKLOG = 128
# Open files kept free for everything but client connections: token and lock files,
# logs, DNS, the listening sockets, connections being refused.
FD_RESERVE = 64
# How long a refused connection may take to read its answer before it is dropped.
REFUSAL_LINGER = 1.0


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


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one; returns the soft limit in force.

    The common default of 1024 is easily reached by idle keep-alive clients; once it is,
    accept() fails and every new client waits, the polite ones included."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY and soft >= hard):
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.debug("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    log.debug("raised the open-file limit from %d to %d", soft, target)
    return target


def client_budget(open_files: int, upstream_connections: int) -> int:
    """How many client connections fit beside the upstream ones and the reserve."""
    return max(open_files // 4, open_files - upstream_connections - FD_RESERVE)


class Admission:
    """The listening socket's protocol factory: aiohttp's handler while the client budget
    lasts, else a short 503 and close, instead of accept() failing for everyone.

    The budget is checked when a connection is made, against the handlers aiohttp has
    registered by then: the one moment that is the same on every event loop. (asyncio
    calls the factory after accept(), a whole backlog at a time; uvloop calls it before
    accepting; both run connection_made in a later turn.)"""

    def __init__(self, server: web.Server, budget: int) -> None:
        self._server = server
        self.budget = budget
        self.lingering = 0  # refused connections still open (they use the reserve)

    def __call__(self) -> asyncio.BaseProtocol:
        return _Door(self)

    def admit(self, transport: asyncio.BaseTransport) -> asyncio.BaseProtocol:
        """The protocol that takes over `transport`: aiohttp's handler, connected and
        counted in server.connections before this returns, or a refusal."""
        if len(self._server.connections) >= self.budget:
            protocol: asyncio.BaseProtocol = _Refusal(self)
        else:
            protocol = self._server()
        # Before connection_made, so the transport has not read anything for the door.
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        return protocol


class _Door(asyncio.Protocol):
    """Stands in for a connection's protocol until it is made, then hands the transport
    to whatever Admission.admit decides; it never sees a byte."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._successor: asyncio.BaseProtocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._successor = self._admission.admit(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        # Only when the transport died before it was made (the loop then tells the
        # protocol it was created with); a successor hears it from the transport.
        if self._successor is not None:
            self._successor.connection_lost(exc)


class _Refusal(asyncio.Protocol):
    """Answers 503 too_many_connections to whatever the client sends, then hangs up."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport on every loop, though uvloop's does not subclass asyncio's.
        stream = cast(asyncio.Transport, transport)
        body = json.dumps(
            {
                "error": f"this proxy already has {self._admission.budget} client connections "
                "open, "
                "as many as its open-file limit allows: close idle connections, or raise "
                "the limit (ulimit -n) before starting closeproxy",
                "closeproxy_error": "too_many_connections",
            }
        ).encode()
        stream.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        if self._admission.lingering >= FD_RESERVE // 2 or not stream.can_write_eof():
            stream.close()
            return
        stream.write_eof()
        # Read and drop what the client sends meanwhile, so that closing does not reset
        # the connection before it has read the answer; never for long, never for many.
        self._admission.lingering += 1
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, stream.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._admission.lingering -= 1


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
                "(in %.0f s): set CLOSEPROXY_CLIENT_ID and CLOSEPROXY_CLIENT_SECRET (or "
                "client_id and client_secret_file in the config file)",
                max(tokens.expires_in(), 0),
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
