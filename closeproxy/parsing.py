"""Value types: how one kind of setting is read from a flag, the environment or the file.

Each kind is a `ValueType[T]`: `parse` turns the raw value (a string from a flag or the
environment, any TOML value from the file) into a T or raises a ConfigError that names
the setting and where the value came from; `show` writes a T the way a user would type
it, for the defaults in `--help`.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from yarl import URL

from .errors import ConfigError
from .secret import Secret
from .upstream_proxy import DIRECT, Direct, ProxyURL, parse_proxy_url

T = TypeVar("T")
_SIZE_UNITS: dict[str, int] = {"k": 1024, "m": 1024**2, "g": 1024**3}


@dataclass(frozen=True)
class Origin:
    """Where a raw value came from: kind is 'flag', 'env', 'file' or 'default'."""

    kind: str
    label: str
    base_dir: Path | None = None
    setting: str | None = None

    def resolve(self, raw: str) -> Path:
        path = Path(raw).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        return path

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.label}: {message}", setting=self.setting)


class ValueType(Protocol[T]):
    """One kind of setting value: its parser, its display and its placeholder in help."""

    @property
    def metavar(self) -> str: ...

    @property
    def repeatable(self) -> bool: ...

    @property
    def name_suffix(self) -> str:
        """Added to the field name for the flag and the file key (not the environment)."""
        ...

    def parse(self, raw: object, origin: Origin) -> T: ...

    def show(self, value: T) -> str: ...


class _Kind(Generic[T]):
    """Defaults shared by the value types: one value per flag, shown with str()."""

    metavar = "VALUE"
    repeatable = False
    name_suffix = ""

    def show(self, value: T) -> str:
        return str(value)


class Text(_Kind[str]):
    """A non-empty string, trimmed."""

    def parse(self, raw: object, origin: Origin) -> str:
        if not isinstance(raw, str) or not raw.strip():
            raise origin.fail("expected a non-empty string")
        return raw.strip()


@dataclass(frozen=True)
class Choice(_Kind[str]):
    """One of a few lower-case words."""

    choices: Collection[str]

    def parse(self, raw: object, origin: Origin) -> str:
        value = str(raw).strip().lower()
        if value not in self.choices:
            raise origin.fail(f"expected one of {', '.join(sorted(self.choices))}, got {raw!r}")
        return value


@dataclass(frozen=True)
class Seconds(_Kind[float]):
    """A duration in seconds; `positive` refuses 0."""

    positive: bool
    metavar = "SECONDS"

    def parse(self, raw: object, origin: Origin) -> float:
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            raise origin.fail(f"expected a number of seconds, got {raw!r}")
        try:
            value = float(raw)
        except ValueError:
            raise origin.fail(f"expected a number of seconds, got {raw!r}") from None
        if not math.isfinite(value) or value < 0 or (self.positive and value == 0):
            bound = "greater than 0" if self.positive else "0 or more"
            raise origin.fail(f"expected a number of seconds {bound}, got {raw!r}")
        return value

    def show(self, value: float) -> str:
        return f"{value:g}"


class Port(_Kind[int]):
    """A TCP port, 0-65535 (0 picks a free one)."""

    metavar = "PORT"

    def parse(self, raw: object, origin: Origin) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise origin.fail(f"expected a port number 0-65535, got {raw!r}") from None
        if not 0 <= value <= 65535:
            raise origin.fail(f"expected a port number 0-65535, got {raw!r}")
        return value


@dataclass(frozen=True)
class Count(_Kind[int]):
    """A whole number from 1 to `high`."""

    high: int
    metavar = "N"

    def parse(self, raw: object, origin: Origin) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise origin.fail(f"expected a whole number 1-{self.high}, got {raw!r}") from None
        if not 1 <= value <= self.high:
            raise origin.fail(f"expected a whole number 1-{self.high}, got {raw!r}")
        return value


class Size(_Kind[int | None]):
    """A number of bytes like 1048576, 512k, 10m or 1g; 0, off or none mean no limit."""

    metavar = "SIZE"

    def parse(self, raw: object, origin: Origin) -> int | None:
        text = str(raw).strip().lower()
        if text in {"", "0", "off", "none"}:
            return None
        factor = _SIZE_UNITS.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in _SIZE_UNITS else text
        try:
            value = int(digits) * factor
        except ValueError:
            raise origin.fail(
                f"expected a size in bytes like 1048576, 512k, 10m or 1g, got {raw!r}"
            ) from None
        if value < 0:
            raise origin.fail(f"expected a positive size, got {raw!r}")
        return value

    def show(self, value: int | None) -> str:
        if value is None:
            return "0"
        for unit, factor in reversed(_SIZE_UNITS.items()):
            if value and value % factor == 0:
                return f"{value // factor}{unit}"
        return str(value)


class BaseURL(_Kind[URL]):
    """An http(s) base URL with a host and no query, fragment or user; no trailing /."""

    metavar = "URL"

    def parse(self, raw: object, origin: Origin) -> URL:
        try:
            url = URL(str(raw).strip())
        except ValueError:
            raise origin.fail(f"expected an http(s) URL, got {raw!r}") from None
        if url.scheme not in {"http", "https"} or not url.host:
            raise origin.fail(f"expected an http:// or https:// URL with a host, got {raw!r}")
        if url.raw_query_string or url.raw_fragment or url.user:
            raise origin.fail(f"expected a base URL without query, fragment or user, got {raw!r}")
        return url.with_path(url.raw_path.rstrip("/"), encoded=True)


class RedirectURI(_Kind[str]):
    """An http(s) URL, kept as the exact string: Close compares it byte for byte."""

    metavar = "URL"

    def parse(self, raw: object, origin: Origin) -> str:
        text = str(raw).strip()
        try:
            url = URL(text)
        except ValueError:
            raise origin.fail(f"expected an http(s) URL, got {raw!r}") from None
        if url.scheme not in {"http", "https"} or not url.host:
            raise origin.fail(f"expected an http(s) URL, got {raw!r}")
        return text


class UpstreamProxy(_Kind[ProxyURL | Direct]):
    """An outbound proxy URL, or `none` to go direct."""

    metavar = "URL"

    def parse(self, raw: object, origin: Origin) -> ProxyURL | Direct:
        if not isinstance(raw, str):
            raise origin.fail("expected a proxy URL like http://proxy.example.com:3128")
        text = raw.strip()
        if text.lower() in {"", DIRECT}:
            return DIRECT
        try:
            return parse_proxy_url(text)
        except ValueError as exc:
            raise origin.fail(str(exc)) from None

    def show(self, value: ProxyURL | Direct) -> str:
        return value if isinstance(value, str) else value.display


class FilePath(_Kind[Path]):
    """A file path; relative ones are relative to the config file (or the working dir)."""

    metavar = "PATH"

    def parse(self, raw: object, origin: Origin) -> Path:
        if not isinstance(raw, str) or not raw.strip():
            raise origin.fail("expected a file path")
        return origin.resolve(raw.strip())


@dataclass(frozen=True)
class SecretFile(_Kind[Secret]):
    """A secret: flags and the config file name a file holding it, the environment holds it.

    So its flag and file key end in `-file`/`_file`; its environment variable does not.
    """

    what: str
    metavar = "PATH"
    name_suffix = "_file"

    def parse(self, raw: object, origin: Origin) -> Secret:
        if not isinstance(raw, str) or not raw.strip():
            raise origin.fail(f"expected the {self.what}")
        if origin.kind == "env":
            return Secret(raw.strip())
        path = origin.resolve(raw.strip())
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise origin.fail(f"cannot read the {self.what} from {path}: {exc.strerror}") from None
        if not value:
            raise origin.fail(f"the {self.what} file {path} is empty")
        return Secret(value)

    def show(self, value: Secret) -> str:
        return str(value)


class Hosts(_Kind[tuple[str, ...]]):
    """Host names without port or scheme: repeatable flags, a comma list or a TOML list."""

    metavar = "NAME"
    repeatable = True

    def parse(self, raw: object, origin: Origin) -> tuple[str, ...]:
        if isinstance(raw, str):
            items = raw.split(",")
        elif isinstance(raw, list | tuple):
            items = [str(item) for item in raw]
        else:
            raise origin.fail("expected a list of host names")
        return tuple(_host(item, origin) for item in items if item.strip())

    def show(self, value: tuple[str, ...]) -> str:
        return ",".join(value)


def _host(item: str, origin: Origin) -> str:
    host = item.strip().lower()
    wrong = f"expected a host name without port or scheme, got {item!r}"
    if ":" in host and not host.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise origin.fail(wrong) from None
        host = f"[{host}]"
    if (
        "/" in host
        or (host.startswith("[") and not host.endswith("]"))
        or (":" in host and not host.startswith("["))
    ):
        raise origin.fail(wrong)
    return host
