"""Logging in: `closeproxy login` (paste and loopback) and /admin/login, against the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from helpers import Proxy, cli_env, free_port, proxy_env, run_cli_async

from closeproxy.file_store import FileGrantStore
from closeproxy.sim import RunningSim

AUTHORIZE_LINE = "/oauth2/authorize/?"


class LoginProcess:
    """`closeproxy login` in a child process that the test talks to like a user."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr = ""

    @classmethod
    async def start(cls, env: dict[str, str], *args: str) -> LoginProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "closeproxy",
            "login",
            *args,
            env=cli_env(env),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def authorize_url(self) -> str:
        assert self.process.stderr is not None
        while True:
            line = (await asyncio.wait_for(self.process.stderr.readline(), 20)).decode()
            self.stderr += line
            if not line:
                raise AssertionError(f"login printed no authorize URL: {self.stderr}")
            if AUTHORIZE_LINE in line:
                return line.strip()

    async def finish(self, pasted: str | None = None) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(
            self.process.communicate(pasted.encode() if pasted is not None else None), 30
        )
        assert self.process.returncode is not None
        return self.process.returncode, out.decode(), self.stderr + err.decode()


async def consent(authorize_url: str) -> str:
    """What the browser does: open the authorize URL; returns where Close sends it."""
    async with (
        aiohttp.ClientSession() as browser,
        browser.get(authorize_url, allow_redirects=False) as resp,
    ):
        assert resp.status == 302
        return resp.headers["Location"]


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


async def test_paste_flow_stores_tokens_and_status_shows_who(
    sim: RunningSim, token_file: Path
) -> None:
    env = proxy_env(sim, token_file)
    login = await LoginProcess.start(env, "--no-browser")
    url = await login.authorize_url()
    params = query_of(url)
    assert params["client_id"] == [sim.state.config.client_id]
    assert params["response_type"] == ["code"]
    assert len(params["state"][0]) >= 22  # at least 128 bits, base64url
    assert params["code_challenge_method"] == ["S256"]
    landed = await consent(url)
    code, out, err = await login.finish(landed + "\n")
    assert code == 0, err
    assert sim.state.config.organization_id in out
    assert sim.state.config.user_id in out
    assert str(token_file) in out
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    status = await run_cli_async(env, "status", "--json")
    doc = json.loads(status.stdout)
    assert doc["organization_id"] == sim.state.config.organization_id
    assert doc["user_id"] == sim.state.config.user_id
    # PKCE: the simulator checked the verifier against the challenge
    (exchange,) = sim.state.token_log
    assert exchange["grant_type"] == "authorization_code"
    assert "code_verifier" in exchange
    assert sim.state.code_exchanges == 1
    tokens = FileGrantStore(token_file).read()
    assert tokens is not None
    assert tokens.access_token not in out + err


async def test_no_pkce_sends_neither_challenge_nor_verifier(
    sim: RunningSim, token_file: Path
) -> None:
    login = await LoginProcess.start(proxy_env(sim, token_file), "--no-browser", "--no-pkce")
    url = await login.authorize_url()
    assert "code_challenge" not in query_of(url)
    code, _, err = await login.finish(await consent(url) + "\n")
    assert code == 0, err
    (exchange,) = sim.state.token_log
    assert "code_verifier" not in exchange


async def test_a_bare_code_can_be_pasted(sim: RunningSim, token_file: Path) -> None:
    login = await LoginProcess.start(proxy_env(sim, token_file), "--no-browser")
    landed = await consent(await login.authorize_url())
    code, _, err = await login.finish(query_of(landed)["code"][0] + "\n")
    assert code == 0, err
    assert FileGrantStore(token_file).read() is not None


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda url: url.replace("state=", "state=X"), "state does not match"),
        (lambda url: url.split("&state=")[0], "no state parameter"),
        (
            lambda url: (
                url.split("?")[0] + "?error=access_denied&state=" + query_of(url)["state"][0]
            ),
            "declined",
        ),
        (
            lambda url: (
                url.split("?")[0] + "?error=server_error&state=" + query_of(url)["state"][0]
            ),
            "error instead of a code",
        ),
        (lambda url: "", "no input"),
    ],
    ids=["wrong-state", "missing-state", "access-denied", "other-error", "empty-stdin"],
)
async def test_bad_callbacks_are_refused_before_any_code_exchange(
    sim: RunningSim, token_file: Path, mangle, message: str
) -> None:
    login = await LoginProcess.start(proxy_env(sim, token_file), "--no-browser")
    landed = await consent(await login.authorize_url())
    code, out, err = await login.finish(mangle(landed) + "\n" if mangle(landed) else "")
    assert code == 1
    assert message in err
    assert "Traceback" not in err
    assert sim.state.token_requests == 0
    assert not token_file.exists()


