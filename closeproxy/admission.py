"""Admission: client connections only while the open-file budget lasts.

Beyond it a connection is answered 503 too_many_connections and closed, instead of
accept() failing for everyone once the open-file limit is reached (the polite clients
included). The budget is what the limit leaves beside the upstream connections and a
reserve for token files, logs and DNS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import cast

from aiohttp import web

log = logging.getLogger("closeproxy.server")

# Open files kept free for everything but client connections: token and lock files,
# logs, DNS, the listening sockets, connections being refused.
FD_RESERVE = 64
# How long a refused connection may take to read its answer before it is dropped.
REFUSAL_LINGER = 1.0


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
