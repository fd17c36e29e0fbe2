"""The admission of client connections, on transports that are not asyncio's own."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiohttp import web

from closeproxy.admission import FD_RESERVE, Admission


class LoopAgnosticTransport:
    """A stream transport that, like uvloop's, does not subclass asyncio.Transport."""

    def __init__(self) -> None:
        self.protocol: asyncio.BaseProtocol | None = None
        self.sent = b""
        self.eof = False
        self.closed = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol

    def write(self, data: bytes) -> None:
        self.sent += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeHandler(asyncio.Protocol):
    def __init__(self, server: FakeServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server.connections.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.remove(self)


class FakeServer:
    """web.Server's part Admission uses: a factory of handlers that count themselves."""

    def __init__(self) -> None:
        self.connections: list[FakeHandler] = []

    def __call__(self) -> FakeHandler:
        return FakeHandler(self)


def connect(protocol: asyncio.BaseProtocol) -> LoopAgnosticTransport:
    transport = LoopAgnosticTransport()
    transport.protocol = protocol
    protocol.connection_made(cast(asyncio.BaseTransport, transport))
    return transport


async def test_the_budget_holds_when_the_factory_runs_for_a_burst_before_any_connection() -> None:
    """uvloop calls the factory before accepting, asyncio after; either way many factory
    calls can come before the first connection_made. The count is taken at the latter."""
    server = FakeServer()
    admission = Admission(cast(web.Server, server), budget=3)
    doors = [admission() for _ in range(8)]
    transports = [connect(door) for door in doors]
    admitted = [t for t in transports if isinstance(t.protocol, FakeHandler)]
    refused = [t for t in transports if not isinstance(t.protocol, FakeHandler)]
    assert len(admitted) == 3 == len(server.connections)
    assert len(refused) == 5
    for transport in refused:
        assert transport.sent.startswith(b"HTTP/1.1 503 ")
        assert b'"closeproxy_error": "too_many_connections"' in transport.sent
        assert transport.eof  # answered, then lingering to read what the client sends
    # One admitted client leaves: the next one is admitted again.
    assert admitted[0].protocol is not None
    admitted[0].protocol.connection_lost(None)
    assert isinstance(connect(admission()).protocol, FakeHandler)
    assert len(server.connections) == 3


async def test_a_refusal_on_a_transport_that_is_not_asyncios_answers_and_hangs_up() -> None:
    """uvloop's TCPTransport is no asyncio.Transport: the refusal once asserted it was,
    so under uvloop refused clients got no answer and their sockets stayed open."""
    admission = Admission(cast(web.Server, FakeServer()), budget=0)
    admission.lingering = FD_RESERVE // 2  # no room left to linger: answer and close
    transport = connect(admission())
    assert transport.sent.startswith(b"HTTP/1.1 503 ")
    assert transport.closed
