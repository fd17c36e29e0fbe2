"""Benchmark closeproxy against the bundled simulator; prints figures, never a test.

    python scripts/bench.py stream  [--size 1G] [--chunk 256k] [--json]
    python scripts/bench.py latency [--requests 5000] [--concurrency 10] [--json]
    python scripts/bench.py slow    [--downloads 300] [--uploads 260] [--json]
    python scripts/bench.py ratelimit [--requests 1000] [--limit 20] [--json]
    python scripts/bench.py metrics-cost [--rounds 200000] [--json]

Both start the simulator (`python -m closeproxy.sim`) and `closeproxy serve` as separate
processes on free loopback ports, seed the proxy's token file from the simulator, and
run the same calls directly against the simulator and through the proxy in one run, so
the ratio compares like with like on this machine.

`stream` is the acceptance run for SPEC §4.1 "bodies stream in both directions": the
proxy's peak RSS during a large download and upload, throughput, and whether the first
byte of a slow download reaches the client long before the upstream has finished. It
prints PASS/FAIL lines and exits 0 only if all pass. `latency` prints figures only.
`ratelimit` (SPEC §9) limits one endpoint group at the simulator and sends sequential,
curl-style requests (a new connection each, no retry of a 429) at three times that
limit, direct and through the proxy: it prints the failures of each and the proxy's total
time against the ideal (requests / limit).

Units: sizes in MiB (2**20 bytes); throughput and RSS in MB (10**6 bytes), so the RSS
limit is the stricter reading of "80 MB".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import aiohttp
import psutil

from closeproxy.file_store import FileGrantStore
from closeproxy.grant import TokenSet
from closeproxy.sim import payloads

PATTERN_SEED: Final = b"closeproxy.sim download"
MIB: Final = 1024 * 1024
MB: Final = 1_000_000
SIZE_UNITS: Final[dict[str, int]] = {"": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}
SIZE_PATTERN: Final = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)

SIM_CLIENT_ID: Final = "sim-client"
SIM_CLIENT_SECRET: Final = "sim-secret"
SIM_READY: Final = re.compile(r"^simulator listening on (http://\S+)", re.MULTILINE)
PROXY_READY: Final = re.compile(r"^listening on (http://\S+)", re.MULTILINE)
STARTUP_TIMEOUT: Final = 20.0
# The proxy drains in-flight requests on SIGTERM; a benchmark has none left by then.
STOP_TIMEOUT: Final = 10.0
LOG_TAIL_LINES: Final = 20

RSS_INTERVAL: Final = 0.05
PROGRESS_EVERY: Final = 256 * MIB
DOWNLOAD_PATH: Final = "/api/v1/_sim/download"
UPLOAD_PATH: Final = "/api/v1/_sim/upload"
ME_PATH: Final = "/api/v1/me/"
WARMUP_MIN: Final = 500
# "First byte long before the last": at most this fraction of the time to the last byte.
FIRST_BYTE_FRACTION: Final = 0.25
FIRST_BYTE_CHUNK: Final = 65536
CLIENT_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)


class BenchError(Exception):
    """The benchmark could not run or a transfer went wrong."""


def parse_size(text: str) -> int:
    """`1G`, `256k`, `512MiB`, `1048576` -> bytes (binary units)."""
    match = SIZE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G, 256k, 65536)")
    size = int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def parse_chunk(text: str) -> int:
    size = parse_size(text)
    if size > payloads.MAX_CHUNK:
        raise argparse.ArgumentTypeError(
            f"at most {payloads.MAX_CHUNK // 1024}k, the simulator's largest chunk"
        )
    return size


def say(line: str = "") -> None:
    print(line, flush=True)


# --- child processes ---------------------------------------------------------------


@dataclass
class Child:
    """A simulator or proxy process whose output goes to files in the work directory."""

    name: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    url: str = ""
    stopped_by: str = ""

    @classmethod
    def spawn(cls, name: str, argv: list[str], env: dict[str, str], workdir: Path) -> Child:
        stdout_path = workdir / f"{name}.stdout"
        stderr_path = workdir / f"{name}.stderr"
        # Files, not pipes: a chatty access log must never block the child on a full pipe.
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        return cls(name, process, stdout_path, stderr_path)

    def wait_ready(self, ready: re.Pattern[str], timeout: float = STARTUP_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = ready.search(self.stdout_path.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return self.url
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.process.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            time.sleep(0.05)
        raise BenchError(f"{self.name} was not ready within {timeout:g} s:\n" + self.log_tail())

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        tail = text.splitlines()[-lines:]
        return (
            "\n".join(f"    {self.name}| {line}" for line in tail)
            or f"    ({self.name}: no output)"
        )

    def stop(self) -> int:
        """SIGTERM, then kill if it will not go; safe to call more than once."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
                self.stopped_by = "SIGTERM"
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.stopped_by = f"kill (no exit {STOP_TIMEOUT:g} s after SIGTERM)"
        elif not self.stopped_by:
            self.stopped_by = "had already exited"
        return self.process.returncode


