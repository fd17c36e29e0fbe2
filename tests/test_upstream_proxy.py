"""Reaching Close through an outbound proxy: a real tinyproxy between closeproxy and the sim."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from helpers import (
    FAST_BACKOFF,
    ServeProcess,
    proxy_env,
    run_cli_async,
    seed_tokens,
    start_serve,
)
from yarl import URL

from closeproxy.config import load_settings
from closeproxy.file_store import FileGrantStore
from closeproxy.server import running
from closeproxy.sim import RunningSim
from closeproxy.upstream_proxy import bypasses, parse_proxy_url, resolve

PROXY_USER = "proxyuser"
PROXY_PASSWORD = "pr0xy-Pa55word-sentinel"


@dataclass
class Tinyproxy:
    """Debian's tinyproxy on a free loopback port, logging every request line to a file."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines tinyproxy saw, e.g. 'GET http://127.0.0.1:1234/api/v1/me/ HTTP/1.1'."""
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return [line.split("): ", 1)[1] for line in text.splitlines() if "Request (file" in line]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def tinyproxy_running(directory: Path, *, basic_auth: bool = False) -> Iterator[Tinyproxy]:
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.fail("tinyproxy is needed for these tests: apt-get install tinyproxy (see .ci/run)")
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = directory / "tinyproxy.log"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 30",
        f'LogFile "{log}"',
        "LogLevel Info",
        "MaxClients 50",
        "Allow 127.0.0.1",
    ]
    if basic_auth:
        lines.append(f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}")
    config = directory / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    process = subprocess.Popen(
        [binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(500):
            if process.poll() is not None:
                pytest.fail(f"tinyproxy exited with {process.returncode}: {log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(0.01)
        else:
            pytest.fail("tinyproxy did not start listening within 5 s")
        yield Tinyproxy(process, port, log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    with tinyproxy_running(tmp_path / "tinyproxy") as proxy:
        yield proxy


@pytest.fixture
def auth_tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    with tinyproxy_running(tmp_path / "tinyproxy-auth", basic_auth=True) as proxy:
        yield proxy


@contextlib.asynccontextmanager
async def closeproxy_with(
    sim: RunningSim, token_file: Path, flags: dict[str, str] | None = None, /, **environ: str
) -> AsyncIterator[str]:
    settings = load_settings(flags or {}, {**proxy_env(sim, token_file), **environ})
    async with running(settings, oauth_backoff=FAST_BACKOFF) as where:
        yield where.url


def seen(tiny: Tinyproxy, path: str) -> list[str]:
    return [line for line in tiny.requests() if path in line]


# --- acceptance 1: the environment's proxy, and NO_PROXY --------------------------------


async def test_environment_proxy_carries_api_calls_refresh_and_revoke(
    sim: RunningSim, token_file: Path, tinyproxy: Tinyproxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    env = {"HTTP_PROXY": tinyproxy.url, "HTTPS_PROXY": tinyproxy.url}
    async with closeproxy_with(sim, token_file, **env) as url:
        async with client.get(f"{url}/api/v1/me/") as resp:
            assert resp.status == 200
            assert (await resp.json())["id"] == sim.state.config.user_id
        async with client.post(f"{url}/admin/refresh") as resp:
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
        assert doc["upstream_proxy"] == {
            "url": tinyproxy.url,
            "source": "HTTP_PROXY",
            "credentials": False,
        }
        async with client.get(f"{url}/api/v1/me/") as resp:  # with the refreshed token
            assert resp.status == 200
        async with client.post(f"{url}/admin/revoke") as resp:
            assert resp.status == 200
            assert (await resp.json())["revoked"] is True
    assert len(seen(tinyproxy, "/api/v1/me/")) == 2
    assert len(seen(tinyproxy, "/oauth2/token/")) == 1
    assert seen(tinyproxy, "/oauth2/revoke/")
    assert sim.state.refreshes == 1
    assert sim.state.revokes >= 1
    # The simulator saw requests that came through the proxy (it adds Via).
    assert all(
        any(name.lower() == "via" and "tinyproxy" in value for name, value in record.headers)
        for record in sim.state.api_log
    )


async def test_no_proxy_covering_the_api_host_goes_direct(
    sim: RunningSim, token_file: Path, tinyproxy: Tinyproxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    env = {"HTTP_PROXY": tinyproxy.url, "NO_PROXY": "example.com, 127.0.0.0/8"}
    async with closeproxy_with(sim, token_file, **env) as url:
        async with client.get(f"{url}/api/v1/me/") as resp:
            assert resp.status == 200
        async with client.post(f"{url}/admin/refresh") as resp:
            assert resp.status == 200
            doc = await resp.json()
    assert doc["upstream_proxy"]["url"] is None
    assert doc["upstream_proxy"]["source"] == "NO_PROXY covers 127.0.0.1"
    assert tinyproxy.requests() == []
    assert sim.state.refreshes == 1
    assert not any(name.lower() == "via" for name, _ in sim.state.api_log[0].headers)


async def test_the_explicit_setting_wins_over_the_environment(
    sim: RunningSim, token_file: Path, tinyproxy: Tinyproxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    async with closeproxy_with(
        sim, token_file, {"upstream_proxy": tinyproxy.url}, HTTP_PROXY=dead
    ) as url:
        async with client.get(f"{url}/api/v1/me/") as resp:
            assert resp.status == 200
    async with closeproxy_with(
        sim, token_file, CLOSEPROXY_UPSTREAM_PROXY="none", HTTP_PROXY=dead
    ) as url:
        async with client.get(f"{url}/api/v1/me/") as resp:
            assert resp.status == 200
    assert len(seen(tinyproxy, "/api/v1/me/")) == 1


async def test_a_proxy_that_cannot_be_reached_is_a_502_naming_it(
    sim: RunningSim, token_file: Path, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file, expires_in=1)  # the token needs a refresh too
    dead = f"http://127.0.0.1:{_free_port()}"
    async with closeproxy_with(sim, token_file, {"upstream_proxy": dead}) as url:
        async with client.post(f"{url}/admin/refresh") as resp:
            body = await resp.json()
            assert resp.status == 503
            assert body["closeproxy_error"] == "token_service_unavailable"
            assert f"outbound proxy 127.0.0.1:{URL(dead).port}" in body["error"]
        seed_tokens(sim, token_file)
        async with client.get(f"{url}/api/v1/me/") as resp:
            body = await resp.json()
            assert resp.status == 502
    assert body["closeproxy_error"] == "upstream_proxy_failed"
    assert f"cannot connect to the outbound proxy {dead}" in body["error"]
    assert sim.state.api_requests == 0


# --- acceptance 2: credentials in --upstream-proxy ----------------------------------------


async def test_proxy_credentials_work_and_never_show(
    sim: RunningSim,
    token_file: Path,
    auth_tinyproxy: Tinyproxy,
    client: aiohttp.ClientSession,
    serve_processes: list[ServeProcess],
) -> None:
    seed_tokens(sim, token_file)
    with_auth = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{auth_tinyproxy.port}"
    env = proxy_env(sim, token_file, CLOSEPROXY_LOG_LEVEL="debug")
    server = await asyncio.to_thread(start_serve, env, "--upstream-proxy", with_auth)
    serve_processes.append(server)
    async with client.get(f"{server.url}/api/v1/me/") as resp:
        assert resp.status == 200, await resp.text()
    async with client.post(f"{server.url}/admin/refresh") as resp:
        assert resp.status == 200, await resp.text()
    async with client.get(f"{server.url}/admin/status") as resp:
        admin_status = await resp.text()
    refreshed = await run_cli_async(env, "refresh", "--upstream-proxy", with_auth)
    assert refreshed.returncode == 0, refreshed.stderr
    text = await run_cli_async(env, "status", "--upstream-proxy", with_auth)
    as_json = await run_cli_async(env, "status", "--json", "--upstream-proxy", with_auth)
    await asyncio.to_thread(server.stop)
    assert sim.state.refreshes == 2
    assert seen(auth_tinyproxy, "/api/v1/me/")
    assert len(seen(auth_tinyproxy, "/oauth2/token/")) == 2
    doc = json.loads(as_json.stdout)
    assert doc["upstream_proxy"] == {
        "url": f"http://127.0.0.1:{auth_tinyproxy.port}",
        "source": "--upstream-proxy",
        "credentials": True,
    }
    assert f"via http://127.0.0.1:{auth_tinyproxy.port}" in text.stdout
    assert "connections to Close at" in server.logs  # the debug log ran and said where
    encoded = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    for output in (
        server.logs,
        "".join(server.stdout),
        admin_status,
        refreshed.stdout + refreshed.stderr,
        text.stdout + text.stderr,
        as_json.stdout + as_json.stderr,
    ):
        assert PROXY_PASSWORD not in output
        assert encoded not in output
    # Proxy-Authorization is for the proxy: Close never receives it.
    for record in sim.state.api_log:
        assert not any(name.lower() == "proxy-authorization" for name, _ in record.headers)


async def test_a_proxy_refusing_without_credentials_is_a_502_naming_it(
    sim: RunningSim, token_file: Path, auth_tinyproxy: Tinyproxy, client: aiohttp.ClientSession
) -> None:
    # tinyproxy answers 407 when credentials are missing (wrong ones get a non-standard 401,
    # which over an http:// API base cannot be told apart from Close's own).
    seed_tokens(sim, token_file)
    async with closeproxy_with(sim, token_file, {"upstream_proxy": auth_tinyproxy.url}) as url:
        async with client.get(f"{url}/api/v1/me/") as resp:
            body = await resp.json()
            assert resp.status == 502
        async with client.post(f"{url}/admin/refresh") as resp:
            refresh_body = await resp.json()
            assert resp.status == 503
    assert body["closeproxy_error"] == "upstream_proxy_failed"
    assert f"outbound proxy {auth_tinyproxy.url} refused" in body["error"]
    assert "407" in body["error"]
    assert refresh_body["closeproxy_error"] == "token_service_unavailable"
    assert "407" in refresh_body["error"]
    assert sim.state.api_requests == 0
    assert sim.state.token_requests == 0


@pytest.mark.parametrize("auth", [False, True], ids=["unreachable-target", "no-credentials"])
async def test_a_refused_tunnel_to_an_https_api_is_a_502_naming_the_proxy(
    sim: RunningSim, token_file: Path, tmp_path: Path, client: aiohttp.ClientSession, auth: bool
) -> None:
    # An https API base goes through a CONNECT tunnel; nothing listens at the target, so
    # the proxy refuses the tunnel (or asks for credentials first) before any TLS begins.
    api = f"https://127.0.0.1:{_free_port()}"
    seed_tokens(sim, token_file, api_url=api)
    with tinyproxy_running(tmp_path / "connect", basic_auth=auth) as tiny:
        flags = {"api_url": api, "upstream_proxy": tiny.url}
        async with closeproxy_with(sim, token_file, flags) as url:
            async with client.get(f"{url}/api/v1/me/") as resp:
                body = await resp.json()
                assert resp.status == 502
        assert [line for line in tiny.requests() if line.startswith("CONNECT ")]
    assert body["closeproxy_error"] == "upstream_proxy_failed"
    assert f"the outbound proxy {tiny.url} refused the connection" in body["error"]
    assert ("407" in body["error"]) is auth


# --- acceptance 3: ~/.netrc is never read -------------------------------------------------


async def test_a_netrc_for_the_api_host_changes_nothing_that_is_sent(
    sim: RunningSim,
    token_file: Path,
    tmp_path: Path,
    tinyproxy: Tinyproxy,
    client: aiohttp.ClientSession,
    serve_processes: list[ServeProcess],
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(
        "machine 127.0.0.1 login netrc-user password netrc-password\n"
        "default login netrc-default password netrc-default-password\n"
    )
    netrc.chmod(0o600)
    seed_tokens(sim, token_file)
    env = proxy_env(sim, token_file, HOME=str(home), NETRC=str(netrc))
    for proxied in (False, True):
        extra = {"HTTP_PROXY": tinyproxy.url} if proxied else {}
        server = await asyncio.to_thread(start_serve, {**env, **extra})
        serve_processes.append(server)
        async with client.get(f"{server.url}/api/v1/me/") as resp:
            assert resp.status == 200
        async with client.post(f"{server.url}/admin/refresh") as resp:
            assert resp.status == 200
        async with client.post(f"{server.url}/admin/revoke") as resp:
            assert resp.status == 200
        await asyncio.to_thread(server.stop)
        seed_tokens(sim, token_file)
    assert len(sim.state.api_log) == 2
    for record in sim.state.api_log:
        auth = [value for name, value in record.headers if name.lower() == "authorization"]
        assert len(auth) == 1 and auth[0].startswith("Bearer simacc_")
    assert len(sim.state.oauth_headers) >= 4  # two refreshes, two revokes (at least)
    for headers in sim.state.oauth_headers:
        names = {name.lower() for name, _ in headers}
        assert "authorization" not in names
        assert "proxy-authorization" not in names
    assert FileGrantStore(token_file).read() is not None


# --- the decision itself, without sockets -------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"),
    [
        ("*", "api.close.com", 443, True),
        ("close.com", "api.close.com", 443, True),
        (".close.com", "api.close.com", 443, True),
        ("*.close.com", "api.close.com", 443, True),
        ("close.com", "notclose.com", 443, False),
        ("api.close.com:8443", "api.close.com", 443, False),
        ("api.close.com:443", "api.close.com", 443, True),
        ("10.0.0.0/8, 127.0.0.1", "127.0.0.1", 80, True),
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("[::1]", "[::1]", 80, True),
        ("::1", "::1", 80, True),
        ("", "api.close.com", 443, False),
    ],
)
def test_no_proxy_matching_follows_curl(no_proxy: str, host: str, port: int, bypass: bool) -> None:
    assert bypasses(no_proxy, host, port) is bypass


def test_https_api_uses_https_proxy_lower_case_first() -> None:
    environ = {
        "HTTPS_PROXY": "http://upper:3128",
        "https_proxy": "lower:3128",
        "HTTP_PROXY": "http://plain:3128",
    }
    route = resolve(None, URL("https://api.close.com"), environ)
    assert route.proxy is not None
    assert route.proxy.display == "http://lower:3128"
    assert route.source == "https_proxy"
    http_route = resolve(None, URL("http://127.0.0.1:9"), environ)
    assert http_route.proxy is not None and http_route.proxy.display == "http://plain:3128"


def test_proxy_urls_are_validated_and_their_reprs_masked() -> None:
    proxy = parse_proxy_url("http://bob:s%40cret@proxy.corp:3128")
    assert proxy.password == "s@cret"
    assert "s@cret" not in repr(proxy) and "s%40cret" not in repr(proxy)
    assert "s@cret" not in str(load_settings({"upstream_proxy": "http://bob:s%40cret@p:1"}, {}))
    for bad in ("socks5://proxy:1080", "http://proxy:3128/path", "http://:3128"):
        with pytest.raises(ValueError, match="proxy"):
            parse_proxy_url(bad)


async def test_login_exchanges_the_code_and_retires_the_old_grant_through_the_proxy(
    sim: RunningSim, token_file: Path, tinyproxy: Tinyproxy
) -> None:
    from test_login import log_in  # the CLI login, driven like a user with a browser

    env = proxy_env(sim, token_file, HTTP_PROXY=tinyproxy.url)
    for _ in range(2):
        code, _, err = await log_in(env)
        assert code == 0, err
    assert len(seen(tinyproxy, "/oauth2/token/")) == 2  # both code exchanges
    assert len(seen(tinyproxy, "/oauth2/revoke/")) == 1  # the first grant, retired
    assert sim.state.code_exchanges == 2
    assert sim.state.revokes == 1


async def test_a_malformed_proxy_setting_is_a_usage_error_naming_it(
    sim: RunningSim, token_file: Path, tmp_path: Path
) -> None:
    env = proxy_env(sim, token_file, HTTPS_PROXY="socks5://proxy:1080")
    env["CLOSEPROXY_API_URL"] = "https://api.close.com"
    result = await run_cli_async(env, "serve")
    assert result.returncode == 2
    assert "environment variable HTTPS_PROXY: socks5:// proxies are not supported" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    config = tmp_path / "config.toml"
    config.write_text('upstream_proxy = "http://proxy:3128/some/path"\n')
    result = await run_cli_async(proxy_env(sim, token_file), "status", "--config", str(config))
    assert result.returncode == 2
    assert f"config file {config} (upstream_proxy)" in result.stderr
    config.write_text('upstream_proxy = "none"\n')
    env = proxy_env(sim, token_file, HTTP_PROXY="http://proxy:3128")
    result = await run_cli_async(env, "status", "--config", str(config))
    assert f"direct (config file {config} (upstream_proxy) is none)" in result.stdout
