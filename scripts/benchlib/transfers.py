"""Measured downloads, uploads and a slow first byte, checked byte for byte."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from benchlib.common import DOWNLOAD_PATH, MB, MIB, UPLOAD_PATH, BenchError, Target, say
from benchlib.rss import RssSampler
from closeproxy.sim import payloads

PATTERN_SEED: Final = b"closeproxy.sim download"
PROGRESS_EVERY: Final = 256 * MIB
# "First byte long before the last": at most this fraction of the time to the last byte.
FIRST_BYTE_FRACTION: Final = 0.25
FIRST_BYTE_CHUNK: Final = 65536


def pattern_chunks(total: int, chunk: int) -> Iterator[memoryview]:
    """The simulator's download bytes, from its documented definition, not its code.

    Byte i is ``shake_256(b"closeproxy.sim download")[i % PATTERN_PERIOD]`` (see
    closeproxy.sim.payloads). Built independently so that a bug in the simulator's own
    generator shows up as a mismatch instead of being agreed with (this is how a short
    pattern buffer, since fixed, was found: it broke bodies over 22,000,066 bytes).
    """
    period = payloads.PATTERN_PERIOD
    pattern = hashlib.shake_256(PATTERN_SEED).digest(period)
    # Enough repeats that every chunk, wherever it starts in the period, is one slice.
    buffer = memoryview(pattern * (chunk // period + 2))
    offset = 0
    while offset < total:
        size = min(chunk, total - offset)
        start = offset % period
        yield buffer[start : start + size]
        offset += size


def pattern_sha256(total: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern_chunks(total, MIB):
        digest.update(piece)
    return digest.hexdigest()


@dataclass
class Transfer:
    """One measured download or upload."""

    label: str
    expected_bytes: int
    nbytes: int = 0
    seconds: float = 0.0
    sha256: str = ""
    expected_sha256: str = ""
    baseline_rss: int | None = None
    peak_rss: int | None = None
    after_rss: int | None = None  # the proxy's RSS once the transfer was over
    rss_samples: int = 0
    error: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / MB / self.seconds if self.seconds else 0.0

    @property
    def intact(self) -> bool:
        return (
            not self.error
            and self.nbytes == self.expected_bytes
            and self.sha256 == self.expected_sha256
        )

    def line(self) -> str:
        text = f"  {self.label:<16} {self.nbytes / MIB:7.0f} MiB in {self.seconds:6.2f} s"
        text += f" = {self.mb_per_s:7.1f} MB/s"
        if self.peak_rss is not None and self.baseline_rss is not None:
            text += (
                f", proxy RSS baseline {self.baseline_rss / MB:.1f} MB,"
                f" peak {self.peak_rss / MB:.1f} MB ({self.rss_samples} samples)"
            )
        text += ", sha256 ok" if self.intact else f", NOT INTACT: {self.problem()}"
        return text

    def problem(self) -> str:
        if self.error:
            return self.error
        if self.nbytes != self.expected_bytes:
            return f"{self.nbytes} bytes, expected {self.expected_bytes}"
        return f"sha256 {self.sha256[:16]}…, expected {self.expected_sha256[:16]}…"

    def summary(self) -> dict[str, Any]:
        return {
            "bytes": self.nbytes,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.mb_per_s, 1),
            "baseline_rss_mb": None
            if self.baseline_rss is None
            else round(self.baseline_rss / MB, 1),
            "peak_rss_mb": None if self.peak_rss is None else round(self.peak_rss / MB, 1),
            "intact": self.intact,
            "error": self.error or None,
        }


class Progress:
    """Prints a line each time a transfer crosses another PROGRESS_EVERY bytes."""

    def __init__(self, label: str, total: int, rss: RssSampler | None) -> None:
        self._label = label
        self._total = total
        self._rss = rss
        self._next = PROGRESS_EVERY
        self._start = time.perf_counter()

    def update(self, done: int) -> None:
        if done < self._next:
            return
        self._next = (done // PROGRESS_EVERY + 1) * PROGRESS_EVERY
        elapsed = time.perf_counter() - self._start
        line = f"    {self._label} {done // MIB}/{self._total // MIB} MiB, "
        line += f"{done / MB / elapsed if elapsed else 0:.0f} MB/s"
        if self._rss is not None:
            line += f", proxy RSS {self._rss.last / MB:.0f} MB"
        say(line)


@contextlib.contextmanager
def measured(transfer: Transfer, proxy_pid: int | None) -> Iterator[RssSampler | None]:
    """Time the block, sample the proxy's RSS during it, and record failures in `transfer`."""
    sampler = RssSampler(proxy_pid) if proxy_pid is not None else None
    if sampler is not None:
        transfer.baseline_rss = sampler.rss()
    start = time.perf_counter()
    try:
        with sampler if sampler is not None else contextlib.nullcontext():
            yield sampler
    except (aiohttp.ClientError, TimeoutError, BenchError, ValueError) as exc:
        transfer.error = f"{type(exc).__name__}: {exc}"
    finally:
        transfer.seconds = time.perf_counter() - start
        if sampler is not None:
            transfer.peak_rss = sampler.peak
            transfer.rss_samples = sampler.samples
            if sampler.gone:
                transfer.error = transfer.error or "the proxy process went away"
            else:
                transfer.after_rss = sampler.rss() or None
    say(transfer.line())