def child_env(extra: dict[str, str]) -> dict[str, str]:
    # The caller's own CLOSEPROXY_* settings must not leak into the benchmark's proxy.
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLOSEPROXY_")}
    return {**base, "PYTHONUNBUFFERED": "1", **extra}


def seed_tokens(sim_url: str, token_file: Path) -> TokenSet:
    """Log in at the simulator without a browser and store the grant as `login` would."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore http_proxy
    request = urllib.request.Request(sim_url + "/_sim/issue", data=b"", method="POST")
    with opener.open(request, timeout=10) as reply:
        document = json.load(reply)
    tokens = TokenSet.from_reply(document, received_at=time.time(), api_url=sim_url)
    FileGrantStore(token_file).write(tokens)
    return tokens


@dataclass
class Rig:
    """The simulator and a proxy logged in to it, both running."""

    sim: Child
    proxy: Child
    access_token: str

    @property
    def children(self) -> tuple[Child, ...]:
        return (self.proxy, self.sim)

    def require_running(self) -> None:
        """Fail loudly if a child died: later figures would only say "connection refused"."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise BenchError(f"the {child.name} exited (code {code}) during the benchmark")

    def stop(self) -> dict[str, Any]:
        """Stop the proxy first (it talks to the simulator), then the simulator."""
        return {
            child.name: {"exit": child.stop(), "stopped_by": child.stopped_by}
            for child in self.children
        }


@contextlib.contextmanager
def rig(log_level: str) -> Iterator[Rig]:
    """Start both processes in a private temporary directory; always stop and clean up."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="closeproxy-bench-")))
        sim = Child.spawn(
            "simulator",
            [sys.executable, "-m", "closeproxy.sim", "--port", "0"],
            child_env({}),
            workdir,
        )
        stack.callback(sim.stop)
        sim.wait_ready(SIM_READY)
        token_file = workdir / "tokens.json"
        tokens = seed_tokens(sim.url, token_file)
        env = {
            "CLOSEPROXY_API_URL": sim.url,
            "CLOSEPROXY_APP_URL": sim.url,
            "CLOSEPROXY_CLIENT_ID": SIM_CLIENT_ID,
            "CLOSEPROXY_CLIENT_SECRET": SIM_CLIENT_SECRET,
            "CLOSEPROXY_TOKEN_FILE": str(token_file),
            "CLOSEPROXY_PORT": "0",
            "CLOSEPROXY_LOG_LEVEL": log_level,
        }
        proxy = Child.spawn(
            "proxy",
            [sys.executable, "-m", "closeproxy", "serve", "--port", "0"],
            child_env(env),
            workdir,
        )
        stack.callback(proxy.stop)
        proxy.wait_ready(PROXY_READY)
        say(
            f"simulator {sim.url} (pid {sim.process.pid}), "
            f"proxy {proxy.url} (pid {proxy.process.pid})"
        )
        try:
            yield Rig(sim, proxy, tokens.access_token)
        except Exception:
            say("proxy log tail:\n" + proxy.log_tail())
            raise


# --- memory sampling ---------------------------------------------------------------


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


# --- streaming transfers -----------------------------------------------------------


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
    """A request body produced chunk by chunk from the simulator's pattern; never whole."""

    def __init__(self, size: int, chunk: int, progress: Progress) -> None:
        self._size = size
        self._chunk = chunk
        self._progress = progress
        self.digest = hashlib.sha256()
        self.sent = 0

    async def chunks(self) -> AsyncIterator[memoryview]:
        for piece in pattern_chunks(self._size, self._chunk):
            self.digest.update(piece)
            self.sent += len(piece)
            self._progress.update(self.sent)
            yield piece


