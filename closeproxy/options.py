"""option(): declare a setting once, as a dataclass field; options_of() reads them back.

A declaration names the default, the value type and the help; the flag, the environment
variable and the config-file key follow from the field name (a field `retry_wait`
would be `--retry-wait`, `CLOSEPROXY_RETRY_WAIT` and `retry_wait`) unless the
declaration overrides them; a secret's flag and key end in `-file`/`_file`. The
default is filled into the help text from the declaration: at a `{default}`
placeholder, else appended in parentheses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING, TypeVar, overload

from .parsing import Origin, ValueType

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
ENV_PREFIX = "CLOSEPROXY_"
_METADATA_KEY = "closeproxy.option"


@dataclass(frozen=True)
class Option:
    """One setting as the command line, the environment and the config file see it."""

    name: str
    flag: str
    env: str
    key: str  # in the config file
    help: str  # with the default filled in
    parse: Callable[[object, Origin], object]
    metavar: str
    repeatable: bool = False
    # The default as a user would type it; None when there is none or it is described.
    default: str | None = None

    def how_to_set(self, file: str) -> str:
        """`pass --flag METAVAR, set ENV, or add key to FILE`, for error messages."""
        return f"pass {self.flag} {self.metavar}, set {self.env}, or add {self.key} to {file}"


@dataclass(frozen=True)
class _Declaration:
    """What option() knows before the field has a name."""

    help: str
    parse: Callable[[object, Origin], object]
    metavar: str
    repeatable: bool
    name_suffix: str
    shown: str | None
    described: str | None
    flag: str | None
    env: str | None
    file_key: str | None

    def named(self, name: str) -> Option:
        stem = name + self.name_suffix
        if self.shown is not None:
            default = f"default {self.shown}"
        elif self.described is not None:
            default = f"default: {self.described}"
        else:
            default = ""
        if "{default}" in self.help:
            text = self.help.replace("{default}", default)
        else:
            text = f"{self.help} ({default})" if default else self.help
        return Option(
            name=name,
            flag=self.flag or "--" + stem.replace("_", "-"),
            env=self.env or ENV_PREFIX + name.upper(),
            key=self.file_key or stem,
            help=text,
            parse=self.parse,
            metavar=self.metavar,
            repeatable=self.repeatable,
            default=self.shown,
        )


def _declare(
    default: T | None,
    kind: ValueType[T],
    *,
    help: str,
    described: str | None,
    flag: str | None,
    env: str | None,
    file_key: str | None,
    metavar: str | None,
) -> _Declaration:
    shown = kind.show(default) if default is not None else None
    return _Declaration(
        help=help,
        parse=kind.parse,
        metavar=metavar or kind.metavar,
        repeatable=kind.repeatable,
        name_suffix=kind.name_suffix,
        shown=shown or None,
        described=described,
        flag=flag,
        env=env,
        file_key=file_key,
    )


@overload
def option(
    default: T,
    kind: ValueType[T],
    *,
    help: str,
    described: str | None = None,
    flag: str | None = None,
    env: str | None = None,
    file_key: str | None = None,
    metavar: str | None = None,
) -> T: ...


@overload
def option(
    default: None,
    kind: ValueType[T],
    *,
    help: str,
    described: str | None = None,
    flag: str | None = None,
    env: str | None = None,
    file_key: str | None = None,
    metavar: str | None = None,
) -> T | None: ...


def option(
    default: T | None,
    kind: ValueType[T],
    *,
    help: str,
    described: str | None = None,
    flag: str | None = None,
    env: str | None = None,
    file_key: str | None = None,
    metavar: str | None = None,
) -> T | None:
    """A setting with a fixed default; `described` stands in for a None default in help."""
    declaration = _declare(
        default,
        kind,
        help=help,
        described=described,
        flag=flag,
        env=env,
        file_key=file_key,
        metavar=metavar,
    )
    return field(default=default, metadata={_METADATA_KEY: declaration})


def computed_option(
    factory: Callable[[], T],
    kind: ValueType[T],
    *,
    help: str,
    described: str,
    metavar: str | None = None,
) -> T:
    """A setting whose default is computed when Settings is made (e.g. from XDG paths)."""
    declaration = _declare(
        None,
        kind,
        help=help,
        described=described,
        flag=None,
        env=None,
        file_key=None,
        metavar=metavar,
    )
    return field(default_factory=factory, metadata={_METADATA_KEY: declaration})


def standalone(
    name: str, kind: ValueType[T], *, help: str, described: str, metavar: str | None = None
) -> Option:
    """An option that is no Settings field (the config file's own location)."""
    return _declare(
        None,
        kind,
        help=help,
        described=described,
        flag=None,
        env=None,
        file_key=None,
        metavar=metavar,
    ).named(name)


def options_of(cls: type[DataclassInstance]) -> tuple[Option, ...]:
    """The declared options of a dataclass, in field order."""
    return tuple(_named(f) for f in fields(cls) if _METADATA_KEY in f.metadata)


def _named(spec: Field[object]) -> Option:
    declaration = spec.metadata[_METADATA_KEY]
    assert isinstance(declaration, _Declaration)
    return declaration.named(spec.name)
