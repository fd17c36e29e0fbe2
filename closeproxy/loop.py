"""The event loop a serving command runs on: uvloop when installed, else asyncio's.

uvloop comes with the `fast` extra (`pip install 'closeproxy[fast]'`). The event_loop
setting picks: auto (uvloop when importable), asyncio (the standard loop, for a
comparison or a platform where uvloop misbehaves) or uvloop (an error when missing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ConfigError
from .settings import Settings

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(settings: Settings) -> LoopFactory | None:
    """uvloop's loop factory when it is chosen (or auto and installed), else None."""
    if settings.event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if settings.event_loop == "uvloop":
            raise ConfigError(
                f"event loop uvloop (from {settings.source('event_loop')}) is not installed: "
                "install it with pip install 'closeproxy[fast]', or use --event-loop auto",
                setting="event_loop",
            ) from None
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """ "uvloop" or "asyncio", for the start-up line."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(settings: Settings, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """asyncio.run of main() on the loop the settings choose (chosen before main exists,
    so a refusal leaves no coroutine never awaited)."""
    factory = loop_factory(settings)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())
