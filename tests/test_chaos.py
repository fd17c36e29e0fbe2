"""Chaos: two `closeproxy serve` processes and a `closeproxy refresh` loop share one token
file; tokens live 2 s, the token endpoint takes 0.3 s, and random SIGKILLs hit any of them.

The grant must survive every kill except one that lands while the victim has a token
request in flight (or has just had its reply, which it may not have saved yet): that
reply is the only copy of the rotated refresh token, so it is lost with the process. When
that happens every process must say "log in again"; the test then logs in anew and goes on.

Each lost grant is traced exactly: the simulator records which client port asked for each
rotation, and the test names the process holding that port while the request is still
open; a watcher records every refresh token the file held,
so a spent token sent again is blamed on a kill only if the reply carrying its successor
went to a process this test killed, and that successor never reached the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import aiohttp
import pytest
from helpers import ServeProcess, proxy_env, seed_tokens, start_refresh, start_serve

from closeproxy.file_store import FileGrantStore
from closeproxy.sim import RunningSim
from closeproxy.sim.state import Rotation

pytestmark = pytest.mark.chaos

CHAOS_SECONDS = 25.0
LIFETIME = 2.0
TOKEN_DELAY = 0.3
WATCH_EVERY = 0.02  # well under TOKEN_DELAY: every token request is seen while in flight


def socket_inodes(pid: int | str) -> set[str]:
    """Inodes of the process's open sockets (from /proc); empty once it is gone."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def tcp_connections() -> Iterable[tuple[int, int, str]]:
    """(local port, remote port, inode) of every TCP socket on the machine."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                yield int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), inode


def owner_of(port: int, sim_port: int) -> int | None:
    """The process holding the connection from local `port` to the simulator, if any."""
    found = {
        inode for local, remote, inode in tcp_connections() if (local, remote) == (port, sim_port)
    }
    found.discard("0")
    if not found:
        return None
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != str(os.getpid()) and socket_inodes(entry) & found:
            return int(entry)
    return None


def sim_ports(pid: int, sim_port: int) -> set[int]:
    """Local ports of the process's TCP connections to the simulator (from /proc)."""
    inodes = socket_inodes(pid)
    return {
        local
        for local, remote, inode in tcp_connections()
        if remote == sim_port and inode in inodes
    }


