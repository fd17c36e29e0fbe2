"""The forwarding handler: client request in, token on, both bodies streamed.

    handle -> _send_with_auth (token, one refresh + replay on 401)
           -> _send_limited (Close's rate limits: hold, retry 429s; ratelimit.py)
           -> a pool slot, then Exchange.send -> Exchange.relay (proxy_exchange.py)

Method, path and query go upstream byte for byte; hop-by-hop headers are dropped both
ways (RFC 9110 §7.6.1, proxy_headers.py); bodies are never decompressed or collected
whole (proxy_body.py keeps a small one for the replay).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import ServiceError
from .pacing import ClientLimits, ClientTooSlow, Pacer, SlowShare, Watch
from .proxy_body import BodyTooLarge, RequestBody
from .proxy_exchange import CLIENT_GONE, Exchange, ForwardCounters, UpstreamFailed
from .proxy_headers import request_headers, response_headers
from .ratelimit import WAIT_HEADER, WAITED, BadWaitHeader, ClientGone, Held, RateLimits, Wait
from .refresh_policy import Rejected
from .responses import error_response, service_error_response
from .tokens import TokenProvider
from .upstream_proxy import UpstreamRoute

log = logging.getLogger("closeproxy.proxy")

API_PREFIX: Final = "/api/v1/"
PROXY_BUSY: Final = "proxy_busy"
DEFAULT_CLIENT_LIMITS: Final = ClientLimits(timeout=60.0, min_rate=1024)


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
        self._provider = provider
        self._base = str(api_url)  # no trailing slash; the raw target is appended as is
        self._api_prefix = self._base + API_PREFIX
        self._max_body_size = max_body_size
        self._client_limits = client_limits
        # One slot per connection to Close: a request waits for one here, for at most
        # pool_timeout, so that a full pool is answered as such and not as a slow Close.
        self._connections = connections
        self._slots = asyncio.Semaphore(connections)
        self._pool_timeout = pool_timeout
        self._slow_share = SlowShare(max(1, connections // 2))
        self._watch = Watch()
        self.counters = ForwardCounters()
        self.rate_limits = RateLimits(rate_limit_wait)
        self._exchange = Exchange(
            session,
            self.counters,
            base=self._base,
            upstream_timeout=upstream_timeout,
            route=upstream_route,
        )

    def on_upstream(self, observe: Callable[[float], None]) -> None:
        """Call `observe` with the seconds from sending each request to Close to its head."""
        self._exchange.on_upstream = observe

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.counters.requests += 1
        pacer = Pacer(self._client_limits, self._slow_share, self._watch)
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
            headers = request_headers(request.headers, token)
            return await self._exchange.send(request, headers, body, pacer)

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
                headers = self._response_headers(request, upstream.headers)
                return await self._exchange.relay(request, upstream, headers, pacer)
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

    def _response_headers(
        self, request: web.Request, incoming: CIMultiDictProxy[str]
    ) -> CIMultiDict[str]:
        out = response_headers(incoming)
        location = out.get("Location")
        if location is not None and location.startswith(self._api_prefix):
            # Keep the client on the proxy: the token must only ever go to the API base.
            out["Location"] = f"{request.scheme}://{request.host}{location[len(self._base) :]}"
        return out
