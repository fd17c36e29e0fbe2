"""One attempt at Close: send the request, name what failed, stream the answer back.

The forwarder (proxy.py) decides what is sent and which headers come back; here aiohttp's
failures become an UpstreamFailed that tells the client what to change (Close down, the
outbound proxy refusing, the client's own upload stalling or going away), and Close's
body is streamed to the client chunk by chunk, never collected whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .pacing import Pacer
from .proxy_body import BodyTooLarge, RequestBody
from .upstream_proxy import UpstreamRoute, describe_failure, is_proxy_failure, refused_message

log = logging.getLogger("closeproxy.proxy")

CLIENT_GONE: Final = "client_disconnected"


@dataclass
class ForwardCounters:
    """What the forwarder has seen, for /admin/status."""

    requests: int = 0
    replays: int = 0
    upstream_errors: int = 0
    # Clients that hung up before their answer was complete (their problem, not Close's).
    client_disconnects: int = 0
    # Clients cut for sending or reading too slowly (--client-timeout, --client-min-rate).
    slow_clients_cut: int = 0
    # Requests answered 503 proxy_busy: no connection to Close came free in time.
    proxy_busy: int = 0


class UpstreamFailed(Exception):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Exchange:
    """Sends one request to the API base through the pooled session; relays the answer."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        counters: ForwardCounters,
        *,
        base: str,
        upstream_timeout: float,
        route: UpstreamRoute | None,
    ) -> None:
        self._session = session
        self._counters = counters
        self._base = base  # no trailing slash; the raw target is appended as is
        self._route = route
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=upstream_timeout, sock_read=upstream_timeout
        )
        self._upstream_timeout = upstream_timeout
        # Told how long Close took to answer each request's head (the metrics histogram).
        self.on_upstream: Callable[[float], None] | None = None

    async def send(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        body: RequestBody,
        pacer: Pacer,
    ) -> aiohttp.ClientResponse:
        """Close's answer (its head; the caller releases it), or UpstreamFailed."""
        url = URL(self._base + request.raw_path, encoded=True)
        started = time.perf_counter()
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=body.payload(),
                allow_redirects=False,
                timeout=self._timeout,
            )
        except TimeoutError:
            if pacer.cut is not None:  # the client's body stalled, not Close
                raise pacer.cut from None
            raise UpstreamFailed(
                504,
                "upstream_timeout",
                f"Close did not answer within {self._upstream_timeout:g} s: try again, or "
                "raise --upstream-timeout for slow calls",
            ) from None
        except aiohttp.ClientError as exc:
            if body.too_large:
                raise BodyTooLarge() from None
            if pacer.cut is not None:
                raise pacer.cut from None
            if request.transport is None or request.transport.is_closing():
                # The client went away mid-upload; the answer is for the log only.
                raise UpstreamFailed(
                    400, CLIENT_GONE, "the client closed the connection mid-request"
                ) from None
            if is_proxy_failure(exc):
                raise UpstreamFailed(
                    502,
                    "upstream_proxy_failed",
                    f"cannot reach Close at {self._base}: {describe_failure(exc, self._route)}",
                ) from None
            if self._route is not None and self._route.proxy is not None:
                # Every connection goes through the outbound proxy: it may be the one
                # that failed, so the message names it.
                raise UpstreamFailed(
                    502,
                    "upstream_unreachable",
                    f"cannot reach Close at {self._base}{self._route.via()} "
                    f"({_reason(exc)}): check that proxy, the network and the --api-url "
                    "setting",
                ) from None
            raise UpstreamFailed(
                502,
                "upstream_unreachable",
                f"cannot reach Close at {self._base} ({_reason(exc)}): check the network "
                "and the --api-url setting",
            ) from None
        if upstream.status == 407 and self._route is not None and self._route.proxy is not None:
            # An http:// API base goes through the proxy without a tunnel: its refusal
            # arrives as a response, which is the proxy's, not Close's.
            upstream.release()
            raise UpstreamFailed(
                502,
                "upstream_proxy_failed",
                f"cannot reach Close at {self._base}: "
                + refused_message(407, upstream.reason or "", self._route.proxy.display),
            )
        if self.on_upstream is not None:
            self.on_upstream(time.perf_counter() - started)
        return upstream

    async def relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        pacer: Pacer,
    ) -> web.StreamResponse:
        """Close's status, `headers` and body, streamed to the client at its pace."""
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        sent = 0
        try:
            await out.prepare(request)
            async for chunk in upstream.content.iter_any():
                try:
                    await pacer.write(request, out, chunk)
                except ConnectionError:
                    return self._client_left(out, pacer, sent)
                sent += len(chunk)
        except ConnectionError:
            return self._client_left(out, pacer, sent)  # gone before the head went out
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The head is gone already: cut the connection so the client sees a
            # truncated body instead of a short one that looks complete.
            if request.transport is not None:
                request.transport.abort()
            if pacer.cut is not None:  # its streamed upload was cut mid-way
                return self._client_left(out, pacer, sent)
            self._counters.upstream_errors += 1
            log.warning("Close's response body failed after %d bytes: %s", sent, _reason(exc))
            return out
        try:
            await pacer.write_eof(request, out)
        except ConnectionError:
            return self._client_left(out, pacer, sent)
        return out

    def _client_left(self, out: web.StreamResponse, pacer: Pacer, sent: int) -> web.StreamResponse:
        if pacer.cut is not None:
            self._counters.slow_clients_cut += 1
            log.debug("cut a client that read too slowly after %d body bytes", sent)
        else:
            self._counters.client_disconnects += 1
            log.debug("client went away after %d body bytes", sent)
        return out


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return type(exc).__name__
