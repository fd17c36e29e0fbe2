"""Settings: every setting declared once, as a field with its type, default and help.

The flag, the environment variable and the config-file key follow from the field name
(see options.py); config.py fills the fields from flags > environment > file > defaults.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
from yarl import URL

from .errors import ConfigError
from .keys import ScopedKey
from .options import Option, computed_option, option, options_of, standalone
from .parsing import (
    BaseURL,
    Choice,
    Count,
    FilePath,
    Hosts,
    Port,
    RedirectURI,
    Seconds,
    SecretFile,
    Size,
    Text,
    UpstreamProxy,
)
from .secret import Secret
from .store_options import FILE_STORE, StoreSecret, StoreURL, TokenStore
from .upstream_proxy import Direct, ProxyURL, UpstreamRoute, resolve

APP_NAME = "closeproxy"
DEFAULT_PORT = 8730
LOOPBACK_NAMES: frozenset[str] = frozenset({"localhost", "127.0.0.1", "[::1]"})
LOG_FORMATS: frozenset[str] = frozenset({"text", "json"})
LOG_LEVELS: frozenset[str] = frozenset({"debug", "info", "warning", "error"})
SWITCH: frozenset[str] = frozenset({"on", "off"})
EVENT_LOOPS: frozenset[str] = frozenset({"auto", "asyncio", "uvloop"})


def default_config_file() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def default_token_file() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME)) / "tokens.json"


def is_loopback_host(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    name = host.strip().lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


# The config file's own location: a flag and a variable, but no key in the file itself.
CONFIG: Option = standalone(
    "config",
    FilePath(),
    help="TOML config file",
    described="config.toml in the user config directory",
)


@dataclass(frozen=True)
class Settings:
    """Everything a closeproxy command needs to know, validated."""

    client_id: str | None = option(
        None, Text(), metavar="ID", help="OAuth client id of your Close OAuth app"
    )
    client_secret: Secret | None = option(
        None,
        SecretFile("client secret"),
        help="file holding the OAuth client secret (the environment variable holds the "
        "secret itself); never printed or logged",
    )
    redirect_uri: str | None = option(
        None,
        RedirectURI(),
        described="the app's registered one",
        help="redirect URI registered for the OAuth app",
    )
    api_url: URL = option(URL("https://api.close.com"), BaseURL(), help="Close API base URL")
    app_url: URL = option(
        URL("https://app.close.com"),
        BaseURL(),
        help="Close app base URL, serving /oauth2/authorize/",
    )
    host: str = option(
        "127.0.0.1",
        Text(),
        metavar="HOST",
        help="address to listen on ({default}; anything not loopback needs a proxy key)",
    )
    port: int = option(
        DEFAULT_PORT, Port(), help="port to listen on ({default}; 0 picks a free one)"
    )
    unix_socket: Path | None = option(
        None, FilePath(), help="listen on this unix socket (mode 0600) instead of TCP"
    )
    token_file: Path = computed_option(
        default_token_file,
        FilePath(),
        described="tokens.json in the user data directory",
        help="where the tokens are kept",
    )
    token_store: StoreURL = option(
        StoreURL(FILE_STORE),
        TokenStore(),
        help="where the grant lives: {default} (the token file), or the redis://, rediss:// "
        "or unix:// URL of a Redis that several closeproxy processes share (needs "
        "closeproxy[redis]; the password and database as redis-py reads them)",
    )
    token_store_key: str = option(
        "closeproxy:grant",
        Text(),
        metavar="KEY",
        help="the key of the grant in Redis ({default})",
    )
    token_store_secret: Secret | None = option(
        None,
        StoreSecret(),
        flag="--token-store-key-file",
        file_key="token_store_key_file",
        help="file holding the key that encrypts the tokens in Redis with AES-GCM: 32 random "
        "bytes in base64, as `openssl rand -base64 32` prints them (the environment "
        "variable holds the key itself)",
    )
    proxy_key: Secret | None = option(
        None,
        SecretFile("proxy key"),
        help="file holding the key clients must present as Basic user name or Bearer token "
        "(the environment variable holds the key itself); required off loopback",
    )
    log_format: str = option(
        "text", Choice(LOG_FORMATS), metavar="FORMAT", help="log format: text or json"
    )
    log_level: str = option(
        "info",
        Choice(LOG_LEVELS),
        metavar="LEVEL",
        help="log level: debug, info, warning or error",
    )
    refresh_margin: float = option(
        300.0,
        Seconds(positive=False),
        help="refresh the access token this many seconds before it expires",
    )
    upstream_timeout: float = option(
        60.0,
        Seconds(positive=True),
        help="seconds to wait for Close's response head, and between body chunks",
    )
    allowed_hosts: tuple[str, ...] = option(
        (),
        Hosts(),
        flag="--allow-host",
        help="also accept requests whose Host header names this host (repeatable; the "
        "environment variable is comma-separated)",
    )
    login_timeout: float = option(
        300.0,
        Seconds(positive=True),
        help="seconds to wait for the browser to come back during login",
    )
    max_body_size: int | None = option(
        None,
        Size(),
        described="no limit",
        help="refuse request bodies larger than this, e.g. 10m",
    )
    header_timeout: float = option(
        10.0,
        Seconds(positive=True),
        help="seconds a client may take to send its request head",
    )
    client_timeout: float = option(
        60.0,
        Seconds(positive=True),
        help="seconds a client may pause while sending its request body or reading the "
        "answer before it is cut",
    )
    client_min_rate: int | None = option(
        1024,
        Size(),
        metavar="BYTES",
        help="slowest average rate, in bytes per second, at which a client may send its body "
        "or read the answer while the proxy waits on it; slower ones are cut after "
        "--client-timeout ({default}; 0 turns the check off)",
    )
    upstream_connections: int = option(
        256,
        Count(high=65535),
        help="most connections to Close at once; clients that send or read slowly may hold "
        "at most half of them",
    )
    pool_timeout: float = option(
        10.0,
        Seconds(positive=True),
        help="seconds a request may wait for a free connection to Close before it is "
        "answered 503 proxy_busy",
    )
    rate_limit_wait: float = option(
        60.0,
        Seconds(positive=False),
        help="longest a request waits out Close's rate limits before Close's 429 is passed "
        "on ({default}; 0 passes every 429 through unchanged)",
    )
    event_loop: str = option(
        "auto",
        Choice(EVENT_LOOPS),
        metavar="LOOP",
        help="event loop to serve on: auto (uvloop when installed, with closeproxy[fast]), "
        "asyncio or uvloop",
    )
    metrics: str = option(
        "on",
        Choice(SWITCH),
        metavar="on|off",
        help="on or off: serve Prometheus metrics at /metrics and count requests for them "
        "(off answers /metrics with 404 and counts nothing)",
    )
    upstream_proxy: ProxyURL | Direct | None = option(
        None,
        UpstreamProxy(),
        described="HTTPS_PROXY/HTTP_PROXY and NO_PROXY from the environment",
        help="outbound proxy for every connection to Close, http://[USER:PASSWORD@]HOST:PORT, "
        "or none to go direct ({default}); the password is never shown",
    )
    # Filled by the loader, not declared options: the file actually read, its
    # [keys.NAME] tables, and the proxy variables of the environment (and nothing else
    # from it; see upstream_proxy.py).
    config_file: Path | None = None
    keys: tuple[ScopedKey, ...] = ()
    proxy_environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    # setting name -> where its value came from, for error messages
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def source(self, name: str) -> str:
        return self.sources.get(name, "default")

    def require_client(self) -> tuple[str, Secret]:
        """The OAuth client credentials, or a ConfigError saying how to set them."""
        if not self.client_id:
            raise ConfigError(
                f"client id is not set: {_how_to_set('client_id', self._config_hint())}",
                setting="client_id",
            )
        if self.client_secret is None:
            raise ConfigError(
                f"client secret is not set: {_how_to_set('client_secret', self._config_hint())}",
                setting="client_secret",
            )
        return self.client_id, self.client_secret

    @property
    def listens_on_loopback(self) -> bool:
        return self.unix_socket is not None or is_loopback_host(self.host)

    def check_serve(self) -> None:
        """Refuse settings that would expose the user's Close account to the network."""
        if not self.listens_on_loopback and self.proxy_key is None:
            key = OPTIONS_BY_NAME["proxy_key"]
            raise ConfigError(
                f"listen host {self.host!r} (from {self.source('host')}) is not a loopback "
                "address, so anyone who can reach it would act as you in Close: set a proxy "
                f"key with {key.flag} {key.metavar} or {key.env}, or listen on 127.0.0.1",
                setting="host",
            )
        self.upstream_route()  # a malformed proxy variable fails now, not on first use

    def upstream_route(self) -> UpstreamRoute:
        """Which outbound proxy (if any) carries the connections to the API base."""
        try:
            return resolve(
                self.upstream_proxy,
                self.api_url,
                self.proxy_environ,
                explicit_source=self.source("upstream_proxy"),
            )
        except ValueError as exc:
            flag = OPTIONS_BY_NAME["upstream_proxy"]
            raise ConfigError(
                f"{exc}: fix the variable, or override it with {flag.flag} {flag.metavar} "
                "(or none)",
                setting="upstream_proxy",
            ) from None

    def _config_hint(self) -> str:
        return f"the config file ({self.config_file or default_config_file()})"


OPTIONS: tuple[Option, ...] = options_of(Settings)
OPTIONS_BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}


def _how_to_set(name: str, file: str) -> str:
    return OPTIONS_BY_NAME[name].how_to_set(file)


def spelled(name: str) -> str:
    """A setting as messages name it: `--flag (or CLOSEPROXY_NAME)`."""
    declared = OPTIONS_BY_NAME[name]
    return f"{declared.flag} (or {declared.env})"


def client_hint() -> str:
    """Where the OAuth client is set: both variables, or both keys of the config file."""
    cid, secret = OPTIONS_BY_NAME["client_id"], OPTIONS_BY_NAME["client_secret"]
    return f"{cid.env} and {secret.env}, or {cid.key} and {secret.key} in the config file"
