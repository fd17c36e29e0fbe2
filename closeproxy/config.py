"""Settings: one frozen object built from flags > environment > config file > defaults.

Every setting is declared once, as a field of Settings (settings.py); this module reads
the values from those declarations. Errors name the setting and where its value came
from. The public names of the settings modules are re-exported here.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .keys import (
    KEY_ENV_PREFIX,
    KEY_METHODS,
    KEY_PATH_ROOT,
    PROXY_KEY_NAME,
    READ_ONLY_METHODS,
    ScopedKey,
    check_keys,
    key_env_name,
    parse_key_methods,
    parse_key_paths,
    scoped_keys,
)
from .options import Option
from .parsing import Origin
from .secret import Secret
from .settings import (
    APP_NAME,
    CONFIG,
    DEFAULT_PORT,
    LOG_FORMATS,
    LOG_LEVELS,
    LOOPBACK_NAMES,
    OPTIONS,
    OPTIONS_BY_NAME,
    Settings,
    default_config_file,
    default_token_file,
    is_loopback_host,
)
from .upstream_proxy import PROXY_ENV_NAMES

__all__ = [
    "APP_NAME",
    "CONFIG",
    "DEFAULT_PORT",
    "KEY_ENV_PREFIX",
    "KEY_METHODS",
    "KEY_PATH_ROOT",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LOOPBACK_NAMES",
    "OPTIONS",
    "OPTIONS_BY_NAME",
    "PROXY_KEY_NAME",
    "READ_ONLY_METHODS",
    "Option",
    "Origin",
    "ScopedKey",
    "Secret",
    "Settings",
    "default_config_file",
    "default_token_file",
    "is_loopback_host",
    "key_env_name",
    "load_settings",
    "parse_key_methods",
    "parse_key_paths",
]

# The [keys.NAME] tables are read by keys.py, not by a declared option.
KEYS_TABLE = "keys"
FILE_KEYS: Mapping[str, Option] = {option.key: option for option in OPTIONS}


def _read_config_file(path: Path, explicit: bool, label: str) -> dict[str, object]:
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
    unknown = sorted(set(data) - set(FILE_KEYS) - {KEYS_TABLE})
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting {unknown[0]!r}; known settings are "
            f"{', '.join(sorted(FILE_KEYS))} and [{KEYS_TABLE}.NAME] tables",
            setting=unknown[0],
        )
    return data


def _config_path(config_file: str | None, environ: Mapping[str, str]) -> tuple[Path, bool, str]:
    """Which config file to read, whether it was asked for, and by what."""
    if config_file:
        return Path(config_file).expanduser(), True, CONFIG.flag
    if environ.get(CONFIG.env):
        return Path(environ[CONFIG.env]).expanduser(), True, CONFIG.env
    return default_config_file(), False, "default"


def _raw_value(
    option: Option,
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    file_values: Mapping[str, object],
    path: Path,
) -> tuple[object, Origin] | None:
    """The raw value of one option and its origin, by precedence; None when unset."""
    if option.name in flags:
        raw = flags[option.name]
        if option.repeatable and isinstance(raw, Sequence) and not isinstance(raw, str):
            raw = list(raw)
        return raw, Origin("flag", option.flag, Path.cwd(), option.name)
    if environ.get(option.env, "") != "":
        label = f"environment variable {option.env}"
        return environ[option.env], Origin("env", label, Path.cwd(), option.name)
    if option.key in file_values:
        label = f"config file {path} ({option.key})"
        return file_values[option.key], Origin("file", label, path.resolve().parent, option.name)
    return None


def load_settings(
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    config_file: str | None = None,
) -> Settings:
    """Build Settings; `flags` maps option names to values given on the command line."""
    flags = {name: value for name, value in (flags or {}).items() if value not in (None, [], ())}
    environ = os.environ if environ is None else environ
    path, explicit, label = _config_path(config_file, environ)
    file_values = _read_config_file(path, explicit, label)

    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        found = _raw_value(option, flags, environ, file_values, path)
        if found is not None:
            raw, origin = found
            values[option.name] = option.parse(raw, origin)
            sources[option.name] = origin.label
    proxy_environ = {name: environ[name] for name in PROXY_ENV_NAMES if environ.get(name)}
    keys = (
        scoped_keys(file_values[KEYS_TABLE], path, environ, path.resolve().parent)
        if KEYS_TABLE in file_values
        else ()
    )
    proxy_key = values.get("proxy_key")
    check_keys(keys, proxy_key if isinstance(proxy_key, Secret) else None, path)
    base = Settings(
        keys=keys,
        config_file=path if file_values or explicit else None,
        proxy_environ=proxy_environ,
        sources=sources,
    )
    # The one untyped step: each value was parsed by its field's own ValueType[T], and
    # option() made mypy check that T is the field's type; only the name joins them here.
    changes: dict[str, Any] = values
    return dataclasses.replace(base, **changes)
