"""Settings: one frozen object built from flags > environment > config file > defaults.

Every setting is declared once in OPTIONS; the command line builds its flags from the
same table, so names, defaults and help never drift apart. Errors name the setting and
where its value came from.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from yarl import URL

from .errors import ConfigError
from .sealing import parse_key
from .upstream_proxy import (
    DIRECT,
    PROXY_ENV_NAMES,
    Direct,
    ProxyURL,
    UpstreamRoute,
    parse_proxy_url,
    resolve,
)

APP_NAME = "closeproxy"
DEFAULT_API_URL = "https://api.close.com"
DEFAULT_APP_URL = "https://app.close.com"
DEFAULT_PORT = 8730
LOOPBACK_NAMES: frozenset[str] = frozenset({"localhost", "127.0.0.1", "[::1]"})
LOG_FORMATS: frozenset[str] = frozenset({"text", "json"})
LOG_LEVELS: frozenset[str] = frozenset({"debug", "info", "warning", "error"})
# What a scoped key may be limited to (CONNECT, TRACE and TRACK are never served).
KEY_METHODS: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
READ_ONLY_METHODS: frozenset[str] = frozenset({"GET", "HEAD"})
KEY_PATH_ROOT = "/api/v1/"
KEY_ENV_PREFIX = "CLOSEPROXY_KEY_"
# The proxy key's own name in logs; a [keys.NAME] table may not take it.
PROXY_KEY_NAME = "proxy"
MIN_KEY_LENGTH = 16
_KEY_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
_KEY_FIELDS: frozenset[str] = frozenset({"key_file", "methods", "paths"})
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_~!$&'()*+,;=:@-]+")


class Secret:
    """A string that never shows itself in a repr, a str() or a format()."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('[secure]')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ScopedKey:
    """A named key limited to some methods and path prefixes under /api/v1/.

    `methods` None means every method; `paths` empty means all of /api/v1/.
    """

    name: str
    key: Secret
    methods: frozenset[str] | None = None
    paths: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"ScopedKey(name={self.name!r}, scope={self.scope()!r})"

    def scope(self) -> str:
        """What this key may do: `GET, HEAD requests under /api/v1/lead/`."""
        methods = (
            "requests of any method"
            if self.methods is None
            else ", ".join(m for m in KEY_METHODS if m in self.methods) + " requests"
        )
        paths = ", ".join(self.paths) if self.paths else KEY_PATH_ROOT
        return f"{methods} under {paths}"


def key_env_name(name: str) -> str:
    """CLOSEPROXY_KEY_<NAME>: the variable that may hold the key of [keys.NAME]."""
    return KEY_ENV_PREFIX + name.upper().replace("-", "_")


def parse_key_methods(raw: Any, where: str) -> frozenset[str]:
    """A key's methods (a list, or a comma-separated string from the command line)."""
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f'{where}: methods must be a list of HTTP methods like ["GET"]')
    methods = {item.strip().upper() for item in items if item.strip()}
    if not methods:
        raise ConfigError(
            f"{where}: methods is empty, so the key could do nothing: list some, "
            f'e.g. ["GET", "HEAD"], or leave methods out to allow all'
        )
    unknown = sorted(methods - set(KEY_METHODS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown method {unknown[0]!r} in methods; use some of "
            f"{', '.join(KEY_METHODS)}"
        )
    return frozenset(methods)


def parse_key_paths(raw: Any, where: str) -> tuple[str, ...]:
    """A key's path prefixes: each under /api/v1/, ending in `/`, already normalized."""
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f'{where}: paths must be a list of path prefixes like ["/api/v1/lead/"]')
    paths: list[str] = []
    for item in items:
        path = item.strip()
        if not path:
            continue
        segments = path[len(KEY_PATH_ROOT) : -1].split("/") if path != KEY_PATH_ROOT else []
        if (
            not path.startswith(KEY_PATH_ROOT)
            or not path.endswith("/")
            or not all(_PATH_SEGMENT.fullmatch(s) and s not in {".", ".."} for s in segments)
        ):
            raise ConfigError(
                f"{where}: path {item!r} is not a plain prefix under {KEY_PATH_ROOT} ending "
                f'in /: write it like "/api/v1/lead/" (no query, no %, . or .. segments)'
            )
        if path not in paths:
            paths.append(path)
    if not paths:
        raise ConfigError(
            f"{where}: paths is empty, so the key could reach nothing: list some prefixes, "
            f'e.g. ["/api/v1/lead/"], or leave paths out to allow all of {KEY_PATH_ROOT}'
        )
    return tuple(paths)


