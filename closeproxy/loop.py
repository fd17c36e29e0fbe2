"""The event loop a long-running command runs on: uvloop when installed, else asyncio's.

uvloop comes with the `fast` extra (`pip install 'closeproxy[fast]'`); the standard loop
can be forced (for a comparison, or a platform where uvloop misbehaves).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory(*, standard: bool = False) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when it is installed and not refused, else None (asyncio's)."""
    if standard:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """ "uvloop" or "asyncio", for the start-up line."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], *, standard: bool = False) -> T:
    """asyncio.run on the loop loop_factory picks."""
    with asyncio.Runner(loop_factory=loop_factory(standard=standard)) as runner:
        return runner.run(main)