async def upload(
    client: aiohttp.ClientSession, target: Target, *, size: int, chunk: int
) -> Transfer:
    """POST size bytes from a generator (chunked); the simulator reports what it got."""
    label = f"upload {target.name}"
    transfer = Transfer(label, size)
    with measured(transfer, target.proxy_pid) as rss:
        source = UploadSource(size, chunk, Progress(label, size, rss))
        url = target.base + UPLOAD_PATH
        async with client.post(url, data=source.chunks(), headers=target.headers) as reply:
            if reply.status != 200:
                raise BenchError(f"HTTP {reply.status}: {(await reply.text())[:200]}")
            document = await reply.json()
        transfer.expected_sha256 = source.digest.hexdigest()
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


@dataclass
class Checks:
    """PASS/FAIL lines; the exit status is 0 only if every one passed."""

    results: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.results.append((name, ok, detail))

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.results)

    def print(self) -> None:
        for name, ok, detail in self.results:
            say(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")

    def summary(self) -> dict[str, bool]:
        return {name: ok for name, ok, _ in self.results}


def rss_check(checks: Checks, transfer: Transfer, limit_mb: float) -> None:
    peak = transfer.peak_rss
    ok = peak is not None and not transfer.error and peak < limit_mb * MB
    detail = "not measured" if peak is None else f"peak {peak / MB:.1f} MB"
    if transfer.error:
        detail += " but the transfer failed, so the peak proves nothing"
    checks.add(f"{transfer.label} peak RSS < {limit_mb:g} MB", ok, detail)


def session(limit: int = 100, read_bufsize: int = 2**16) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=CLIENT_TIMEOUT,
        read_bufsize=read_bufsize,
        auto_decompress=False,
        trust_env=False,
    )


@dataclass(frozen=True)
class Target:
    """Where a transfer goes: straight to the simulator, or through the proxy."""

    name: str  # "direct" or "proxy"
    base: str
    headers: dict[str, str]
    proxy_pid: int | None  # whose RSS to sample; None for direct


def targets(rig: Rig) -> tuple[Target, Target]:
    # Direct calls carry the token themselves; through the proxy they carry nothing.
    bearer = {"Authorization": f"Bearer {rig.access_token}"}
    return (
        Target("direct", rig.sim.url, bearer, None),
        Target("proxy", rig.proxy.url, {}, rig.proxy.process.pid),
    )