class Tracer:
    """Which process asked for each rotation, and which refresh tokens reached the file."""

    def __init__(self, sim: RunningSim, token_file: Path, sim_port: int) -> None:
        self.state = sim.state
        self.store = FileGrantStore(token_file)
        self.sim_port = sim_port
        self.owner_of_port: dict[int, int] = {}
        self.asked_by: dict[str, int] = {}  # spent token -> pid that got its successor
        self.on_disk: set[str] = set()
        self.killed: dict[int, float] = {}  # pid -> monotonic time of its SIGKILL
        # Spent tokens whose asker no longer held its socket when the simulator rotated.
        self.hung_up: set[str] = set()
        self.causes: list[str] = []  # each grant lost, and the kill that lost it

    def install(self) -> None:
        """Name the asker of each rotation while its request is still open.

        The simulator rotates inside the request's handler, before it answers, so the
        asking socket still exists: any process holding it is found, even one the test
        is not tracking yet (a `serve` just restarted, refreshing while it starts)."""
        state = self.state
        rotate = state.refresh

        def refresh(refresh_token: str, *, port: int = 0) -> dict[str, object]:
            reply = rotate(refresh_token, port=port)
            if (pid := owner_of(port, self.sim_port)) is not None:
                self.owner_of_port[port] = pid
                self.asked_by[refresh_token] = pid
            else:
                self.hung_up.add(refresh_token)
            return reply

        state.refresh = refresh  # type: ignore[method-assign]

    def look(self, pids: Iterable[int]) -> None:
        for pid in pids:
            for port in sim_ports(pid, self.sim_port):
                self.owner_of_port[port] = pid
        for spent, rotation in list(self.state.rotations.items()):
            if spent not in self.asked_by and rotation.port in self.owner_of_port:
                self.asked_by[spent] = self.owner_of_port[rotation.port]
        with contextlib.suppress(OSError, ValueError):
            tokens = self.store.read()
            if tokens is not None and tokens.refresh_token is not None:
                self.on_disk.add(tokens.refresh_token)

    def blame(self, reused: str) -> str | None:
        """None when a kill explains why the spent token `reused` was sent again."""
        rotation = self.state.rotations.get(reused)
        if rotation is None:
            return "a refresh token no refresh had spent was reported as sent again"
        successor = rotation.successor
        if successor in self.on_disk or successor in self.state.rotations:
            return "a spent refresh token was sent again although its successor had been saved"
        pid = self.asked_by.get(reused, self.owner_of_port.get(rotation.port))
        if pid is None and reused in self.hung_up:
            return self.blame_unseen(rotation)
        killed_at = None if pid is None else self.killed.get(pid)
        if killed_at is None:
            return f"process {pid} got a rotated refresh token, was not killed, and never saved it"
        if not rotation.at - TOKEN_DELAY - 1.0 < killed_at < rotation.at + 5.0:
            return (
                f"process {pid} was killed {killed_at - rotation.at:+.2f} s from the rotation "
                "it lost: too long before or after it to be the cause"
            )
        self.causes.append(f"kill {killed_at - rotation.at:+.2f} s from the rotation")
        return None

    def blame_unseen(self, rotation: Rotation) -> str | None:
        """The asker sent its request and was gone before anyone saw its socket.

        A process killed just after sending is that: its request still arrives, is
        rotated, and the reply has nobody to go to. A kill must have come in the time
        such a request spends in the simulator, or just before it."""
        near = [
            at - rotation.at
            for at in self.killed.values()
            if 0 < rotation.at - at < TOKEN_DELAY + 1.0
        ]
        if not near:
            return "the asker of a rotation hung up before its reply, and no kill came just before"
        self.causes.append(f"kill {max(near):+.2f} s from the rotation (asker gone unseen)")
        return None


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to see sockets")
async def test_random_kills_never_lose_the_grant_unless_they_hit_a_refresh_in_flight(
    sim: RunningSim, token_file: Path, request: pytest.FixtureRequest
) -> None:
    sim.state.config.token_lifetime = LIFETIME
    sim.state.token_delay = TOKEN_DELAY
    seed_tokens(sim, token_file, expires_in=LIFETIME)
    env = proxy_env(sim, token_file, CLOSEPROXY_LOG_LEVEL="warning")
    sim_port = int(sim.url.rsplit(":", 1)[1])
    seed = os.environ.get("CHAOS_SEED", str(time.time_ns()))  # CHAOS_SEED=... replays a run
    rng = random.Random(seed)

    servers: list[ServeProcess] = list(
        await asyncio.gather(*(asyncio.to_thread(start_serve, env) for _ in range(2)))
    )
    cli: list[asyncio.subprocess.Process | None] = [None]
    tracer = Tracer(sim, token_file, sim_port)
    tracer.install()
    kills: Counter[str] = Counter()
    deaths = 0
    cli_results: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()
    problems: list[str] = []

    async def refresh_loop() -> None:
        while not stop.is_set():
            process = await start_refresh(env)
            cli[0] = process
            _, err = await process.communicate()
            cli[0] = None
            if process.returncode == 0:
                cli_results["ok"] += 1
            elif process.returncode == -signal.SIGKILL:
                cli_results["killed"] += 1
            else:
                cli_results[f"exit {process.returncode}"] += 1
                if b"closeproxy login" not in err:
                    problems.append(f"refresh failed without saying what to do: {err!r}")

    async def traffic(client: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            for server in list(servers):
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with client.get(f"{server.url}/api/v1/me/") as resp:
                        statuses[resp.status] += 1
                        if resp.status not in (200, 401, 503):
                            problems.append(f"{resp.status}: {await resp.text()}")
            await asyncio.sleep(0.1)

    def live_pids() -> list[int]:
        process = cli[0]
        pids = [server.process.pid for server in servers]
        return pids if process is None or process.returncode is not None else [*pids, process.pid]

    async def watch() -> None:
        while not stop.is_set():
            tracer.look(live_pids())
            await asyncio.sleep(WATCH_EVERY)

    async def kill_one() -> None:
        choice = rng.randrange(3)
        if choice == 2:
            process = cli[0]
            if process is None or process.returncode is not None:
                return
            pid, kind = process.pid, "refresh"
        else:
            pid, kind = servers[choice].process.pid, "serve"
        tracer.look(live_pids())
        ports = sim_ports(pid, sim_port)
        hit = bool(ports & set(sim.state.token_requests_in_flight))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        tracer.killed[pid] = time.monotonic()
        await asyncio.sleep(0.05)  # a request already sent reaches the simulator now
        hit = hit or bool(ports & set(sim.state.token_requests_in_flight))
        kills[f"{kind} {'in a refresh' if hit else 'idle'}"] += 1
        if choice < 2:
            old = servers[choice]
            await asyncio.to_thread(old.process.wait)
            old.join()
            servers[choice] = await asyncio.to_thread(start_serve, env)

    async def all_say_log_in_again(client: aiohttp.ClientSession) -> None:
        for server in servers:
            async with client.get(f"{server.url}/api/v1/me/") as resp:
                body = await resp.json()
                assert resp.status == 401, body
                assert body["closeproxy_error"] == "login_required"
                assert "closeproxy login" in body["error"]

    def lost_without_cause(reused: list[str]) -> str | None:
        faults = [fault for fault in map(tracer.blame, reused) if fault is not None]
        if not faults:
            return None
        return f"grant lost, no kill to blame: {faults}; kills {dict(kills)} (CHAOS_SEED={seed})"

    timeout = aiohttp.ClientTimeout(total=20)
    background: list[asyncio.Task[None]] = []
    try:
        async with aiohttp.ClientSession(timeout=timeout) as client:
            background += [
                asyncio.create_task(refresh_loop()),
                asyncio.create_task(traffic(client)),
                asyncio.create_task(watch()),
            ]
            deadline = time.monotonic() + CHAOS_SECONDS
            seen_reuse = 0
            # Tokens of grants already declared dead: a process still holding one of them
            # may send it once more before it sees the new login; that is the old death.
            dead: set[str] = set()

            def newly_reused() -> list[str]:
                """Spent refresh tokens of the live grant sent again since the last look."""
                nonlocal seen_reuse
                reused = sim.state.reused_refresh_tokens[seen_reuse:]
                seen_reuse += len(reused)
                return [token for token in reused if token not in dead]

            while time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                await kill_one()
                if reused := newly_reused():
                    # The grant died: only a kill that lost a rotated token may cause that.
                    deaths += 1
                    tracer.look(live_pids())
                    fault = lost_without_cause(reused)
                    assert fault is None, fault
                    await asyncio.sleep(0.5)
                    await all_say_log_in_again(client)
                    async with FileGrantStore(token_file).locked():  # log in again
                        dead = set(sim.state.issued_secrets())
                        seed_tokens(sim, token_file, expires_in=LIFETIME)
            stop.set()
            await asyncio.gather(*background)
            # Quiet now: the grant has to go on living through several token lifetimes.
            await asyncio.sleep(3 * LIFETIME)
            if reused := newly_reused():
                deaths += 1
                fault = lost_without_cause(reused)
                assert fault is None, fault
                await all_say_log_in_again(client)
            else:
                for server in servers:
                    async with client.get(f"{server.url}/api/v1/me/") as resp:
                        assert resp.status == 200, await resp.text()
    finally:
        # Also after a failed assertion: a refresh process left running would be collected
        # after this loop is closed and fail whichever test runs next on this worker.
        stop.set()
        if (process := cli[0]) is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(server.stop) for server in servers))
    summary = (
        f"seed {seed}; kills: {dict(kills)}; grants lost: {deaths} {tracer.causes}; "
        f"cli refreshes: {dict(cli_results)}; "
        f"proxy answers: {dict(statuses)}; sim refreshes: {sim.state.refreshes}"
    )
    request.node.user_properties.append(("chaos", summary))
    print(summary)
    assert not problems, problems
    assert sum(kills.values()) >= 5, summary
