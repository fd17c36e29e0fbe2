"""Faults that used to cost the grant (issue 7): real disk faults, a slow or lost token
reply, a deleted lock file, and refreshes racing each other. Over real sockets against
the simulator; the simulator's reuse counter must stay 0 wherever a reply was received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers import (
    FAST_BACKOFF,
    make_settings,
    provider_against_token_endpoint,
    proxy_env,
    run_cli_async,
    seed_tokens,
)

from closeproxy.errors import LoginRequired, TokenServiceUnavailable, TokenStoreError
from closeproxy.file_store import FileGrantStore
from closeproxy.grant import TokenSet
from closeproxy.oauth import OAuthClient
from closeproxy.refresh_policy import FORCE, Rejected
from closeproxy.server import running
from closeproxy.sim import RunningSim
from closeproxy.tokens import TokenProvider
from closeproxy.upstream import client_session


class Tmpfs:
    """A small tmpfs mounted for one test: a disk that really fills up or turns read-only."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self._fillers: list[Path] = []

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.where)], check=True)

    def use_up_inodes(self) -> None:
        """Create empty files until the file system has no inode left."""
        while True:
            path = self.where / f"filler-{len(self._fillers)}"
            try:
                path.touch()
            except OSError:
                return
            self._fillers.append(path)

    def free_inodes(self) -> None:
        for path in self._fillers:
            path.unlink()
        self._fillers.clear()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    where = tmp_path / "small-disk"
    where.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=64,mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no mount command here: cannot make a small tmpfs for disk faults")
    if mounted.returncode != 0:
        pytest.skip(
            f"mounting a tmpfs is not permitted here ({mounted.stderr.strip()}): these disk "
            "fault tests need root"
        )
    try:
        yield Tmpfs(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_disk_token_file(tmpfs: Tmpfs) -> Path:
    return tmpfs.where / "tokens.json"


def stored(token_file: Path) -> TokenSet:
    tokens = FileGrantStore(token_file).read()
    assert tokens is not None
    return tokens


@contextlib.asynccontextmanager
async def provider_for(
    sim: RunningSim, token_file: Path, *, attempt_timeout: float = 15.0, request_wait: float = 15.0
) -> AsyncIterator[TokenProvider]:
    settings = make_settings(sim, token_file)
    assert settings.client_secret is not None
    async with client_session() as session:
        oauth = OAuthClient(
            session,
            api_url=settings.api_url,
            client_id=settings.client_id or "",
            client_secret=settings.client_secret,
            backoff=FAST_BACKOFF,
            attempt_timeout=attempt_timeout,
        )
        provider = TokenProvider(
            FileGrantStore(token_file),
            oauth,
            margin=300,
            api_url=sim.url,
            request_wait=request_wait,
        )
        try:
            yield provider
        finally:
            await provider.aclose()


# --- 1 and 4: the disk refuses the new tokens ------------------------------------------


async def test_no_free_inode_keeps_the_refreshed_tokens_and_saves_them_at_shutdown(
    sim: RunningSim, tmpfs: Tmpfs, client: aiohttp.ClientSession
) -> None:
    token_file = tmpfs.where / "tokens.json"
    old = seed_tokens(sim, token_file, expires_in=-10)
    sim.state.expire_access_token(old.access_token)
    FileGrantStore(token_file).lock_path.touch()  # the lock file needs no new inode
    settings = make_settings(sim, token_file)
    async with running(settings, oauth_backoff=FAST_BACKOFF) as where:
        tmpfs.use_up_inodes()  # the temp file of the save cannot be created
        for _ in range(2):
            async with client.get(f"{where.url}/api/v1/me/") as resp:
                assert resp.status == 200, await resp.text()
        assert sim.state.refreshes == 1
        assert stored(token_file).refresh_token == old.refresh_token  # the disk said no
        tmpfs.free_inodes()  # room again before shutdown
    assert sim.state.reuse_detected == 0
    saved = stored(token_file)
    assert saved.refresh_token != old.refresh_token
    assert sim.state.refresh(saved.refresh_token or "")  # the saved one is the live one


async def test_a_store_that_cannot_even_lock_answers_json_token_store_error(
    sim: RunningSim, tmpfs: Tmpfs, client: aiohttp.ClientSession
) -> None:
    token_file = tmpfs.where / "tokens.json"
    old = seed_tokens(sim, token_file, expires_in=-10)
    sim.state.expire_access_token(old.access_token)
    async with running(make_settings(sim, token_file), oauth_backoff=FAST_BACKOFF) as where:
        tmpfs.use_up_inodes()  # not even the lock file can be created
        async with client.get(f"{where.url}/api/v1/me/") as resp:
            assert resp.status == 500
            body = await resp.json()
        assert body["closeproxy_error"] == "token_store_error"
        assert "tokens.json.lock" in body["error"]
    assert sim.state.token_requests == 0  # nothing was spent
    assert stored(token_file) == old


async def test_a_read_only_store_mid_run_keeps_the_tokens_and_says_where_things_stand_at_exit(
    sim: RunningSim, tmpfs: Tmpfs, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmpfs.where / "tokens.json"
    old = seed_tokens(sim, token_file)
    FileGrantStore(token_file).lock_path.touch()
    async with provider_for(sim, token_file) as provider:
        tmpfs.remount("ro")
        fresh = await provider.refresh(FORCE)
        assert (await provider.current()).access_token == fresh.access_token
        with caplog.at_level(logging.ERROR, "closeproxy.tokens"):
            await provider.aclose()
        assert provider.unsaved == fresh
    message = caplog.records[-1].getMessage()
    assert "could still not be saved" in message and "read-only" in message.lower()
    assert str(token_file) in message and "closeproxy login" in message
    assert stored(token_file) == old
    assert sim.state.reuse_detected == 0


# --- 5: the CLI when the save fails -----------------------------------------------------


async def test_cli_refresh_that_cannot_save_exits_1_and_leaves_the_tokens_in_a_named_file(
    sim: RunningSim, tmpfs: Tmpfs, tmp_path: Path
) -> None:
    token_file = tmpfs.where / "tokens.json"
    old = seed_tokens(sim, token_file)
    FileGrantStore(token_file).lock_path.touch()
    tmpfs.remount("ro")
    env = proxy_env(sim, token_file, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = await run_cli_async(env, "refresh")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "memory" not in result.stderr
    rescue_dir = tmp_path / "tmp" / f"closeproxy-{os.getuid()}"
    [rescued] = list(rescue_dir.iterdir())
    assert str(rescued) in result.stderr and f"mv {rescued} {token_file}" in result.stderr
    assert rescued.stat().st_mode & 0o777 == 0o600
    assert stored(rescued).refresh_token != old.refresh_token
    # Following the advice keeps the grant alive.
    tmpfs.remount("rw")
    shutil.move(rescued, token_file)  # what `mv` does across file systems
    again = await run_cli_async(env, "refresh")
    assert again.returncode == 0, again.stderr
    assert sim.state.reuse_detected == 0


# --- 2 and 10: a slow token endpoint, a lost reply --------------------------------------


async def test_a_slow_token_endpoint_finishes_and_saves_the_refresh_that_was_sent(
    sim: RunningSim, token_file: Path
) -> None:
    old = seed_tokens(sim, token_file)
    sim.state.token_delay = 1.0
    async with provider_for(sim, token_file, attempt_timeout=0.3, request_wait=0.3) as provider:
        with pytest.raises(TokenServiceUnavailable) as failed:
            await provider.refresh(Rejected(old.access_token))
        assert "still in progress" in str(failed.value)
        await provider.aclose()  # the refresh goes on after the request gave up
    assert sim.state.token_requests == 1  # never resent with the same refresh token
    assert sim.state.reuse_detected == 0
    assert stored(token_file).refresh_token != old.refresh_token


async def test_a_lost_token_reply_is_not_resent_and_the_message_tells_the_truth(
    sim: RunningSim, token_file: Path
) -> None:
    old = seed_tokens(sim, token_file)
    sim.state.token_endpoint = "lose_reply"  # Close rotates, the reply never arrives
    async with provider_for(sim, token_file) as provider:
        with pytest.raises(TokenServiceUnavailable) as failed:
            await provider.refresh(FORCE)
        message = str(failed.value)
        assert "kept" not in message
        assert "may have replaced the refresh token" in message
        assert "closeproxy login" in message
        assert sim.state.token_requests == 1
        sim.state.token_endpoint = "ok"
        with pytest.raises(LoginRequired):  # the truth: the grant is gone
            await provider.refresh(FORCE)
    assert stored(token_file).refresh_token == old.refresh_token


# --- 3: the lock file deleted ---------------------------------------------------------


async def test_a_lock_file_deleted_while_waited_on_is_reopened_not_trusted(
    token_file: Path,
) -> None:
    holder, waiter, latecomer = (FileGrantStore(token_file) for _ in range(3))
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def wait_then_hold() -> None:
        async with waiter.locked():
            inside.set()
            await leave.wait()

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(holder.locked())
        task = asyncio.create_task(wait_then_hold())
        await asyncio.sleep(0.05)  # the waiter polls the old lock file
        holder.lock_path.unlink()
    await asyncio.wait_for(inside.wait(), 5)
    # A newcomer opens whatever is at the path now: it must see the waiter's lock.
    with pytest.raises(TokenStoreError, match="held"):
        async with latecomer.locked(wait=0.3):
            pass
    leave.set()
    await task
    async with latecomer.locked(wait=1):
        pass


async def test_stale_temp_files_of_a_crashed_save_are_removed_under_the_lock(
    token_file: Path,
) -> None:
    store = FileGrantStore(token_file)
    store.ensure_directory()
    stale = token_file.with_name(f".{token_file.name}.k1ll3d.tmp")
    stale.write_text('{"refresh_token": "left by a crash"}')
    unrelated = token_file.with_name("notes.tmp")
    unrelated.write_text("mine")
    async with store.locked():
        pass
    assert not stale.exists()
    assert unrelated.exists()


# --- 9: races ---------------------------------------------------------------------------


async def test_kept_tokens_never_overwrite_a_newer_login_written_meanwhile(
    sim: RunningSim, tmpfs: Tmpfs
) -> None:
    token_file = tmpfs.where / "tokens.json"
    seed_tokens(sim, token_file)
    FileGrantStore(token_file).lock_path.touch()
    async with provider_for(sim, token_file) as provider:
        tmpfs.remount("ro")
        fresh = await provider.refresh(FORCE)
        assert provider.unsaved == fresh
        tmpfs.remount("rw")
        login = seed_tokens(sim, token_file)  # another process: `closeproxy login`
        current = await provider.snapshot()
        assert current is not None and current.access_token == login.access_token
        await provider.aclose()
    assert stored(token_file).access_token == login.access_token


async def test_a_refresh_for_a_rejected_token_that_joins_another_flight_gets_a_new_token(
    sim: RunningSim, token_file: Path
) -> None:
    first = seed_tokens(sim, token_file)
    other_process = FileGrantStore(token_file)
    async with provider_for(sim, token_file) as provider:
        assert await provider.snapshot() == first
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(other_process.locked())
            older = asyncio.create_task(provider.refresh(Rejected(first.access_token)))
            await asyncio.sleep(0.05)  # that flight waits for the lock
            # Meanwhile the other process refreshed: its token is on disk, and Close has
            # just rejected it for the caller below (which joins the flight in progress).
            second = seed_tokens(sim, token_file)
            joined = asyncio.create_task(provider.refresh(Rejected(second.access_token)))
            forced = asyncio.create_task(provider.refresh(FORCE))
            await asyncio.sleep(0.05)
        assert (await older).access_token == second.access_token
        newer = await joined
        assert newer.access_token not in {first.access_token, second.access_token}
        assert (await forced).access_token not in {first.access_token, second.access_token}
    # `joined` starts its own refresh; the forced one joins it, which did ask Close.
    assert sim.state.refreshes == 1
    assert sim.state.reuse_detected == 0


async def test_a_lock_file_deleted_while_held_admits_nobody_else(token_file: Path) -> None:
    """The hostile case: the lock file vanishes while a refresh holds it. A newcomer that
    creates and locks a fresh file at the path must still wait for the holder."""
    holder, newcomer = FileGrantStore(token_file), FileGrantStore(token_file)
    async with holder.locked():
        holder.lock_path.unlink()
        with pytest.raises(TokenStoreError, match="held"):
            async with newcomer.locked(wait=0.3):
                pass
    async with newcomer.locked(wait=1):
        pass


async def test_an_unusable_200_to_a_refresh_does_not_claim_the_tokens_are_kept(
    token_file: Path,
) -> None:
    """A 200 means Close took the refresh token: the message must not promise it is kept."""

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"refresh_token": "ref-2"})  # no access token

    async with provider_against_token_endpoint(token_file, token) as provider:
        with pytest.raises(TokenServiceUnavailable) as caught:
            await provider.current()
    assert "may already have spent" in str(caught.value)
    assert "kept" not in str(caught.value)
