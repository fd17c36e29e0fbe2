"""Which event loop a serving command runs on: --event-loop auto, asyncio or uvloop."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from helpers import UVLOOP_INSTALLED, run_cli

from closeproxy import loop
from closeproxy.config import load_settings
from closeproxy.errors import ConfigError


async def running_loop_name() -> str:
    return loop.loop_name(asyncio.get_running_loop())


def test_asyncio_is_used_when_asked_for() -> None:
    settings = load_settings({"event_loop": "asyncio"}, {})
    assert loop.run(settings, running_loop_name) == "asyncio"


@pytest.mark.skipif(not UVLOOP_INSTALLED, reason="uvloop is not installed (closeproxy[fast])")
def test_auto_uses_uvloop_when_it_is_installed() -> None:
    assert load_settings({}, {}).event_loop == "auto"
    assert loop.run(load_settings({}, {}), running_loop_name) == "uvloop"
    assert loop.run(load_settings({"event_loop": "uvloop"}, {}), running_loop_name) == "uvloop"


def test_without_uvloop_auto_is_asyncio_and_asking_for_uvloop_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop.run(load_settings({}, {}), running_loop_name) == "asyncio"
    settings = load_settings({}, {"CLOSEPROXY_EVENT_LOOP": "uvloop"})
    with pytest.raises(ConfigError) as caught:
        loop.run(settings, running_loop_name)
    assert caught.value.setting == "event_loop"
    assert "environment variable CLOSEPROXY_EVENT_LOOP" in str(caught.value)
    assert "closeproxy[fast]" in str(caught.value)


def test_an_unknown_event_loop_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="expected one of asyncio, auto, uvloop"):
        load_settings({"event_loop": "trio"}, {})


def test_serve_asked_for_a_missing_uvloop_exits_2_with_the_fix(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "uvloop"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('uvloop hidden by the test')\n")
    result = run_cli(
        {"PYTHONPATH": str(shadow.parent), "CLOSEPROXY_PORT": "0"},
        "serve",
        "--event-loop",
        "uvloop",
    )
    assert result.returncode == 2
    assert "event loop uvloop (from --event-loop) is not installed" in result.stderr
    assert "pip install 'closeproxy[fast]'" in result.stderr
    assert result.stdout == ""  # it never started listening