async def stream_figures(args: argparse.Namespace, rig: Rig, checks: Checks) -> dict[str, Any]:
    size: int = args.size
    chunk: int = args.chunk
    both = targets(rig)
    say(f"expected sha256 of the {size / MIB:.0f} MiB download: computing…")
    expected = await asyncio.to_thread(pattern_sha256, size)
    say(f"  {expected}")
    slow_size = args.first_byte_chunks * FIRST_BYTE_CHUNK
    slow_sha = pattern_sha256(slow_size)
    upstream_time = (args.first_byte_chunks - 1) * args.first_byte_delay

    downloads: dict[str, Transfer] = {}
    uploads: dict[str, Transfer] = {}
    slow_runs: dict[str, FirstByte] = {}
    async with session(read_bufsize=chunk) as client:
        say(f"download {size / MIB:.0f} MiB, simulator chunk {chunk // 1024} KiB")
        for target in both:
            rig.require_running()
            downloads[target.name] = await download(
                client, target, size=size, chunk=chunk, expected_sha256=expected
            )
        say(f"upload {size / MIB:.0f} MiB from a generator, {chunk // 1024} KiB chunks (chunked)")
        for target in both:
            rig.require_running()
            uploads[target.name] = await upload(client, target, size=size, chunk=chunk)
        say(
            f"slow download: {args.first_byte_chunks} x {FIRST_BYTE_CHUNK // 1024} KiB, "
            f"{args.first_byte_delay * 1000:g} ms apart (upstream needs ~{upstream_time:.2f} s)"
        )
        for target in both:
            rig.require_running()
            slow_runs[target.name] = await first_byte(
                client,
                target,
                chunks=args.first_byte_chunks,
                delay=args.first_byte_delay,
                expected_sha256=slow_sha,
            )
    down_direct, down_proxy = downloads["direct"], downloads["proxy"]
    up_direct, up_proxy = uploads["direct"], uploads["proxy"]
    slow_direct, slow_proxy = slow_runs["direct"], slow_runs["proxy"]

    say("ratios (proxy / direct)")
    for name, via_proxy, straight in (
        ("download", down_proxy, down_direct),
        ("upload", up_proxy, up_direct),
    ):
        if not (via_proxy.intact and straight.intact):
            say(f"  {name:<8} n/a (a transfer failed)")
            continue
        ratio = via_proxy.mb_per_s / straight.mb_per_s
        say(f"  {name:<8} {via_proxy.mb_per_s:7.1f} / {straight.mb_per_s:7.1f} MB/s = {ratio:.2f}")

    for transfer in (down_direct, down_proxy, up_direct, up_proxy):
        checks.add(
            f"{transfer.label} bytes and sha256 match",
            transfer.intact,
            "ok" if transfer.intact else transfer.problem(),
        )
    rss_check(checks, down_proxy, args.rss_limit)
    rss_check(checks, up_proxy, args.rss_limit)
    for slow in (slow_direct, slow_proxy):
        checks.add(f"{slow.label} bytes and sha256 match", slow.intact, slow.error or "ok")
    first = "never" if slow_proxy.first is None else f"{slow_proxy.first * 1000:.0f} ms"
    checks.add(
        f"first byte through the proxy before {FIRST_BYTE_FRACTION:.0%} of the last byte's time",
        slow_proxy.streamed,
        f"first {first}, last {slow_proxy.last * 1000:.0f} ms "
        f"(limit {FIRST_BYTE_FRACTION * slow_proxy.last * 1000:.0f} ms)",
    )
    return {
        "size": size,
        "chunk": chunk,
        "cpus": os.cpu_count(),
        "download": {"direct": down_direct.summary(), "proxy": down_proxy.summary()},
        "upload": {"direct": up_direct.summary(), "proxy": up_proxy.summary()},
        "first_byte": {"direct": slow_direct.summary(), "proxy": slow_proxy.summary()},
    }


def cmd_stream(args: argparse.Namespace) -> int:
    checks = Checks()
    with rig(args.log_level) as running:
        figures = asyncio.run(stream_figures(args, running, checks))
        shutdown = running.stop()
    say()
    checks.print()
    report_shutdown(shutdown)
    verdict = "PASS" if checks.passed else "FAIL"
    say(
        f"{verdict}  streaming acceptance ({sum(ok for _, ok, _ in checks.results)}"
        f"/{len(checks.results)} checks)"
    )
    if args.json:
        say(
            json.dumps(
                {
                    "bench": "stream",
                    **figures,
                    "checks": checks.summary(),
                    "passed": checks.passed,
                    "shutdown": shutdown,
                }
            )
        )
    return 0 if checks.passed else 1


def report_shutdown(shutdown: dict[str, Any]) -> None:
    for name, how in shutdown.items():
        say(f"info  {name} stopped: exit {how['exit']} ({how['stopped_by']})")


# --- latency -----------------------------------------------------------------------


@dataclass
class LatencyRun:
    """Many small GETs with a fixed number in flight."""

    label: str
    latencies: list[float]
    seconds: float
    errors: int

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile, seconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]

    def line(self) -> str:
        ms = {name: self.percentile(q) * 1000 for name, q in PERCENTILES.items()}
        return (
            f"  {self.label:<7} {self.rate:8.0f} req/s, "
            + ", ".join(f"{name} {value:6.2f} ms" for name, value in ms.items())
            + f", max {max(self.latencies, default=float('nan')) * 1000:6.2f} ms"
            + f", errors {self.errors}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies),
            "errors": self.errors,
            "req_per_s": round(self.rate, 1),
            **{
                f"{name}_ms": round(self.percentile(q) * 1000, 3) for name, q in PERCENTILES.items()
            },
        }


PERCENTILES: Final[dict[str, float]] = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


