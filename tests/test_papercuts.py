"""Issue 8: what a newcomer hits in the first hour, each over real sockets or the real CLI."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from helpers import (
    ServeProcess,
    cli_env,
    make_settings,
    proxy_env,
    run_cli,
    run_cli_async,
    seed_tokens,
    start_demo,
    start_serve,
)

from closeproxy import errors
from closeproxy.demo import demo_commands
from closeproxy.server import running
from closeproxy.sim import RunningSim

ROOT = Path(__file__).resolve().parent.parent


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.05)


# --- 1. set-up problems are not 5xx ---------------------------------------------------


async def test_login_page_without_a_client_id_is_a_4xx_that_says_what_to_set(
    sim: RunningSim, token_file: Path, client: aiohttp.ClientSession
) -> None:
    settings = replace(make_settings(sim, token_file), client_id=None, client_secret=None)
    async with running(settings) as where, client.get(f"{where.url}/admin/login") as resp:
        page = await resp.text()
    assert 400 <= resp.status < 500
    assert "client id is not set" in page
    assert "CLOSEPROXY_CLIENT_ID" in page
    assert sim.state.token_requests == 0


def test_every_error_code_is_in_the_readme_with_its_status() -> None:
    readme = (ROOT / "README.md").read_text()
    classes = [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ServiceError)
    ]
    codes = {cls.code: cls.status for cls in classes if cls is not errors.ServiceError}
    assert {"client_not_configured", "token_request_rejected"} <= set(codes)
    for code, status in codes.items():
        rows = [line for line in readme.splitlines() if f"`{code}`" in line]
        assert rows, f"{code} missing from README's error table"
        assert any(f"| {status} |" in row or f"{status} /" in row for row in rows), (code, rows)


# --- 2. status of an expired token ----------------------------------------------------


async def test_status_says_how_long_ago_the_token_expired(
    sim: RunningSim, token_file: Path
) -> None:
    seed_tokens(sim, token_file, expires_in=-185)
    result = await run_cli_async(proxy_env(sim, token_file), "status")
    assert "expired left" not in result.stdout
    assert re.search(r"access token\s+expired 3 min \d s ago \(at ", result.stdout), result.stdout
    seed_tokens(sim, token_file, expires_in=600)
    result = await run_cli_async(proxy_env(sim, token_file), "status")
    assert re.search(r"access token\s+(9|10) min \d+ s left \(expires ", result.stdout)


# --- 3. the demo's one ready line ---------------------------------------------------


@pytest.fixture
async def demo() -> AsyncIterator[tuple[str, str, str]]:
    """`closeproxy demo` running: (proxy URL, simulator URL, the export line's config path)."""
    process = await start_demo("--port", "0", "--exit-after", "120")
    assert process.stdout is not None
    printed = ""
    try:
        while not (match := re.search(r"^  export CLOSEPROXY_CONFIG=(\S+)$", printed, re.M)):
            line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
            assert line, f"demo ended early: {printed}"
            printed += line
        config = shlex.split(match.group(1))[0]
        proxy_url = re.search(r"^listening on (\S+)$", printed, re.M)
        sim_url = re.search(r"a simulated Close runs at (\S+) ", printed)
        assert proxy_url and sim_url, printed
        yield proxy_url.group(1), sim_url.group(1), config
    finally:
        process.terminate()
        await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0


async def test_the_demo_prints_one_line_that_points_the_other_commands_at_it(
    demo: tuple[str, str, str],
) -> None:
    proxy_url, sim_url, config = demo
    env = {"CLOSEPROXY_CONFIG": config}
    status = await run_cli_async(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["user_id"] == "user_sim"
    token = await run_cli_async(env, "token")
    assert token.returncode == 0, token.stderr
    async with aiohttp.ClientSession() as client:
        headers = {"Authorization": f"Bearer {token.stdout.strip()}"}
        async with client.get(f"{sim_url}/api/v1/me/", headers=headers) as resp:
            assert resp.status == 200  # a real token of the demo's simulator
        refresh = await run_cli_async(env, "refresh")
        assert refresh.returncode == 0, refresh.stderr
        assert "refreshed" in refresh.stdout
        child = (
            "import json, os, urllib.request\n"
            "r = urllib.request.Request(os.environ['CLOSE_API_URL'] + 'me/')\n"
            "import base64\n"
            "key = base64.b64encode((os.environ['CLOSE_API_KEY'] + ':').encode()).decode()\n"
            "r.add_header('Authorization', 'Basic ' + key)\n"
            "print(json.load(urllib.request.urlopen(r, timeout=10))['id'])\n"
        )
        ran = await run_cli_async(env, "run", "--", sys.executable, "-c", child)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "user_sim"
        # the demo's own proxy picked up the refreshed grant; no refresh token spent twice
        async with client.get(f"{proxy_url}/api/v1/me/") as resp:
            assert resp.status == 200
        async with client.get(f"{sim_url}/_sim/stats") as resp:
            counters = (await resp.json())["counters"]
    assert counters["reuse_detected"] == 0
    assert counters["refreshes"] >= 1


def test_the_readme_shows_what_the_demo_prints() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Try it without an account", 1)[1].split("```sh\n", 1)[1]
    block = block.split("```", 1)[0]
    for line in demo_commands("http://127.0.0.1:8730"):
        assert line in block, line


# --- 4. serve and run say once at start when nothing is logged in ----------------------


async def test_serve_says_once_at_start_that_nothing_is_logged_in(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess]
) -> None:
    server = await asyncio.to_thread(start_serve, proxy_env(sim, token_file))
    serve_processes.append(server)
    await wait_for(lambda: "not logged in" in server.logs)
    async with aiohttp.ClientSession() as client, client.get(f"{server.url}/api/v1/me/") as resp:
        assert resp.status == 401
    assert await asyncio.to_thread(server.stop) == 0
    (line,) = [line for line in server.stderr if "not logged in" in line]
    assert "WARNING" in line
    assert "closeproxy login" in line
    assert f"{server.url}/admin/login" in line


async def test_serve_says_nothing_when_logged_in(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess]
) -> None:
    seed_tokens(sim, token_file)
    server = await asyncio.to_thread(start_serve, proxy_env(sim, token_file))
    serve_processes.append(server)
    assert await asyncio.to_thread(server.stop) == 0
    assert "listening on" in server.logs  # its start was logged, and nothing more
    assert "not logged in" not in server.logs


