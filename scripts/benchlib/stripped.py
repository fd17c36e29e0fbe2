"""`closeproxy serve` with parts of its request path switched off: what each part costs.

    python scripts/benchlib/stripped.py PART[,PART...] serve [serve flags]

For the `instructions` benchmark only, never a way to run the proxy: each part below is
replaced in process by the least that still answers a plain GET (no checks, no limits,
no log line). Every name is looked up before it is replaced, so a renamed part fails
here loudly instead of measuring nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final

# What each part is, as the benchmark's table names it.
PARTS: Final[dict[str, str]] = {
    "log": "the access line (AccessLogger.log)",
    "front": "the front middleware (request id, guard, metrics, dashboard row)",
    "guard": "the guard's checks (Guard.check)",
    "pacing": "slow-client pacing around body reads and writes (Pacer)",
    "ratelimit": "the rate-limit gate around each attempt (RateLimits.send)",
    "token": "the token provider's per-request look (TokenProvider.current)",
    "headers": "header filtering both ways (request_headers, response headers)",
    "timeouts": "aiohttp's read timer for --upstream-timeout (two timers a request)",
}


def _replace(owner: Any, name: str, value: object) -> None:
    getattr(owner, name)  # AttributeError when the part was renamed
    setattr(owner, name, value)


def strip(parts: set[str]) -> None:
    """Replace the named parts in closeproxy's modules (before the app is built)."""
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"stripped.py: unknown part(s) {', '.join(sorted(unknown))}")
    from aiohttp import ClientTimeout, web
    from multidict import CIMultiDict

    from closeproxy import access_log, app, guard, pacing, proxy, proxy_exchange, ratelimit
    from closeproxy import tokens as tokens_module

    if "log" in parts:
        _replace(access_log.AccessLogger, "log", lambda self, request, response, time: None)
    if "front" in parts:

        @web.middleware
        async def passthrough(self: object, request: web.Request, handler: Any) -> Any:
            return await handler(request)

        _replace(app.Front, "middleware", passthrough)
    if "guard" in parts:
        _replace(guard.Guard, "check", lambda self, request: None)
    if "pacing" in parts:
        _replace(pacing.Pacer, "read", lambda self, content: content.readany())
        _replace(pacing.Pacer, "write", lambda self, request, out, chunk: out.write(chunk))
        _replace(pacing.Pacer, "write_eof", lambda self, request, out: out.write_eof())
    if "ratelimit" in parts:

        async def send(
            self: object, wait: object, attempt: Callable[[], Awaitable[Any]], **_: Any
        ) -> Any:
            return await attempt()

        _replace(ratelimit.RateLimits, "send", send)
    if "token" in parts:
        first = tokens_module.TokenProvider.current
        held: dict[str, Any] = {}

        async def current(self: Any, **kwargs: Any) -> Any:
            if "tokens" not in held:
                held["tokens"] = await first(self, **kwargs)
            return held["tokens"]

        _replace(tokens_module.TokenProvider, "current", current)
    if "headers" in parts:
        _replace(
            proxy,
            "request_headers",
            lambda incoming, token: CIMultiDict(Authorization=f"Bearer {token}"),
        )
        _replace(
            proxy.Forwarder,
            "_response_headers",
            lambda self, request, incoming: CIMultiDict(incoming),
        )
    if "timeouts" in parts:
        built = proxy_exchange.Exchange.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            built(self, *args, **kwargs)
            _replace(self, "_timeout", ClientTimeout())

        _replace(proxy_exchange.Exchange, "__init__", init)


def main() -> None:
    parts = {part for part in sys.argv[1].split(",") if part}
    strip(parts)
    sys.argv = ["closeproxy", *sys.argv[2:]]
    from closeproxy.cli import run

    run()


if __name__ == "__main__":
    main()