async def hammer(
    client: aiohttp.ClientSession, target: Target, *, requests: int, concurrency: int
) -> LatencyRun:
    """GET /api/v1/me/ `requests` times with `concurrency` in flight; time each one."""
    url = target.base + ME_PATH
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))

    async def worker() -> None:
        nonlocal errors
        for _ in remaining:  # shared: each request is taken by exactly one worker
            start = time.perf_counter()
            try:
                async with client.get(url, headers=target.headers) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LatencyRun(target.name, latencies, time.perf_counter() - start, errors)


async def latency_figures(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    both = targets(rig)
    # Pools, caches and the first token check settle in the warm-up; it is not measured.
    warmup = min(args.requests, max(args.concurrency * 50, WARMUP_MIN))
    say(
        f"GET {ME_PATH}: {args.requests} requests per target, concurrency {args.concurrency}, "
        f"{warmup} warm-up requests first, {os.cpu_count()} CPUs, proxy log level {args.log_level}"
    )
    runs: dict[str, LatencyRun] = {}
    proxy_process = psutil.Process(rig.proxy.process.pid)
    cpu_per_request = 0.0
    async with session(limit=args.concurrency) as client:
        for target in both:
            await hammer(client, target, requests=warmup, concurrency=args.concurrency)
        for target in both:
            rig.require_running()
            cpu_before = proxy_process.cpu_times()
            run = await hammer(client, target, requests=args.requests, concurrency=args.concurrency)
            cpu_after = proxy_process.cpu_times()
            runs[target.name] = run
            say(run.line())
            if target.name == "proxy" and run.latencies:
                # CPU the proxy process spent per request: steadier than req/s on a busy
                # machine, so it is the figure to compare two builds of the proxy by.
                spent = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
                cpu_per_request = spent / len(run.latencies)
                say(f"  proxy CPU per request: {cpu_per_request * 1e6:.0f} us (user + system)")
    direct, proxy = runs["direct"], runs["proxy"]
    added = {
        name: (proxy.percentile(q) - direct.percentile(q)) * 1000 for name, q in PERCENTILES.items()
    }
    ratio = proxy.rate / direct.rate if direct.rate else 0.0
    say(
        "  added by the proxy: "
        + ", ".join(f"{name} {value:+.2f} ms" for name, value in added.items())
        + f"; throughput {ratio:.2f}x direct"
    )
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "cpus": os.cpu_count(),
        "direct": direct.summary(),
        "proxy": proxy.summary(),
        "added_ms": {name: round(value, 3) for name, value in added.items()},
        "throughput_ratio": round(ratio, 3),
        "proxy_cpu_us_per_request": round(cpu_per_request * 1e6, 1),
    }


def cmd_latency(args: argparse.Namespace) -> int:
    with rig(args.log_level) as running:
        figures = asyncio.run(latency_figures(args, running))
        shutdown = running.stop()
    report_shutdown(shutdown)
    if args.json:
        say(json.dumps({"bench": "latency", **figures, "shutdown": shutdown}))
    failed = figures["direct"]["errors"] or figures["proxy"]["errors"]
    return 1 if failed else 0


# --- slow clients ------------------------------------------------------------------


async def open_slow_clients(
    host: str, port: int, downloads: int, uploads: int
) -> list[asyncio.StreamWriter]:
    """Downloads nobody reads and 5 MB uploads that have sent 1 kB: raw sockets."""
    writers: list[asyncio.StreamWriter] = []
    for index in range(downloads + uploads):
        _, writer = await asyncio.open_connection(host, port)
        if index < downloads:
            head = f"GET {DOWNLOAD_PATH}?bytes=1000000000&chunk=65536 HTTP/1.1\r\n"
            body = b""
        else:
            head = f"POST {UPLOAD_PATH} HTTP/1.1\r\nContent-Length: 5000000\r\n"
            body = b"u" * 1000
        writer.write(f"{head}Host: {host}:{port}\r\n\r\n".encode() + body)
        writers.append(writer)
    return writers


async def trickle(writers: list[asyncio.StreamWriter], every: float) -> None:
    """One byte per upload every `every` seconds, never a pause near a timeout."""
    while True:
        for writer in writers:
            if not writer.is_closing():
                writer.write(b"u")
        await asyncio.sleep(every)


