"""The Close simulator, exercised over real sockets the way the proxy will use it."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import secrets
import signal
import sys
import time
import zlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from yarl import URL

from closeproxy.sim import SimConfig, SimState, download_sha256, run_sim
from closeproxy.sim.app import RunningSim

CLIENT = {"client_id": "sim-client", "client_secret": "sim-secret"}
CALLBACK = "http://127.0.0.1:9/callback"


@pytest.fixture
async def sim() -> AsyncIterator[RunningSim]:
    async with run_sim() as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        yield client


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def bearer(token: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def authorize(
    session: aiohttp.ClientSession, sim: RunningSim, **params: str
) -> dict[str, list[str]]:
    """Follow the authorize page's redirect and return the callback's query."""
    query = {"client_id": "sim-client", "response_type": "code", **params}
    async with session.get(
        sim.url + "/oauth2/authorize/", params=query, allow_redirects=False
    ) as resp:
        assert resp.status == 302, await resp.text()
        return parse_qs(urlsplit(resp.headers["Location"]).query)


async def token_request(
    session: aiohttp.ClientSession, sim: RunningSim, **form: str
) -> tuple[int, dict[str, object]]:
    async with session.post(sim.url + "/oauth2/token/", data={**CLIENT, **form}) as resp:
        return resp.status, await resp.json()


async def login(session: aiohttp.ClientSession, sim: RunningSim) -> dict[str, object]:
    verifier, challenge = pkce_pair()
    query = await authorize(
        session,
        sim,
        redirect_uri=CALLBACK,
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    status, reply = await token_request(
        session,
        sim,
        grant_type="authorization_code",
        code=query["code"][0],
        redirect_uri=CALLBACK,
        code_verifier=verifier,
    )
    assert status == 200, reply
    return reply


async def refresh(
    session: aiohttp.ClientSession, sim: RunningSim, refresh_token: object
) -> tuple[int, dict[str, object]]:
    return await token_request(
        session, sim, grant_type="refresh_token", refresh_token=str(refresh_token)
    )


async def api_status(
    session: aiohttp.ClientSession, sim: RunningSim, token: object, path: str = "/api/v1/me/"
) -> int:
    async with session.get(sim.url + path, headers=bearer(token)) as resp:
        await resp.read()
        return resp.status


# --- OAuth: authorize and code exchange ------------------------------------------------


async def test_authorize_redirects_with_code_and_echoes_state(sim, session):
    async with session.get(
        sim.url + "/oauth2/authorize/",
        params={
            "client_id": "sim-client",
            "response_type": "code",
            "redirect_uri": "http://127.0.0.1:9/cb?keep=1",
            "state": "xyz",
        },
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    assert location.startswith("http://127.0.0.1:9/cb?keep=1&code=simcode_")
    assert parse_qs(urlsplit(location).query)["state"] == ["xyz"]


async def test_authorize_without_redirect_uri_uses_registered_one(sim, session):
    async with session.get(
        sim.url + "/oauth2/authorize/",
        params={"client_id": "sim-client", "response_type": "code"},
        allow_redirects=False,
    ) as resp:
        location = resp.headers["Location"]
    assert location.startswith("https://example.com/callback/close?code=")
    assert "state=" not in location


async def test_authorize_unknown_client_is_an_html_error(sim, session):
    async with session.get(
        sim.url + "/oauth2/authorize/",
        params={"client_id": "nobody", "response_type": "code", "redirect_uri": CALLBACK},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 400
        assert resp.content_type == "text/html"
        assert "Unknown client_id" in await resp.text()


async def test_deny_knob_redirects_with_access_denied(sim, session):
    sim.state.deny = True
    query = await authorize(session, sim, redirect_uri=CALLBACK, state="s1")
    assert query == {"error": ["access_denied"], "state": ["s1"]}


async def test_consent_page_allow_and_deny():
    async with (
        run_sim(SimConfig(auto_consent=False)) as sim,
        aiohttp.ClientSession() as session,
    ):
        params = {"client_id": "sim-client", "response_type": "code", "redirect_uri": CALLBACK}
        async with session.get(sim.url + "/oauth2/authorize/", params=params) as resp:
            assert resp.status == 200
            page = await resp.text()
        assert "value='allow'" in page
        assert "value='deny'" in page
        for decision, key in (("allow", "code"), ("deny", "error")):
            async with session.post(
                sim.url + "/oauth2/authorize/",
                data={**params, "state": "st", "decision": decision},
                allow_redirects=False,
            ) as resp:
                assert resp.status == 302
                query = parse_qs(urlsplit(resp.headers["Location"]).query)
            assert key in query
            assert query["state"] == ["st"]
        assert query["error"] == ["access_denied"]


async def test_code_exchange_with_pkce_returns_close_shaped_reply(sim, session):
    reply = await login(session, sim)
    assert reply["token_type"] == "Bearer"
    assert str(reply["access_token"]).startswith("simacc_")
    assert str(reply["refresh_token"]).startswith("simref_")
    assert reply["expires_in"] == 3600
    assert reply["scope"] == "all.full_access offline_access"
    assert reply["organization_id"] == "orga_sim"
    assert reply["user_id"] == "user_sim"
    assert sim.state.code_exchanges == 1
    assert sim.state.token_log[-1]["grant_type"] == "authorization_code"
    assert sim.state.token_log[-1]["client_secret"] == "sim-secret"
    assert await api_status(session, sim, reply["access_token"]) == 200


@pytest.mark.parametrize(
    ("with_challenge", "token_fields"),
    [
        pytest.param(True, {"code_verifier": "wrong" * 10}, id="wrong-verifier"),
        pytest.param(True, {"code_verifier": None}, id="missing-verifier"),
        pytest.param(False, {"code_verifier": "v" * 50}, id="verifier-without-challenge"),
        pytest.param(True, {"redirect_uri": CALLBACK + "/"}, id="different-redirect-uri"),
        pytest.param(True, {"redirect_uri": None}, id="redirect-uri-left-out"),
    ],
)
async def test_code_exchange_mismatch_is_invalid_grant(sim, session, with_challenge, token_fields):
    verifier, challenge = pkce_pair()
    pkce = {"code_challenge": challenge, "code_challenge_method": "S256"} if with_challenge else {}
    query = await authorize(session, sim, redirect_uri=CALLBACK, **pkce)
    form = {
        "grant_type": "authorization_code",
        "code": query["code"][0],
        "redirect_uri": CALLBACK,
        "code_verifier": verifier,
    }
    if not with_challenge:
        del form["code_verifier"]
    form.update(token_fields)
    status, reply = await token_request(
        session, sim, **{k: v for k, v in form.items() if v is not None}
    )
    assert (status, reply["error"]) == (400, "invalid_grant")
    assert sim.state.code_exchanges == 0


async def test_redirect_uri_at_token_but_not_at_authorize_is_invalid_grant(sim, session):
    query = await authorize(session, sim)
    status, reply = await token_request(
        session,
        sim,
        grant_type="authorization_code",
        code=query["code"][0],
        redirect_uri="https://example.com/callback/close",
    )
    assert (status, reply["error"]) == (400, "invalid_grant")


async def test_reused_code_is_invalid_grant_and_kills_what_it_issued(sim, session):
    query = await authorize(session, sim, redirect_uri=CALLBACK)
    form = {"grant_type": "authorization_code", "code": query["code"][0], "redirect_uri": CALLBACK}
    status, first = await token_request(session, sim, **form)
    assert status == 200
    status, second = await token_request(session, sim, **form)
    assert (status, second["error"]) == (400, "invalid_grant")
    assert await api_status(session, sim, first["access_token"]) == 401


async def test_expired_code_is_invalid_grant(sim, session, monkeypatch):
    monkeypatch.setattr("closeproxy.sim.state.CODE_LIFETIME", 0.0)
    query = await authorize(session, sim)
    status, reply = await token_request(
        session, sim, grant_type="authorization_code", code=query["code"][0]
    )
    assert (status, reply["error"]) == (400, "invalid_grant")
    assert "expired" in str(reply["error_description"])


async def test_token_form_with_repeated_parameter_is_invalid_request(sim, session):
    async with session.post(
        sim.url + "/oauth2/token/",
        data=[*CLIENT.items(), ("grant_type", "refresh_token"), ("grant_type", "password")],
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"
    assert sim.state.token_requests == 1


async def test_wrong_client_secret_is_invalid_client(sim, session):
    async with session.post(
        sim.url + "/oauth2/token/",
        data={"client_id": "sim-client", "client_secret": "nope", "grant_type": "refresh_token"},
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_client"


async def test_plain_pkce_is_refused_at_authorize(sim, session):
    query = await authorize(
        session, sim, redirect_uri=CALLBACK, code_challenge="a" * 43, code_challenge_method="plain"
    )
    assert query["error"] == ["invalid_request"]


# --- OAuth: refresh rotation and revoke ------------------------------------------------


async def test_refresh_rotates_and_reuse_kills_the_family(sim, session):
    first = await login(session, sim)
    status, second = await refresh(session, sim, first["refresh_token"])
    assert status == 200
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert sim.state.refreshes == 1
    status, third = await refresh(session, sim, second["refresh_token"])
    assert status == 200
    assert await api_status(session, sim, third["access_token"]) == 200

    status, reply = await refresh(session, sim, first["refresh_token"])
    assert (status, reply["error"]) == (400, "invalid_grant")
    assert sim.state.reuse_detected == 1
    assert await api_status(session, sim, third["access_token"]) == 401
    status, reply = await refresh(session, sim, third["refresh_token"])
    assert (status, reply["error"]) == (400, "invalid_grant")
    assert sim.state.refreshes == 2


async def test_old_access_token_survives_refresh_unless_knob_set(sim, session):
    first = await login(session, sim)
    _, second = await refresh(session, sim, first["refresh_token"])
    assert await api_status(session, sim, first["access_token"]) == 200
    sim.state.revoke_old_access_on_refresh = True
    _, third = await refresh(session, sim, second["refresh_token"])
    assert await api_status(session, sim, second["access_token"]) == 401
    assert await api_status(session, sim, third["access_token"]) == 200


async def test_concurrent_refreshes_with_one_token_succeed_exactly_once(sim, session):
    tokens = sim.state.issue_tokens()
    sim.state.token_delay = 0.2
    results = await asyncio.gather(
        refresh(session, sim, tokens["refresh_token"]),
        refresh(session, sim, tokens["refresh_token"]),
    )
    assert sorted(status for status, _ in results) == [200, 400]
    assert sim.state.refreshes == 1
    assert sim.state.reuse_detected == 1
    assert sim.state.token_requests == 2


async def test_unknown_refresh_token_is_invalid_grant_without_reuse(sim, session):
    status, reply = await refresh(session, sim, "simref_unknown")
    assert (status, reply["error"]) == (400, "invalid_grant")
    assert sim.state.reuse_detected == 0


async def test_revoke_refresh_token_revokes_family(sim, session):
    tokens = sim.state.issue_tokens()
    async with session.post(
        sim.url + "/oauth2/revoke/", data={**CLIENT, "token": tokens["refresh_token"]}
    ) as resp:
        assert resp.status == 200
        assert await resp.json() == {}
    assert await api_status(session, sim, tokens["access_token"]) == 401
    status, _ = await refresh(session, sim, tokens["refresh_token"])
    assert status == 400
    assert sim.state.revokes == 1
    assert sim.state.revoke_log == [{**CLIENT, "token": tokens["refresh_token"]}]


async def test_revoke_access_token_revokes_only_it(sim, session):
    tokens = sim.state.issue_tokens()
    async with session.post(
        sim.url + "/oauth2/revoke/", data={**CLIENT, "token": tokens["access_token"]}
    ) as resp:
        assert resp.status == 200
    assert await api_status(session, sim, tokens["access_token"]) == 401
    status, _ = await refresh(session, sim, tokens["refresh_token"])
    assert status == 200


async def test_revoke_unknown_token_is_ok_but_bad_client_is_not(sim, session):
    async with session.post(
        sim.url + "/oauth2/revoke/", data={**CLIENT, "token": "whatever"}
    ) as resp:
        assert resp.status == 200
    async with session.post(
        sim.url + "/oauth2/revoke/",
        data={"client_id": "sim-client", "client_secret": "x", "token": "t"},
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_client"


async def test_token_endpoint_down_drop_and_lose_reply(sim, session):
    tokens = sim.state.issue_tokens()
    sim.state.token_endpoint = "down"
    status, reply = await refresh(session, sim, tokens["refresh_token"])
    assert status == 503
    assert "error" in reply
    async with session.post(
        sim.url + "/oauth2/revoke/", data={**CLIENT, "token": tokens["refresh_token"]}
    ) as resp:
        assert resp.status == 503

    sim.state.token_endpoint = "drop"
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await refresh(session, sim, tokens["refresh_token"])
    assert sim.state.refreshes == 0

    # The rotation happens but its answer never arrives: the old token is now spent.
    sim.state.token_endpoint = "lose_reply"
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await refresh(session, sim, tokens["refresh_token"])
    assert sim.state.refreshes == 1
    sim.state.token_endpoint = "ok"
    status, _ = await refresh(session, sim, tokens["refresh_token"])
    assert status == 400
    assert sim.state.reuse_detected == 1
    assert sim.state.token_requests == 4


async def test_short_token_lifetime_expires():
    async with run_sim(SimConfig(token_lifetime=0.3)) as sim, aiohttp.ClientSession() as session:
        tokens = sim.state.issue_tokens()
        assert tokens["expires_in"] == 0.3
        assert await api_status(session, sim, tokens["access_token"]) == 200
        await asyncio.sleep(0.4)
        assert await api_status(session, sim, tokens["access_token"]) == 401


# --- API gate ------------------------------------------------------------------------


async def raw_request(sim: RunningSim, head: bytes) -> tuple[int, bytes]:
    """Send a hand-written request: aiohttp's client cannot produce every header shape."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        writer.write(head)
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2]


