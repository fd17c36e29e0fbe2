"""Signal handling, in one place: a callback on the event loop while a block runs.

    with on_signals(STOP_SIGNALS, lambda signum: stop.set()):
        ...

The callback runs on the loop (never inside a signal handler), so it may touch asyncio
objects. On leaving the block the signals go back to what they did before: an outer
`on_signals` block's callback, or the process's handler from before the loop took them
(the default, or SIG_IGN under nohup).

`run_until_signal` runs a command's coroutine so that SIGTERM and SIGHUP end it the way
Ctrl-C does, raising `Stopped` once it has cleaned up.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

# A terminal closing (SIGHUP) stops the proxy as cleanly as Ctrl-C or `kill`.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

SignalCallback = Callable[[signal.Signals], None]

# Per loop and signal, the callbacks of the blocks still open, innermost last.
_installed: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[signal.Signals, list[SignalCallback]]
] = weakref.WeakKeyDictionary()
# Per loop and signal, the process's handler from before the first block took it.
_before: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[signal.Signals, Any]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.contextmanager
def on_signals(signals: Iterable[signal.Signals], callback: SignalCallback) -> Iterator[None]:
    """Call `callback(signum)` on the running loop for each of `signals` inside the block."""
    loop = asyncio.get_running_loop()
    wanted = tuple(signals)
    stacks = _installed.setdefault(loop, {})
    before = _before.setdefault(loop, {})
    for signum in wanted:
        stack = stacks.setdefault(signum, [])
        if not stack:
            before[signum] = signal.getsignal(signum)
        stack.append(callback)
        loop.add_signal_handler(signum, callback, signum)
    try:
        yield
    finally:
        for signum in wanted:
            stack = stacks[signum]
            stack.remove(callback)
            if stack:
                outer = stack[-1]
                loop.add_signal_handler(signum, outer, signum)
                continue
            loop.remove_signal_handler(signum)
            previous = before.pop(signum, None)
            if _restorable(previous):
                signal.signal(signum, previous)


class Stopped(Exception):
    """A command was stopped by a signal after cleaning up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_until_signal(main: Coroutine[object, object, int]) -> int:
    """asyncio.run, where SIGTERM and SIGHUP end the command the way Ctrl-C does.

    The main task is cancelled, so a refresh already sent to Close still finishes and
    saves the new refresh token before the process exits.
    """
    received: list[int] = []

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        with on_signals(
            (signal.SIGTERM, signal.SIGHUP), lambda signum: _cancel(task, signum, received)
        ):
            return await main

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        if received:
            raise Stopped(received[0]) from None
        raise


def _cancel(task: asyncio.Task[int], signum: int, received: list[int]) -> None:
    received.append(signum)
    task.cancel()


def _restorable(handler: Any) -> bool:
    """A handler of the process's own, not asyncio's placeholder for another loop handler
    (which cannot be brought back from here: the signal is left at its default then)."""
    if handler is None:
        return False
    return getattr(handler, "__module__", None) != asyncio.unix_events.__name__