async def test_serve_warns_at_start_when_the_token_cannot_be_refreshed(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess]
) -> None:
    seed_tokens(sim, token_file)
    env = proxy_env(sim, token_file)
    del env["CLOSEPROXY_CLIENT_ID"], env["CLOSEPROXY_CLIENT_SECRET"]
    server = await asyncio.to_thread(start_serve, env)
    serve_processes.append(server)
    await wait_for(lambda: "cannot be refreshed" in server.logs)
    async with aiohttp.ClientSession() as client, client.get(f"{server.url}/api/v1/me/") as resp:
        assert resp.status == 200  # the token is still valid: it is served meanwhile
    (line,) = [line for line in server.stderr if "cannot be refreshed" in line]
    assert "CLOSEPROXY_CLIENT_ID" in line
    assert "client_not_configured" in line


async def test_run_says_so_and_its_401_gives_advice_that_works_there(
    sim: RunningSim, token_file: Path
) -> None:
    child = textwrap.dedent(
        """
        import base64, json, os, urllib.error, urllib.request
        request = urllib.request.Request(os.environ["CLOSE_API_URL"] + "me/")
        key = base64.b64encode((os.environ["CLOSE_API_KEY"] + ":").encode()).decode()
        request.add_header("Authorization", "Basic " + key)
        try:
            urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as exc:
            print(json.dumps([exc.code, json.load(exc)]))
        """
    )
    result = await run_cli_async(
        proxy_env(sim, token_file), "run", "--", sys.executable, "-c", child
    )
    status, body = json.loads(result.stdout)
    assert (status, body["closeproxy_error"]) == (401, "login_required")
    assert "closeproxy login" in body["error"]
    assert "/admin/login" not in body["error"]  # that proxy is gone when the command ends
    assert "run this command again" in body["error"]
    warnings = [line for line in result.stderr.splitlines() if "not logged in" in line]
    assert len(warnings) == 1, result.stderr
    assert "/admin/login" not in warnings[0]


# --- 5. token needs the OAuth client only when a refresh is due ---------------------------


async def test_token_without_a_client_id_prints_a_valid_token(
    sim: RunningSim, token_file: Path
) -> None:
    tokens = seed_tokens(sim, token_file)
    env = {"CLOSEPROXY_TOKEN_FILE": str(token_file), "CLOSEPROXY_API_URL": sim.url}
    result = await run_cli_async(env, "token")
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokens.access_token + "\n"
    seed_tokens(sim, token_file, expires_in=60)  # inside the margin: a refresh is due
    result = await run_cli_async(env, "token")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "client id is not set" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sim.state.token_requests == 0


# --- 6. a refused refresh is reported once -------------------------------------------


async def test_refresh_with_a_wrong_secret_says_so_once(
    sim: RunningSim, token_file: Path, tmp_path: Path
) -> None:
    seed_tokens(sim, token_file)
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret\n")
    env = proxy_env(sim, token_file)
    del env["CLOSEPROXY_CLIENT_SECRET"]
    result = await run_cli_async(env, "refresh", "--client-secret-file", str(wrong))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("closeproxy refresh: Close refused")
    assert "client secret" in lines[0]


# --- 8. help texts ---------------------------------------------------------------------


def test_help_texts_mention_sighup_and_no_odd_defaults() -> None:
    top = run_cli({}, "--help")
    serve = run_cli({}, "serve", "--help")
    assert "SIGHUP" in top.stdout
    assert "SIGHUP" in " ".join(serve.stdout.split())
    sim = subprocess.run(
        [sys.executable, "-m", "closeproxy.sim", "--help"],
        env=cli_env({}),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "--no-auto-consent" in sim.stdout
    assert "(default: True)" not in sim.stdout  # a flag that turns consent off


# --- 9. the container's health check ----------------------------------------------------


def healthcheck_command() -> list[str]:
    dockerfile = (ROOT / "Dockerfile").read_text()
    match = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", dockerfile)
    assert match, "no exec-form HEALTHCHECK in the Dockerfile"
    command: list[str] = json.loads(match.group(1))
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


async def test_the_dockerfile_health_check_asks_the_configured_port(
    sim: RunningSim, token_file: Path, serve_processes: list[ServeProcess]
) -> None:
    server = await asyncio.to_thread(start_serve, proxy_env(sim, token_file))
    serve_processes.append(server)
    command = healthcheck_command()
    check = await asyncio.create_subprocess_exec(
        *command, env=cli_env({"CLOSEPROXY_PORT": str(server.port)})
    )
    assert await asyncio.wait_for(check.wait(), 20) == 0
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        idle = probe.getsockname()[1]
    check = await asyncio.create_subprocess_exec(
        *command,
        env=cli_env({"CLOSEPROXY_PORT": str(idle)}),
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(check.wait(), 20) != 0


# --- 10. README ----------------------------------------------------------------------


def test_readme_quick_start_is_consistent_and_states_measured_figures() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "about a minute" not in readme
    assert "just point their base URL at it" not in readme
    assert "activate" in readme  # bare `closeproxy` is explained by an activated venv
    assert "closeio_api" in readme and "close.io" in readme