async def test_api_rejects_missing_invalid_expired_and_doubled_authorization(sim, session):
    tokens = sim.state.issue_tokens()
    good = str(tokens["access_token"])
    async with session.get(sim.url + "/api/v1/me/", headers=bearer(good)) as resp:
        assert resp.status == 200
        me = await resp.json()
    assert me["id"] == "user_sim"
    assert me["organizations"] == [{"id": "orga_sim", "name": "Simulated Org"}]

    async with session.get(sim.url + "/api/v1/me/") as resp:
        assert resp.status == 401
        assert await resp.json() == {"error": "Unauthorized"}
    assert await api_status(session, sim, "simacc_forged") == 401
    async with session.get(
        sim.url + "/api/v1/me/", headers={"Authorization": "Basic " + good}
    ) as resp:
        assert resp.status == 401
    status, _ = await raw_request(
        sim,
        b"GET /api/v1/me/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: Bearer {good}\r\nAuthorization: Bearer {good}\r\n\r\n".encode(),
    )
    assert status == 401
    sim.state.expire_access_token(good)
    assert await api_status(session, sim, good) == 401
    assert sim.state.rejected_api_requests == 5
    assert sim.state.api_requests == 6
    assert len(sim.state.api_log) == 6


async def test_force_401_counts_down(sim, session):
    token = sim.state.issue_tokens()["access_token"]
    sim.state.force_401 = 2
    statuses = [await api_status(session, sim, token) for _ in range(3)]
    assert statuses == [401, 401, 200]
    assert sim.state.force_401 == 0
    assert sim.state.rejected_api_requests == 2


