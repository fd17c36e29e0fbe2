"""Property-based: whatever the path, query and headers, the deputy stays inside /api/v1/."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from helpers import Proxy, raw_request, seed_tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closeproxy.sim import RunningSim

SEGMENTS = st.sampled_from(
    [
        "api",
        "v1",
        "API",
        "V1",
        "lead",
        "me",
        "oauth2",
        "token",
        "admin",
        "revoke",
        "healthz",
        "",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2e%2e",
        ".%2e",
        "%2e.",
        "%252e%252e",
        "%2f",
        "%2F..",
        "%5c",
        "%5C..",
        "%00",
        ";",
        "%3b",
        "a;b",
        "%",
        "%zz",
        "~",
        "lead_1",
        "_sim",
        "echo",
    ]
)
PATHS = st.one_of(
    st.lists(SEGMENTS, max_size=6).map(lambda parts: "/api/v1/" + "/".join(parts)),
    st.lists(SEGMENTS, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.lists(SEGMENTS, min_size=1, max_size=4).map(
        lambda parts: "/api/v1/_sim/echo/" + "/".join(parts)
    ),
)
QUERY = st.text(alphabet=st.sampled_from(list("abcXYZ019=&%2F/?.:;,+-_~!$'()*@")), max_size=30)
HEADER_NAMES = st.sampled_from(
    [
        "Authorization",
        "authorization",
        "AUTHORIZATION",
        "Proxy-Authorization",
        "Cookie",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "Forwarded",
        "X-Custom",
        "Connection",
        "X-Http-Method-Override",
        "Accept-Encoding",
        "TE",
    ]
)
HEADER_VALUES = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
).map(str.strip)
HEADERS = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6)


def escapes_api(raw_path: str) -> bool:
    path = raw_path.partition("?")[0]
    for _ in range(4):
        if not path.startswith("/api/v1/") or any(s in {".", ".."} for s in path.split("/")):
            return True
        path = unquote(path)
    return False


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=PATHS, query=QUERY, headers=HEADERS)
async def test_nothing_leaves_the_api_and_only_our_authorization_goes_up(
    sim: RunningSim,
    token_file: Path,
    proxy: Proxy,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
) -> None:
    if not token_file.exists():
        seed_tokens(sim, token_file)
    target = path + ("?" + query if query else "")
    before = len(sim.state.api_log)
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{proxy.port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Connection: close")
    response = await raw_request(proxy.port, "\n".join(lines) + "\n\n")
    assert 200 <= response.status < 600
    forwarded = sim.state.api_log[before:]
    assert len(forwarded) <= 1
    assert sim.state.token_requests == 0
    bearer = f"Bearer {sim_token(token_file)}"
    for record in forwarded:
        assert record.raw_path == target  # byte for byte
        assert not escapes_api(record.raw_path)
        auths = [v for k, v in record.headers if k.lower() == "authorization"]
        assert auths == [bearer]
        sent = {k.lower() for k, _ in record.headers}
        assert not sent & {
            "cookie",
            "proxy-authorization",
            "x-forwarded-for",
            "forwarded",
            "x-forwarded-host",
            "te",
        }


def sim_token(token_file: Path) -> str:
    import json

    return str(json.loads(token_file.read_text())["access_token"])
