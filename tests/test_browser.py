"""Acceptance: the loopback login flow end to end in a real headless Chromium.

A browser opens /admin/login on a running proxy, passes the simulator's consent page,
lands on /admin/callback and the proxy then serves /api/v1/me/ to it: the callback
navigation passes the proxy's browser guards (SPEC §4.3, §5, §8). A page on another
origin then tries to use the proxy with fetch() and a form post; every one of those
requests reaches the proxy and is refused before anything is forwarded to Close.

The simulator and the proxy run in the test's event loop, so every blocking selenium
call goes through asyncio.to_thread and the loop keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from helpers import ProxyFactory
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from closeproxy.file_store import FileGrantStore
from closeproxy.sim import RunningSim

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = (
    "this acceptance test drives Debian's Chromium: install it with "
    "`apt-get install chromium chromium-driver` (it needs /usr/bin/chromium and "
    "/usr/bin/chromedriver; .ci/run installs them)"
)
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # the tests run as root in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    "--window-size=1024,768",
)
WAIT = 15.0
LOGGED_IN_TITLE = "closeproxy: Logged in to Close"
ACCESS_LOGGER = "closeproxy.access"


# --- the browser ----------------------------------------------------------------------


def _start_chromium(profile: Path, driver_log: Path) -> WebDriver:
    options = webdriver.ChromeOptions()
    # Both paths given, so selenium-manager never runs (it would try to download).
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # DevTools network events: what Chromium really sent and received.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(driver_log))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    return driver


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: {INSTALL_HINT}", pytrace=False)
    driver = await asyncio.to_thread(
        _start_chromium, tmp_path / "chromium-profile", tmp_path / "chromedriver.log"
    )
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)


async def open_page(driver: WebDriver, url: str) -> None:
    """Navigate and wait for the load, off the event loop (the proxy must keep serving)."""
    await asyncio.to_thread(driver.get, url)


async def wait_for(driver: WebDriver, condition: Callable[[WebDriver], bool], what: str) -> None:
    def wait() -> None:
        WebDriverWait(driver, WAIT).until(condition, f"timed out waiting for {what}")

    await asyncio.to_thread(wait)


async def page_text(driver: WebDriver, tag: str = "body") -> str:
    def text() -> str:
        return str(driver.find_element(By.TAG_NAME, tag).text)

    return await asyncio.to_thread(text)


async def current_url(driver: WebDriver) -> str:
    return str(await asyncio.to_thread(lambda: driver.current_url))


# --- what went over the wire, from Chromium's DevTools performance log ----------------


class Exchange:
    """One HTTP request Chromium made and the response it got (one hop of a redirect chain)."""

    def __init__(self, url: str, method: str) -> None:
        self.url = url
        self.method = method
        self.request_headers: dict[str, str] = {}
        self.status: int | None = None
        self.response_headers: dict[str, str] = {}

    def __repr__(self) -> str:
        return (
            f"{self.method} {self.url} -> {self.status}\n"
            f"  sent: {self.request_headers}\n  got: {self.response_headers}"
        )


async def network_log(driver: WebDriver) -> list[Exchange]:
    """Every request since the last call, in order, with the headers really sent and received.

    Redirect hops share a requestId; the ExtraInfo events (the headers as they went on the
    wire, Sec-Fetch-* and Origin included) come in the same order as the hops, though not
    always after the event that names the URL, so they are matched up at the end.
    """
    entries: list[dict[str, Any]] = await asyncio.to_thread(driver.get_log, "performance")
    hops: dict[str, list[Exchange]] = {}
    ordered: list[Exchange] = []
    sent: dict[str, list[dict[str, str]]] = {}
    received: dict[str, list[tuple[int | None, dict[str, str]]]] = {}
    for entry in entries:
        message = json.loads(entry["message"])["message"]
        method, params = message.get("method"), message.get("params", {})
        request_id = params.get("requestId")
        if method == "Network.requestWillBeSent":
            request = params["request"]
            exchange = Exchange(request["url"], request["method"])
            hops.setdefault(request_id, []).append(exchange)
            ordered.append(exchange)
        elif method == "Network.requestWillBeSentExtraInfo":
            sent.setdefault(request_id, []).append(_lower(params.get("headers", {})))
        elif method == "Network.responseReceivedExtraInfo":
            response = (params.get("statusCode"), _lower(params.get("headers", {})))
            received.setdefault(request_id, []).append(response)
    for request_id, exchanges in hops.items():
        for exchange, headers in zip(exchanges, sent.get(request_id, []), strict=False):
            exchange.request_headers = headers
        for exchange, (status, headers) in zip(
            exchanges, received.get(request_id, []), strict=False
        ):
            exchange.status, exchange.response_headers = status, headers
    return ordered


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def to(exchanges: list[Exchange], prefix: str) -> list[Exchange]:
    return [e for e in exchanges if e.url.startswith(prefix)]


# --- the proxy's own record of what reached it ----------------------------------------


def access_records(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request the proxy answered, from its access log."""
    return [
        (r.method, r.path, r.status)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == ACCESS_LOGGER
    ]


