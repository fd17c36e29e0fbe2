"""Which headers travel, each way (RFC 9110 §7.6.1 and what a reverse proxy must add).

Hop-by-hop headers are dropped both ways, plus those each message's Connection header
names; the client's credentials and forwarding claims never go upstream, and Close's
cookies and CORS headers never come back.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from .ratelimit_headers import WAIT_HEADER

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