async def probe(client: aiohttp.ClientSession, base: str, count: int) -> list[tuple[int, float]]:
    """`count` ordinary GETs one after another: (status, seconds) each; 0 = no answer."""
    results: list[tuple[int, float]] = []
    for _ in range(count):
        started = time.perf_counter()
        try:
            async with client.get(base + ME_PATH) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        results.append((status, time.perf_counter() - started))
    return results


async def slow_client_figures(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    url = rig.proxy.url
    host, _, port_text = url.removeprefix("http://").rpartition(":")
    timeout = aiohttp.ClientTimeout(total=args.probe_timeout)
    say(
        f"{args.downloads} downloads nobody reads + {args.uploads} uploads trickling 1 byte "
        f"every {args.trickle_every:g} s; then {args.probes} ordinary GETs {ME_PATH}"
    )
    sampler = RssSampler(rig.proxy.process.pid)
    baseline = sampler.rss()
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as client:
        with sampler:
            writers = await open_slow_clients(host, int(port_text), args.downloads, args.uploads)
            trickling = asyncio.create_task(trickle(writers[args.downloads :], args.trickle_every))
            try:
                await asyncio.sleep(args.settle)
                rig.require_running()
                results = await probe(client, url, args.probes)
                async with client.get(url + "/admin/status") as resp:
                    counters = (await resp.json())["counters"]
            finally:
                trickling.cancel()
                for writer in writers:
                    writer.transport.abort()
        await asyncio.sleep(2)  # the proxy lets go of the cut transfers
        after = sampler.rss()
    ok = [seconds for status, seconds in results if status == 200]
    statuses = sorted({status for status, _ in results})
    say(
        f"  ordinary GETs: {len(ok)}/{len(results)} answered 200 (statuses {statuses}); "
        f"slowest {max(seconds for _, seconds in results) * 1000:.0f} ms, "
        f"median {sorted(seconds for _, seconds in results)[len(results) // 2] * 1000:.0f} ms"
    )
    say(
        f"  proxy RSS: baseline {baseline / MB:.1f} MB, peak {sampler.peak / MB:.1f} MB, "
        f"2 s after the slow clients left {after / MB:.1f} MB"
    )
    say(
        f"  counters: slow_clients_cut {counters.get('slow_clients_cut')}, "
        f"proxy_busy {counters.get('proxy_busy')}, upstream_errors {counters['upstream_errors']}"
    )
    return {
        "downloads": args.downloads,
        "uploads": args.uploads,
        "probes": [{"status": status, "seconds": round(s, 4)} for status, s in results],
        "rss_mb": {
            "baseline": round(baseline / MB, 1),
            "peak": round(sampler.peak / MB, 1),
            "after": round(after / MB, 1),
        },
        "counters": counters,
        "all_ok": len(ok) == len(results),
    }


def cmd_slow(args: argparse.Namespace) -> int:
    # Our side holds every slow socket: lift this process's own open-file limit first.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with rig(args.log_level) as running:
        figures = asyncio.run(slow_client_figures(args, running))
        shutdown = running.stop()
    report_shutdown(shutdown)
    if args.json:
        say(json.dumps({"bench": "slow", **figures, "shutdown": shutdown}))
    say(f"{'PASS' if figures['all_ok'] else 'FAIL'}  every ordinary GET answered 200")
    return 0 if figures["all_ok"] else 1


# --- rate limits (SPEC §9) -----------------------------------------------------------

RATELIMIT_GROUP: Final = "GET lead"
RATELIMIT_PATH: Final = "/api/v1/lead/?_limit=1&_fields=id"


@dataclass
class PacedRun:
    """Sequential requests, each started no earlier than its slot at the offered rate."""

    label: str
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failures(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)

    def line(self) -> str:
        seen = ", ".join(f"{status}: {count}" for status, count in sorted(self.statuses.items()))
        return f"  {self.label:<7} {self.seconds:7.2f} s, failures {self.failures} ({seen})"


async def paced(target: Target, *, requests: int, rate: float) -> PacedRun:
    """Like a shell loop of curl calls: one connection per request, a 429 is a failure."""
    run = PacedRun(target.name)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=CLIENT_TIMEOUT, trust_env=False
    ) as client:
        start = time.perf_counter()
        for index in range(requests):
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                async with client.get(target.base + RATELIMIT_PATH, headers=target.headers) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0  # no answer at all
            run.statuses[status] = run.statuses.get(status, 0) + 1
        run.seconds = time.perf_counter() - start
    return run