async def test_a_code_used_twice_is_refused_and_nothing_written(
    sim: RunningSim, token_file: Path
) -> None:
    first = await LoginProcess.start(proxy_env(sim, token_file), "--no-browser")
    landed = await consent(await first.authorize_url())
    # the user pastes the landing URL of this login into a second, newer login: other state
    second = await LoginProcess.start(proxy_env(sim, token_file), "--no-browser")
    await second.authorize_url()
    code, _, err = await second.finish(landed + "\n")
    assert code == 1
    assert "state does not match" in err
    code, _, err = await first.finish(landed + "\n")
    assert code == 0, err
    assert sim.state.code_exchanges == 1


async def test_loopback_flow_catches_the_redirect(
    sim: RunningSim, token_file: Path, tmp_path: Path
) -> None:
    # A "browser" that follows the redirects like a real one would.
    browser = tmp_path / "fake-browser"
    browser.write_text(
        f"#!{sys.executable}\nimport sys, urllib.request\n"
        "body = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()\n"
        "sys.exit(0 if 'Logged in to Close' in body else 1)\n"
    )
    browser.chmod(0o700)
    redirect = f"http://127.0.0.1:{free_port()}/callback/close"
    env = proxy_env(sim, token_file, CLOSEPROXY_REDIRECT_URI=redirect, BROWSER=str(browser))
    result = await run_cli_async(env, "login", timeout=40)
    assert result.returncode == 0, result.stderr
    assert "waiting for the browser" in result.stderr
    assert sim.state.config.user_id in result.stdout
    (exchange,) = sim.state.token_log
    assert exchange["redirect_uri"] == redirect  # byte-identical to the authorize request
    assert FileGrantStore(token_file).read() is not None


async def test_loopback_flow_gives_up_after_the_login_timeout(
    sim: RunningSim, token_file: Path
) -> None:
    redirect = f"http://127.0.0.1:{free_port()}/cb"
    env = proxy_env(sim, token_file, CLOSEPROXY_REDIRECT_URI=redirect)
    result = await run_cli_async(env, "login", "--login-timeout", "1", timeout=30)
    assert result.returncode == 1
    assert "no callback arrived within 1 s" in result.stderr
    assert AUTHORIZE_LINE in result.stderr  # the user was shown where to go
    assert not token_file.exists()


async def test_loopback_listener_refuses_foreign_callbacks_and_keeps_waiting(
    sim: RunningSim, token_file: Path
) -> None:
    port = free_port()
    redirect = f"http://127.0.0.1:{port}/cb"
    env = proxy_env(sim, token_file, CLOSEPROXY_REDIRECT_URI=redirect)
    login = await LoginProcess.start(env)
    url = await login.authorize_url()
    async with aiohttp.ClientSession() as browser:
        async with browser.get(f"{redirect}?code=forged&state=forged") as resp:
            assert resp.status == 400
            assert "forged" not in await resp.text()  # nothing reflected
        async with browser.get(url) as resp:  # the real consent, redirects followed
            assert resp.status == 200
            assert "Logged in to Close" in await resp.text()
            assert resp.headers["Cache-Control"] == "no-store"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
    code, _, err = await login.finish()
    assert code == 0, err
    assert "refused a callback" in err
    assert sim.state.code_exchanges == 1


