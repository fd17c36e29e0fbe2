"""Scoped keys: the [keys.NAME] tables of the config file, each limited to some methods
and path prefixes under /api/v1/, and the checks that keep them apart."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .options import ENV_PREFIX
from .secret import Secret

# What a scoped key may be limited to (CONNECT, TRACE and TRACK are never served).
KEY_METHODS: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
READ_ONLY_METHODS: frozenset[str] = frozenset({"GET", "HEAD"})
KEY_PATH_ROOT = "/api/v1/"
KEY_ENV_PREFIX = ENV_PREFIX + "KEY_"
# The proxy key's own name in logs; a [keys.NAME] table may not take it.
PROXY_KEY_NAME = "proxy"
MIN_KEY_LENGTH = 16
_KEY_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
_KEY_FIELDS: frozenset[str] = frozenset({"key_file", "methods", "paths"})
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_~!$&'()*+,;=:@-]+")


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


def parse_key_methods(raw: object, where: str) -> frozenset[str]:
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


def parse_key_paths(raw: object, where: str) -> tuple[str, ...]:
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


def scoped_keys(
    raw: object, path: Path, environ: Mapping[str, str], base_dir: Path
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
    table: Mapping[str, object], where: str, env: str, environ: Mapping[str, str], base_dir: Path
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


def check_keys(keys: Sequence[ScopedKey], proxy_key: Secret | None, path: Path | None) -> None:
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