async def test_unknown_paths_are_json_404(sim, session):
    token = sim.state.issue_tokens()["access_token"]
    async with session.get(sim.url + "/nowhere") as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "Not found"}
    assert await api_status(session, sim, token, "/api/v1/nothing/") == 404
    # Under /api/v1/ the gate runs first, as at Close.
    assert await api_status(session, sim, "bad", "/api/v1/nothing/") == 401


async def test_rate_limit_answers_429_with_close_headers():
    config = SimConfig(rate_limit=2, rate_window=30.0)
    async with run_sim(config) as sim, aiohttp.ClientSession() as session:
        token = sim.state.issue_tokens()["access_token"]
        async with session.get(sim.url + "/api/v1/me/", headers=bearer(token)) as resp:
            assert resp.status == 200
            assert resp.headers["RateLimit"].startswith("limit=2, remaining=1, reset=")
        assert await api_status(session, sim, token) == 200
        async with session.get(sim.url + "/api/v1/me/", headers=bearer(token)) as resp:
            assert resp.status == 429
            assert 1 <= int(resp.headers["Retry-After"]) <= 30
            assert resp.headers["RateLimit"].startswith("limit=2, remaining=0, reset=")
            assert "error" in await resp.json()
        sim.state.config.rate_limit = None
        async with session.get(sim.url + "/api/v1/me/", headers=bearer(token)) as resp:
            assert resp.status == 200
            assert "RateLimit" not in resp.headers