def _scoped_keys(
    raw: Any, path: Path, environ: Mapping[str, str], base_dir: Path
) -> tuple[ScopedKey, ...]:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path}: keys must be tables like [keys.reports], not a value",
            setting="keys",
        )
    keys: list[ScopedKey] = []
    env_names: dict[str, str] = {}
    for name, table in raw.items():
        where = f"config file {path}, [keys.{name}]"
        if not _KEY_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: the name must be 1-40 lower-case letters, digits, - or _, "
                "starting with a letter",
                setting="keys",
            )
        if name == PROXY_KEY_NAME:
            raise ConfigError(
                f"{where}: the name {PROXY_KEY_NAME!r} means the proxy key in logs: "
                "choose another name",
                setting="keys",
            )
        if not isinstance(table, dict):
            raise ConfigError(
                f"{where}: expected a table with key_file, methods and paths", setting="keys"
            )
        unknown = sorted(set(table) - _KEY_FIELDS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown field {unknown[0]!r}; a key table takes "
                f"{', '.join(sorted(_KEY_FIELDS))}",
                setting="keys",
            )
        env = key_env_name(name)
        if env in env_names:
            raise ConfigError(
                f"{where}: the name clashes with [keys.{env_names[env]}] (both read {env}): "
                "rename one",
                setting="keys",
            )
        env_names[env] = name
        key = _scoped_key_value(table, where, env, environ, base_dir)
        methods = parse_key_methods(table["methods"], where) if "methods" in table else None
        paths = parse_key_paths(table["paths"], where) if "paths" in table else ()
        keys.append(ScopedKey(name, key, methods, () if paths == (KEY_PATH_ROOT,) else paths))
    return tuple(keys)


def _scoped_key_value(
    table: Mapping[str, Any], where: str, env: str, environ: Mapping[str, str], base_dir: Path
) -> Secret:
    if environ.get(env, "").strip():
        value, origin = environ[env].strip(), f"environment variable {env}"
    elif "key_file" in table:
        raw = table["key_file"]
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(f"{where}: key_file must be a file path", setting="keys")
        key_path = Path(raw.strip()).expanduser()
        if not key_path.is_absolute():
            key_path = base_dir / key_path
        try:
            value = key_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot read the key file {key_path}: {exc.strerror}", setting="keys"
            ) from None
        if not value:
            raise ConfigError(
                f"{where}: the key file {key_path} is empty: put the key in it",
                setting="keys",
            )
        origin = f"key file {key_path}"
    else:
        raise ConfigError(
            f'{where}: no key: set key_file = "PATH" in the table or the environment '
            f"variable {env}",
            setting="keys",
        )
    if len(value) < MIN_KEY_LENGTH or any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(
            f"{where}: the key from {origin} must be at least {MIN_KEY_LENGTH} printable "
            "characters without spaces: make one with `openssl rand -hex 24`",
            setting="keys",
        )
    return Secret(value)


def _check_keys(keys: Sequence[ScopedKey], proxy_key: Secret | None, path: Path | None) -> None:
    seen: dict[str, str] = {}
    for scoped in keys:
        value = scoped.key.reveal()
        if value in seen:
            raise ConfigError(
                f"config file {path}: [keys.{seen[value]}] and [keys.{scoped.name}] have the "
                "same key: give each tool its own key",
                setting="keys",
            )
        seen[value] = scoped.name
        if proxy_key is not None and value == proxy_key.reveal():
            raise ConfigError(
                f"config file {path}, [keys.{scoped.name}]: the key is the proxy key, which "
                "may do everything: give the table a key of its own",
                setting="keys",
            )


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


