"""FileGrantStore on a real disk: private modes, atomic saves, clear errors, the lock, kill -9."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import re
import select
import signal
import stat
import statistics
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from closeproxy.errors import TokenStoreError
from closeproxy.file_store import FileGrantStore
from closeproxy.grant import TokenSet

ACCESS = "simacc_0123456789-access-SECRET-abcdefghijklmnopq"
REFRESH = "simref_9876543210-refresh-SECRET-zyxwvutsrqponml"
TEMP_NAME = re.compile(r"\.tokens\.json\..+\.tmp")


def make_tokens(n: int = 1, **changes: Any) -> TokenSet:
    now = time.time()
    fields: dict[str, Any] = {
        "access_token": f"{ACCESS}-{n}",
        "refresh_token": f"{REFRESH}-{n}",
        "expires_at": now + 3600,
        "obtained_at": now,
        "scope": "all.full_access offline_access",
        "organization_id": "orga_1",
        "user_id": "user_1",
        "api_url": "https://api.close.com",
    }
    return TokenSet(**{**fields, **changes})


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# --- saving ---------------------------------------------------------------------------


def test_save_creates_a_private_directory_and_file_whatever_the_umask(token_file: Path) -> None:
    assert not token_file.parent.exists()
    old_umask = os.umask(0)  # the most permissive umask a user could have
    try:
        FileGrantStore(token_file).write(make_tokens())
    finally:
        os.umask(old_umask)
    assert stat.S_ISDIR(os.stat(token_file.parent).st_mode)
    assert mode(token_file.parent) == 0o700
    assert stat.S_ISREG(os.stat(token_file).st_mode)
    assert mode(token_file) == 0o600


def test_save_makes_a_world_readable_token_file_private(token_file: Path) -> None:
    token_file.parent.mkdir()
    token_file.write_text("{}")
    token_file.chmod(0o644)
    FileGrantStore(token_file).write(make_tokens())
    assert mode(token_file) == 0o600


@pytest.mark.parametrize(
    "tokens",
    [
        make_tokens(),
        make_tokens(refresh_token=None, scope="all.full_access"),
        make_tokens(refresh_rejected="invalid_grant"),
    ],
    ids=["full", "no-refresh-token", "rejected"],
)
def test_tokens_round_trip_through_the_file(token_file: Path, tokens: TokenSet) -> None:
    FileGrantStore(token_file).write(tokens)
    assert FileGrantStore(token_file).read() == tokens
    on_disk = json.loads(token_file.read_text())
    assert on_disk["version"] == 1
    assert on_disk["access_token"] == tokens.access_token
    assert on_disk["refresh_token"] == tokens.refresh_token
    assert on_disk["expires_at"] == tokens.expires_at  # absolute, not "expires_in"
    assert on_disk["organization_id"] == "orga_1"
    assert on_disk["user_id"] == "user_1"
    assert on_disk["scope"] == tokens.scope


def test_reprs_never_show_a_token(token_file: Path) -> None:
    store = FileGrantStore(token_file)
    store.write(make_tokens())
    tokens = store.read()
    assert tokens is not None
    shown = [repr(tokens), str(tokens), f"{tokens}", repr(store), str(store), repr([tokens])]
    for text in shown:
        assert "SECRET" not in text, text
    assert str(token_file) in repr(store)
    assert "orga_1" in repr(tokens)  # who it belongs to is fine to show


def test_save_replaces_the_file_by_rename_and_leaves_nothing_behind(token_file: Path) -> None:
    store = FileGrantStore(token_file)
    store.write(make_tokens(1))
    first = os.stat(token_file)
    with open(token_file, "rb") as reader:  # e.g. another process reading right now
        store.write(make_tokens(2))
        old_content = reader.read()
    second = os.stat(token_file)
    assert second.st_ino != first.st_ino
    assert TokenSet.from_json(json.loads(old_content)).access_token == f"{ACCESS}-1"
    loaded = store.read()
    assert loaded is not None
    assert loaded.access_token == f"{ACCESS}-2"
    assert names(token_file.parent) == ["tokens.json"]


def _fail_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = 0

    def half_then_full_disk(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[:20]))  # a partial write first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full_disk)


def _fail_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)


def _fail_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(src: Any, dst: Any) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refused)


FAILURES = [
    pytest.param(_fail_write, "No space left", id="disk-full-mid-write"),
    pytest.param(_fail_fsync, "Input/output error", id="fsync-fails"),
    pytest.param(_fail_replace, "Permission denied", id="rename-refused"),
]


@pytest.mark.parametrize(("break_it", "reason"), FAILURES)
def test_a_failed_save_keeps_the_old_file_and_removes_the_temp_file(
    token_file: Path, monkeypatch: pytest.MonkeyPatch, break_it: Any, reason: str
) -> None:
    store = FileGrantStore(token_file)
    store.write(make_tokens(1))
    old_bytes = token_file.read_bytes()
    break_it(monkeypatch)
    with pytest.raises(TokenStoreError) as info:
        store.write(make_tokens(2))
    monkeypatch.undo()
    message = str(info.value)
    assert str(token_file) in message
    assert reason in message
    assert "--token-file" in message
    assert "SECRET" not in message
    assert token_file.read_bytes() == old_bytes
    assert names(token_file.parent) == ["tokens.json"]


@pytest.mark.parametrize(("break_it", "reason"), FAILURES)
def test_a_failed_first_save_leaves_no_token_file_at_all(
    token_file: Path, monkeypatch: pytest.MonkeyPatch, break_it: Any, reason: str
) -> None:
    break_it(monkeypatch)
    with pytest.raises(TokenStoreError, match=reason):
        FileGrantStore(token_file).write(make_tokens())
    monkeypatch.undo()
    assert names(token_file.parent) == []
    assert FileGrantStore(token_file).read() is None


def test_clear_deletes_the_file_once(token_file: Path) -> None:
    store = FileGrantStore(token_file)
    store.write(make_tokens())
    assert store.delete() is True
    assert not token_file.exists()
    assert store.read() is None
    assert store.delete() is False


# --- loading --------------------------------------------------------------------------


def test_loading_a_missing_file_means_not_logged_in(token_file: Path) -> None:
    store = FileGrantStore(token_file)
    assert store.read() is None
    assert store.read_with_version() == (None, None)
    assert store.version() is None


def _doc(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


BROKEN_FILES = [
    pytest.param(b"", id="empty"),
    pytest.param(f"access_token={ACCESS}\n".encode(), id="not-json"),
    pytest.param(_doc(version=1, access_token=ACCESS, refresh_token=REFRESH)[:-30], id="torn"),
    pytest.param(b"\xff\xfe" + ACCESS.encode(), id="not-utf8"),
    pytest.param(json.dumps([ACCESS, REFRESH]).encode(), id="not-an-object"),
    pytest.param(_doc(version=2, access_token=ACCESS, expires_at=1.0), id="future-version"),
    pytest.param(_doc(access_token=ACCESS, expires_at=1.0), id="no-version"),
    pytest.param(_doc(version=1, refresh_token=REFRESH, expires_at=1.0), id="no-access-token"),
    pytest.param(_doc(version=1, access_token=ACCESS, refresh_token=REFRESH), id="no-expiry"),
    pytest.param(_doc(version=1, access_token=ACCESS, expires_at="soon"), id="bad-expiry"),
    pytest.param(
        _doc(version=1, access_token=ACCESS, refresh_token=7, expires_at=1.0), id="bad-refresh"
    ),
    pytest.param(
        _doc(version=ACCESS, access_token="x", expires_at=1.0),
        id="token-in-version-field",
    ),
]


@pytest.mark.parametrize("content", BROKEN_FILES)
def test_a_broken_token_file_says_to_log_in_and_never_echoes_its_content(
    token_file: Path, content: bytes
) -> None:
    token_file.parent.mkdir()
    token_file.write_bytes(content)
    with pytest.raises(TokenStoreError) as info:
        FileGrantStore(token_file).read()
    message = str(info.value)
    assert str(token_file) in message
    assert "run `closeproxy login`" in message
    assert "SECRET" not in message
    assert token_file.read_bytes() == content  # left for the user to look at


# --- noticing another writer ---------------------------------------------------------


def test_the_fingerprint_changes_only_when_the_file_is_replaced(token_file: Path) -> None:
    ours, theirs = FileGrantStore(token_file), FileGrantStore(token_file)  # e.g. two processes
    saved = ours.write(make_tokens(1))
    assert ours.version() == saved
    assert ours.version() == ours.version()  # nothing changed, nothing to re-read
    assert ours.read_with_version()[1] == saved

    theirs.write(make_tokens(2))  # same size, written by someone else
    assert ours.version() != saved
    tokens, fingerprint = ours.read_with_version()
    assert tokens is not None
    assert tokens.access_token == f"{ACCESS}-2"
    assert fingerprint == ours.version()

    before = ours.version()
    theirs.write(make_tokens(2))  # even identical content is a new version
    assert ours.version() != before

    theirs.delete()
    assert ours.version() is None


# --- the lock -------------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""

PROBE_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("busy")
else:
    print("free")
"""

