"""The forwarding handler: client request in, token on, both bodies streamed.

    handle -> _send_with_auth (token, one refresh + replay on 401)
           -> _send_limited (Close's rate limits: hold, retry 429s; ratelimit.py)
           -> _send_once -> _relay

Method, path and query go upstream byte for byte; hop-by-hop headers are dropped both
ways (RFC 9110 §7.6.1); bodies are never decompressed or collected whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import ServiceError
from .pacing import ClientLimits, ClientTooSlow, Pacer, SlowShare
from .ratelimit import WAIT_HEADER, WAITED, BadWaitHeader, ClientGone, Held, RateLimits, Wait
from .refresh_policy import Rejected
from .responses import error_response, service_error_response
from .tokens import TokenProvider
from .upstream_proxy import UpstreamRoute, describe_failure, is_proxy_failure, refused_message

log = logging.getLogger("closeproxy.proxy")

API_PREFIX: Final = "/api/v1/"
# Bodies up to this size are kept so that the request can be replayed after a refresh.
REPLAY_LIMIT: Final = 1024 * 1024
CLIENT_GONE: Final = "client_disconnected"
PROXY_BUSY: Final = "proxy_busy"
DEFAULT_CLIENT_LIMITS: Final = ClientLimits(timeout=60.0, min_rate=1024)

# RFC 9110 §7.6.1 plus the de-facto ones; each message's Connection header adds more.
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: credentials of the client, framing aiohttp redoes, and
# client-asserted forwarding information nobody should trust.
REQUEST_DROP: frozenset[str] = HOP_BY_HOP | frozenset(
    {
        "authorization",
        "cookie",
        "host",
        "expect",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
        WAIT_HEADER.lower(),  # the client's word to this proxy, not to Close
    }
)
# Never relayed back: Close's cookies belong to no client of the proxy, and no CORS
# header may ever invite a web page in (whatever the upstream says).
RESPONSE_DROP: frozenset[str] = HOP_BY_HOP | frozenset({"set-cookie", "set-cookie2"})
CORS_PREFIX = "access-control-"


def _dropped(headers: CIMultiDictProxy[str], always: frozenset[str]) -> frozenset[str]:
    """`always` plus the headers this message's Connection header names hop-by-hop."""
    values = headers.getall("Connection", ())
    if not values:
        return always  # the common case: no set to build per request
    named = {token.strip().lower() for value in values for token in value.split(",")}
    named.discard("")
    return always | named


def _without(incoming: CIMultiDictProxy[str], always: frozenset[str]) -> CIMultiDict[str]:
    """A copy of `incoming` without the headers to drop. The multidict finds them (its
    case-insensitive key view against the set), so no Python loop runs over every header."""
    out = incoming.copy()
    for name in incoming.keys() & _dropped(incoming, always):
        out.popall(name, None)
    return out


def request_headers(incoming: CIMultiDictProxy[str], token: str) -> CIMultiDict[str]:
    """The client's headers minus what must not travel, plus exactly one Authorization."""
    out = _without(incoming, REQUEST_DROP)
    out["Authorization"] = f"Bearer {token}"
    return out


def response_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Close's headers minus hop-by-hop ones, cookies and any CORS header."""
    out = _without(incoming, RESPONSE_DROP)
    if CORS_PREFIX in "\n".join(out.keys()).lower():  # rare: then look at each name
        for name in {n for n in out if n.lower().startswith(CORS_PREFIX)}:
            out.popall(name, None)
    return out


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


class BodyTooLarge(Exception):
    """The client's body is larger than --max-body-size allows."""