@dataclass(frozen=True)
class Settings:
    """Everything a closeproxy command needs to know, validated."""

    client_id: str | None = None
    client_secret: Secret | None = None
    redirect_uri: str | None = None
    api_url: URL = field(default_factory=lambda: URL(DEFAULT_API_URL))
    app_url: URL = field(default_factory=lambda: URL(DEFAULT_APP_URL))
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    unix_socket: Path | None = None
    token_file: Path = field(default_factory=default_token_file)
    token_store: str = field(default="file", repr=False)  # a URL may hold a password: no repr
    token_store_key: str = "closeproxy:grant"  # noqa: S105 - a key name, not a password
    token_store_secret: Secret | None = None
    proxy_key: Secret | None = None
    log_format: str = "text"
    log_level: str = "info"
    refresh_margin: float = 300.0
    upstream_timeout: float = 60.0
    allowed_hosts: tuple[str, ...] = ()
    login_timeout: float = 300.0
    max_body_size: int | None = None
    header_timeout: float = 10.0
    client_timeout: float = 60.0
    client_min_rate: int | None = 1024
    upstream_connections: int = 256
    pool_timeout: float = 10.0
    rate_limit_wait: float = 60.0
    config_file: Path | None = None
    # [keys.NAME] tables of the config file: keys limited to some methods and paths.
    keys: tuple[ScopedKey, ...] = ()
    upstream_proxy: ProxyURL | Direct | None = None
    # The proxy variables of the environment (and nothing else from it): see upstream_proxy.py.
    proxy_environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    # setting name -> where its value came from, for error messages
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def source(self, name: str) -> str:
        return self.sources.get(name, "default")

    def require_client(self) -> tuple[str, Secret]:
        """The OAuth client credentials, or a ConfigError saying how to set them."""
        if not self.client_id:
            raise ConfigError(
                "client id is not set: pass --client-id, set CLOSEPROXY_CLIENT_ID, "
                f"or add client_id to {self._config_hint()}",
                setting="client_id",
            )
        if self.client_secret is None:
            raise ConfigError(
                "client secret is not set: pass --client-secret-file PATH, set "
                f"CLOSEPROXY_CLIENT_SECRET, or add client_secret_file to {self._config_hint()}",
                setting="client_secret",
            )
        return self.client_id, self.client_secret

    @property
    def listens_on_loopback(self) -> bool:
        return self.unix_socket is not None or is_loopback_host(self.host)

    def check_serve(self) -> None:
        """Refuse settings that would expose the user's Close account to the network."""
        if not self.listens_on_loopback and self.proxy_key is None:
            raise ConfigError(
                f"listen host {self.host!r} (from {self.source('host')}) is not a loopback "
                "address, so anyone who can reach it would act as you in Close: set a proxy "
                "key with --proxy-key-file PATH or CLOSEPROXY_PROXY_KEY, or listen on 127.0.0.1",
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
            raise ConfigError(
                f"{exc}: fix the variable, or override it with --upstream-proxy URL (or none)",
                setting="upstream_proxy",
            ) from None

    def _config_hint(self) -> str:
        return f"the config file ({self.config_file or default_config_file()})"


# --- the option table -----------------------------------------------------------------

Parser = Callable[[Any, "Origin"], Any]


@dataclass(frozen=True)
class Origin:
    """Where a raw value came from: kind is 'flag', 'env', 'file' or 'default'."""

    kind: str
    label: str
    base_dir: Path | None = None

    def resolve(self, raw: str) -> Path:
        path = Path(raw).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        return path


@dataclass(frozen=True)
class Option:
    """One setting: its flag, environment variable, config-file key and parser."""

    name: str
    flag: str
    env: str
    help: str
    parse: Parser
    file_key: str = ""
    metavar: str = "VALUE"
    repeatable: bool = False

    @property
    def key(self) -> str:
        return self.file_key or self.name


def _fail(origin: Origin, message: str, name: str) -> ConfigError:
    return ConfigError(f"{origin.label}: {message}", setting=name)


def _str(name: str) -> Parser:
    def parse(raw: Any, origin: Origin) -> str:
        if not isinstance(raw, str) or not raw.strip():
            raise _fail(origin, "expected a non-empty string", name)
        return raw.strip()

    return parse


def _choice(name: str, choices: frozenset[str]) -> Parser:
    def parse(raw: Any, origin: Origin) -> str:
        value = str(raw).strip().lower()
        if value not in choices:
            raise _fail(origin, f"expected one of {', '.join(sorted(choices))}, got {raw!r}", name)
        return value

    return parse


def _seconds(name: str, *, positive: bool) -> Parser:
    def parse(raw: Any, origin: Origin) -> float:
        if isinstance(raw, bool):
            raise _fail(origin, f"expected a number of seconds, got {raw!r}", name)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise _fail(origin, f"expected a number of seconds, got {raw!r}", name) from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "greater than 0" if positive else "0 or more"
            raise _fail(origin, f"expected a number of seconds {bound}, got {raw!r}", name)
        return value

    return parse


def _port(raw: Any, origin: Origin) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise _fail(origin, f"expected a port number 0-65535, got {raw!r}", "port") from None
    if not 0 <= value <= 65535:
        raise _fail(origin, f"expected a port number 0-65535, got {raw!r}", "port")
    return value


def _size(raw: Any, origin: Origin) -> int | None:
    return _bytes(raw, origin, "max_body_size")


def _rate(raw: Any, origin: Origin) -> int | None:
    return _bytes(raw, origin, "client_min_rate")


def _bytes(raw: Any, origin: Origin, name: str) -> int | None:
    text = str(raw).strip().lower()
    if text in {"", "0", "off", "none"}:
        return None
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    factor = units.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in units else text
    try:
        value = int(digits) * factor
    except ValueError:
        raise _fail(
            origin,
            f"expected a size in bytes like 1048576, 512k, 10m or 1g, got {raw!r}",
            name,
        ) from None
    if value < 0:
        raise _fail(origin, f"expected a positive size, got {raw!r}", name)
    return value


def _count(name: str, *, high: int) -> Parser:
    def parse(raw: Any, origin: Origin) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise _fail(origin, f"expected a whole number 1-{high}, got {raw!r}", name) from None
        if not 1 <= value <= high:
            raise _fail(origin, f"expected a whole number 1-{high}, got {raw!r}", name)
        return value

    return parse


def _url(name: str) -> Parser:
    def parse(raw: Any, origin: Origin) -> URL:
        text = str(raw).strip()
        try:
            url = URL(text)
        except ValueError:
            raise _fail(origin, f"expected an http(s) URL, got {raw!r}", name) from None
        if url.scheme not in {"http", "https"} or not url.host:
            raise _fail(
                origin, f"expected an http:// or https:// URL with a host, got {raw!r}", name
            )
        if url.raw_query_string or url.raw_fragment or url.user:
            raise _fail(
                origin, f"expected a base URL without query, fragment or user, got {raw!r}", name
            )
        return url.with_path(url.raw_path.rstrip("/"), encoded=True)

    return parse


def _upstream_proxy(raw: Any, origin: Origin) -> ProxyURL | Direct:
    if not isinstance(raw, str):
        raise _fail(
            origin, "expected a proxy URL like http://proxy.example.com:3128", "upstream_proxy"
        )
    text = raw.strip()
    if text.lower() in {"", DIRECT}:
        return DIRECT
    try:
        return parse_proxy_url(text)
    except ValueError as exc:
        raise _fail(origin, str(exc), "upstream_proxy") from None


def _redirect_uri(raw: Any, origin: Origin) -> str:
    # Kept as the exact string: Close compares it byte for byte with the registered one.
    text = str(raw).strip()
    try:
        url = URL(text)
    except ValueError:
        raise _fail(origin, f"expected an http(s) URL, got {raw!r}", "redirect_uri") from None
    if url.scheme not in {"http", "https"} or not url.host:
        raise _fail(origin, f"expected an http(s) URL, got {raw!r}", "redirect_uri")
    return text


def _path(name: str) -> Parser:
    def parse(raw: Any, origin: Origin) -> Path:
        if not isinstance(raw, str) or not raw.strip():
            raise _fail(origin, "expected a file path", name)
        return origin.resolve(raw.strip())

    return parse


def _secret(name: str, what: str) -> Parser:
    """Flags and the config file name a file holding the secret; the environment holds it."""

    def parse(raw: Any, origin: Origin) -> Secret:
        if not isinstance(raw, str) or not raw.strip():
            raise _fail(origin, f"expected the {what}", name)
        if origin.kind == "env":
            return Secret(raw.strip())
        path = origin.resolve(raw.strip())
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _fail(
                origin, f"cannot read the {what} from {path}: {exc.strerror}", name
            ) from None
        if not value:
            raise _fail(origin, f"the {what} file {path} is empty", name)
        return Secret(value)

    return parse


def _token_store(raw: Any, origin: Origin) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise _fail(origin, "expected 'file' or a redis:// URL", "token_store")
    value = raw.strip()
    if value == "file":
        return value
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in {"redis", "rediss", "unix"}:
        # Never echo the value: a URL may carry a password.
        raise _fail(
            origin,
            "expected 'file' or a redis://, rediss:// or unix:// URL "
            "(e.g. redis://:PASSWORD@host:6379/0)",
            "token_store",
        )
    return value


def _store_secret(raw: Any, origin: Origin) -> Secret:
    secret: Secret = _secret("token_store_secret", "token store secret")(raw, origin)
    try:
        parse_key(secret.reveal())
    except ConfigError as exc:
        raise _fail(origin, str(exc), "token_store_secret") from None
    return secret


def _hosts(raw: Any, origin: Origin) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, list | tuple):
        items = [str(item) for item in raw]
    else:
        raise _fail(origin, "expected a list of host names", "allowed_hosts")
    hosts: list[str] = []
    for item in items:
        host = item.strip().lower()
        if not host:
            continue
        if ":" in host and not host.startswith("["):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise _fail(
                    origin,
                    f"expected a host name without port or scheme, got {item!r}",
                    "allowed_hosts",
                ) from None
            host = f"[{host}]"
        if (
            "/" in host
            or (host.startswith("[") and not host.endswith("]"))
            or (":" in host and not host.startswith("["))
        ):
            raise _fail(
                origin,
                f"expected a host name without port or scheme, got {item!r}",
                "allowed_hosts",
            )
        hosts.append(host)
    return tuple(hosts)