def api_requests(sim: RunningSim) -> list[str]:
    return [f"{r.method} {r.raw_path}" for r in sim.state.api_log]


# --- the tests --------------------------------------------------------------------------


async def log_in(driver: WebDriver, proxy_url: str) -> str:
    """/admin/login -> simulator's authorize page -> /admin/callback; the callback URL."""
    await open_page(driver, f"{proxy_url}/admin/login")
    await wait_for(driver, lambda d: d.title == LOGGED_IN_TITLE, "the logged-in page")
    landed = await current_url(driver)
    assert landed.startswith(f"{proxy_url}/admin/callback?"), landed
    return landed


async def test_browser_logs_in_through_the_proxy_and_then_uses_the_api(
    sim: RunningSim,
    token_file: Path,
    start_proxy: ProxyFactory,
    browser: WebDriver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    config = sim.state.config
    async with start_proxy() as proxy:
        landed = await log_in(browser, proxy.url)
        text = await page_text(browser)
        assert config.organization_id in text
        assert config.user_id in text
        assert sim.state.code_exchanges == 1

        stored = FileGrantStore(token_file).read()
        assert stored is not None
        assert (stored.organization_id, stored.user_id) == (config.organization_id, config.user_id)
        # The page shows who logged in, never a credential.
        assert stored.access_token not in text
        assert stored.refresh_token is not None
        assert stored.refresh_token not in text

        hops = await network_log(browser)
        callback = to(hops, f"{proxy.url}/admin/callback")
        assert [e.url for e in callback] == [landed], hops
        assert callback[0].status == 200, callback
        assert callback[0].response_headers.get("cache-control") == "no-store", callback
        assert callback[0].response_headers.get("referrer-policy") == "no-referrer", callback
        assert not [h for h in callback[0].response_headers if h.startswith("access-control-")]
        # The authorize page was really visited, with this proxy's own callback URL.
        authorize = to(hops, f"{sim.url}/oauth2/authorize/")
        assert len(authorize) == 1, hops
        query = parse_qs(urlsplit(authorize[0].url).query)
        assert query["redirect_uri"] == [f"{proxy.url}/admin/callback"]

        # The browser's own navigation to the API is served with the stored token.
        await open_page(browser, f"{proxy.url}/api/v1/me/")
        me = json.loads(await page_text(browser, "pre"))
        assert me["id"] == config.user_id
        assert me["organizations"][0]["id"] == config.organization_id
        assert api_requests(sim) == ["GET /api/v1/me/"]
        (auth,) = [v for k, v in sim.state.api_log[0].headers if k.lower() == "authorization"]
        assert auth == f"Bearer {stored.access_token}"

        assert ("GET", "/admin/login", 302) in access_records(caplog)


EVIL_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>evil</title></head>
<body>
<form id="form" method="post" action="PROXY/api/v1/lead/" enctype="text/plain" target="sink">
<input type="hidden" name='{"name":"evil form","x":"' value='"}'>
</form>
<iframe name="sink" id="sink"></iframe>
<pre id="out"></pre>
<script>
const proxy = "PROXY";
async function attempt(label, url, init) {
  try {
    const response = await fetch(url, init);
    return label + ":" + (response.type === "opaque" ? "opaque" : response.status);
  } catch (error) {
    return label + ":" + error.name;
  }
}
function submitForm() {
  return new Promise((resolve) => {
    const sink = document.getElementById("sink");
    const timer = setTimeout(() => resolve("form:timeout"), 5000);
    sink.onload = () => { clearTimeout(timer); resolve("form:loaded"); };
    document.getElementById("form").submit();
  });
}
async function attack() {
  const results = [];
  results.push(await attempt("get-no-cors", proxy + "/api/v1/me/",
    {mode: "no-cors", credentials: "include"}));
  results.push(await attempt("post-no-cors", proxy + "/api/v1/lead/",
    {method: "POST", mode: "no-cors", credentials: "include",
     headers: {"Content-Type": "text/plain"}, body: '{"name": "evil fetch"}'}));
  results.push(await attempt("get-cors", proxy + "/api/v1/me/", {credentials: "include"}));
  results.push(await attempt("post-preflight", proxy + "/api/v1/lead/",
    {method: "POST", credentials: "include",
     headers: {"Content-Type": "application/json"}, body: '{"name": "evil json"}'}));
  results.push(await submitForm());
  document.getElementById("out").textContent = JSON.stringify(results);
  document.title = "done";
}
window.addEventListener("load", attack);
</script>
</body></html>
"""


@pytest.fixture
async def evil_site() -> AsyncIterator[Callable[[str], str]]:
    """A page on another origin (http://localhost:PORT, not 127.0.0.1) that attacks a proxy.

    Yields a function: proxy URL -> the attacking page's URL.
    """
    pages: dict[str, str] = {}

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=pages[request.match_info["name"]], content_type="text/html")

    app = web.Application()
    app.router.add_get("/{name}.html", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])

    def page_for(proxy_url: str) -> str:
        pages["evil"] = EVIL_PAGE.replace("PROXY", proxy_url)
        return f"http://localhost:{port}/evil.html"

    try:
        yield page_for
    finally:
        await runner.cleanup()


async def test_cross_site_pages_cannot_use_the_logged_in_proxy(
    sim: RunningSim,
    start_proxy: ProxyFactory,
    browser: WebDriver,
    evil_site: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with start_proxy() as proxy:
        await log_in(browser, proxy.url)
        await network_log(browser)  # forget the login's traffic
        before = api_requests(sim)
        seen_before = len(access_records(caplog))

        evil_url = evil_site(proxy.url)
        await open_page(browser, evil_url)
        await wait_for(browser, lambda d: d.title == "done", "the cross-site page to finish")
        results = json.loads(await page_text(browser, "pre"))
        hops = await network_log(browser)

        # Nothing the page did was forwarded to Close.
        assert api_requests(sim) == before, hops
        # ...because each attempt reached the proxy and was refused there.
        refused = access_records(caplog)[seen_before:]
        assert sorted(refused) == sorted(
            [
                # fetch, no-cors: Chromium sends no Origin on a no-cors GET, only
                # Sec-Fetch-Site: cross-site, so that header alone must refuse it.
                ("GET", "/api/v1/me/", 403),
                ("POST", "/api/v1/lead/", 403),  # fetch, no-cors, text/plain
                ("GET", "/api/v1/me/", 403),  # fetch, cors
                ("OPTIONS", "/api/v1/lead/", 403),  # the preflight of the JSON POST
                ("POST", "/api/v1/lead/", 403),  # the form
            ]
        ), (refused, hops)
        # A CORS read gets nothing, and the JSON POST never got past its preflight.
        assert results == [
            "get-no-cors:opaque",
            "post-no-cors:opaque",
            "get-cors:TypeError",
            "post-preflight:TypeError",
            "form:loaded",
        ], hops
        for exchange in to(hops, proxy.url):
            assert not [h for h in exchange.response_headers if h.startswith("access-control-")]

        # Straight from a client: such an Origin gets the refusal and no CORS headers.
        evil_origin = evil_url.rsplit("/", 1)[0]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{proxy.url}/api/v1/me/", headers={"Origin": evil_origin}) as resp,
        ):
            body = await resp.json()
            assert resp.status == 403
            assert body["closeproxy_error"] == "forbidden_origin"
            assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
        assert api_requests(sim) == before


async def test_a_replayed_callback_is_refused_without_a_token_request(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, browser: WebDriver
) -> None:
    async with start_proxy() as proxy:
        landed = await log_in(browser, proxy.url)
        stored = FileGrantStore(token_file).read()
        token_requests = sim.state.token_requests
        code_exchanges = sim.state.code_exchanges
        assert code_exchanges == 1

        await network_log(browser)
        await open_page(browser, landed)
        await wait_for(browser, lambda d: "Login link not valid" in d.title, "the refusal page")
        hops = to(await network_log(browser), f"{proxy.url}/admin/callback")
        assert [e.status for e in hops] == [400], hops
        assert hops[0].response_headers.get("cache-control") == "no-store", hops

        assert sim.state.token_requests == token_requests
        assert sim.state.code_exchanges == code_exchanges
        assert sim.state.reuse_detected == 0
        # The earlier login stands untouched.
        assert FileGrantStore(token_file).read() == stored
        await open_page(browser, f"{proxy.url}/api/v1/me/")
        assert json.loads(await page_text(browser, "pre"))["id"] == sim.state.config.user_id
