"""Acceptance for SPEC §11: /metrics, the /admin/ page's access rules, request ids in logs."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from helpers import Proxy, ProxyFactory, cli_env, proxy_env, seed_tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from closeproxy.file_store import FileGrantStore
from closeproxy.metrics import Metrics
from closeproxy.sim import RunningSim

# Every metric SPEC §11 names, as the parser names the families (counters lose "_total").
NAMED: frozenset[str] = frozenset(
    {
        "closeproxy_requests",
        "closeproxy_request_duration_seconds",
        "closeproxy_upstream_duration_seconds",
        "closeproxy_requests_in_flight",
        "closeproxy_token_refreshes",
        "closeproxy_token_expiry_timestamp_seconds",
        "closeproxy_rate_limit_waits",
        "closeproxy_rate_limit_wait_seconds",
        "closeproxy_rate_limit_remaining",
        "closeproxy_errors",
    }
)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """Family names and every sample, through prometheus_client's own parser."""
    names: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return names, samples


async def scrape(client: aiohttp.ClientSession, proxy: Proxy, **headers: str) -> Samples:
    async with client.get(f"{proxy.url}/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        _, samples = parse(await resp.text())
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over `name`'s samples whose labels include `labels` (others may differ)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


async def test_every_named_metric_is_exposed_and_parses(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.url}/metrics") as resp:
        assert resp.status == 200
        names, samples = parse(await resp.text())
    assert names >= NAMED, NAMED - names
    # Counting starts at zero, and scraping is not a proxied request.
    assert value(samples, "closeproxy_requests_in_flight") == 0
    assert not [key for key in samples if key[0] == "closeproxy_requests_total"]
    for result in ("ok", "rejected", "failed"):
        assert value(samples, "closeproxy_token_refreshes_total", result=result) == 0


async def test_counters_move_with_traffic(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    # Not logged in: a 401 login_required, counted as a request and as that error.
    async with client.get(f"{proxy.url}/api/v1/me/") as resp:
        assert resp.status == 401
        assert (await resp.json())["closeproxy_error"] == "login_required"
    samples = await scrape(client, proxy)
    assert value(samples, "closeproxy_requests_total", method="GET", status="401") == 1
    assert value(samples, "closeproxy_errors_total", code="login_required") == 1
    assert value(samples, "closeproxy_token_expiry_timestamp_seconds") == 0  # absent

    seed_tokens(sim, token_file, expires_in=600)
    for _ in range(3):
        async with client.get(f"{proxy.url}/api/v1/me/?secret=1") as resp:
            assert resp.status == 200
    async with client.post(f"{proxy.url}/api/v1/lead/", json={"name": "Acme"}) as resp:
        assert resp.status == 200
    samples = await scrape(client, proxy)
    assert value(samples, "closeproxy_requests_total", method="GET", status="200") == 3
    assert value(samples, "closeproxy_requests_total", method="POST", status="200") == 1
    assert value(samples, "closeproxy_request_duration_seconds_count", method="GET") == 4
    assert value(samples, "closeproxy_request_duration_seconds_count", method="POST") == 1
    assert value(samples, "closeproxy_upstream_duration_seconds_count") == 4
    assert value(samples, "closeproxy_requests_in_flight") == 0
    expiry = value(samples, "closeproxy_token_expiry_timestamp_seconds")
    stored = FileGrantStore(token_file).read()
    assert stored is not None
    assert expiry == stored.expires_at

    # A forced refresh (curl: no page token needed) moves the ok count and the expiry.
    async with client.post(f"{proxy.url}/admin/refresh") as resp:
        assert resp.status == 200
    samples = await scrape(client, proxy)
    assert value(samples, "closeproxy_token_refreshes_total", result="ok") == 1
    assert value(samples, "closeproxy_token_expiry_timestamp_seconds") > expiry + 60

    # Close kills the grant: the next refresh is rejected.
    fresh = FileGrantStore(token_file).read()
    assert fresh is not None and fresh.refresh_token is not None
    sim.state.revoke(fresh.refresh_token)
    async with client.post(f"{proxy.url}/admin/refresh") as resp:
        assert resp.status == 401
    samples = await scrape(client, proxy)
    assert value(samples, "closeproxy_token_refreshes_total", result="rejected") == 1
    assert value(samples, "closeproxy_token_refreshes_total", result="failed") == 0
    assert value(samples, "closeproxy_errors_total", code="login_required") == 2
    # Admin routes and /metrics itself never count as proxied requests.
    assert sum(v for (name, _), v in samples.items() if name == "closeproxy_requests_total") == 5


async def test_a_failing_token_endpoint_counts_as_failed(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    sim.state.set_knobs({"token_endpoint": "down"})
    async with client.post(f"{proxy.url}/admin/refresh") as resp:
        assert resp.status == 503
        code = (await resp.json())["closeproxy_error"]
    samples = await scrape(client, proxy)
    assert value(samples, "closeproxy_token_refreshes_total", result="failed") == 1
    assert value(samples, "closeproxy_token_refreshes_total", result="rejected") == 0
    assert value(samples, "closeproxy_errors_total", code=code) == 1


def test_rate_limit_functions_move_their_metrics() -> None:
    metrics = Metrics()
    metrics.rate_limit_wait("lead", 1.5)
    metrics.rate_limit_wait("lead", 0.25)
    metrics.rate_limit_remaining("lead", 7)
    metrics.rate_limit_remaining("lead", 3)
    names, samples = parse(metrics.exposition().decode())
    assert value(samples, "closeproxy_rate_limit_waits_total", group="lead") == 2
    assert value(samples, "closeproxy_rate_limit_wait_seconds_total", group="lead") == 1.75
    assert value(samples, "closeproxy_rate_limit_remaining", group="lead") == 3


def test_two_apps_in_one_process_count_apart() -> None:
    first, second = Metrics(), Metrics()
    first.request_done("GET", 200, 0.01)
    _, samples = parse(second.exposition().decode())
    assert value(samples, "closeproxy_requests_total", method="GET", status="200") == 0


def test_odd_methods_are_folded_into_other() -> None:
    metrics = Metrics()
    for method in ("PROPFIND", "GETX", "get"):
        metrics.request_done(method, 404, 0.001)
    _, samples = parse(metrics.exposition().decode())
    methods = {dict(labels)["method"] for (name, labels) in samples if "method" in dict(labels)}
    assert methods == {"other"}
    assert value(samples, "closeproxy_requests_total", method="other", status="404") == 3


SEGMENT = st.text(alphabet="abcdefxyz0123456789_-.~", min_size=1, max_size=12)
PATH = st.lists(SEGMENT, min_size=1, max_size=4).map(lambda parts: "/".join(parts))
QUERY = st.text(alphabet="abcxyz0123456789=&_-", min_size=1, max_size=20)
METHOD = st.sampled_from(["GET", "POST", "DELETE", "PATCH", "PROPFIND", "FOO"])


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=PATH, query=QUERY, method=METHOD)
async def test_no_label_value_holds_a_path_query_or_secret(
    sim: RunningSim, token_file: Path, proxy: Proxy, path: str, query: str, method: str
) -> None:
    if not token_file.exists():
        seed_tokens(sim, token_file)
    tokens = FileGrantStore(token_file).read()
    assert tokens is not None
    target = f"/api/v1/{path}?{query}"
    async with aiohttp.ClientSession() as client:
        async with client.request(method, proxy.url + target) as resp:
            await resp.read()
        async with client.get(f"{proxy.url}/metrics") as resp:
            text = await resp.text()
    _, samples = parse(text)
    allowed_methods = {"GET", "POST", "DELETE", "PATCH", "HEAD", "PUT", "OPTIONS", "other"}
    for _, labels in samples:
        for label, label_value in labels:
            assert "/" not in label_value, (label, label_value)
            assert query not in label_value or len(query) < 3, (label, label_value)
            assert path not in label_value or len(path) < 3, (label, label_value)
            assert tokens.access_token not in label_value
            if label == "method":
                assert label_value in allowed_methods
            if label == "status":
                assert re.fullmatch(r"[1-5][0-9][0-9]", label_value)
            if label == "code":
                assert re.fullmatch(r"[a-z_]+", label_value)
    assert tokens.access_token not in text
    assert str(tokens.refresh_token) not in text


async def test_with_a_proxy_key_metrics_and_the_dashboard_need_it(
    sim: RunningSim,
    token_file: Path,
    start_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    seed_tokens(sim, token_file)
    key = "dashboard-key-0123456789"
    key_file = tmp_path / "proxy.key"
    key_file.write_text(key)
    basic = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    async with start_proxy(proxy_key=str(key_file)) as proxy:
        for path in ("/metrics", "/admin/", "/admin/status"):
            async with client.get(proxy.url + path) as resp:
                assert resp.status == 401, path
                assert (await resp.json())["closeproxy_error"] == "proxy_key_required"
                assert resp.headers["WWW-Authenticate"].startswith("Basic")
            for auth in (basic, f"Bearer {key}"):
                async with client.get(proxy.url + path, headers={"Authorization": auth}) as resp:
                    assert resp.status == 200, path
                    body = await resp.text()
                    assert key not in body
        samples = await scrape(client, proxy, Authorization=basic)
        assert value(samples, "closeproxy_errors_total", code="proxy_key_required") == 3


async def test_request_ids_on_every_line_about_a_request_text_and_json(
    sim: RunningSim, token_file: Path
) -> None:
    for fmt in ("text", "json"):
        seed_tokens(sim, token_file)
        env = proxy_env(sim, token_file, CLOSEPROXY_LOG_FORMAT=fmt, CLOSEPROXY_LOG_LEVEL="info")
        process = subprocess.Popen(
            [sys.executable, "-m", "closeproxy", "serve"],
            env=cli_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = await asyncio.to_thread(process.stdout.readline)
            url = line.split("listening on ")[1].strip()
            async with aiohttp.ClientSession() as client:
                # The refresh logs a line of its own (closeproxy.tokens) besides the access line.
                async with client.post(f"{url}/admin/refresh") as resp:
                    assert resp.status == 200
        finally:
            process.terminate()
            _, err = await asyncio.to_thread(process.communicate, None, 20)
        lines = [line for line in err.splitlines() if line.strip()]
        if fmt == "json":
            records = [json.loads(line) for line in lines]
            about = [
                r for r in records if r["logger"] in {"closeproxy.tokens", "closeproxy.access"}
            ]
            refreshed = [r for r in about if r["message"].startswith("refreshed the access token")]
            access = [r for r in about if r.get("path") == "/admin/refresh"]
            assert len(refreshed) == 1 and len(access) == 1, records
            assert refreshed[0]["request_id"] == access[0]["request_id"]
            # Lines about no request carry no id.
            starting = [r for r in records if "listening on" in r["message"]]
            assert starting and "request_id" not in starting[0]
        else:
            refreshed = [line for line in lines if "refreshed the access token" in line]
            access = [line for line in lines if '"POST /admin/refresh' in line]
            assert len(refreshed) == 1 and len(access) == 1, lines
            ids = {re.search(r" rid=(\S+)$", line).group(1) for line in (*refreshed, *access)}  # type: ignore[union-attr]
            assert len(ids) == 1, lines
            starting = [line for line in lines if "listening on" in line]
            assert starting and "rid=" not in starting[0]


async def test_prometheus_client_is_loaded_only_when_metrics_are_scraped(
    sim: RunningSim, token_file: Path
) -> None:
    """A proxy that is never scraped does not import prometheus_client (start time, RSS)."""
    seed_tokens(sim, token_file)
    script = """
import asyncio, sys
import aiohttp
import pytest
from closeproxy.config import load_settings
from closeproxy.server import running

async def main():
    async with running(load_settings()) as where, aiohttp.ClientSession() as client:
        async with client.get(f"{where.url}/api/v1/me/") as resp:
            assert resp.status == 200, resp.status
        print("after a request:", "prometheus_client" in sys.modules)
        async with client.get(f"{where.url}/metrics") as resp:
            assert resp.status == 200, resp.status
        print("after a scrape:", "prometheus_client" in sys.modules)

asyncio.run(main())
"""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        env=cli_env(proxy_env(sim, token_file)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["after a request: False", "after a scrape: True"]


async def test_metrics_off_answers_404_and_still_proxies(
    sim: RunningSim,
    token_file: Path,
    start_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
) -> None:
    seed_tokens(sim, token_file)
    async with start_proxy(metrics="off") as proxy:
        async with client.get(f"{proxy.url}/api/v1/me/") as resp:
            assert resp.status == 200
        async with client.get(f"{proxy.url}/metrics") as resp:
            assert resp.status == 404
            body = await resp.json()
            assert body["closeproxy_error"] == "not_found"
            assert "--metrics (or CLOSEPROXY_METRICS) set to off" in body["error"]
        async with client.get(f"{proxy.url}/admin/") as resp:
            assert resp.status == 200
            page = await resp.text()
            assert 'href="/metrics"' not in page
            assert "/api/v1/me/" in page  # the recent-requests table still fills
    async with start_proxy() as proxy:  # on by default
        async with client.get(f"{proxy.url}/admin/") as resp:
            assert 'href="/metrics"' in await resp.text()


def test_the_metrics_setting_takes_on_or_off_only() -> None:
    from closeproxy.config import load_settings
    from closeproxy.errors import ConfigError

    assert load_settings({}, {"CLOSEPROXY_METRICS": "OFF"}).metrics == "off"
    assert load_settings({}, {}).metrics == "on"
    with pytest.raises(ConfigError, match="CLOSEPROXY_METRICS"):
        load_settings({}, {"CLOSEPROXY_METRICS": "maybe"})
