"""The /admin/ dashboard (SPEC §11): rendered from the status document, its buttons' guard,
and the page in a real headless Chromium (test_browser.py's set-up)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from helpers import Proxy, ProxyFactory, seed_tokens
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from test_browser import browser, current_url, network_log, open_page, wait_for  # noqa: F401

from closeproxy.dashboard import PAGE_HEADERS, PageTokens, RecentRequest, render
from closeproxy.file_store import FileGrantStore
from closeproxy.sim import RunningSim

TOKEN_FIELD = re.compile(r'name="page_token" value="([^"]+)"')


def doc(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "logged_in": True,
        "organization_id": "orga_1",
        "user_id": "user_1",
        "expires_in": 3599,
        "expires_at": "2026-01-01T00:00:00+00:00",
        "access_token_valid": True,
        "counters": {"requests": 3, "refreshes": 1},
        "version": "1.0",
        "uptime": 12.0,
        "token_file": "/x/tokens.json",
    }
    base.update(fields)
    return base


def test_the_page_is_a_function_of_the_status_document() -> None:
    recent = [
        RecentRequest(at=0.0, method="GET", path="/api/v1/lead/<b>x</b>", status=404, duration=0.5),
        RecentRequest(at=0.0, method="POST", path="/api/v1/lead/", status=200, duration=0.01),
    ]
    page = render(doc(), recent, page_token="tok-123")
    assert "Logged in to Close" in page
    assert "orga_1" in page and "user_1" in page
    assert 'data-expires-in="3599"' in page and "59m 59s" in page
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page  # escaped
    assert page.count('name="page_token" value="tok-123"') == 2  # refresh and revoke
    assert 'action="/admin/refresh"' in page and 'action="/admin/revoke"' in page
    assert "no rate-limit information" in page
    assert render(doc(), recent, page_token="tok-123") == page  # nothing else goes in


def test_the_banner_says_what_state_the_login_is_in() -> None:
    def banner(**fields: object) -> str:
        page = render(doc(**fields), [], page_token="t")
        match = re.search(r'<div class="banner (\w+)" id="banner">([^<]*)', page)
        assert match is not None
        return f"{match.group(1)}: {match.group(2)}"

    assert banner() == "ok: Logged in to Close"
    assert banner(logged_in=False, problem="not logged in: run `closeproxy login`") == (
        "bad: Not logged in"
    )
    assert banner(last_refresh_error="Close is down") == "warn: Logged in, but refreshing fails"
    assert banner(access_token_valid=False) == ("warn: Logged in, but the access token has expired")


def test_rate_limit_groups_are_shown_when_the_document_has_them() -> None:
    page = render(
        doc(rate_limits={"lead": {"remaining": 17, "limit": 40, "reset": 1.5}}),
        [],
        page_token="t",
    )
    assert "<td>lead</td><td class=num>17</td><td class=num>40</td>" in page


def test_page_tokens_are_single_process_and_expire() -> None:
    now = [0.0]
    tokens = PageTokens(clock=lambda: now[0])
    issued = tokens.issue()
    assert tokens.valid(issued)
    assert not tokens.valid(issued[:-1] + ("A" if issued[-1] != "A" else "B"))
    assert not tokens.valid(None) and not tokens.valid("")
    now[0] = 3601.0
    assert not tokens.valid(issued)


async def page_token(client: aiohttp.ClientSession, proxy: Proxy) -> str:
    async with client.get(f"{proxy.url}/admin/") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Security-Policy"] == PAGE_HEADERS["Content-Security-Policy"]
        match = TOKEN_FIELD.search(await resp.text())
    assert match is not None
    return match.group(1)


@pytest.mark.parametrize("button", ["/admin/refresh", "/admin/revoke"])
async def test_browser_posts_to_the_buttons_need_the_same_origin_and_the_page_token(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession, button: str
) -> None:
    seed_tokens(sim, token_file)
    token = await page_token(client, proxy)
    own = f"http://127.0.0.1:{proxy.port}"
    refused: list[tuple[dict[str, str], dict[str, str]]] = [
        # Cross-site, even with a valid page token: the §8 rule stands.
        ({"Origin": "http://evil.example"}, {"page_token": token}),
        ({"Sec-Fetch-Site": "cross-site", "Origin": own}, {"page_token": token}),
        ({"Sec-Fetch-Site": "same-site"}, {"page_token": token}),
        ({"Origin": f"http://localhost:{proxy.port + 1}"}, {"page_token": token}),
        ({"Origin": "null"}, {"page_token": token}),
        # Same origin, but no token or a wrong one.
        ({"Origin": own}, {}),
        ({"Origin": own}, {"page_token": "forged"}),
        ({"Sec-Fetch-Site": "same-origin"}, {"page_token": token + "x"}),
    ]
    for headers, form in refused:
        async with client.post(
            proxy.url + button, headers=headers, data=form, allow_redirects=False
        ) as resp:
            assert resp.status == 403, (headers, form)
            assert (await resp.json())["closeproxy_error"] == "forbidden_origin"
            assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
    assert sim.state.token_requests == 0
    assert sim.state.revokes == 0

    # From the page itself (an allowed host name on the proxy's own port): done, and back.
    async with client.post(
        proxy.url + button,
        headers={"Origin": f"http://localhost:{proxy.port}", "Sec-Fetch-Site": "same-origin"},
        data={"page_token": token},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/admin/"
    if button == "/admin/refresh":
        assert sim.state.token_requests == 1
    else:
        assert sim.state.revokes >= 1
        assert FileGrantStore(token_file).read() is None


async def test_curl_posts_need_no_page_token(
    sim: RunningSim, token_file: Path, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    seed_tokens(sim, token_file)
    async with client.post(f"{proxy.url}/admin/refresh") as resp:
        assert resp.status == 200
        assert (await resp.json())["logged_in"] is True
    assert sim.state.token_requests == 1


# --- in a real browser ------------------------------------------------------------------


# Read in one script call: the page reloads itself, so an element found in one call may be
# gone by the next.
_TEXT_OF = "const e = document.getElementById(arguments[0]); return e ? e.innerText : null;"


def _element_text(driver: WebDriver, element_id: str) -> str | None:
    text = driver.execute_script(_TEXT_OF, element_id)
    return None if text is None else str(text).strip()


async def text_of(driver: WebDriver, element_id: str) -> str:
    text = await asyncio.to_thread(_element_text, driver, element_id)
    assert text is not None, f"no #{element_id} on the page"
    return text


def _press(driver: WebDriver, element_id: str) -> None:
    """A real click; found again if a reload replaced the button in between."""
    for _ in range(3):
        try:
            driver.find_element(By.ID, element_id).click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"#{element_id} kept going stale")


async def test_the_dashboard_in_chromium(
    sim: RunningSim,
    token_file: Path,
    start_proxy: ProxyFactory,
    browser: WebDriver,  # noqa: F811
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    tokens = seed_tokens(sim, token_file, expires_in=900)
    config = sim.state.config
    async with start_proxy() as proxy:
        # A tool's call, with a query that must not reach the page.
        async with client.get(f"{proxy.url}/api/v1/lead/?query=secret-query-value") as resp:
            assert resp.status == 200
        await network_log(browser)
        await open_page(browser, f"{proxy.url}/admin/")
        await wait_for(browser, lambda d: d.title == "closeproxy dashboard", "the dashboard")
        await asyncio.to_thread(browser.save_screenshot, str(tmp_path / "dashboard.png"))
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000

        assert await text_of(browser, "org") == config.organization_id
        assert await text_of(browser, "user") == config.user_id
        assert "Logged in to Close" in await text_of(browser, "banner")
        recent = await text_of(browser, "recent")
        assert "\tGET\t/api/v1/lead/\t200\t" in recent, recent
        assert "secret-query-value" not in recent
        # The script counts down; without it the server-rendered value is still there.
        assert re.fullmatch(r"1[45]m \d+s", await text_of(browser, "expires-in"))
        expires_before = await text_of(browser, "expires-at")

        # Press Refresh: a form post with the page token, answered by a redirect back.
        started = time.time()
        await asyncio.to_thread(_press, browser, "refresh")
        await wait_for(
            browser,
            lambda d: "refreshed" in (_element_text(d, "notice") or ""),
            "the page after Refresh",
        )
        assert await current_url(browser) == f"{proxy.url}/admin/"
        assert sim.state.token_requests == 1
        expires_after = await text_of(browser, "expires-at")
        assert expires_after != expires_before
        assert re.fullmatch(r"(59|60)m \d+s|1h 0m \d+s", await text_of(browser, "expires-in"))
        assert time.time() - started < 15

        # No secret anywhere in the DOM, before or after the refresh.
        dom = str(await asyncio.to_thread(lambda: browser.page_source))
        fresh = FileGrantStore(token_file).read()
        assert fresh is not None
        for secret in (
            tokens.access_token,
            tokens.refresh_token,
            fresh.access_token,
            fresh.refresh_token,
            config.client_secret,
        ):
            assert secret and secret not in dom

        # Everything the browser asked for went to the proxy on 127.0.0.1 and nowhere else.
        # (Chromium's own chrome:// pages are internal, not network requests.)
        hops = [
            hop
            for hop in await network_log(browser)
            if urlsplit(hop.url).scheme not in {"chrome", "data", "about", "blob"}
        ]
        assert hops
        assert all(hop.url.startswith(f"{proxy.url}/") for hop in hops), hops
        post = [hop for hop in hops if hop.method == "POST"]
        assert [hop.url for hop in post] == [f"{proxy.url}/admin/refresh"], hops
        assert post[0].status == 303, post
        assert post[0].request_headers.get("origin") == proxy.url, post
        assert post[0].request_headers.get("sec-fetch-site") == "same-origin", post
