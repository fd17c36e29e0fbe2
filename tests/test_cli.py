"""The `closeproxy` command in real processes: serve, status, refresh, token, errors."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from helpers import (
    ServeProcess,
    cli_env,
    proxy_env,
    run_cli,
    run_cli_async,
    seed_tokens,
    start_serve,
)

from closeproxy.cli import COMMAND_OPTIONS, COMMANDS
from closeproxy.config import OPTIONS_BY_NAME
from closeproxy.file_store import FileGrantStore
from closeproxy.sim import RunningSim


async def serve(env: dict[str, str], *args: str) -> ServeProcess:
    return await asyncio.to_thread(start_serve, env, *args)


async def test_serve_forwards_and_drains_in_flight_requests_on_sigterm(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess]
) -> None:
    seed_tokens(sim, token_file)
    server = await serve(proxy_env(sim, token_file))
    serve_processes.append(server)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{server.url}/api/v1/me/") as resp:
            assert resp.status == 200
        slow = asyncio.create_task(client.get(f"{server.url}/api/v1/_sim/sleep?seconds=1"))
        await asyncio.sleep(0.3)
        stopped = asyncio.create_task(asyncio.to_thread(server.stop))
        resp = await slow
        assert resp.status == 200  # the request that was in flight finished
        resp.release()
        assert await stopped == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


async def test_serve_starts_when_not_logged_in(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess]
) -> None:
    server = await serve(proxy_env(sim, token_file))
    serve_processes.append(server)
    async with aiohttp.ClientSession() as client, client.get(f"{server.url}/api/v1/me/") as resp:
        assert resp.status == 401
        assert (await resp.json())["closeproxy_error"] == "login_required"


async def test_status_text_and_json_never_print_a_secret(sim: RunningSim, token_file: Path) -> None:
    env = proxy_env(sim, token_file)
    result = await run_cli_async(env, "status")
    assert result.returncode == 1
    assert "not logged in" in result.stdout
    tokens = seed_tokens(sim, token_file)
    text = await run_cli_async(env, "status")
    as_json = await run_cli_async(env, "status", "--json")
    assert text.returncode == as_json.returncode == 0
    assert "logged in to Close" in text.stdout
    assert sim.state.config.organization_id in text.stdout
    doc = json.loads(as_json.stdout)
    assert doc["logged_in"] is True
    assert doc["user_id"] == sim.state.config.user_id
    assert doc["token_file"] == str(token_file)
    assert 3500 < doc["expires_in"] <= 3600
    for output in (text.stdout + text.stderr, as_json.stdout + as_json.stderr):
        assert tokens.access_token not in output
        assert str(tokens.refresh_token) not in output
        assert sim.state.config.client_secret not in output


async def test_refresh_rotates_and_says_so(sim: RunningSim, token_file: Path) -> None:
    old = seed_tokens(sim, token_file)
    result = await run_cli_async(proxy_env(sim, token_file), "refresh")
    assert result.returncode == 0, result.stderr
    assert "refreshed" in result.stdout
    new = FileGrantStore(token_file).read()
    assert new is not None
    assert new.refresh_token != old.refresh_token
    assert new.access_token not in result.stdout + result.stderr
    assert sim.state.refreshes == 1


async def test_refresh_of_a_dead_grant_exits_1_with_the_fix(
    sim: RunningSim, token_file: Path
) -> None:
    old = seed_tokens(sim, token_file)
    sim.state.revoke(str(old.refresh_token))
    result = await run_cli_async(proxy_env(sim, token_file), "refresh")
    assert result.returncode == 1
    assert "closeproxy login" in result.stderr
    assert "Traceback" not in result.stderr


async def test_token_prints_a_valid_token_refreshing_first_when_needed(
    sim: RunningSim, token_file: Path
) -> None:
    env = proxy_env(sim, token_file)
    current = seed_tokens(sim, token_file)
    result = await run_cli_async(env, "token")
    assert result.returncode == 0, result.stderr
    assert result.stdout == current.access_token + "\n"
    assert sim.state.refreshes == 0
    expiring = seed_tokens(sim, token_file, expires_in=60)  # inside the 300 s margin
    result = await run_cli_async(env, "token")
    printed = result.stdout.strip()
    assert printed != expiring.access_token
    assert sim.state.access_token_valid(printed)
    assert sim.state.refreshes == 1


def test_token_when_not_logged_in_exits_1(token_file: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    result = run_cli(
        {"CLOSEPROXY_TOKEN_FILE": str(token_file)},
        "token",
        "--client-id",
        "abc",
        "--client-secret-file",
        str(secret),
    )
    assert result.returncode == 1
    assert result.stderr.startswith("closeproxy token: not logged in")
    assert "closeproxy login" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["serve", "--port", "abc"], {}, "--port"),
        (["serve", "--port", "70000"], {}, "--port"),
        (["serve"], {"CLOSEPROXY_REFRESH_MARGIN": "-1"}, "CLOSEPROXY_REFRESH_MARGIN"),
        (["serve", "--host", "0.0.0.0"], {}, "proxy key"),
        (["serve", "--log-level", "loud"], {}, "--log-level"),
        (["refresh"], {}, "client id is not set"),
        (
            ["status", "--config", "/nonexistent/closeproxy.toml"],
            {},
            "/nonexistent/closeproxy.toml",
        ),
        (["serve", "--client-secret-file", "/nonexistent/secret"], {}, "--client-secret-file"),
    ],
)
def test_configuration_errors_exit_2_naming_the_setting(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    result = run_cli(env, *args, timeout=20)
    assert result.returncode == 2, result
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli({}, "serve", "--port", str(port), timeout=20)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr


def test_config_file_settings_are_used(tmp_path: Path, token_file: Path) -> None:
    config = tmp_path / "xdg-config" / "closeproxy" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'token_file = "{token_file}"\nport = 9999\n')
    result = run_cli({"XDG_CONFIG_HOME": str(tmp_path / "xdg-config")}, "status", "--json")
    assert json.loads(result.stdout)["token_file"] == str(token_file)
    config.write_text("prot = 1\n")
    result = run_cli({"XDG_CONFIG_HOME": str(tmp_path / "xdg-config")}, "status")
    assert result.returncode == 2
    assert "unknown setting 'prot'" in result.stderr


def test_every_command_has_complete_help() -> None:
    top = run_cli({}, "--help")
    assert top.returncode == 0
    for name in COMMANDS:
        assert name in top.stdout
        result = run_cli({}, name, "--help")
        assert result.returncode == 0
        for option in COMMAND_OPTIONS[name]:
            spec = OPTIONS_BY_NAME[option]
            assert spec.flag in result.stdout
            assert spec.env in result.stdout.replace("\n", " ").replace("  ", "")


async def test_debug_logs_never_contain_a_secret(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess], serve_loop: str
) -> None:
    seed_tokens(sim, token_file, expires_in=-5)
    server = await serve(
        proxy_env(sim, token_file), "--log-level", "debug", "--event-loop", serve_loop
    )
    serve_processes.append(server)
    bodies: list[str] = []
    async with aiohttp.ClientSession() as client:
        for path in ("/api/v1/me/", "/api/v1/me/?token=abc", "/admin/status"):
            async with client.get(server.url + path) as resp:
                bodies.append(await resp.text())
        sim.state.force_401 = 1  # a reactive refresh and a replay
        async with client.post(f"{server.url}/api/v1/lead/", json={"name": "x"}) as resp:
            bodies.append(await resp.text())
        async with client.post(f"{server.url}/admin/refresh") as resp:
            bodies.append(await resp.text())
        sim.state.token_endpoint = "down"
        async with client.post(f"{server.url}/admin/refresh") as resp:
            bodies.append(await resp.text())
    assert await asyncio.to_thread(server.stop) == 0
    logs = server.logs
    # Debug logging really was on: closeproxy's own debug line, not the event loop's.
    assert re.search(r"DEBUG .*admitting at most \d+ client connections", logs), logs
    assert f"(event loop {serve_loop})" in logs
    assert "refreshed the access token" in logs
    secrets = _every_token_the_simulator_saw(sim) | {sim.state.config.client_secret}
    assert len(secrets) > 5
    for secret in secrets:
        assert secret not in logs
        assert all(secret not in body for body in bodies)


def _every_token_the_simulator_saw(sim: RunningSim) -> set[str]:
    seen: set[str] = set()
    for form in sim.state.token_log:
        seen.update(v for k, v in form.items() if k in {"refresh_token", "code"})
    for record in sim.state.api_log:
        seen.update(
            value.removeprefix("Bearer ")
            for name, value in record.headers
            if name.lower() == "authorization"
        )
    return seen


def test_version() -> None:
    result = run_cli({}, "--version")
    assert result.returncode == 0
    assert re.fullmatch(r"closeproxy \d+\.\d+\.\d+\n", result.stdout)


async def test_serve_with_port_zero_prints_the_real_port(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess]
) -> None:
    started = time.monotonic()
    server = await serve(proxy_env(sim, token_file), "--port", "0")
    serve_processes.append(server)
    assert server.port > 0
    assert time.monotonic() - started < 10


async def test_sigterm_during_a_refresh_lets_it_finish_and_save(
    sim: RunningSim, token_file: Path
) -> None:
    old = seed_tokens(sim, token_file)
    sim.state.token_delay = 1.5  # the refresh is in flight at Close when the signal comes
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "closeproxy",
        "refresh",
        env=cli_env(proxy_env(sim, token_file)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(200):
        if sim.state.token_requests:
            break
        await asyncio.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err.decode()
    saved = FileGrantStore(token_file).read()
    assert saved is not None
    assert saved.refresh_token != old.refresh_token  # the rotated token reached the disk
    sim.state.token_delay = 0
    again = await run_cli_async(proxy_env(sim, token_file), "refresh")
    assert again.returncode == 0, again.stderr
    assert sim.state.reuse_detected == 0


async def test_sighup_stops_serve_cleanly(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess]
) -> None:
    server = await serve(proxy_env(sim, token_file))
    serve_processes.append(server)
    server.process.send_signal(signal.SIGHUP)
    assert await asyncio.to_thread(server.process.wait, 20) == 0
