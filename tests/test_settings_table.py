"""README's settings table against the declarations: a setting added without a row fails."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from closeproxy.config import CONFIG, KEY_ENV_PREFIX, OPTIONS, Option

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = ["setting", "flag", "environment", "default"]
_CODE = re.compile(r"`([^`]*)`")


def settings_section(text: str) -> str:
    return text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]


def table_rows(section: str) -> list[list[str]]:
    lines = [line.strip() for line in section.splitlines() if line.startswith("|")]
    header, _rule, *body = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    assert header == HEADER
    return body


def first_code(cell: str) -> str | None:
    match = _CODE.search(cell)
    return match.group(1) if match else None


def table_problems(text: str, declared: Sequence[Option]) -> list[str]:
    """What the README's settings table gets wrong about `declared`; empty when nothing."""
    section = settings_section(text)
    rows = table_rows(section)
    problems: list[str] = []
    by_flag = {first_code(row[1]): row for row in rows}
    for option in declared:
        row = by_flag.get(option.flag)
        if row is None:
            problems.append(f"{option.name}: no row with flag `{option.flag}`")
            continue
        if first_code(row[2]) != option.env:
            problems.append(f"{option.name}: the row does not name `{option.env}`")
        cell = row[3]
        if option.default is not None and not cell.startswith(f"`{option.default}`"):
            problems.append(f"{option.name}: the default is `{option.default}`, not {cell!r}")
        if option.default is None and cell.startswith("`"):
            problems.append(f"{option.name}: declared without a fixed default, not {cell!r}")
        flag_key = option.flag.removeprefix("--").replace("-", "_")
        if option.key != flag_key and f"`{flag_key}` is `{option.key}`" not in section:
            problems.append(f"{option.name}: the file key {option.key} is not explained")
    flags = {option.flag for option in declared}
    envs = {option.env for option in declared}
    for row in rows:
        if first_code(row[1]) in flags:
            continue
        if (first_code(row[2]) or "").startswith(KEY_ENV_PREFIX):
            continue  # the [keys.NAME] tables: read by keys.py, not a declared option
        problems.append(f"row {row[0]!r} names no declared setting")
    for name in re.findall(r"`(--[a-z-]+|CLOSEPROXY_[A-Z_]+)", "\n".join(map(str, rows))):
        if name not in flags | envs and not name.startswith(KEY_ENV_PREFIX):
            problems.append(f"the table names {name}, which is not declared")
    return problems


DECLARED: tuple[Option, ...] = (CONFIG, *OPTIONS)


def test_the_readme_table_matches_the_declarations() -> None:
    assert table_problems(README.read_text(encoding="utf-8"), DECLARED) == []


def test_every_row_is_checked() -> None:
    rows = table_rows(settings_section(README.read_text(encoding="utf-8")))
    assert len(rows) == len(DECLARED) + 1  # and the [keys.NAME] row


def _changed(option: Option, **changes: Any) -> Option:
    return dataclasses.replace(option, **changes)


def test_a_setting_without_a_row_fails() -> None:
    added = _changed(OPTIONS[0], name="retry_wait", flag="--retry-wait", env="CLOSEPROXY_X")
    problems = table_problems(README.read_text(encoding="utf-8"), (*DECLARED, added))
    assert problems == ["retry_wait: no row with flag `--retry-wait`"]


def test_a_row_for_no_setting_fails() -> None:
    declared = tuple(option for option in DECLARED if option.name != "pool_timeout")
    problems = table_problems(README.read_text(encoding="utf-8"), declared)
    assert "row 'pool timeout' names no declared setting" in problems
    assert "the table names --pool-timeout, which is not declared" in problems


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"env": "CLOSEPROXY_WAIT"}, "the row does not name `CLOSEPROXY_WAIT`"),
        ({"default": "30"}, "the default is `30`"),
        ({"default": None}, "declared without a fixed default"),
        ({"key": "wait"}, "the file key wait is not explained"),
    ],
)
def test_a_row_that_disagrees_with_its_declaration_fails(
    changes: dict[str, Any], problem: str
) -> None:
    declared = tuple(
        _changed(option, **changes) if option.name == "rate_limit_wait" else option
        for option in DECLARED
    )
    problems = table_problems(README.read_text(encoding="utf-8"), declared)
    assert problems
    assert problems[0].startswith(f"rate_limit_wait: {problem}"), problems


_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*[a-z]")
_ENV = re.compile(r"\bCLOSEPROXY_[A-Z_]*[A-Z]\b")


def _parser_flags() -> set[str]:
    import argparse

    from closeproxy.arguments import build_parser

    flags: set[str] = set()
    pending = [build_parser()]
    while pending:
        parser = pending.pop()
        for action in parser._actions:
            flags.update(option for option in action.option_strings if option.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    return flags


def test_every_flag_and_variable_a_message_names_exists() -> None:
    """Messages name settings by hand ("raise --upstream-timeout"): a renamed setting must
    not leave a message pointing at a flag or variable that no longer exists."""
    package = Path(__file__).resolve().parents[1] / "closeproxy"
    # Other programs' flags (systemctl --user --now) and docstring placeholders.
    flags = _parser_flags() | {"--user", "--now", "--flag", "--retry-wait"}
    # Variables closeproxy sets for a child that are not settings, and placeholders.
    other_env = {"CLOSEPROXY_URL", "CLOSEPROXY_KEY", "CLOSEPROXY_NAME", "CLOSEPROXY_RETRY_WAIT"}
    envs = {option.env for option in OPTIONS} | other_env
    unknown: list[str] = []
    for path in sorted(package.rglob("*.py")):
        if "sim" in path.relative_to(package).parts or path.name == "dashboard.py":
            continue  # the simulator has its own command line; CSS has var(--fg)
        text = path.read_text()
        unknown += [f"{path.name}: {flag}" for flag in _FLAG.findall(text) if flag not in flags]
        unknown += [f"{path.name}: {env}" for env in _ENV.findall(text) if env not in envs]
    assert unknown == [], unknown


def test_every_module_is_on_the_readme_map() -> None:
    """README's "Development" map names every module of the package, and no other."""
    section = README.read_text().split("\n## Development\n", 1)[1].split("\n## ", 1)[0]
    named = {
        name
        for line in section.splitlines()
        if line.startswith("| `")
        for name in _CODE.findall(line.split("|")[1])
    }
    package = README.parent / "closeproxy"
    modules = {path.name for path in package.glob("*.py")} - {"__init__.py", "__main__.py"}
    modules.add("sim/")
    assert sorted(modules - named) == []
    assert sorted(named - modules) == []
