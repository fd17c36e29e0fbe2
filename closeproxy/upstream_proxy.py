"""Which outbound (corporate) proxy carries the connections to Close, if any.

Decided once per process from `--upstream-proxy` (which wins) or the conventional
environment variables curl and requests read: `https_proxy`/`HTTPS_PROXY` for an https
API base, `http_proxy`/`HTTP_PROXY` for an http one, `all_proxy`/`ALL_PROXY` for either,
and `no_proxy`/`NO_PROXY` to go direct. Only these variables are read: the client session
keeps `trust_env=False`, so no `.netrc` credential ever rides along to Close.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import aiohttp
from yarl import URL

DIRECT: Final = "none"
Direct = Literal["none"]
PROXY_SCHEMES: frozenset[str] = frozenset({"http", "https"})
# Lower case first: curl reads only http_proxy in lower case, and lower case wins elsewhere.
ENV_NAMES: Mapping[str, tuple[str, ...]] = {
    "https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
    "http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
}
NO_PROXY_NAMES: tuple[str, ...] = ("no_proxy", "NO_PROXY")
PROXY_ENV_NAMES: frozenset[str] = frozenset(
    {*ENV_NAMES["https"], *ENV_NAMES["http"], *NO_PROXY_NAMES}
)


@dataclass(frozen=True)
class ProxyURL:
    """An outbound proxy: its address, and credentials that never show in a repr."""

    url: URL  # scheme://host:port, no user info
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        auth = ", credentials='[secure]'" if self.user is not None else ""
        return f"ProxyURL({str(self.url)!r}{auth})"

    __str__ = __repr__

    @property
    def display(self) -> str:
        """The address to show users: never the user name or password."""
        return str(self.url)

    def with_credentials(self) -> URL:
        """The URL handed to aiohttp, which turns the user info into Proxy-Authorization.

        aiohttp encodes that header's credentials as Latin-1, which fails on any other
        letter; curl sends UTF-8 (RFC 7617). So each is handed over as its UTF-8 bytes
        spelled in Latin-1, which aiohttp's encoding turns back into those bytes.
        """
        if self.user is None:
            return self.url
        return self.url.with_user(_as_latin1(self.user)).with_password(
            _as_latin1(self.password or "")
        )


def _as_latin1(text: str) -> str:
    return text.encode("utf-8").decode("latin-1")


def parse_proxy_url(text: str) -> ProxyURL:
    """`[http://][user:password@]host[:port]`; ValueError with the reason otherwise."""
    text = text.strip()
    if "://" not in text:
        text = "http://" + text  # curl's convention for a bare host:port
    try:
        url = URL(text)
        port = url.port
    except ValueError:
        raise ValueError("expected a proxy URL like http://proxy.example.com:3128") from None
    if url.scheme not in PROXY_SCHEMES:
        raise ValueError(
            f"{url.scheme}:// proxies are not supported; use an http:// (or https://) proxy URL"
        )
    if not url.host:
        raise ValueError("expected a proxy URL with a host, like http://proxy.example.com:3128")
    if url.raw_path not in {"", "/"} or url.raw_query_string or url.raw_fragment:
        raise ValueError("expected a proxy URL without path, query or fragment")
    bare = URL.build(scheme=url.scheme, host=url.host, port=port)
    if url.user is None and url.password is None:
        return ProxyURL(bare)
    return ProxyURL(bare, user=url.user or "", password=url.password or "")


@dataclass(frozen=True)
class UpstreamRoute:
    """The decision: a proxy (or none) and the reason, for status and error messages."""

    proxy: ProxyURL | None
    source: str

    @property
    def label(self) -> str:
        if self.proxy is None:
            return f"direct ({self.source})"
        auth = ", with credentials" if self.proxy.user is not None else ""
        return f"via {self.proxy.display} (from {self.source}{auth})"

    def document(self) -> dict[str, object]:
        """The status document's `upstream_proxy` entry; never a credential."""
        return {
            "url": self.proxy.display if self.proxy is not None else None,
            "source": self.source,
            "credentials": self.proxy is not None and self.proxy.user is not None,
        }

    def session_proxy(self) -> URL | None:
        return self.proxy.with_credentials() if self.proxy is not None else None

    def via(self) -> str:
        """`` through the outbound proxy URL`` when there is one (for error messages)."""
        return f" through the outbound proxy {self.proxy.display}" if self.proxy else ""


def resolve(
    explicit: ProxyURL | Direct | None,
    api_url: URL,
    environ: Mapping[str, str],
    *,
    explicit_source: str = "--upstream-proxy",
) -> UpstreamRoute:
    """The route to `api_url`: the explicit setting wins, then the environment."""
    if explicit == DIRECT:
        return UpstreamRoute(None, f"{explicit_source} is none")
    if isinstance(explicit, ProxyURL):
        return UpstreamRoute(explicit, explicit_source)
    scheme = "https" if api_url.scheme == "https" else "http"
    for name in ENV_NAMES[scheme]:
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        host = api_url.host or ""
        for no_name in NO_PROXY_NAMES:
            if environ.get(no_name, "").strip():
                if bypasses(environ[no_name], host, api_url.port):
                    return UpstreamRoute(None, f"{no_name} covers {host}")
                break
        try:
            return UpstreamRoute(parse_proxy_url(raw), name)
        except ValueError as exc:
            raise ValueError(f"environment variable {name}: {exc}") from None
    return UpstreamRoute(None, "no proxy configured")


def bypasses(no_proxy: str, host: str, port: int | None) -> bool:
    """True when `host` matches a NO_PROXY entry, the way curl and requests read them.

    Entries are comma or space separated: `*` (everything), a domain (itself and every
    name under it, with or without a leading dot or `*.`), an IP address or CIDR range,
    each optionally with `:port`.
    """
    name = host.strip("[]").rstrip(".").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        address = None
    for raw in no_proxy.replace(",", " ").split():
        entry = raw.strip().lower()
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.startswith("["):  # [v6]:port or [v6]
            inside, _, rest = entry[1:].partition("]")
            entry = inside
            if rest.startswith(":") and rest[1:].isdigit():
                entry_port = int(rest[1:])
        elif entry.count(":") == 1:
            entry, _, port_text = entry.partition(":")
            if port_text.isdigit():
                entry_port = int(port_text)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.removeprefix("*").lstrip(".").rstrip(".")
        if entry and (name == entry or name.endswith("." + entry)):
            return True
    return False


def is_proxy_failure(exc: BaseException) -> bool:
    return isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError)


def describe_failure(exc: BaseException, route: UpstreamRoute | None = None) -> str:
    """What went wrong at the outbound proxy, naming it but never its credentials."""
    where = route.proxy.display if route is not None and route.proxy is not None else None
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        where = where or f"{exc.host}:{exc.port}"
        reason = exc.os_error.strerror or str(exc.os_error)
        return f"cannot connect to the outbound proxy {where}: {reason}"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return refused_message(exc.status, exc.message, where or "in use")
    return type(exc).__name__


def refused_message(status: int, reason: str, where: str) -> str:
    hint = (
        "check the user name and password in --upstream-proxy (or the proxy variable)"
        if status in {401, 407}
        else "ask whoever runs the proxy to allow it"
    )
    return f"the outbound proxy {where} refused the connection ({status} {reason}): {hint}"