COUNT_UNDER_LOCK = """
import asyncio, sys
from pathlib import Path
from closeproxy.file_store import FileGrantStore

async def main(path: str, rounds: int) -> None:
    store = FileGrantStore(Path(path))
    counter = store.path.with_name("counter")
    for _ in range(rounds):
        async with store.locked(wait=30):
            value = int(counter.read_text())
            await asyncio.sleep(0.001)  # a refresh takes a while: let the other one in
            counter.write_text(str(value + 1))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def python(code: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def test_coroutines_take_the_lock_one_at_a_time(token_file: Path) -> None:
    store = FileGrantStore(token_file)
    holders: list[int] = []
    most = 0
    done: list[int] = []

    async def worker(n: int) -> None:
        nonlocal most
        async with FileGrantStore(token_file).locked(wait=10):  # each its own handle
            holders.append(n)
            most = max(most, len(holders))
            await asyncio.sleep(0.02)
            holders.remove(n)
            done.append(n)

    await asyncio.gather(*(worker(n) for n in range(5)))
    assert most == 1
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert store.lock_path == token_file.with_name("tokens.json.lock")
    assert mode(store.lock_path) == 0o600


async def test_another_process_sees_the_lock_while_it_is_held(token_file: Path) -> None:
    store = FileGrantStore(token_file)
    async with store.locked():
        assert await python(PROBE_LOCK, str(store.lock_path)) == "busy"
    assert await python(PROBE_LOCK, str(store.lock_path)) == "free"


async def test_two_processes_never_hold_the_lock_together(token_file: Path) -> None:
    store = FileGrantStore(token_file)
    store.ensure_directory()
    counter = token_file.with_name("counter")
    counter.write_text("0")
    rounds = 40
    await asyncio.gather(
        python(COUNT_UNDER_LOCK, str(token_file), str(rounds)),
        python(COUNT_UNDER_LOCK, str(token_file), str(rounds)),
    )
    assert int(counter.read_text()) == 2 * rounds  # no read-modify-write was lost


async def test_a_held_lock_times_out_naming_the_lock_file_and_frees_when_the_holder_dies(
    token_file: Path,
) -> None:
    store = FileGrantStore(token_file)
    store.ensure_directory()
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_LOCK, str(store.lock_path), stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 20) == b"held\n"

        started = time.monotonic()
        with pytest.raises(TokenStoreError) as info:
            async with store.locked(wait=0.3):
                pytest.fail("got a lock another process holds")
        waited = time.monotonic() - started
        assert 0.3 <= waited < 2.0
        assert str(store.lock_path) in str(info.value)
        assert "stuck process" in str(info.value)

        holder.send_signal(signal.SIGKILL)
        await holder.wait()
        started = time.monotonic()
        async with store.locked(wait=0.3):
            assert time.monotonic() - started < 0.1  # at once, no stale lock to clean up
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_a_cancelled_waiter_leaves_nothing_behind(token_file: Path) -> None:
    store = FileGrantStore(token_file)
    store.ensure_directory()
    open_fds = len(os.listdir("/proc/self/fd"))
    release = asyncio.Event()

    async def hold() -> None:
        async with store.locked():
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.02)

    async def wait_for_lock() -> None:
        async with store.locked(wait=10):
            pytest.fail("the cancelled waiter got the lock")

    waiter = asyncio.create_task(wait_for_lock())
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await holder
    started = time.monotonic()
    async with store.locked(wait=0.3):
        assert time.monotonic() - started < 0.1
    assert len(os.listdir("/proc/self/fd")) == open_fds


# --- kill -9 while refreshing for real ---------------------------------------------

KILL_TRIALS = 40
MAX_KILL_DELAY = 0.12  # seconds; a refresh + save cycle takes about a millisecond or two
IDLE_BETWEEN_REFRESHES = 0.001
PHASES: tuple[str, ...] = ("idle", "refreshing", "saving")
IDLE, REFRESHING, SAVING = range(3)
# shared marks: phase byte, 3 pad, completed refreshes (u32), last saved access token,
# access token being saved now
MARKS = struct.Struct("<B3xI64s64s")
SIM_LISTENING = re.compile(r"simulator listening on (http://\S+)")

REFRESH_LOOP = f"""
import asyncio, mmap, struct, sys
from closeproxy.upstream import client_session
from closeproxy.config import load_settings
from closeproxy.errors import LoginRequired
from closeproxy.file_store import FileGrantStore
from closeproxy.refresh_policy import FORCE
from closeproxy.wiring import token_provider

