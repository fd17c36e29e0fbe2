"""The simulator's Close resources over real sockets: seeds, persistence, query, paging, errors."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closeproxy.sim import RunningSim, SimConfig, SimState, run_sim

SEED = 40
CREATE_PATHS = (
    "lead",
    "contact",
    "opportunity",
    "task",
    "activity/note",
    "activity/call",
    "activity/email",
    "status/lead",
    "status/opportunity",
    "custom_field/lead",
)


class Api:
    """A bearer-authenticated client for one simulator."""

    def __init__(self, session: aiohttp.ClientSession, sim: RunningSim) -> None:
        self.session = session
        self.sim = sim
        self.auth = {"Authorization": f"Bearer {sim.state.issue_tokens()['access_token']}"}

    async def call(
        self, method: str, path: str, body: object = None, **params: str
    ) -> tuple[int, Any]:
        async with self.session.request(
            method,
            f"{self.sim.url}/api/v1/{path}",
            json=body,
            params=params or None,
            headers=self.auth,
        ) as resp:
            return resp.status, await resp.json()

    async def ok(self, method: str, path: str, body: object = None, **params: str) -> Any:
        status, document = await self.call(method, path, body, **params)
        assert status == 200, document
        return document


@pytest.fixture
async def seeded() -> AsyncIterator[RunningSim]:
    async with run_sim(SimConfig(seed=SEED)) as running:
        yield running


@pytest.fixture
async def api(seeded: RunningSim) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield Api(session, seeded)


def dump(state: SimState) -> str:
    org = state.org
    return json.dumps(
        {name: list(org.collection(name).records.values()) for name in ("users", "leads",
         "contacts", "opportunities", "tasks", "activities", "events", "custom_fields")},
        sort_keys=True,
    )  # fmt: skip


# --- acceptance 3: same seed, same data; --data survives a restart -----------------------


async def test_same_seed_serves_the_same_data_and_another_seed_does_not():
    assert dump(SimState(SimConfig(seed=SEED))) == dump(SimState(SimConfig(seed=SEED)))
    assert dump(SimState(SimConfig(seed=SEED))) != dump(SimState(SimConfig(seed=SEED + 1)))
    pages = []
    for _ in range(2):
        async with run_sim(SimConfig(seed=SEED)) as sim, aiohttp.ClientSession() as session:
            api = Api(session, sim)
            pages.append(
                [
                    await api.ok("GET", "lead/", _limit="100"),
                    await api.ok("GET", "event/", _limit="50"),
                    await api.ok("GET", "activity/"),
                ]
            )
    assert pages[0] == pages[1]
    assert pages[0][0]["total_results"] == SEED


async def test_data_dir_survives_a_restart(tmp_path: Path):
    async with run_sim(SimConfig(seed=12, data_dir=tmp_path)) as sim:
        async with aiohttp.ClientSession() as session:
            api = Api(session, sim)
            lead = await api.ok("POST", "lead/", {"name": "Persisted Co"})
            # Written soon, not only at shutdown: a killed simulator loses a moment at most.
            saved = tmp_path / "organization.json"
            for _ in range(500):
                if "Persisted Co" in saved.read_text():
                    break
                await asyncio.sleep(0.01)
            assert "Persisted Co" in saved.read_text()
            await api.ok("POST", "activity/note/", {"lead_id": lead["id"], "note": "kept"})
            first = next(iter(sim.state.org.leads))
            await api.ok("DELETE", f"lead/{first['id']}/")
            before = dump(sim.state)
    assert (tmp_path / "organization.json").exists()
    # Restarted without a seed: the saved organization, not the classic demo leads.
    async with run_sim(SimConfig(data_dir=tmp_path)) as sim:
        assert dump(sim.state) == before
        async with aiohttp.ClientSession() as session:
            api = Api(session, sim)
            found = await api.ok("GET", "lead/", query='name:"Persisted Co"')
            assert [row["id"] for row in found["data"]] == [lead["id"]]
            status, _ = await api.call("GET", f"lead/{first['id']}/")
            assert status == 404
            page = await api.ok("GET", "lead/")
            assert page["total_results"] == 12
            events = await api.ok("GET", "event/", object_id=first["id"], action="deleted")
            assert len(events["data"]) == 1


async def test_standalone_simulator_with_seed_and_data_restarts_with_the_same_data(tmp_path):
    async def start() -> tuple[asyncio.subprocess.Process, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "closeproxy.sim", "--seed", "25", "--data", str(tmp_path),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        return proc, line.split()[-1]

    async def leads(url: str, session: aiohttp.ClientSession, create: bool) -> list[str]:
        async with session.post(url + "/_sim/issue") as resp:
            token = (await resp.json())["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        if create:
            async with session.post(url + "/api/v1/lead/", json={"name": "Z"}, headers=auth) as r:
                assert r.status == 200
        async with session.get(url + "/api/v1/lead/", headers=auth) as resp:
            return [row["id"] for row in (await resp.json())["data"]]

    seen = []
    async with aiohttp.ClientSession() as session:
        for create in (True, False):
            proc, url = await start()
            try:
                seen.append(await leads(url, session, create))
            finally:
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert len(seen[0]) == 26
    assert seen[0] == seen[1]


async def test_a_data_file_that_is_not_ours_is_a_usage_error(tmp_path):
    (tmp_path / "organization.json").write_text("{not json")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "closeproxy.sim", "--data", str(tmp_path),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    text = err.decode()
    assert "organization.json is not simulator data" in text
    assert "Traceback" not in text
    assert len(text.strip().splitlines()) == 1


# --- shapes, query, paging ----------------------------------------------------------------


async def test_seeded_organization_is_believable(api: Api):
    org = api.sim.state.org
    lead = (await api.ok("GET", "lead/", _limit="1"))["data"][0]
    assert lead["contacts"] and lead["addresses"]
    assert set(lead) >= {
        "id", "name", "display_name", "status_id", "status_label", "contacts", "addresses",
        "opportunities", "tasks", "custom", "date_created", "date_updated", "organization_id",
        "created_by", "html_url",
    }  # fmt: skip
    industry = next(f for f in org.custom_fields if f["name"] == "Industry")
    assert lead["custom"]["Industry"] == lead[f"custom.{industry['id']}"]
    statuses = await api.ok("GET", "status/lead/")
    assert {s["label"] for s in statuses["data"]} == {
        "Potential",
        "Bad Fit",
        "Qualified",
        "Customer",
    }
    opportunity_statuses = await api.ok("GET", "status/opportunity/")
    assert {s["type"] for s in opportunity_statuses["data"]} == {"active", "won", "lost"}
    users = await api.ok("GET", "user/")
    assert users["total_results"] == len(org.users) > 1
    me = await api.ok("GET", "me/")
    assert me["id"] == "user_sim"
    for path in ("contact/", "opportunity/", "task/", "custom_field/lead/"):
        page = await api.ok("GET", path)
        assert page["total_results"] > 0
    activity_types = {a["_type"] for a in (await api.ok("GET", "activity/"))["data"]}
    assert activity_types == {"Note", "Call", "Email"}
    call = (await api.ok("GET", "activity/call/", _limit="1"))["data"][0]
    assert call["_type"] == "Call"
    assert (await api.ok("GET", f"activity/call/{call['id']}/"))["id"] == call["id"]


async def test_query_forms(api: Api):
    org = api.sim.state.org
    leads = list(org.leads)
    target = leads[3]
    page = await api.ok("GET", "lead/", query=f'name:"{target["name"]}"')
    assert target["id"] in [row["id"] for row in page["data"]]
    assert all(target["name"].lower() in row["name"].lower() for row in page["data"])
    potential = [lead["id"] for lead in leads if lead["status_label"] == "Potential"]
    page = await api.ok("GET", "lead/", query='status:"potential"', _limit="200")
    assert [row["id"] for row in page["data"]] == potential
    contact = next(c for c in org.contacts if c["lead_id"] == target["id"])
    page = await api.ok("GET", "lead/", query=contact["emails"][0]["email"].upper())
    assert [row["id"] for row in page["data"]] == [target["id"]]
    page = await api.ok(
        "GET", "lead/", query='date_updated>="2024-06-01T00:00" sort:-date_updated', _limit="200"
    )
    dates = [row["date_updated"] for row in page["data"]]
    assert dates == sorted(dates, reverse=True)
    assert len(dates) == sum(lead["date_updated"] >= "2024-06-01" for lead in leads)
    page = await api.ok("GET", "lead/", query="zzz-no-such-lead")
    assert (page["data"], page["total_results"], page["has_more"]) == ([], 0, False)
    for bad in ("colour:red", "a OR b", 'name:"unbalanced', "sort:nothing", "date_updated>=soon"):
        status, body = await api.call("GET", "lead/", query=bad)
        assert status == 400, bad
        assert body["error"].startswith(("Invalid query", "date_updated")), body


async def test_skip_limit_fields_and_cursor_paging(api: Api):
    page = await api.ok("GET", "lead/", _skip="5", _limit="10", _fields="id,display_name")
    assert len(page["data"]) == 10
    assert all(set(row) == {"id", "display_name"} for row in page["data"])
    assert (page["has_more"], page["total_results"]) == (True, SEED)
    assert [r["id"] for r in page["data"]] == list(api.sim.state.org.leads.records)[5:15]
    for path, limit in (("event/", "50"), ("activity/", "17")):
        seen: list[str] = []
        params = {"_limit": limit}
        while True:
            page = await api.ok("GET", path, **params)
            seen += [row["id"] for row in page["data"]]
            if not page["cursor_next"]:
                break
            params = {"_limit": limit, "_cursor": page["cursor_next"]}
        collection = api.sim.state.org.events if path == "event/" else api.sim.state.org.activities
        assert sorted(seen) == sorted(collection.records)
        assert len(seen) == len(set(seen))
    status, body = await api.call("GET", "event/", _cursor="bogus!")
    assert status == 400
    assert "_cursor" in body["error"]
    window = await api.ok(
        "GET", "activity/", date_created__gt="2024-03-01T00:00:00", date_created__lt="2024-04-01"
    )
    assert window["data"]
    assert all("2024-03-01" < row["date_created"] < "2024-04-01" for row in window["data"])


async def test_updates_and_deletes_are_events(api: Api):
    lead = (await api.ok("GET", "lead/", _limit="1"))["data"][0]
    new_status = "Customer" if lead["status_label"] != "Customer" else "Potential"
    updated = await api.ok(
        "PUT", f"lead/{lead['id']}/", {"name": "Renamed Co", "status": new_status}
    )
    assert (updated["display_name"], updated["status_label"]) == ("Renamed Co", new_status)
    assert updated["contacts"] == lead["contacts"]
    events = await api.ok("GET", "event/", object_id=lead["id"])
    newest = events["data"][0]
    assert (newest["action"], newest["object_type"]) == ("updated", "lead")
    assert set(newest["changed_fields"]) >= {"name", "status_id", "status_label"}
    assert newest["previous_data"]["name"] == lead["name"]
    assert newest["data"]["name"] == "Renamed Co"
    task = await api.ok("GET", "task/", lead_id=lead["id"])
    await api.ok("DELETE", f"lead/{lead['id']}/")
    deleted = await api.ok("GET", "event/", lead_id=lead["id"], action="deleted")
    types = {event["object_type"] for event in deleted["data"]}
    assert {"lead", "contact"} <= types
    if task["data"]:
        assert "task.lead" in types
    assert (await api.call("GET", f"lead/{lead['id']}/"))[0] == 404


# --- acceptance 4: invalid payloads are 400 with Close's shape, never a 500 ---------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("lead/", {"name": 123}, "name"),
        ("lead/", {"status": "Nope"}, "status"),
        ("lead/", {"contacts": [{"emails": [{"email": "no-at-sign"}]}]}, "contacts"),
        ("lead/", {"custom.cf_missing": 1}, "custom.cf_missing"),
        ("lead/", {"custom": {"Employees": "many"}}, "custom.Employees"),
        ("lead/", {"custom": {"Industry": "Piracy"}}, "custom.Industry"),
        ("contact/", {"lead_id": "lead_nope", "name": "x"}, "lead_id"),
        ("opportunity/", {"value": 5}, "lead_id"),
        ("task/", {"lead_id": None, "text": "x"}, "lead_id"),
        ("activity/call/", {"lead_id": "lead_nope", "duration": -1}, "duration"),
        ("activity/email/", {"to": "a@b.example"}, "to"),
        ("status/opportunity/", {"label": "Maybe", "type": "perhaps"}, "type"),
        ("custom_field/lead/", {"name": "Size", "type": "choices"}, "choices"),
    ],
)
async def test_invalid_payloads_name_the_field(api: Api, path, body, field):
    status, document = await api.call("POST", path, body)
    assert status == 400
    assert field in document["field-errors"], document
    assert isinstance(document["errors"], list)
    assert isinstance(document["error"], str)


async def test_not_json_and_not_objects_are_400_and_unknown_ids_are_close_404s(api: Api):
    async with api.session.post(
        f"{api.sim.url}/api/v1/task/", data=b"{nope", headers=api.auth
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "Request body is not valid JSON"
    status, body = await api.call("POST", "note/", [1, 2])
    assert status == 404
    status, body = await api.call("POST", "activity/note/", [1, 2])
    assert (status, body["error"]) == (400, "Request body must be a JSON object")
    for path, kind in (
        ("lead/lead_nope/", "Lead"),
        ("contact/cont_nope/", "Contact"),
        ("opportunity/oppo_nope/", "Opportunity"),
        ("task/task_nope/", "Task"),
        ("event/ev_nope/", "Event"),
        ("user/user_nope/", "User"),
        ("custom_field/lead/cf_nope/", "Custom field"),
    ):
        status, body = await api.call("GET", path)
        assert (status, body) == (
            404,
            {"error": f"Empty query: {kind} matching query does not exist."},
        )


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
FIELD_NAMES = st.sampled_from(
    ["name", "lead_id", "contact_id", "user_id", "status", "status_id", "label", "type",
     "value", "value_period", "confidence", "text", "date", "is_complete", "note",
     "direction", "duration", "status", "to", "cc", "subject", "emails", "phones",
     "contacts", "addresses", "custom", "custom.Industry", "choices", "description", "url"]
)  # fmt: skip
PAYLOADS = st.one_of(st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=6), JSON_VALUES)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=st.sampled_from(CREATE_PATHS), payload=PAYLOADS, update=st.booleans())
async def test_any_payload_is_answered_200_or_close_shaped_400_never_500(
    api: Api, path: str, payload: object, update: bool
):
    target = path + "/"
    if update:
        collection = {
            "lead": "leads", "contact": "contacts", "opportunity": "opportunities",
            "task": "tasks", "status/lead": "lead_statuses",
            "status/opportunity": "opportunity_statuses", "custom_field/lead": "custom_fields",
        }.get(path, "activities")  # fmt: skip
        records = list(api.sim.state.org.collection(collection))
        if path.startswith("activity/"):
            kind = path.split("/")[1].capitalize()
            records = [r for r in records if r["_type"] == kind]
        target += records[0]["id"] + "/"
    status, body = await api.call("PUT" if update else "POST", target, payload)
    assert status in {200, 400}, body
    if status == 400:
        assert isinstance(body["error"], str)
        assert isinstance(body["errors"], list)
        assert isinstance(body["field-errors"], dict)


async def test_logins_survive_a_restart_with_data_dir_and_rotation_stays_strict(tmp_path):
    form = {"client_id": "sim-client", "client_secret": "sim-secret", "grant_type": "refresh_token"}
    async with run_sim(SimConfig(data_dir=tmp_path)) as sim:
        first = sim.state.issue_tokens()
        async with aiohttp.ClientSession() as session:
            async with session.post(
                sim.url + "/oauth2/token/", data={**form, "refresh_token": first["refresh_token"]}
            ) as resp:
                second = await resp.json()
                assert resp.status == 200
    assert (tmp_path / "tokens.json").stat().st_mode & 0o777 == 0o600
    async with run_sim(SimConfig(data_dir=tmp_path)) as sim, aiohttp.ClientSession() as session:
        me = f"{sim.url}/api/v1/me/"
        async with session.get(
            me, headers={"Authorization": f"Bearer {second['access_token']}"}
        ) as r:
            assert r.status == 200
        async with session.post(
            sim.url + "/oauth2/token/", data={**form, "refresh_token": second["refresh_token"]}
        ) as resp:
            assert resp.status == 200
            third = await resp.json()
        # The first refresh token was spent before the restart: reuse still kills the family.
        async with session.post(
            sim.url + "/oauth2/token/", data={**form, "refresh_token": first["refresh_token"]}
        ) as resp:
            assert (resp.status, (await resp.json())["error"]) == (400, "invalid_grant")
        async with session.get(
            me, headers={"Authorization": f"Bearer {third['access_token']}"}
        ) as r:
            assert r.status == 401


async def test_events_of_one_request_share_its_request_id_and_stats_count_the_data(api: Api):
    lead = await api.ok(
        "POST", "lead/", {"name": "Two Contacts Co", "contacts": [{"name": "A"}, {"name": "B"}]}
    )
    note = await api.ok("POST", "activity/note/", {"lead_id": lead["id"], "note": "hello"})
    events = (await api.ok("GET", "event/", lead_id=lead["id"]))["data"]
    by_object = {event["object_id"]: event["request_id"] for event in events}
    creating = {by_object[lead["id"]], *(by_object[c["id"]] for c in lead["contacts"])}
    assert len(creating) == 1
    assert by_object[note["id"]] not in creating
    async with api.session.get(api.sim.url + "/_sim/stats") as resp:
        data = (await resp.json())["data"]
    assert data["leads"] == SEED + 1
    assert data["events"] == len(api.sim.state.org.events)