async def test_api_delay_holds_every_api_answer(sim, session):
    token = sim.state.issue_tokens()["access_token"]
    sim.state.api_delay = 0.3
    started = time.monotonic()
    assert await api_status(session, sim, token) == 200
    assert time.monotonic() - started >= 0.3


# --- leads -----------------------------------------------------------------------------


async def test_leads_paging_and_projection(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    async with session.get(sim.url + "/api/v1/lead/", headers=auth) as resp:
        page = await resp.json()
    assert page["total_results"] == 5
    assert page["has_more"] is False
    all_ids = [lead["id"] for lead in page["data"]]
    assert all(lead_id.startswith("lead_") for lead_id in all_ids)

    async with session.get(
        sim.url + "/api/v1/lead/",
        params={"_skip": "1", "_limit": "2", "_fields": "id,display_name"},
        headers=auth,
    ) as resp:
        page = await resp.json()
    assert [lead["id"] for lead in page["data"]] == all_ids[1:3]
    assert all(set(lead) == {"id", "display_name"} for lead in page["data"])
    assert page["has_more"] is True

    for i in range(250):
        sim.state.leads.create({"name": f"extra {i}"})
    async with session.get(sim.url + "/api/v1/lead/", params={"_limit": "500"}, headers=auth) as r:
        page = await r.json()
    assert len(page["data"]) == 200
    assert page["has_more"] is True
    async with session.get(sim.url + "/api/v1/lead/", params={"_limit": "x"}, headers=auth) as r:
        assert r.status == 400


async def test_lead_crud(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    async with session.post(
        sim.url + "/api/v1/lead/", json={"name": "New Co", "id": "lead_forged"}, headers=auth
    ) as resp:
        assert resp.status == 200
        lead = await resp.json()
    assert lead["display_name"] == "New Co"
    assert lead["id"] != "lead_forged"
    url = f"{sim.url}/api/v1/lead/{lead['id']}/"
    async with session.put(url, json={"name": "Renamed"}, headers=auth) as resp:
        assert (await resp.json())["display_name"] == "Renamed"
    async with session.get(url, headers=auth) as resp:
        assert (await resp.json())["name"] == "Renamed"
    async with session.delete(url, headers=auth) as resp:
        assert resp.status == 200
    async with session.get(url, headers=auth) as resp:
        assert resp.status == 404
    async with session.post(sim.url + "/api/v1/lead/", data=b"{not json", headers=auth) as resp:
        assert resp.status == 400
        assert "error" in await resp.json()
    assert len(sim.state.leads) == 5


# --- test helper endpoints ---------------------------------------------------------------


async def test_echo_reports_raw_path_headers_and_body_exactly(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    raw = "/api/v1/_sim/echo/x?query=name%3A%22A%20B%22&_fields=id,display_name&x=%2F"
    body = "héllo".encode()
    async with session.post(
        URL(sim.url + raw, encoded=True), data=body, headers={**auth, "X-Tz-Offset": "-5"}
    ) as resp:
        echoed = await resp.json()
    assert echoed["raw_path"] == raw
    assert echoed["method"] == "POST"
    assert ["X-Tz-Offset", "-5"] in echoed["headers"]
    assert echoed["body_size"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echoed["body_text"] == "héllo"
    assert sim.state.api_log[-1].raw_path == raw
    assert sim.state.api_log[-1].body_sha256 == hashlib.sha256(body).hexdigest()

    async with session.get(URL(sim.url + raw, encoded=True), headers=auth) as resp:
        get_length = len(await resp.read())
    async with session.head(URL(sim.url + raw, encoded=True), headers=auth) as resp:
        assert resp.status == 200
        assert await resp.read() == b""
        # Same document, only "HEAD" is one character longer than "GET".
        assert int(resp.headers["Content-Length"]) == get_length + 1
    assert sim.state.api_log[-1].method == "HEAD"


async def test_echo_large_body_has_no_text(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    body = b"x" * (64 * 1024 + 1)
    async with session.put(sim.url + "/api/v1/_sim/echo/big", data=body, headers=auth) as resp:
        echoed = await resp.json()
    assert echoed["body_text"] is None
    assert echoed["body_size"] == len(body)


async def test_download_streams_deterministic_bytes(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    size = 3 * 1024 * 1024 + 17
    async with session.get(
        sim.url + "/api/v1/_sim/download", params={"bytes": str(size)}, headers=auth
    ) as resp:
        assert resp.headers["Content-Length"] == str(size)
        assert resp.headers["Content-Type"] == "application/octet-stream"
        digest = hashlib.sha256()
        async for chunk in resp.content.iter_chunked(65536):
            digest.update(chunk)
    assert digest.hexdigest() == download_sha256(size)
    pattern = hashlib.shake_256(b"closeproxy.sim download").digest(1_000_003)
    expected = hashlib.sha256((pattern * 4)[:size]).hexdigest()
    assert download_sha256(size) == expected

    async with session.get(
        sim.url + "/api/v1/_sim/download",
        params={"bytes": "100000", "chunk": "7000", "chunked": "1"},
        headers=auth,
    ) as resp:
        assert "Content-Length" not in resp.headers
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert hashlib.sha256(await resp.read()).hexdigest() == download_sha256(100000)


async def test_download_delay_delivers_first_chunk_early(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    started = time.monotonic()
    async with session.get(
        sim.url + "/api/v1/_sim/download",
        params={"bytes": "3000", "chunk": "1000", "delay": "0.3"},
        headers=auth,
    ) as resp:
        first = await resp.content.readany()
        first_at = time.monotonic() - started
        rest = await resp.read()
        done_at = time.monotonic() - started
    assert len(first) + len(rest) == 3000
    assert first_at < 0.25
    assert done_at >= 0.6


async def test_upload_hashes_a_streamed_body(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    block = secrets.token_bytes(1 << 20)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield block

    async with session.post(sim.url + "/api/v1/_sim/upload", data=body(), headers=auth) as resp:
        result = await resp.json()
    assert result == {"bytes": 8 << 20, "sha256": hashlib.sha256(block * 8).hexdigest()}
    assert sim.state.api_log[-1].body_size == 8 << 20


async def test_aborted_upload_is_recorded_incomplete_and_sim_keeps_serving(sim, session):
    token = sim.state.issue_tokens()["access_token"]
    _, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(
        b"POST /api/v1/_sim/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
        + f"Authorization: Bearer {token}\r\n\r\n".encode()
        + b"x" * 1000
    )
    await writer.drain()
    for _ in range(500):
        if sim.state.api_log and sim.state.api_log[-1].body_size == 1000:
            break
        await asyncio.sleep(0.01)
    writer.close()
    await writer.wait_closed()
    assert await api_status(session, sim, token) == 200
    aborted = sim.state.api_log[0]
    assert (aborted.body_size, aborted.body_complete, aborted.body_sha256) == (1000, False, "")
    assert sim.state.api_log[1].body_complete


async def test_gzip_document_is_byte_stable_with_etag(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    bodies = []
    for _ in range(2):
        async with session.get(
            sim.url + "/api/v1/_sim/gzip", headers=auth, auto_decompress=False
        ) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.content_type == "application/json"
            body = await resp.read()
            assert int(resp.headers["Content-Length"]) == len(body)
            etag = resp.headers["ETag"]
            bodies.append(body)
    assert bodies[0] == bodies[1]
    assert json.loads(gzip.decompress(bodies[0]))["total_results"] == 50
    async with session.get(
        sim.url + "/api/v1/_sim/gzip", headers={**auth, "If-None-Match": etag}
    ) as resp:
        assert resp.status == 304
        assert await resp.read() == b""


async def test_large_gzip_export_streams_json_lines(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    async with session.get(
        sim.url + "/api/v1/_sim/export.json.gz",
        params={"bytes": "2000000"},
        headers=auth,
        auto_decompress=False,
    ) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert "Content-Length" not in resp.headers
        compressed = await resp.read()
    raw = zlib.decompress(compressed, 31)
    assert len(raw) >= 2_000_000
    assert len(compressed) < len(raw)
    lines = raw.splitlines()
    assert [json.loads(line)["n"] for line in lines] == list(range(len(lines)))


@pytest.mark.parametrize("code", [204, 304])
async def test_status_without_body(sim, session, code):
    token = sim.state.issue_tokens()["access_token"]
    status, body = await raw_request(
        sim,
        f"GET /api/v1/_sim/status/{code} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode(),
    )
    assert (status, body) == (code, b"")


async def test_status_with_body(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    async with session.delete(sim.url + "/api/v1/_sim/status/503", headers=auth) as resp:
        assert resp.status == 503
        assert (await resp.json())["status"] == 503


async def test_redirect_is_not_followed_and_location_verbatim(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    target = "https://elsewhere.example/a%20b?c=d"
    async with session.get(
        sim.url + "/api/v1/_sim/redirect",
        params={"to": target, "status": "307"},
        headers=auth,
        allow_redirects=False,
    ) as resp:
        assert resp.status == 307
        assert resp.headers["Location"] == target


async def test_sleep_and_hop_headers(sim, session):
    auth = bearer(sim.state.issue_tokens()["access_token"])
    started = time.monotonic()
    async with session.get(
        sim.url + "/api/v1/_sim/sleep", params={"seconds": "0.2"}, headers=auth
    ) as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.2
    async with session.get(sim.url + "/api/v1/_sim/headers", headers=auth) as resp:
        assert resp.headers["Connection"] == "X-Hop"
        assert resp.headers["X-Hop"] == "secret-hop"
        assert resp.headers["Keep-Alive"] == "timeout=5"
        assert resp.headers["Set-Cookie"] == "a=b"
        assert resp.headers["X-Custom"] == "yes"
        await resp.read()


# --- control -----------------------------------------------------------------------------


async def test_control_endpoints_drive_the_simulator(sim, session):
    async with session.post(sim.url + "/_sim/control", json={"nope": 1}) as resp:
        assert resp.status == 400
        assert "nope" in (await resp.json())["error"]
    async with session.post(
        sim.url + "/_sim/control", json={"force_401": 1, "token_endpoint": "bogus"}
    ) as resp:
        assert resp.status == 400
    assert sim.state.force_401 == 0

    async with session.post(
        sim.url + "/_sim/control", json={"force_401": 1, "rate_limit": 50, "token_delay": 0.5}
    ) as resp:
        knobs = await resp.json()
    assert knobs["force_401"] == 1
    assert knobs["rate_limit"] == 50
    assert sim.state.token_delay == 0.5
    assert sim.state.config.rate_limit == 50

    async with session.post(sim.url + "/_sim/issue") as resp:
        tokens = await resp.json()
    assert await api_status(session, sim, tokens["access_token"]) == 401
    assert await api_status(session, sim, tokens["access_token"]) == 200
    async with session.post(
        sim.url + "/_sim/expire", json={"access_token": tokens["access_token"]}
    ) as resp:
        assert resp.status == 200
    assert await api_status(session, sim, tokens["access_token"]) == 401
    async with session.post(sim.url + "/_sim/expire", json={"access_token": "x"}) as resp:
        assert resp.status == 404

    async with session.get(sim.url + "/_sim/stats") as resp:
        stats = await resp.json()
    assert stats["counters"]["api_requests"] == 3
    assert stats["counters"]["rejected_api_requests"] == 2
    assert stats["knobs"]["token_delay"] == 0.5
    async with session.get(sim.url + "/_sim/logs") as resp:
        logs = await resp.json()
    assert [entry["raw_path"] for entry in logs["api_log"]] == ["/api/v1/me/"] * 3
    async with session.post(sim.url + "/_sim/reset") as resp:
        assert resp.status == 200
    assert sim.state.api_requests == 0
    assert sim.state.api_log == []


async def test_logs_keep_only_the_newest_entries():
    async with run_sim(SimConfig(log_limit=2)) as sim, aiohttp.ClientSession() as session:
        token = sim.state.issue_tokens()["access_token"]
        for path in ("/api/v1/a", "/api/v1/b", "/api/v1/c"):
            assert await api_status(session, sim, token, path) == 404
        assert [record.raw_path for record in sim.state.api_log] == ["/api/v1/b", "/api/v1/c"]
        assert sim.state.api_requests == 3


def test_state_repr_and_config_hide_the_secret():
    config = SimConfig(client_secret="top-secret-value")
    assert "top-secret-value" not in repr(config)
    assert SimState(config).config is config


async def test_standalone_process_serves_and_exits_on_sigterm():
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "closeproxy.sim",
        "--port",
        "0",
        "--token-lifetime",
        "120",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line.startswith("simulator listening on http://127.0.0.1:")
        url = line.split()[-1]
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/_sim/issue") as resp:
                tokens = await resp.json()
            assert tokens["expires_in"] == 120
            async with session.get(
                url + "/api/v1/me/", headers=bearer(tokens["access_token"])
            ) as r:
                assert r.status == 200
                assert (await r.json())["id"] == "user_sim"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_download_is_exact_past_the_pattern_period_with_the_largest_chunk(sim, session):
    """Bodies longer than the pattern period, sent in the largest chunks, stay exact."""
    total = 25_000_000
    pattern = hashlib.shake_256(b"closeproxy.sim download").digest(1_000_003)
    expected = hashlib.sha256()
    for start in range(0, total, 1_000_003):
        expected.update(pattern[: min(1_000_003, total - start)])
    digest = hashlib.sha256()
    size = 0
    token = sim.state.issue_tokens()["access_token"]
    async with session.get(
        f"{sim.url}/api/v1/_sim/download",
        params={"bytes": str(total), "chunk": "1048576"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=30),
    ) as resp:
        assert resp.headers["Content-Length"] == str(total)
        async for piece in resp.content.iter_any():
            digest.update(piece)
            size += len(piece)
    assert size == total
    assert digest.hexdigest() == expected.hexdigest() == download_sha256(total)


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"bytes": "100000", "cut_after": "12345"}, id="content-length"),
        pytest.param(
            {"bytes": "100000", "cut_after": "70000", "chunk": "7000", "chunked": "1"},
            id="chunked-on-a-chunk-boundary",
        ),
        pytest.param({"bytes": "100", "cut_after": "0"}, id="before-any-byte"),
    ],
)
async def test_download_cut_after_hangs_up_after_exactly_n_bytes(sim, session, params):
    token = sim.state.issue_tokens()["access_token"]
    received = bytearray()

    async def read_all() -> None:
        async with session.get(
            sim.url + "/api/v1/_sim/download", params=params, headers=bearer(token)
        ) as resp:
            assert resp.status == 200
            async for piece in resp.content.iter_any():
                received.extend(piece)

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all()
    cut = int(params["cut_after"])
    assert len(received) == cut
    pattern = hashlib.shake_256(b"closeproxy.sim download").digest(cut)
    assert received == pattern[:cut]
    assert await api_status(session, sim, token) == 200


def test_standalone_help_states_true_defaults():
    from closeproxy.sim.__main__ import _parser, parse_args

    text = " ".join(_parser().format_help().split())
    consent = text[text.index("--no-auto-consent") :]
    assert "(default: True)" not in consent
    assert "default: redirect at once" in consent
    args = parse_args([])
    assert args.auto_consent is True
    assert args.group_rate_limit == []
    args = parse_args(["--no-auto-consent", "--group-rate-limit", "GET lead=3"])
    assert args.auto_consent is False
    assert args.group_rate_limit == [("GET lead", 3)]
