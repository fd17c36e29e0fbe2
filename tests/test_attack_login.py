"""Hostile tests of retiring the old grant after a login (issue 16), real processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from helpers import proxy_env, run_cli_async
from test_login import LoginProcess, consent

from closeproxy.file_store import FileGrantStore
from closeproxy.sim import RunningSim


async def test_a_revoke_endpoint_that_hangs_does_not_hang_the_login(
    sim: RunningSim, token_file: Path
) -> None:
    env = proxy_env(sim, token_file)
    first_login = await LoginProcess.start(env, "--no-browser")
    assert (await first_login.finish(await consent(await first_login.authorize_url()) + "\n"))[
        0
    ] == 0
    first = FileGrantStore(token_file).read()
    assert first is not None
    sim.state.revoke_delay = 120.0  # Close's revoke endpoint never answers in time
    login = await LoginProcess.start(env, "--no-browser")
    landed = await consent(await login.authorize_url())
    started = time.monotonic()
    code, out, err = await login.finish(landed + "\n")
    took = time.monotonic() - started
    assert code == 0, err
    assert took < 15, took  # one quick try (5 s), then the login stands
    second = FileGrantStore(token_file).read()
    assert second is not None and second.refresh_token != first.refresh_token
    assert "could not be revoked" in err
    assert first.refresh_token is not None and first.refresh_token not in out + err


async def test_a_login_racing_a_refresh_of_the_old_grant_retires_its_newest_token(
    sim: RunningSim, token_file: Path
) -> None:
    # Another process refreshes the old grant (rotating its refresh token, slowly, under
    # the lock) while the login finishes: the login must revoke the rotated token, so the
    # old grant really ends, and the file must end with the new grant.
    env = proxy_env(sim, token_file)
    first_login = await LoginProcess.start(env, "--no-browser")
    assert (await first_login.finish(await consent(await first_login.authorize_url()) + "\n"))[
        0
    ] == 0
    login = await LoginProcess.start(env, "--no-browser")
    landed = await consent(await login.authorize_url())
    sim.state.token_delay = 1.0
    refresh = asyncio.create_task(run_cli_async(env, "refresh"))
    deadline = time.monotonic() + 20
    while sim.state.token_requests < 2:  # the refresh is at Close, holding the lock
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    code, out, err = await login.finish(landed + "\n")
    refreshed = await refresh
    assert code == 0, err
    assert refreshed.returncode == 0, refreshed.stderr
    final = FileGrantStore(token_file).read()
    assert final is not None
    assert sim.state.access_token_valid(final.access_token)
    # Exactly one grant lives at Close: the new login's.
    live = [
        t
        for t in sim.state.issued_secrets()
        if t != final.access_token and sim.state.access_token_valid(t)
    ]
    assert live == [], "the old grant (its rotated tokens) is still alive"