async def download(
    client: aiohttp.ClientSession, target: Target, *, size: int, chunk: int, expected_sha256: str
) -> Transfer:
    """GET size bytes, hashing as they arrive; nothing is kept."""
    label = f"download {target.name}"
    transfer = Transfer(label, size, expected_sha256=expected_sha256)
    url = f"{target.base}{DOWNLOAD_PATH}?bytes={size}&chunk={chunk}"
    with measured(transfer, target.proxy_pid) as rss:
        progress = Progress(label, size, rss)
        digest = hashlib.sha256()
        async with client.get(url, headers=target.headers) as response:
            if response.status != 200:
                raise BenchError(f"HTTP {response.status}: {(await response.text())[:200]}")
            async for piece in response.content.iter_any():
                digest.update(piece)
                transfer.nbytes += len(piece)
                progress.update(transfer.nbytes)
        transfer.sha256 = digest.hexdigest()
    return transfer


class UploadSource:
    """A request body produced chunk by chunk from the simulator's pattern; never whole.

    Not hashed as it is sent: its digest is the download's, computed beforehand, so that
    the sender spends no CPU the proxy and the receiver compete for on a small machine."""

    def __init__(self, size: int, chunk: int, progress: Progress) -> None:
        self._size = size
        self._chunk = chunk
        self._progress = progress
        self.sent = 0

    async def chunks(self) -> AsyncIterator[memoryview]:
        for piece in pattern_chunks(self._size, self._chunk):
            self.sent += len(piece)
            self._progress.update(self.sent)
            yield piece


async def upload(
    client: aiohttp.ClientSession, target: Target, *, size: int, chunk: int, expected_sha256: str
) -> Transfer:
    """POST size bytes of the pattern from a generator (chunked); the simulator reports
    what it got. `expected_sha256`: the pattern's digest (`pattern_sha256(size)`)."""
    label = f"upload {target.name}"
    transfer = Transfer(label, size, expected_sha256=expected_sha256)
    with measured(transfer, target.proxy_pid) as rss:
        source = UploadSource(size, chunk, Progress(label, size, rss))
        url = target.base + UPLOAD_PATH
        async with client.post(url, data=source.chunks(), headers=target.headers) as reply:
            if reply.status != 200:
                raise BenchError(f"HTTP {reply.status}: {(await reply.text())[:200]}")
            document = await reply.json()
        if source.sent != size:
            raise BenchError(f"the generator produced {source.sent} bytes, not {size}")
        # What the simulator counted and hashed on its side is the figure that matters.
        transfer.nbytes = int(document["bytes"])
        transfer.sha256 = str(document["sha256"])
    return transfer


@dataclass
class FirstByte:
    """Timing of a download the upstream produces slowly."""

    label: str
    expected_bytes: int
    expected_sha256: str
    head: float = 0.0
    first: float | None = None
    last: float = 0.0
    nbytes: int = 0
    sha256: str = ""
    error: str = ""

    @property
    def intact(self) -> bool:
        return not self.error and (self.nbytes, self.sha256) == (
            self.expected_bytes,
            self.expected_sha256,
        )

    @property
    def streamed(self) -> bool:
        return (
            self.intact and self.first is not None and self.first <= FIRST_BYTE_FRACTION * self.last
        )

    def line(self) -> str:
        first = "never" if self.first is None else f"{self.first * 1000:7.0f} ms"
        text = (
            f"  {self.label:<16} head {self.head * 1000:5.0f} ms, first byte {first}, "
            f"last byte {self.last * 1000:7.0f} ms, {self.nbytes} bytes"
        )
        if self.error:
            text += f", ERROR {self.error}"
        elif not self.intact:
            text += ", NOT INTACT"
        return text

    def summary(self) -> dict[str, Any]:
        return {
            "head_ms": round(self.head * 1000, 1),
            "first_byte_ms": None if self.first is None else round(self.first * 1000, 1),
            "last_byte_ms": round(self.last * 1000, 1),
            "bytes": self.nbytes,
            "intact": self.intact,
            "error": self.error or None,
        }


async def first_byte(
    client: aiohttp.ClientSession,
    target: Target,
    *,
    chunks: int,
    delay: float,
    expected_sha256: str,
) -> FirstByte:
    """Time to head, first body byte and last body byte of a deliberately slow download."""
    size = chunks * FIRST_BYTE_CHUNK
    result = FirstByte(f"first byte {target.name}", size, expected_sha256)
    url = f"{target.base}{DOWNLOAD_PATH}?bytes={size}&chunk={FIRST_BYTE_CHUNK}&delay={delay}"
    digest = hashlib.sha256()
    start = time.perf_counter()
    try:
        async with client.get(url, headers=target.headers) as response:
            result.head = time.perf_counter() - start
            if response.status != 200:
                raise BenchError(f"HTTP {response.status}: {(await response.text())[:200]}")
            async for piece in response.content.iter_any():
                if result.first is None and piece:
                    result.first = time.perf_counter() - start
                digest.update(piece)
                result.nbytes += len(piece)
    except (aiohttp.ClientError, TimeoutError, BenchError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.last = time.perf_counter() - start
    result.sha256 = digest.hexdigest()
    say(result.line())
    return result