IDLE, REFRESHING, SAVING = range(3)
with open(sys.argv[1], "r+b") as fh:
    marks = mmap.mmap(fh.fileno(), {MARKS.size})

def note(offset, token):
    marks[offset:offset + 64] = token.encode().ljust(64, b"\\0")

class MarkingStore(FileGrantStore):
    def write(self, tokens):
        note(72, tokens.access_token)
        marks[0] = SAVING
        fingerprint = super().write(tokens)
        note(8, tokens.access_token)
        marks[0] = REFRESHING
        return fingerprint

async def main():
    settings = load_settings()  # CLOSEPROXY_* from the environment, like `closeproxy refresh`
    async with client_session() as session:
        provider = token_provider(settings, session, store=MarkingStore(settings.token_file))
        ready = False
        while True:
            marks[0] = REFRESHING
            try:
                await provider.refresh(FORCE)
            except LoginRequired:
                print("dead", flush=True)
                sys.stdin.readline()  # the test logs in again, then lets us go on
                continue
            marks[0] = IDLE
            struct.pack_into("<I", marks, 4, struct.unpack_from("<I", marks, 4)[0] + 1)
            if not ready:
                print("ready", flush=True)
                ready = True
            await asyncio.sleep({IDLE_BETWEEN_REFRESHES})