async def test_admin_login_through_the_running_proxy(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    async with aiohttp.ClientSession() as browser:
        async with browser.get(f"{proxy.url}/admin/login", allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Cache-Control"] == "no-store"
            authorize = resp.headers["Location"]
        params = query_of(authorize)
        assert params["redirect_uri"] == [f"{proxy.url}/admin/callback"]
        assert params["code_challenge_method"] == ["S256"]
        callback = await consent(authorize)
        # Close's redirect is a cross-site navigation; state protects it, not the Origin guard
        headers = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        async with browser.get(callback, headers=headers) as resp:
            page = await resp.text()
            assert resp.status == 200, page
            assert resp.headers["Cache-Control"] == "no-store"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
            assert resp.headers["Content-Type"].startswith("text/html")
        for secret in (params["state"][0], query_of(callback)["code"][0]):
            assert secret not in page
        async with browser.get(callback) as resp:  # replayed
            assert resp.status == 400
            assert "already used" in await resp.text()
        async with browser.get(f"{proxy.url}/api/v1/me/") as resp:
            assert resp.status == 200
    assert sim.state.code_exchanges == 1
    assert sim.state.token_requests == 1


async def test_admin_callback_refuses_unknown_state_and_access_denied(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    async with aiohttp.ClientSession() as browser:
        async with browser.get(
            f"{proxy.url}/admin/callback?code=abc&state=<script>alert(1)</script>"
        ) as resp:
            assert resp.status == 400
            assert "<script>" not in await resp.text()
        async with browser.get(f"{proxy.url}/admin/login", allow_redirects=False) as resp:
            state = query_of(resp.headers["Location"])["state"][0]
        async with browser.get(
            f"{proxy.url}/admin/callback?error=access_denied&state={state}"
        ) as resp:
            assert resp.status == 400
            assert "declined" in await resp.text()
    assert sim.state.token_requests == 0
    assert not token_file.exists()


async def test_loopback_callback_is_single_use_even_when_two_arrive_at_once(
    sim: RunningSim, token_file: Path
) -> None:
    port = free_port()
    redirect = f"http://127.0.0.1:{port}/cb"
    sim.state.token_delay = 0.3  # the first exchange is still running when the second comes
    login = await LoginProcess.start(proxy_env(sim, token_file, CLOSEPROXY_REDIRECT_URI=redirect))
    landed = await consent(await login.authorize_url())
    async with aiohttp.ClientSession() as browser:

        async def visit() -> int:
            async with browser.get(landed) as resp:
                return resp.status

        statuses = sorted(await asyncio.gather(visit(), visit()))
    code, _, err = await login.finish()
    assert statuses == [200, 400]
    assert code == 0, err
    assert sim.state.code_exchanges == 1
    assert sim.state.reuse_detected == 0


async def test_admin_login_with_a_redirect_uri_elsewhere_explains_instead_of_dead_ending(
    sim: RunningSim, token_file: Path, start_proxy
) -> None:
    async with start_proxy(redirect_uri="https://localhost/closeproxy/callback") as proxy:
        async with (
            aiohttp.ClientSession() as browser,
            browser.get(f"{proxy.url}/admin/login", allow_redirects=False) as resp,
        ):
            page = await resp.text()
    assert resp.status == 409
    assert "closeproxy login" in page
    assert sim.state.token_requests == 0


NO_BROWSER = {"DISPLAY": "", "WAYLAND_DISPLAY": "", "BROWSER": ""}


async def test_loopback_login_also_takes_a_pasted_address(
    sim: RunningSim, token_file: Path
) -> None:
    # Over SSH the browser is on another machine: its redirect never reaches the listener,
    # so the user pastes the address it landed on. A wrong one is refused; the right one wins.
    redirect = f"http://127.0.0.1:{free_port()}/cb"
    env = proxy_env(sim, token_file, CLOSEPROXY_REDIRECT_URI=redirect, **NO_BROWSER)
    login = await LoginProcess.start(env)
    landed = await consent(await login.authorize_url())
    assert login.process.stdin is not None
    login.process.stdin.write(landed.replace("state=", "state=stale").encode() + b"\n")
    code, out, err = await login.finish(landed + "\n")
    assert code == 0, err
    assert "No browser could be opened here" in err
    assert "state does not match this login" in err
    assert "still waiting" in err
    assert sim.state.config.user_id in out
    assert sim.state.code_exchanges == 1
    assert FileGrantStore(token_file).read() is not None


class Terminal:
    """A pseudo-terminal for a child's stdin, stdout and stderr, and what it printed."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: every copy of the slave side is closed
                return
            if not chunk:
                return
            self.output += chunk

    def start_reading(self) -> None:
        os.close(self.slave)
        self._reader.start()

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def close(self) -> None:
        self._reader.join(5)
        os.close(self.master)


@pytest.mark.parametrize("mode", ["loopback", "paste"])
async def test_on_a_terminal_login_counts_down_and_ends_its_line_on_ctrl_c(
    sim: RunningSim, token_file: Path, mode: str
) -> None:
    redirect = f"http://127.0.0.1:{free_port()}/cb"
    env = proxy_env(sim, token_file, CLOSEPROXY_REDIRECT_URI=redirect, **NO_BROWSER)
    args = ["--login-timeout", "120"] + (["--no-browser"] if mode == "paste" else [])
    terminal = Terminal()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "closeproxy",
        "login",
        *args,
        env=cli_env(env),
        stdin=terminal.slave,
        stdout=terminal.slave,
        stderr=terminal.slave,
    )
    terminal.start_reading()
    try:
        stamps: set[str] = set()
        for _ in range(200):  # the countdown moves: two different stamps within 10 s
            stamps = set(re.findall(r"\[ ?\d+:\d\d left\]", terminal.text))
            if len(stamps) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(stamps) >= 2, terminal.text
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert await asyncio.wait_for(process.wait(), 20) == 130
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        terminal.close()
    text = terminal.text
    if mode == "loopback":
        assert "No browser could be opened here" in text
    else:
        assert "Open this URL in a browser" in text
    before, found, _ = text.partition("closeproxy login: interrupted")
    assert found, text
    assert before.endswith("\n"), repr(before[-80:])  # the prompt's line was ended first
    assert sim.state.token_requests == 0


# --- a new login retires the grant it replaced --------------------------------------------


async def log_in(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    login = await LoginProcess.start(env, "--no-browser", *args)
    landed = await consent(await login.authorize_url())
    return await login.finish(landed + "\n")


async def test_a_second_login_revokes_the_grant_it_replaced(
    sim: RunningSim, token_file: Path
) -> None:
    env = proxy_env(sim, token_file)
    code, _, err = await log_in(env)
    assert code == 0, err
    first = FileGrantStore(token_file).read()
    assert first is not None and first.refresh_token is not None
    code, out, err = await log_in(env)
    assert code == 0, err
    second = FileGrantStore(token_file).read()
    assert second is not None and second.refresh_token != first.refresh_token
    assert [entry["token"] for entry in sim.state.revoke_log] == [first.refresh_token]
    assert not sim.state.access_token_valid(first.access_token)  # the whole grant is gone
    assert sim.state.access_token_valid(second.access_token)
    assert "revoked the previous grant" in out
    assert first.refresh_token not in out + err


async def test_keep_previous_leaves_the_old_grant_alone(sim: RunningSim, token_file: Path) -> None:
    env = proxy_env(sim, token_file)
    assert (await log_in(env))[0] == 0
    first = FileGrantStore(token_file).read()
    assert first is not None
    code, out, err = await log_in(env, "--keep-previous")
    assert code == 0, err
    assert sim.state.revoke_log == []
    assert sim.state.access_token_valid(first.access_token)
    assert "kept the previous grant" in out


async def test_a_revoke_failure_never_fails_the_new_login(
    sim: RunningSim, token_file: Path
) -> None:
    env = proxy_env(sim, token_file)
    assert (await log_in(env))[0] == 0
    first = FileGrantStore(token_file).read()
    assert first is not None
    sim.state.revoke_down = True
    code, out, err = await log_in(env)
    assert code == 0, err
    assert "the previous grant could not be revoked" in err
    assert "HTTP 503" in err
    assert len(sim.state.revoke_log) == 1  # one quick try, no retry
    assert sim.state.access_token_valid(first.access_token)
    second = FileGrantStore(token_file).read()
    assert second is not None and second.access_token != first.access_token
    assert sim.state.access_token_valid(second.access_token)
    assert "logged in to Close" in out


async def test_a_login_through_the_proxy_revokes_the_grant_it_replaced(
    sim: RunningSim, token_file: Path, proxy: Proxy
) -> None:
    tokens = []
    async with aiohttp.ClientSession() as browser:
        for _ in range(2):
            async with browser.get(f"{proxy.url}/admin/login") as resp:  # redirects followed
                page = await resp.text()
                assert resp.status == 200, page
            tokens.append(FileGrantStore(token_file).read())
    first, second = tokens
    assert first is not None and second is not None
    assert "Revoked the previous grant at Close" in page
    assert [entry["token"] for entry in sim.state.revoke_log] == [first.refresh_token]
    assert not sim.state.access_token_valid(first.access_token)
    assert sim.state.access_token_valid(second.access_token)
