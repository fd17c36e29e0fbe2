"""CPU time and resident memory of a process and its children, read from /proc."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

import psutil

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
PAGE: Final = os.sysconf("SC_PAGE_SIZE")


def tree(pid: int) -> list[int]:
    """The process and its children (nginx's workers, say); [] once it is gone."""
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the tree so far (utime and stime in /proc/PID/stat)."""
    ticks = 0
    for member in tree(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{member}/stat").read_text()
            # After "(comm)": state is field 3, utime 14 and stime 15 (proc(5)).
            fields = stat.rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of the tree (the second field of /proc/PID/statm, in pages)."""
    pages = 0
    for member in tree(pid):
        with contextlib.suppress(OSError):
            pages += int(Path(f"/proc/{member}/statm").read_text().split()[1])
    return pages * PAGE