OPTIONS: tuple[Option, ...] = (
    Option(
        "client_id",
        "--client-id",
        "CLOSEPROXY_CLIENT_ID",
        "OAuth client id of your Close OAuth app",
        _str("client_id"),
        metavar="ID",
    ),
    Option(
        "client_secret",
        "--client-secret-file",
        "CLOSEPROXY_CLIENT_SECRET",
        "file holding the OAuth client secret (the environment variable holds the secret "
        "itself); never printed or logged",
        _secret("client_secret", "client secret"),
        file_key="client_secret_file",
        metavar="PATH",
    ),
    Option(
        "redirect_uri",
        "--redirect-uri",
        "CLOSEPROXY_REDIRECT_URI",
        "redirect URI registered for the OAuth app (default: the app's registered one)",
        _redirect_uri,
        metavar="URL",
    ),
    Option(
        "api_url",
        "--api-url",
        "CLOSEPROXY_API_URL",
        f"Close API base URL (default {DEFAULT_API_URL})",
        _url("api_url"),
        metavar="URL",
    ),
    Option(
        "app_url",
        "--app-url",
        "CLOSEPROXY_APP_URL",
        f"Close app base URL, serving /oauth2/authorize/ (default {DEFAULT_APP_URL})",
        _url("app_url"),
        metavar="URL",
    ),
    Option(
        "host",
        "--host",
        "CLOSEPROXY_HOST",
        "address to listen on (default 127.0.0.1; anything not loopback needs a proxy key)",
        _str("host"),
        metavar="HOST",
    ),
    Option(
        "port",
        "--port",
        "CLOSEPROXY_PORT",
        f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)",
        _port,
        metavar="PORT",
    ),
    Option(
        "unix_socket",
        "--unix-socket",
        "CLOSEPROXY_UNIX_SOCKET",
        "listen on this unix socket (mode 0600) instead of TCP",
        _path("unix_socket"),
        metavar="PATH",
    ),
    Option(
        "token_file",
        "--token-file",
        "CLOSEPROXY_TOKEN_FILE",
        "where the tokens are kept (default: tokens.json in the user data directory)",
        _path("token_file"),
        metavar="PATH",
    ),
    Option(
        "token_store",
        "--token-store",
        "CLOSEPROXY_TOKEN_STORE",
        "where the grant lives: 'file' (default: --token-file), or a redis://, rediss:// or "
        "unix:// URL of a Redis shared by several closeproxy processes (needs "
        "closeproxy[redis])",
        _token_store,
        metavar="file|URL",
    ),
    Option(
        "token_store_key",
        "--token-store-key",
        "CLOSEPROXY_TOKEN_STORE_KEY",
        "the key of the grant in Redis (default closeproxy:grant)",
        _str("token_store_key"),
        metavar="KEY",
    ),
    Option(
        "token_store_secret",
        "--token-store-key-file",
        "CLOSEPROXY_TOKEN_STORE_SECRET",
        "file holding the key that encrypts the tokens in Redis (AES-GCM; 32 random bytes in "
        "base64, `openssl rand -base64 32`; the environment variable holds the key itself)",
        _store_secret,
        file_key="token_store_key_file",
        metavar="PATH",
    ),
    Option(
        "proxy_key",
        "--proxy-key-file",
        "CLOSEPROXY_PROXY_KEY",
        "file holding the key clients must present as Basic user name or Bearer token (the "
        "environment variable holds the key itself); required off loopback",
        _secret("proxy_key", "proxy key"),
        file_key="proxy_key_file",
        metavar="PATH",
    ),
    Option(
        "log_format",
        "--log-format",
        "CLOSEPROXY_LOG_FORMAT",
        "log format: text or json (default text)",
        _choice("log_format", LOG_FORMATS),
        metavar="FORMAT",
    ),
    Option(
        "log_level",
        "--log-level",
        "CLOSEPROXY_LOG_LEVEL",
        "log level: debug, info, warning or error (default info)",
        _choice("log_level", LOG_LEVELS),
        metavar="LEVEL",
    ),
    Option(
        "refresh_margin",
        "--refresh-margin",
        "CLOSEPROXY_REFRESH_MARGIN",
        "refresh the access token this many seconds before it expires (default 300)",
        _seconds("refresh_margin", positive=False),
        metavar="SECONDS",
    ),
    Option(
        "upstream_timeout",
        "--upstream-timeout",
        "CLOSEPROXY_UPSTREAM_TIMEOUT",
        "seconds to wait for Close's response head, and between body chunks (default 60)",
        _seconds("upstream_timeout", positive=True),
        metavar="SECONDS",
    ),
    Option(
        "allowed_hosts",
        "--allow-host",
        "CLOSEPROXY_ALLOWED_HOSTS",
        "also accept requests whose Host header names this host (repeatable; the "
        "environment variable is comma-separated)",
        _hosts,
        metavar="NAME",
        repeatable=True,
    ),
    Option(
        "login_timeout",
        "--login-timeout",
        "CLOSEPROXY_LOGIN_TIMEOUT",
        "seconds to wait for the browser to come back during login (default 300)",
        _seconds("login_timeout", positive=True),
        metavar="SECONDS",
    ),
    Option(
        "max_body_size",
        "--max-body-size",
        "CLOSEPROXY_MAX_BODY_SIZE",
        "refuse request bodies larger than this, e.g. 10m (default: no limit)",
        _size,
        metavar="SIZE",
    ),
    Option(
        "header_timeout",
        "--header-timeout",
        "CLOSEPROXY_HEADER_TIMEOUT",
        "seconds a client may take to send its request head (default 10)",
        _seconds("header_timeout", positive=True),
        metavar="SECONDS",
    ),
    Option(
        "upstream_proxy",
        "--upstream-proxy",
        "CLOSEPROXY_UPSTREAM_PROXY",
        "outbound proxy for every connection to Close, http://[USER:PASSWORD@]HOST:PORT, or "
        "none to go direct (default: HTTPS_PROXY/HTTP_PROXY and NO_PROXY from the "
        "environment); the password is never shown",
        _upstream_proxy,
        metavar="URL",
    ),
    Option(
        "client_timeout",
        "--client-timeout",
        "CLOSEPROXY_CLIENT_TIMEOUT",
        "seconds a client may pause while sending its request body or reading the answer "
        "before it is cut (default 60)",
        _seconds("client_timeout", positive=True),
        metavar="SECONDS",
    ),
    Option(
        "client_min_rate",
        "--client-min-rate",
        "CLOSEPROXY_CLIENT_MIN_RATE",
        "slowest average rate, in bytes per second, at which a client may send its body or "
        "read the answer while the proxy waits on it; slower ones are cut after "
        "--client-timeout (default 1k; 0 turns the check off)",
        _rate,
        metavar="BYTES",
    ),
    Option(
        "upstream_connections",
        "--upstream-connections",
        "CLOSEPROXY_UPSTREAM_CONNECTIONS",
        "most connections to Close at once; clients that send or read slowly may hold at "
        "most half of them (default 256)",
        _count("upstream_connections", high=65535),
        metavar="N",
    ),
    Option(
        "pool_timeout",
        "--pool-timeout",
        "CLOSEPROXY_POOL_TIMEOUT",
        "seconds a request may wait for a free connection to Close before it is answered "
        "503 proxy_busy (default 10)",
        _seconds("pool_timeout", positive=True),
        metavar="SECONDS",
    ),
    Option(
        "rate_limit_wait",
        "--rate-limit-wait",
        "CLOSEPROXY_RATE_LIMIT_WAIT",
        "longest a request waits out Close's rate limits before Close's 429 is passed on "
        "(default 60; 0 passes every 429 through unchanged)",
        _seconds("rate_limit_wait", positive=False),
        metavar="SECONDS",
    ),
)
OPTIONS_BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}
_FILE_KEYS: Mapping[str, Option] = {option.key: option for option in OPTIONS}