asyncio.run(main())
"""


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line from the process's stdout without ever blocking past `timeout`."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line from {proc.args!r} within {timeout} s: {line!r}")
        byte = os.read(fd, 1)
        if not byte:
            return line.decode()  # EOF: the process is gone
        line += byte
    return line.decode().strip()


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with _DIRECT.open(request, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, None


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[str]:
    """`python -m closeproxy.sim` in its own process, so the refresh loop can reach it."""
    with (
        open(tmp_path / "sim.log", "wb") as log,
        subprocess.Popen(
            [sys.executable, "-m", "closeproxy.sim", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=log,
        ) as proc,
    ):
        try:
            match = SIM_LISTENING.search(read_line(proc, 20))
            assert match, (tmp_path / "sim.log").read_text()
            yield match.group(1)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def login_at_sim(sim_url: str, store: FileGrantStore) -> None:
    status, reply = http("POST", f"{sim_url}/_sim/issue")
    assert status == 200
    store.write(TokenSet.from_reply(reply, received_at=time.time(), api_url=sim_url))


def test_kill_9_at_random_moments_leaves_the_complete_old_or_new_token_file(
    sim_process: str, token_file: Path, tmp_path: Path
) -> None:
    seed = int(os.environ.get("KILL_TEST_SEED") or random.randrange(2**32))
    print(f"kill -9 test: seed {seed} (rerun with KILL_TEST_SEED={seed})")
    rng = random.Random(seed)
    sim_url = sim_process
    store = FileGrantStore(token_file)
    login_at_sim(sim_url, store)
    marks_file = tmp_path / "marks"
    child_log = tmp_path / "refresh-loop.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLOSEPROXY_")},
        "CLOSEPROXY_CLIENT_ID": "sim-client",
        "CLOSEPROXY_CLIENT_SECRET": "sim-secret",
        "CLOSEPROXY_API_URL": sim_url,
        "CLOSEPROXY_TOKEN_FILE": str(token_file),
    }
    kills: Counter[str] = Counter()
    cycles: list[int] = []
    grants_lost = 0
    renamed_but_unmarked = 0
    last_phase: int | None = None
    temps: set[str] = set()
    started = time.monotonic()

    for trial in range(KILL_TRIALS):
        marks_file.write_bytes(bytes(MARKS.size))
        pre_trial = token_file.read_bytes()
        with (
            open(child_log, "ab") as log,
            subprocess.Popen(
                [sys.executable, "-c", REFRESH_LOOP, str(marks_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            ) as child,
        ):
            assert child.stdin is not None
            try:
                line = read_line(child, 20)
                if line == "dead":
                    # The previous kill landed after Close rotated the refresh token but
                    # before the new one reached the disk: Close's rotation makes that a
                    # re-login, and it can only happen to a process that was refreshing.
                    assert last_phase in (REFRESHING, SAVING), (
                        f"trial {trial}: the grant was lost, yet the last kill hit an idle loop"
                    )
                    dead = store.read()
                    assert dead is not None
                    assert dead.refresh_rejected == "invalid_grant"
                    grants_lost += 1
                    login_at_sim(sim_url, store)
                    pre_trial = token_file.read_bytes()
                    child.stdin.write(b"go\n")
                    child.stdin.flush()
                    line = read_line(child, 20)
                assert line == "ready", child_log.read_text()[-3000:]
                time.sleep(rng.uniform(0.0, MAX_KILL_DELAY))
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait()

        phase, count, raw_done, raw_saving = MARKS.unpack(marks_file.read_bytes())
        last_saved = raw_done.rstrip(b"\0").decode()
        being_saved = raw_saving.rstrip(b"\0").decode()
        last_phase = phase
        kills[PHASES[phase]] += 1
        cycles.append(count)
        where = f"trial {trial} (killed while {PHASES[phase]}, after {count} refreshes)"

        # The file parses and is a complete token set...
        raw = token_file.read_bytes()
        try:
            tokens = TokenSet.from_json(json.loads(raw))
        except ValueError as exc:
            raise AssertionError(f"{where}: torn token file ({exc})") from None
        assert store.read() == tokens
        assert mode(token_file) == 0o600, where
        assert tokens.access_token.startswith("simacc_"), where
        assert tokens.refresh_token is not None, where
        assert tokens.refresh_token.startswith("simref_"), where
        assert tokens.refresh_rejected is None, where
        assert tokens.scope == "all.full_access offline_access", where
        assert (tokens.organization_id, tokens.user_id) == ("orga_sim", "user_sim"), where
        assert tokens.api_url == sim_url, where
        assert tokens.lifetime == 3600, where

        # ...and it is the state before the kill or the one being written at that instant.
        if raw != pre_trial:
            if tokens.access_token == being_saved != last_saved:
                assert phase == SAVING, where
                renamed_but_unmarked += 1
            else:
                assert tokens.access_token == last_saved, where
        status, _ = http("GET", f"{sim_url}/api/v1/me/", tokens.access_token)
        assert status == 200, f"{where}: Close does not know the stored access token"

        # Only the token file, its lock and leftover temp files of a save cut short.
        present = set(names(token_file.parent)) - {"tokens.json", "tokens.json.lock"}
        assert all(TEMP_NAME.fullmatch(name) for name in present), (where, present)
        if present - temps:
            assert phase == SAVING, (where, present - temps)
        temps = present

    elapsed = time.monotonic() - started
    _, stats = http("GET", f"{sim_url}/_sim/stats")
    counters = stats["counters"]
    print(
        f"kill -9 test: {KILL_TRIALS} trials in {elapsed:.1f} s; kills while "
        + ", ".join(f"{name} {kills[name]}" for name in PHASES)
        + f"; renamed but not yet marked {renamed_but_unmarked}"
        + f"; refreshes per trial min {min(cycles)} median {statistics.median(cycles)} "
        + f"max {max(cycles)}; grants lost to a kill mid-refresh {grants_lost}; "
        + f"temp files left by kills mid-write {len(temps)}; Close saw "
        + f"{counters['refreshes']} refreshes, {counters['reuse_detected']} reused tokens"
    )
    assert kills["refreshing"] + kills["saving"] > 0, "no kill ever landed mid-refresh"
    assert sum(cycles) > 2 * KILL_TRIALS, "the loop hardly refreshed before being killed"
    # Every spent refresh token reused was one a kill cut off before it reached the disk.
    assert counters["reuse_detected"] == grants_lost
