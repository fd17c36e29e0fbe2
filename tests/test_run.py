"""`closeproxy run -- CMD`: a private proxy, the key in CLOSE_API_KEY, CMD's exit status."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import cli_env, proxy_env, run_cli_async, seed_tokens

from closeproxy.sim import RunningSim

CHILD = textwrap.dedent(
    """
    import base64, json, os, sys, urllib.error, urllib.request

    def call(auth):
        request = urllib.request.Request(os.environ["CLOSE_API_URL"] + "me/")
        if auth:
            request.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    key = os.environ["CLOSE_API_KEY"]
    basic = "Basic " + base64.b64encode((key + ":").encode()).decode()
    print(json.dumps({
        "with_key": call(basic),
        "without_key": call(None),
        "wrong_key": call("Basic " + base64.b64encode(b"nope:").decode()),
        "proxy_url": os.environ["CLOSEPROXY_URL"],
        "secret_visible": "CLOSEPROXY_CLIENT_SECRET" in os.environ,
    }))
    sys.exit(3)
    """
)


async def test_child_uses_the_key_as_its_api_key_and_its_exit_status_is_returned(
    sim: RunningSim, token_file: Path
) -> None:
    seed_tokens(sim, token_file)
    result = await run_cli_async(
        proxy_env(sim, token_file), "run", "--", sys.executable, "-c", CHILD
    )
    assert result.returncode == 3, result.stderr
    report = __import__("json").loads(result.stdout)
    status, body = report["with_key"]
    assert status == 200
    assert body["id"] == sim.state.config.user_id
    assert report["without_key"][0] == 401
    assert report["without_key"][1]["closeproxy_error"] == "proxy_key_required"
    assert report["wrong_key"][0] == 401
    assert report["secret_visible"] is False
    # the key never reached Close: exactly one upstream request, with the bearer token
    (record,) = sim.state.api_log
    auths = [v for k, v in record.headers if k.lower() == "authorization"]
    assert len(auths) == 1
    assert auths[0].startswith("Bearer simacc_")
    # the proxy is gone with the child: its port no longer answers
    port = int(report["proxy_url"].rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def test_sigterm_to_run_reaches_the_child_and_nothing_is_left_behind(
    sim: RunningSim, token_file: Path, tmp_path: Path
) -> None:
    seed_tokens(sim, token_file)
    marker = tmp_path / "child.pid"
    child = textwrap.dedent(
        f"""
        import os, signal, sys, time
        def stop(signum, frame):
            open({str(marker)!r} + ".term", "w").write(str(signum))
            sys.exit(7)
        signal.signal(signal.SIGTERM, stop)
        open({str(marker)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
        """
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "closeproxy",
        "run",
        "--",
        sys.executable,
        "-c",
        child,
        env=cli_env(proxy_env(sim, token_file)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(200):
        if marker.exists() and marker.read_text():
            break
        await asyncio.sleep(0.05)
    child_pid = int(marker.read_text())
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 7, err.decode()
    assert Path(str(marker) + ".term").read_text() == str(int(signal.SIGTERM))
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)


async def test_child_killed_by_a_signal_exits_like_a_shell_reports_it(
    sim: RunningSim, token_file: Path
) -> None:
    result = await run_cli_async(
        proxy_env(sim, token_file),
        "run",
        "--",
        sys.executable,
        "-c",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    )
    assert result.returncode == 128 + signal.SIGKILL


async def test_command_not_found_and_missing_command(sim: RunningSim, token_file: Path) -> None:
    env = proxy_env(sim, token_file)
    missing = await run_cli_async(env, "run", "--", "no-such-command-anywhere")
    assert missing.returncode == 127
    assert "command not found: no-such-command-anywhere" in missing.stderr
    nothing = await run_cli_async(env, "run")
    assert nothing.returncode == 2
    assert "nothing to run" in nothing.stderr


async def test_run_works_when_not_logged_in_and_says_so_to_the_child(
    sim: RunningSim, token_file: Path
) -> None:
    result = await run_cli_async(
        proxy_env(sim, token_file), "run", "--", sys.executable, "-c", CHILD
    )
    report = __import__("json").loads(result.stdout)
    assert report["with_key"][0] == 401
    assert report["with_key"][1]["closeproxy_error"] == "login_required"
