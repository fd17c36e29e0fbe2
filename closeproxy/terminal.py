"""The terminal side of a login: the browser, the prompt line with its countdown, stdin.

The prompt line stays open (no newline) while the user may paste; a message meanwhile
goes on its own line and the prompt is drawn again after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import webbrowser
from typing import TextIO

# On a terminal, the countdown in front of the prompt is redrawn this often.
TICK = 1.0
# DEC save / restore cursor: the countdown is redrawn without moving what the user typed.
_SAVE, _RESTORE, _CLEAR_LINE = "\0337", "\0338", "\r\033[K"


def can_open_browser() -> bool:
    """Only where a graphical browser can appear: a console browser would take the terminal."""
    return bool(
        os.environ.get("BROWSER")
        or os.environ.get("DISPLAY")
        or os.environ.get("WAYLAND_DISPLAY")
        or sys.platform in {"darwin", "win32"}
    )


async def open_browser(url: str) -> bool:
    if not can_open_browser():
        return False
    try:
        return await asyncio.to_thread(webbrowser.open, url)
    except webbrowser.Error:
        return False


class Prompt:
    """Messages to `err`, and the prompt line on a terminal with its countdown."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.is_open = False  # the prompt line is drawn and has no newline yet
        self.deadline = 0.0
        self.listening = False

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    @property
    def on_terminal(self) -> bool:
        return sys.stdin.isatty() and self.err.isatty()

    def note(self, text: str) -> None:
        """A message while the prompt may be open: on its own line, then the prompt again."""
        if not self.is_open:
            self.say(text)
            return
        self.err.write(_CLEAR_LINE)
        self.say(text)
        self.show()

    def stamp(self, deadline: float) -> str:
        left = max(int(deadline - asyncio.get_running_loop().time() + 0.999), 0)
        return f"[{left // 60:>2}:{left % 60:02} left]"

    def show(self) -> None:
        ask = (
            "paste the address here, or wait for the browser" if self.listening else "paste it here"
        )
        self.err.write(f"{self.stamp(self.deadline)} {ask} (Ctrl-C cancels): ")
        self.err.flush()
        self.is_open = True

    def close(self, *, erase: bool) -> None:
        if not self.is_open:
            return
        self.is_open = False
        self.err.write(_CLEAR_LINE if erase else "\n")
        self.err.flush()
        if erase:
            discard_typed_input()

    async def tick(self, deadline: float) -> None:
        while True:
            await asyncio.sleep(TICK)
            if self.is_open:
                self.err.write(f"{_SAVE}\r{self.stamp(deadline)}{_RESTORE}")
                self.err.flush()


def discard_typed_input() -> None:
    """Half-typed input must not reach the shell once the browser has answered."""
    with contextlib.suppress(Exception):
        import termios

        termios.tcflush(sys.stdin.fileno(), termios.TCIFLUSH)


class StdinLines:
    """Lines from stdin, read by a daemon thread (a blocked read never holds up exit)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = loop
        threading.Thread(target=self._read, name="closeproxy-stdin", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                line = sys.stdin.readline()
            except (OSError, ValueError):
                line = ""
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                self._loop.call_soon_threadsafe(self._queue.put_nowait, line or None)
            if not line:
                return

    async def get(self) -> str | None:
        """The next line; None at the end of input."""
        return await self._queue.get()