async def sim_call(client: aiohttp.ClientSession, rig: Rig, path: str, body: Any) -> Any:
    async with client.request(
        "POST" if body is not None else "GET", rig.sim.url + path, json=body
    ) as reply:
        if reply.status != 200:
            raise BenchError(f"simulator {path} answered {reply.status}: {await reply.text()}")
        return await reply.json()


async def ratelimit_figures(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    offered = 3 * args.limit
    ideal = args.requests / args.limit
    say(
        f"{RATELIMIT_GROUP} limited to {args.limit} per 1 s window at the simulator; "
        f"{args.requests} sequential requests per target offered at {offered}/s, "
        f"a new connection each; {os.cpu_count()} CPUs"
    )
    runs: dict[str, PacedRun] = {}
    stats: dict[str, Any] = {}
    async with session() as control:
        await sim_call(
            control,
            rig,
            "/_sim/control",
            {"group_rate_limits": {RATELIMIT_GROUP: args.limit}, "rate_window": 1.0},
        )
        for target in targets(rig):
            await sim_call(control, rig, "/_sim/reset", {})  # a fresh window for each run
            rig.require_running()
            run = await paced(target, requests=args.requests, rate=offered)
            runs[target.name] = run
            stats[target.name] = (await sim_call(control, rig, "/_sim/stats", None))[
                "rate_groups"
            ].get(RATELIMIT_GROUP, {})
            say(run.line() + f"; simulator saw {stats[target.name]}")
        async with control.get(rig.proxy.url + "/admin/status") as reply:
            proxy_view = (await reply.json())["rate_limits"].get(RATELIMIT_GROUP, {})
    proxy = runs["proxy"]
    over = proxy.seconds / ideal - 1
    say(
        f"  failures direct {runs['direct'].failures}, through the proxy {proxy.failures}; "
        f"proxy total {proxy.seconds:.2f} s vs ideal {ideal:.2f} s ({over:+.1%}); "
        f"proxy counted {proxy_view.get('waits')} waits, "
        f"{proxy_view.get('waited_seconds')} s waited, "
        f"{proxy_view.get('passed_through')} 429s passed through"
    )
    return {
        "requests": args.requests,
        "limit": args.limit,
        "offered_per_s": offered,
        "ideal_s": round(ideal, 3),
        "direct": {
            "seconds": round(runs["direct"].seconds, 3),
            "statuses": runs["direct"].statuses,
        },
        "proxy": {"seconds": round(proxy.seconds, 3), "statuses": proxy.statuses},
        "proxy_over_ideal": round(over, 4),
        "simulator": stats,
        "proxy_rate_limits": proxy_view,
    }


def cmd_ratelimit(args: argparse.Namespace) -> int:
    with rig(args.log_level) as running:
        figures = asyncio.run(ratelimit_figures(args, running))
        shutdown = running.stop()
    report_shutdown(shutdown)
    if args.json:
        say(json.dumps({"bench": "ratelimit", **figures, "shutdown": shutdown}))
    return 0


# --- metrics cost ------------------------------------------------------------------


async def metrics_cost_figures(rounds: int) -> dict[str, float]:
    """The front middleware around a proxied request vs the guard alone, in process.

    Same request, same trivial handler; the difference is what metrics, the request id
    and the dashboard's ring buffer add to every proxied request. (Upstream timing rides
    on the client session's trace hooks and is not in this figure.)
    """
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from closeproxy.app import Front
    from closeproxy.dashboard import Recent
    from closeproxy.guard import Guard
    from closeproxy.metrics import Metrics

    guard = Guard(allowed_hosts=(), proxy_key=None)
    front = Front(guard, Metrics(), Recent()).middleware
    request = make_mocked_request("GET", "/api/v1/me/?x=1", headers={"Host": "127.0.0.1:8730"})
    answer = web.Response(status=200)

    async def handler(request: web.Request) -> web.StreamResponse:
        return answer

    async def bare() -> None:
        if guard.check(request) is None:
            await handler(request)

    async def wrapped() -> None:
        await front(request, handler)

    figures: dict[str, float] = {}
    for name, call in (("guard only", bare), ("front middleware", wrapped)) * 2:
        start = time.process_time()
        for _ in range(rounds):
            await call()
        figures[name] = (time.process_time() - start) / rounds * 1e6  # the second pass counts
    figures["added"] = figures["front middleware"] - figures["guard only"]
    return figures


def cmd_metrics_cost(args: argparse.Namespace) -> int:
    figures = asyncio.run(metrics_cost_figures(args.rounds))
    say(f"per proxied request, CPU, {args.rounds} rounds in process:")
    for name, value in figures.items():
        say(f"  {name:<17} {value:6.2f} us")
    say(
        "  compare 'added' with `latency`'s proxy CPU per request: that ratio is the share "
        "of the proxy's work spent on metrics"
    )
    if args.json:
        say(json.dumps({"bench": "metrics-cost", **{k: round(v, 2) for k, v in figures.items()}}))
    return 0


# --- command line ------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python scripts/bench.py",
        description="Benchmark closeproxy against the simulator (separate processes, loopback).",
    )
    commands = top.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="also print a JSON summary line last")
    common.add_argument(
        "--log-level",
        default="info",
        help="the proxy's CLOSEPROXY_LOG_LEVEL (default: %(default)s)",
    )

    stream = commands.add_parser(
        "stream",
        parents=[common],
        help="1 GiB download and upload: proxy RSS, throughput, first byte (PASS/FAIL)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    stream.add_argument("--size", type=parse_size, default="1G", help="bytes each way (1G, 512M)")
    stream.add_argument(
        "--chunk", type=parse_chunk, default="256k", help="simulator and upload chunk size"
    )
    stream.add_argument("--rss-limit", type=float, default=80.0, help="proxy peak RSS limit, MB")
    stream.add_argument(
        "--first-byte-chunks", type=int, default=40, help="64 KiB chunks in the slow download"
    )
    stream.add_argument(
        "--first-byte-delay", type=float, default=0.05, help="seconds between slow chunks"
    )
    stream.set_defaults(run=cmd_stream)

    latency = commands.add_parser(
        "latency",
        parents=[common],
        help="small GETs of /api/v1/me/ direct vs through the proxy",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    latency.add_argument("--requests", type=int, default=5000, help="measured requests per target")
    latency.add_argument("--concurrency", type=int, default=10, help="requests in flight")
    latency.set_defaults(run=cmd_latency)

    slow = commands.add_parser(
        "slow",
        parents=[common],
        help="non-reading downloads and trickling uploads, then ordinary GETs (PASS/FAIL)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    slow.add_argument("--downloads", type=int, default=300, help="downloads nobody reads")
    slow.add_argument("--uploads", type=int, default=260, help="uploads that trickle")
    slow.add_argument("--trickle-every", type=float, default=0.5, help="seconds between bytes")
    slow.add_argument("--settle", type=float, default=5.0, help="seconds before the probes")
    slow.add_argument("--probes", type=int, default=20, help="ordinary GETs, one at a time")
    slow.add_argument("--probe-timeout", type=float, default=30.0, help="seconds per GET")
    slow.set_defaults(run=cmd_slow)

    ratelimit = commands.add_parser(
        "ratelimit",
        parents=[common],
        help="sequential requests at 3x a group's limit: failures and time, direct vs proxy",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ratelimit.add_argument("--requests", type=int, default=1000, help="requests per target")
    ratelimit.add_argument(
        "--limit", type=int, default=20, help="the group's limit per second at the simulator"
    )
    ratelimit.set_defaults(run=cmd_ratelimit)

    cost = commands.add_parser(
        "metrics-cost",
        parents=[common],
        help="CPU the metrics, request id and recent-requests buffer add to a proxied request",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cost.add_argument("--rounds", type=int, default=200_000, help="requests per variant")
    cost.set_defaults(run=cmd_metrics_cost)
    return top


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM would otherwise end the benchmark without its cleanup, orphaning both children.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        status: int = args.run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    raise SystemExit(main())
