"""One load run against a URL: wrk when installed, else a built-in aiohttp generator."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Final

import aiohttp

from benchlib.common import BenchError, session

WRK: Final = "/usr/bin/wrk"
UNITS: Final[dict[str, float]] = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
WRK_TOTAL: Final = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
WRK_P50: Final = re.compile(r"^\s*50(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\b", re.MULTILINE)
WRK_NON_2XX: Final = re.compile(r"Non-2xx or 3xx responses: (\d+)")
WRK_SOCKET_ERRORS: Final = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+)")


@dataclass(frozen=True)
class Load:
    """What one run achieved."""

    requests: int  # answered with 2xx or 3xx
    seconds: float
    p50: float  # seconds
    errors: int  # other statuses and socket errors

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def find_wrk(choice: str) -> str | None:
    """The wrk binary for `--load auto|wrk`, None for the built-in generator."""
    if choice == "builtin":
        return None
    found = WRK if os.access(WRK, os.X_OK) else shutil.which("wrk")
    if found is None and choice == "wrk":
        raise BenchError(f"--load wrk, but there is no wrk at {WRK} or on PATH")
    return found


def run(
    wrk: str | None, url: str, headers: dict[str, str], *, connections: int, seconds: float
) -> Load:
    if wrk is None:
        return asyncio.run(builtin(url, headers, connections=connections, seconds=seconds))
    return run_wrk(wrk, url, headers, connections=connections, seconds=seconds)


def run_wrk(
    wrk: str, url: str, headers: dict[str, str], *, connections: int, seconds: float
) -> Load:
    threads = max(1, min(connections, os.cpu_count() or 1))
    argv = [wrk, "-t", str(threads), "-c", str(connections), "--latency", "--timeout", "10s"]
    argv += ["-d", f"{max(1, math.ceil(seconds))}s"]  # wrk takes whole seconds only
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return parse_wrk(done.stdout)


def parse_wrk(text: str) -> Load:
    total, p50 = WRK_TOTAL.search(text), WRK_P50.search(text)
    if total is None or p50 is None:
        raise BenchError(f"cannot read wrk's output:\n{text}")
    non_2xx = WRK_NON_2XX.search(text)
    sockets = WRK_SOCKET_ERRORS.search(text)
    failed = int(non_2xx.group(1)) if non_2xx else 0
    errors = failed + (sum(int(n) for n in sockets.groups()) if sockets else 0)
    return Load(
        requests=int(total.group(1)) - failed,
        seconds=float(total.group(2)) * UNITS[total.group(3)],
        p50=float(p50.group(1)) * UNITS[p50.group(2)],
        errors=errors,
    )


async def builtin(url: str, headers: dict[str, str], *, connections: int, seconds: float) -> Load:
    """`connections` workers GET `url` back to back for `seconds`; far slower than wrk."""
    latencies: list[float] = []
    errors = 0

    async def worker(client: aiohttp.ClientSession, deadline: float) -> None:
        nonlocal errors
        while (started := time.perf_counter()) < deadline:
            try:
                async with client.get(url, headers=headers) as response:
                    await response.read()
                    ok = response.status < 400
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    async with session(limit=connections) as client:
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(worker(client, deadline) for _ in range(connections)))
        elapsed = time.perf_counter() - start
    p50 = statistics.median(latencies) if latencies else math.nan
    return Load(requests=len(latencies), seconds=elapsed, p50=p50, errors=errors)
