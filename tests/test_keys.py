"""Scoped keys ([keys.NAME] tables, SPEC §12) over real sockets against the simulator."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AUDIT
from helpers import (
    FAST_BACKOFF,
    RawResponse,
    cli_env,
    proxy_env,
    raw_request,
    run_cli,
    run_cli_async,
    seed_tokens,
    start_serve,
)

from closeproxy.config import Settings, load_settings
from closeproxy.errors import ConfigError
from closeproxy.logs import JsonFormatter, TextFormatter
from closeproxy.server import running
from closeproxy.sim import RunningSim

PROXY_KEY = "proxy-key-0123456789abcdef"
REPORTS_KEY = "reports-key-0123456789abcdef"
AGENT_KEY = "agent-key-0123456789abcdef"
CONFIG = """
[keys.reports]
key_file = "reports.key"
methods = ["get", "HEAD"]
paths = ["/api/v1/lead/", "/api/v1/activity/"]

[keys.agent]
paths = ["/api/v1/me/"]
"""


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def write_config(tmp_path: Path, text: str = CONFIG) -> Path:
    (tmp_path / "reports.key").write_text(REPORTS_KEY + "\n")
    config = tmp_path / "config.toml"
    config.write_text(text)
    return config


def keys_env(sim: RunningSim, token_file: Path, config: Path, **extra: str) -> dict[str, str]:
    return proxy_env(
        sim,
        token_file,
        CLOSEPROXY_CONFIG=str(config),
        CLOSEPROXY_KEY_AGENT=AGENT_KEY,
        **extra,
    )


@contextlib.asynccontextmanager
async def keyed_proxy(
    sim: RunningSim, token_file: Path, tmp_path: Path, *, proxy_key: bool = True
) -> AsyncIterator[int]:
    extra = {"CLOSEPROXY_PROXY_KEY": PROXY_KEY} if proxy_key else {}
    settings = load_settings({}, keys_env(sim, token_file, write_config(tmp_path), **extra))
    async with running(settings, oauth_backoff=FAST_BACKOFF) as where:
        AUDIT.proxies += 1
        assert where.port is not None
        yield where.port


async def send(
    port: int, method: str, target: str, auth: str | None = None, *extra: str
) -> RawResponse:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    lines += list(extra)
    if method in {"POST", "PUT", "PATCH"}:
        lines += ["Content-Type: application/json", "Content-Length: 2"]
        return await raw_request(port, "\n".join(lines) + "\n\n", b"{}")
    return await raw_request(port, "\n".join(lines) + "\n\n")


def error_of(resp: RawResponse) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(resp.body)
    return doc


async def test_a_scoped_key_passes_as_basic_user_name_and_as_bearer(
    sim: RunningSim, token_file: Path, tmp_path: Path
) -> None:
    seed_tokens(sim, token_file)
    async with keyed_proxy(sim, token_file, tmp_path) as port:
        for auth in (basic(REPORTS_KEY), f"Bearer {REPORTS_KEY}"):
            resp = await send(port, "GET", "/api/v1/lead/", auth)
            assert resp.status == 200, resp.body
            resp = await send(port, "HEAD", "/api/v1/activity/?_limit=1", auth)
            assert resp.status == 200
        # the prefix matches its own segment without the slash too: forwarded, and Close
        # (here the simulator) answers it
        resp = await send(port, "GET", "/api/v1/lead", f"Bearer {REPORTS_KEY}")
        assert b"closeproxy_error" not in resp.body
        resp = await send(port, "GET", "/api/v1/me/", basic(AGENT_KEY))
        assert resp.status == 200
    assert [r.raw_path for r in sim.state.api_log] == [
        "/api/v1/lead/",
        "/api/v1/activity/?_limit=1",
        "/api/v1/lead/",
        "/api/v1/activity/?_limit=1",
        "/api/v1/lead",
        "/api/v1/me/",
    ]
    for record in sim.state.api_log:
        auths = [v for k, v in record.headers if k.lower() == "authorization"]
        assert len(auths) == 1 and auths[0].startswith("Bearer simacc_")


@pytest.mark.parametrize(
    ("method", "target", "extra", "status", "code"),
    [
        ("POST", "/api/v1/lead/", (), 403, "key_not_allowed"),
        ("DELETE", "/api/v1/lead/lead_1/", (), 403, "key_not_allowed"),
        ("GET", "/api/v1/opportunity/", (), 403, "key_not_allowed"),
        ("GET", "/api/v1/leadership/", (), 403, "key_not_allowed"),
        ("GET", "/api/v1/", (), 403, "key_not_allowed"),
        ("GET", "/api/v1/me/", (), 403, "key_not_allowed"),
        # a method override would make Close treat a GET as a DELETE
        (
            "GET",
            "/api/v1/lead/lead_1/",
            ("X-HTTP-Method-Override: DELETE",),
            403,
            "key_not_allowed",
        ),
        ("GET", "/api/v1/lead/lead_1/", ("x-http-method: PUT",), 403, "key_not_allowed"),
        # escapes: dot segments and encoded separators never reach a prefix check
        ("GET", "/api/v1/lead/../activity/", (), 400, "bad_path"),
        ("GET", "/api/v1/lead/../opportunity/", (), 400, "bad_path"),
        ("GET", "/api/v1/lead/%2e%2e/opportunity/", (), 400, "bad_path"),
        ("GET", "/api/v1/lead/%2E%2E/opportunity/", (), 400, "bad_path"),
        ("GET", "/api/v1/lead%2F..%2Fopportunity/", (), 400, "bad_path"),
        ("GET", "/api/v1/lead/x%2Fy/", (), 400, "bad_path"),
        ("GET", "/api/v1/lead/x%252Fy/", (), 400, "bad_path"),
        ("GET", "/api/v1/lead/x%5cy/", (), 400, "bad_path"),
        ("GET", "/api/v1/lead/x%2ey/", (), 400, "bad_path"),
        ("GET", "/api/v1/lead\\..\\opportunity/", (), 400, "bad_path"),
        # scoped keys never reach the admin routes, nor anything else outside the API
        ("POST", "/admin/refresh", (), 403, "key_not_allowed"),
        ("GET", "/admin/status", (), 403, "key_not_allowed"),
        ("POST", "/admin/revoke", (), 403, "key_not_allowed"),
        ("GET", "/admin/", (), 403, "key_not_allowed"),
        ("GET", "/metrics", (), 403, "key_not_allowed"),
    ],
)
async def test_a_scoped_key_outside_its_scope_is_refused_and_nothing_is_forwarded(
    sim: RunningSim,
    token_file: Path,
    tmp_path: Path,
    method: str,
    target: str,
    extra: tuple[str, ...],
    status: int,
    code: str,
) -> None:
    tokens = seed_tokens(sim, token_file)
    async with keyed_proxy(sim, token_file, tmp_path) as port:
        resp = await send(port, method, target, f"Bearer {REPORTS_KEY}", *extra)
    assert resp.status == status, resp.body
    doc = error_of(resp)
    assert doc["closeproxy_error"] == code
    if code == "key_not_allowed":
        assert "'reports'" in doc["error"]
        assert "GET, HEAD requests under /api/v1/lead/, /api/v1/activity/" in doc["error"]
    assert REPORTS_KEY not in doc["error"]
    assert sim.state.api_log == []
    # the refused admin routes did nothing either: the grant was not refreshed nor revoked
    assert sim.state.refreshes == 0
    assert sim.state.access_token_valid(tokens.access_token)


async def test_keys_configured_means_no_key_is_401_on_loopback_and_healthz_stays_open(
    sim: RunningSim, token_file: Path, tmp_path: Path
) -> None:
    seed_tokens(sim, token_file)
    # scoped keys only, no proxy key: on loopback, a keyless request is still refused
    async with keyed_proxy(sim, token_file, tmp_path, proxy_key=False) as port:
        for method, target in (("GET", "/api/v1/me/"), ("GET", "/admin/status")):
            resp = await send(port, method, target)
            assert resp.status == 401
            assert error_of(resp)["closeproxy_error"] == "proxy_key_required"
            assert resp.header("WWW-Authenticate") is not None
        wrong = await send(port, "GET", "/api/v1/me/", basic("not-a-key-0123456789"))
        assert wrong.status == 401
        health = await send(port, "GET", "/healthz")
        assert health.status == 200
    assert sim.state.api_log == []


async def test_the_proxy_key_may_still_do_everything(
    sim: RunningSim, token_file: Path, tmp_path: Path
) -> None:
    seed_tokens(sim, token_file)
    async with keyed_proxy(sim, token_file, tmp_path) as port:
        resp = await send(port, "POST", "/admin/refresh", basic(PROXY_KEY))
        assert resp.status == 200, resp.body
        resp = await send(port, "POST", "/api/v1/lead/", f"Bearer {PROXY_KEY}")
        assert resp.status == 200, resp.body
    assert [r.method for r in sim.state.api_log] == ["POST"]


async def test_the_access_log_names_the_key_never_the_key_itself(
    sim: RunningSim, token_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed_tokens(sim, token_file)
    with caplog.at_level(logging.INFO, logger="closeproxy.access"):
        async with keyed_proxy(sim, token_file, tmp_path) as port:
            await send(port, "GET", "/api/v1/lead/", basic(REPORTS_KEY))
            await send(port, "POST", "/api/v1/lead/", basic(REPORTS_KEY))
            await send(port, "GET", "/api/v1/me/", f"Bearer {PROXY_KEY}")
            await send(port, "GET", "/api/v1/me/")
            # Checked before the 100 Continue too (the expect handler, ahead of any
            # middleware): the request still carries its key's name to the log.
            await send(port, "POST", "/api/v1/lead/", f"Bearer {PROXY_KEY}", "Expect: 100-continue")
    records = [r for r in caplog.records if r.name == "closeproxy.access"]
    assert [(r.getMessage().split('"')[1], r.key) for r in records] == [  # type: ignore[attr-defined]
        ("GET /api/v1/lead/", "reports"),
        ("POST /api/v1/lead/", "reports"),
        ("GET /api/v1/me/", "proxy"),
        ("GET /api/v1/me/", None),
        ("POST /api/v1/lead/", "proxy"),
    ]
    text = [TextFormatter().format(r) for r in records]
    # The text formatter puts the request id last: `... key=NAME rid=ID`.
    assert " key=reports rid=" in text[0] and " key=- rid=" in text[3]
    docs = [json.loads(JsonFormatter().format(r)) for r in records]
    assert [d.get("key") for d in docs] == ["reports", "reports", "proxy", None, "proxy"]
    assert all(REPORTS_KEY not in line and PROXY_KEY not in line for line in text)


def settings_with(tmp_path: Path, text: str, **env: str) -> Settings:
    (tmp_path / "reports.key").write_text(REPORTS_KEY)
    config = tmp_path / "config.toml"
    config.write_text(text)
    return load_settings({}, {"CLOSEPROXY_CONFIG": str(config), **env})


def test_scoped_keys_parse_and_never_show_their_key(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path, CONFIG.replace('paths = ["/api/v1/me/"]', ""), CLOSEPROXY_KEY_AGENT=AGENT_KEY
    )
    reports, agent = settings.keys
    assert reports.name == "reports"
    assert reports.methods == frozenset({"GET", "HEAD"})
    assert reports.paths == ("/api/v1/lead/", "/api/v1/activity/")
    assert agent.methods is None and agent.paths == ()
    assert agent.scope() == "requests of any method under /api/v1/"
    shown = repr(settings) + str(settings.keys) + repr(reports)
    assert REPORTS_KEY not in shown and AGENT_KEY not in shown
    assert "reports" in repr(reports)
    # the environment wins over key_file, like every other setting
    other = "another-reports-key-0123456789"
    (again,) = settings_with(
        tmp_path, CONFIG.split("[keys.agent]")[0], CLOSEPROXY_KEY_REPORTS=other
    ).keys
    assert again.key.reveal() == other


BAD_CONFIGS = [
    ('[keys.a]\nkey_file = "reports.key"\nmethods = ["GET", "FETCH"]\n', "[keys.a]", "FETCH"),
    ('[keys.a]\nkey_file = "reports.key"\nmethods = []\n', "[keys.a]", "methods is empty"),
    (
        '[keys.a]\nkey_file = "reports.key"\npaths = ["/api/v2/lead/"]\n',
        "[keys.a]",
        "/api/v2/lead/",
    ),
    ('[keys.a]\nkey_file = "reports.key"\npaths = ["/api/v1/lead"]\n', "[keys.a]", "ending in /"),
    ('[keys.a]\nkey_file = "reports.key"\npaths = ["/api/v1/../oauth2/"]\n', "[keys.a]", "prefix"),
    ('[keys.a]\nkey_file = "reports.key"\npaths = ["/api/v1/lead/?x=1/"]\n', "[keys.a]", "prefix"),
    ('[keys.a]\nkey_file = "reports.key"\npaths = ["/api/v1/%6cead/"]\n', "[keys.a]", "prefix"),
    ('[keys.a]\nkey_file = "missing.key"\n', "[keys.a]", "cannot read the key file"),
    ('[keys.a]\nkey_file = "empty.key"\n', "[keys.a]", "is empty"),
    ('[keys.a]\nkey_file = "short.key"\n', "[keys.a]", "at least 16"),
    ('[keys.a]\nmethods = ["GET"]\n', "[keys.a]", "CLOSEPROXY_KEY_A"),
    ('[keys.a]\nkey_file = "reports.key"\nscope = "read"\n', "[keys.a]", "'scope'"),
    (
        '[keys.a]\nkey_file = "reports.key"\n[keys.b]\nkey_file = "copy.key"\n',
        "[keys.b]",
        "same key",
    ),
    ('[keys.a]\nkey_file = "proxy.key"\n', "[keys.a]", "the proxy key"),
    ('[keys.Bad]\nkey_file = "reports.key"\n', "[keys.Bad]", "lower-case"),
    ('[keys."a b"]\nkey_file = "reports.key"\n', "[keys.a b]", "lower-case"),
    ('[keys.proxy]\nkey_file = "reports.key"\n', "[keys.proxy]", "choose another name"),
    (
        '[keys.a-b]\nkey_file = "reports.key"\n[keys.a_b]\nkey_file = "copy.key"\n',
        "[keys.a_b]",
        "CLOSEPROXY_KEY_A_B",
    ),
    ('keys = "x"\n', "keys", "tables like [keys.reports]"),
]


@pytest.mark.parametrize(("text", "table", "problem"), BAD_CONFIGS)
def test_a_bad_key_table_is_one_sentence_naming_the_table_and_exit_2(
    tmp_path: Path, text: str, table: str, problem: str
) -> None:
    (tmp_path / "empty.key").write_text("\n")
    (tmp_path / "short.key").write_text("short")
    (tmp_path / "copy.key").write_text(REPORTS_KEY)
    (tmp_path / "proxy.key").write_text(PROXY_KEY)
    env = {"CLOSEPROXY_PROXY_KEY": PROXY_KEY}
    with pytest.raises(ConfigError) as caught:
        settings_with(tmp_path, text, **env)
    message = str(caught.value)
    assert table in message and problem in message, message
    assert REPORTS_KEY not in message and PROXY_KEY not in message
    if text is BAD_CONFIGS[0][0]:  # the command line says the same, once, exit 2
        result = run_cli({**env, "CLOSEPROXY_CONFIG": str(tmp_path / "config.toml")}, "serve")
        assert result.returncode == 2
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line == f"closeproxy serve: {message}"
        assert "Traceback" not in result.stderr


def test_serve_says_at_start_which_keys_it_knows(
    sim: RunningSim, token_file: Path, tmp_path: Path
) -> None:
    env = keys_env(sim, token_file, write_config(tmp_path), CLOSEPROXY_PROXY_KEY=PROXY_KEY)
    server = start_serve(env)  # waits for its listening line
    assert server.stop() == 0
    assert (
        "key 'reports' may make GET, HEAD requests under /api/v1/lead/, /api/v1/activity/"
        in server.logs
    )
    assert "key 'agent' may make requests of any method under /api/v1/me/" in server.logs
    assert REPORTS_KEY not in server.logs and AGENT_KEY not in server.logs


RUN_CHILD = textwrap.dedent(
    """
    import json, os, urllib.error, urllib.request

    def call(method, path, body=None):
        url = path if path.startswith("http") else os.environ["CLOSE_API_URL"] + path
        request = urllib.request.Request(
            url, method=method, data=body,
            headers={"Authorization": "Bearer " + os.environ["CLOSE_API_KEY"],
                     "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, None
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    base = os.environ["CLOSEPROXY_URL"]
    print(json.dumps({
        "get": call("GET", "lead/"),
        "post": call("POST", "lead/", b"{}"),
        "activity": call("GET", "activity/"),
        "admin": call("POST", base + "/admin/refresh"),
    }))
    """
)


async def test_run_read_only_gives_the_child_a_key_that_can_only_read(
    sim: RunningSim, token_file: Path
) -> None:
    seed_tokens(sim, token_file)
    env = proxy_env(sim, token_file)
    result = await run_cli_async(env, "run", "--read-only", "--", sys.executable, "-c", RUN_CHILD)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["get"] == [200, None]
    assert report["activity"] == [200, None]
    status, body = report["post"]
    assert status == 403 and body["closeproxy_error"] == "key_not_allowed"
    assert "'run'" in body["error"] and "GET, HEAD requests" in body["error"]
    assert report["admin"][0] == 403
    assert [(r.method, r.raw_path) for r in sim.state.api_log] == [
        ("GET", "/api/v1/lead/"),
        ("GET", "/api/v1/activity/"),
    ]


async def test_run_with_methods_and_paths(sim: RunningSim, token_file: Path) -> None:
    seed_tokens(sim, token_file)
    env = proxy_env(sim, token_file)
    result = await run_cli_async(
        env,
        "run",
        "--methods",
        "GET,post",
        "--paths",
        "/api/v1/lead/",
        "--",
        sys.executable,
        "-c",
        RUN_CHILD,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["get"] == [200, None]
    assert report["post"][0] == 200
    assert report["activity"][0] == 403
    assert [(r.method, r.raw_path) for r in sim.state.api_log] == [
        ("GET", "/api/v1/lead/"),
        ("POST", "/api/v1/lead/"),
    ]


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--methods", "GET,FETCH"), "--methods: unknown method 'FETCH'"),
        (("--paths", "/oauth2/"), "--paths: path '/oauth2/'"),
        (("--read-only", "--methods", "GET"), "--read-only"),
    ],
)
def test_run_with_a_bad_scope_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...], problem: str
) -> None:
    result = run_cli(cli_env({}), "run", *args, "--", sys.executable, "-c", "pass")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert problem in line, line


async def test_metrics_count_requests_by_key_name_never_the_key(
    sim: RunningSim, token_file: Path, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    seed_tokens(sim, token_file)
    async with keyed_proxy(sim, token_file, tmp_path) as port:
        for _ in range(2):
            assert (await send(port, "GET", "/api/v1/lead/", basic(REPORTS_KEY))).status == 200
        assert (await send(port, "POST", "/api/v1/lead/", basic(REPORTS_KEY))).status == 403
        assert (await send(port, "GET", "/api/v1/me/", f"Bearer {PROXY_KEY}")).status == 200
        scraped = await send(port, "GET", "/metrics", f"Bearer {PROXY_KEY}")
    assert scraped.status == 200
    text = scraped.body.decode()
    assert REPORTS_KEY not in text and PROXY_KEY not in text
    counts = {
        (sample.labels["method"], sample.labels["status"], sample.labels["key"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "closeproxy_requests"
        for sample in family.samples
        if sample.name == "closeproxy_requests_total"
    }
    assert counts[("GET", "200", "reports")] == 2
    assert counts[("GET", "200", "proxy")] == 1
