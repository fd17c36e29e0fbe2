"""The proxy's resident memory, sampled on a thread while a transfer runs."""

from __future__ import annotations

import contextlib
import threading
from types import TracebackType
from typing import Final

import psutil

RSS_INTERVAL: Final = 0.05


class RssSampler:
    """Samples a process tree's resident memory every ~50 ms on a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL) -> None:
        self._root = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak = 0
        self.last = 0
        self.samples = 0
        self.gone = False

    def rss(self) -> int:
        """RSS of the process plus its children (bytes); 0 once it is gone."""
        try:
            processes = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            self.gone = True
            return 0
        total = 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def _sample(self) -> None:
        self.last = self.rss()
        self.peak = max(self.peak, self.last)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