def _read_config_file(path: Path, explicit: bool, label: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(
                f"config file {path} (from {label}) does not exist: create it or fix the path",
                setting="config",
            ) from None
        return {}
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}", setting="config"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid TOML: {exc}", setting="config"
        ) from None
    unknown = sorted(set(data) - set(_FILE_KEYS) - {"keys"})
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting {unknown[0]!r}; known settings are "
            f"{', '.join(sorted(_FILE_KEYS))} and [keys.NAME] tables",
            setting=unknown[0],
        )
    return data


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    config_file: str | None = None,
) -> Settings:
    """Build Settings; `flags` maps option names to values given on the command line."""
    flags = {name: value for name, value in (flags or {}).items() if value not in (None, [], ())}
    environ = os.environ if environ is None else environ

    if config_file:
        path, explicit, label = Path(config_file).expanduser(), True, "--config"
    elif environ.get("CLOSEPROXY_CONFIG"):
        path, explicit, label = (
            Path(environ["CLOSEPROXY_CONFIG"]).expanduser(),
            True,
            ("CLOSEPROXY_CONFIG"),
        )
    else:
        path, explicit, label = default_config_file(), False, "default"
    file_values = _read_config_file(path, explicit, label)
    file_dir = path.resolve().parent

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        origin: Origin
        if option.name in flags:
            raw: Any = flags[option.name]
            origin = Origin("flag", option.flag, Path.cwd())
            if option.repeatable and isinstance(raw, Sequence) and not isinstance(raw, str):
                raw = list(raw)
        elif environ.get(option.env, "") != "":
            raw = environ[option.env]
            origin = Origin("env", f"environment variable {option.env}", Path.cwd())
        elif option.key in file_values:
            raw = file_values[option.key]
            origin = Origin("file", f"config file {path} ({option.key})", file_dir)
        else:
            continue
        values[option.name] = option.parse(raw, origin)
        sources[option.name] = origin.label
    proxy_environ = {name: environ[name] for name in PROXY_ENV_NAMES if environ.get(name)}
    keys = (
        _scoped_keys(file_values["keys"], path, environ, file_dir) if "keys" in file_values else ()
    )
    _check_keys(keys, values.get("proxy_key"), path)
    return Settings(
        **values,
        keys=keys,
        config_file=path if file_values or explicit else None,
        proxy_environ=proxy_environ,
        sources=sources,
    )