class RequestBody:
    """The client's body: kept in memory when small enough to replay, else streamed once."""

    def __init__(self, request: web.Request, limit: int | None, pacer: Pacer) -> None:
        self._request = request
        self._pacer = pacer
        self._limit = limit
        self._size = 0
        self.too_large = False
        self.buffered: bytes | None = None
        self._prefix = b""
        self._streamed = False

    @classmethod
    async def read(cls, request: web.Request, limit: int | None, pacer: Pacer) -> RequestBody:
        body = cls(request, limit, pacer)
        if not request.body_exists:
            body.buffered = b""
            return body
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            raise BodyTooLarge()
        if length is not None and length > REPLAY_LIMIT:
            return body
        # Unknown (chunked) or small: read up to the limit; EOF before it means replayable.
        chunks: list[bytes] = []
        size = 0
        content = request.content
        while size <= REPLAY_LIMIT:
            chunk = await pacer.read(content)
            if not chunk:
                body.buffered = b"".join(chunks)
                return body
            body._count(chunk)
            chunks.append(chunk)
            size += len(chunk)
        body._prefix = b"".join(chunks)
        return body

    def _count(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._limit is not None and self._size > self._limit:
            self.too_large = True
            raise BodyTooLarge()

    @property
    def replayable(self) -> bool:
        return self.buffered is not None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        if self.buffered is not None:
            return self.buffered if self.buffered or self._request.body_exists else None
        if self._streamed:
            raise RuntimeError("a streamed request body can be sent only once")
        self._streamed = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        if self._prefix:
            yield self._prefix
            self._prefix = b""
        content = self._request.content
        while chunk := await self._pacer.read(content):
            self._count(chunk)
            yield chunk


class Forwarder:
    """Forwards /api/v1/ requests to the API base through one pooled session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        provider: TokenProvider,
        *,
        api_url: URL,
        upstream_timeout: float,
        max_body_size: int | None = None,
        upstream_route: UpstreamRoute | None = None,
        client_limits: ClientLimits = DEFAULT_CLIENT_LIMITS,
        connections: int = 256,
        pool_timeout: float = 10.0,
        rate_limit_wait: float = 60.0,
    ) -> None:
        self._session = session
        self._route = upstream_route
        self._provider = provider
        self._base = str(api_url)  # no trailing slash; the raw target is appended as is
        self._api_prefix = self._base + API_PREFIX
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=upstream_timeout, sock_read=upstream_timeout
        )
        self._upstream_timeout = upstream_timeout
        self._max_body_size = max_body_size
        self._client_limits = client_limits
        # One slot per connection to Close: a request waits for one here, for at most
        # pool_timeout, so that a full pool is answered as such and not as a slow Close.
        self._connections = connections
        self._slots = asyncio.Semaphore(connections)
        self._pool_timeout = pool_timeout
        self._slow_share = SlowShare(max(1, connections // 2))
        self.counters = ForwardCounters()
        self.rate_limits = RateLimits(rate_limit_wait)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.counters.requests += 1
        pacer = Pacer(self._client_limits, self._slow_share)
        try:
            return await self._forward(request, pacer)
        except ServiceError as exc:
            return service_error_response(exc)
        except ClientTooSlow as exc:
            self.counters.slow_clients_cut += 1
            log.debug("cut a slow client: %s", exc.code)
            return error_response(exc.status, exc.code, str(exc), headers={"Connection": "close"})
        except UpstreamFailed as exc:
            if exc.code == CLIENT_GONE:
                self.counters.client_disconnects += 1
            elif exc.code == PROXY_BUSY:
                self.counters.proxy_busy += 1
            else:
                self.counters.upstream_errors += 1
            return error_response(exc.status, exc.code, str(exc))
        except BadWaitHeader as exc:
            return error_response(400, "bad_rate_limit_wait", str(exc))
        except BodyTooLarge:
            return self._too_large()
        finally:
            pacer.close()

    async def refusal_before_body(self, request: web.Request) -> web.StreamResponse | None:
        """What a client that asks `Expect: 100-continue` gets instead of uploading, if
        anything: the same login and size checks the request itself would meet first."""
        try:
            await self._provider.current()
        except ServiceError as exc:
            return service_error_response(exc)
        length = request.content_length
        if self._max_body_size is not None and length is not None and length > self._max_body_size:
            return self._too_large()
        return None

    def _too_large(self) -> web.Response:
        return error_response(
            413,
            "body_too_large",
            f"the request body is larger than {self._max_body_size} bytes, the limit set "
            "with --max-body-size",
            headers={"Connection": "close"},
        )

    async def _forward(self, request: web.Request, pacer: Pacer) -> web.StreamResponse:
        wait = self.rate_limits.wait_for(
            request.method, request.path, request.headers.get(WAIT_HEADER)
        )
        # The token first: a client that is not logged in learns it before uploading.
        tokens = await self._provider.current()
        body = await RequestBody.read(request, self._max_body_size, pacer)
        held = False

        async def send(token: str) -> aiohttp.ClientResponse:
            # The pool slot is taken at the first attempt: a request held back by its
            # group's rate limit waits without occupying a connection to Close.
            nonlocal held
            if not held:
                await self._take_slot()
                try:
                    # A 429 for its group may have come in while it queued for the slot.
                    self.rate_limits.recheck(wait)
                except Held:
                    self._slots.release()
                    raise
                held = True
                pacer.holds_upstream = True
            return await self._send_once(request, body, token, pacer)

        def idle() -> None:
            # Waiting to retry a 429 needs no connection: other groups may use it.
            nonlocal held
            if held:
                held = False
                pacer.holds_upstream = False
                self._slots.release()

        try:
            try:
                upstream = await self._send_with_auth(
                    request, body, wait, tokens.access_token, send, idle
                )
            finally:
                if wait.spent:
                    request[WAITED] = wait.spent
            try:
                return await self._relay(request, upstream, pacer)
            finally:
                upstream.release()
        finally:
            if held:
                pacer.holds_upstream = False
                self._slots.release()

    async def _take_slot(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # free: no wait, no timer
            return
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamFailed(
                503,
                PROXY_BUSY,
                f"all {self._connections} connections to Close are busy and none came free "
                f"within {self._pool_timeout:g} s (--pool-timeout); Close was not contacted: "
                "try again, or raise --upstream-connections",
            ) from None

    async def _send_with_auth(
        self,
        request: web.Request,
        body: RequestBody,
        wait: Wait,
        token: str,
        send: Callable[[str], Awaitable[aiohttp.ClientResponse]],
        idle: Callable[[], None],
    ) -> aiohttp.ClientResponse:
        upstream = await self._send_limited(request, body, wait, token, send, idle)
        if upstream.status != 401 or not body.replayable:
            return upstream
        if not self._provider.should_refresh_on_401(token):
            return upstream
        upstream.release()
        log.info("Close answered 401 to a token we held valid; refreshing once and replaying")
        fresh = await self._provider.refresh(Rejected(token))
        self.counters.replays += 1
        replayed = await self._send_limited(request, body, wait, fresh.access_token, send, idle)
        if replayed.status == 401:
            self._provider.note_replay_rejected(fresh.access_token)
        return replayed

    async def _send_limited(
        self,
        request: web.Request,
        body: RequestBody,
        wait: Wait,
        token: str,
        send: Callable[[str], Awaitable[aiohttp.ClientResponse]],
        idle: Callable[[], None],
    ) -> aiohttp.ClientResponse:
        """`send` through the group's gate; a 429 is retried while the budget lasts."""
        try:
            return await self.rate_limits.send(
                wait,
                lambda: send(token),
                replayable=body.replayable,
                client_gone=lambda: request.transport is None or request.transport.is_closing(),
                idle=idle,
            )
        except ClientGone:
            raise UpstreamFailed(
                400, CLIENT_GONE, "the client closed the connection while its request waited"
            ) from None

    async def _send_once(
        self, request: web.Request, body: RequestBody, token: str, pacer: Pacer
    ) -> aiohttp.ClientResponse:
        url = URL(self._base + request.raw_path, encoded=True)
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=request_headers(request.headers, token),
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
        return upstream

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, pacer: Pacer
    ) -> web.StreamResponse:
        out = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=self._response_headers(request, upstream.headers),
        )
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
            self.counters.upstream_errors += 1
            log.warning("Close's response body failed after %d bytes: %s", sent, _reason(exc))
            return out
        try:
            await pacer.write_eof(request, out)
        except ConnectionError:
            return self._client_left(out, pacer, sent)
        return out

    def _client_left(self, out: web.StreamResponse, pacer: Pacer, sent: int) -> web.StreamResponse:
        if pacer.cut is not None:
            self.counters.slow_clients_cut += 1
            log.debug("cut a client that read too slowly after %d body bytes", sent)
        else:
            self.counters.client_disconnects += 1
            log.debug("client went away after %d body bytes", sent)
        return out

    def _response_headers(
        self, request: web.Request, incoming: CIMultiDictProxy[str]
    ) -> CIMultiDict[str]:
        out = response_headers(incoming)
        location = out.get("Location")
        if location is not None and location.startswith(self._api_prefix):
            # Keep the client on the proxy: the token must only ever go to the API base.
            out["Location"] = f"{request.scheme}://{request.host}{location[len(self._base) :]}"
        return out


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return type(exc).__name__
