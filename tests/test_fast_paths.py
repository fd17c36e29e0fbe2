"""Fast paths agree with their definitions: header filters, the guard's target check."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from closeproxy.guard_target import check_target, full_target_check
from closeproxy.proxy_headers import (
    CORS_PREFIX,
    REQUEST_DROP,
    RESPONSE_DROP,
    request_headers,
    response_headers,
)

EXTRA_NAMES = ("Accept", "X-Custom", "Access-Control-Allow-Origin", "access-control-max-age")
NAMES = st.sampled_from([*sorted(REQUEST_DROP | RESPONSE_DROP), *EXTRA_NAMES, "Etag"]).flatmap(
    lambda name: st.sampled_from([name, name.upper(), name.title()])
)
HEADERS = st.lists(st.tuples(NAMES, st.sampled_from(["1", "x", "close, X-Custom", "Etag"])))


def _reference(headers: CIMultiDictProxy[str], always: frozenset[str]) -> list[tuple[str, str]]:
    named = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    drop = always | named
    return [(n, v) for n, v in headers.items() if n.lower() not in drop]


@given(HEADERS)
def test_request_headers_match_the_definition(pairs: list[tuple[str, str]]) -> None:
    incoming = CIMultiDictProxy(CIMultiDict(pairs))
    out = request_headers(incoming, "tok")
    assert list(out.items()) == [
        *_reference(incoming, REQUEST_DROP),
        ("Authorization", "Bearer tok"),
    ]


@given(HEADERS)
def test_response_headers_match_the_definition(pairs: list[tuple[str, str]]) -> None:
    incoming = CIMultiDictProxy(CIMultiDict(pairs))
    expected = [
        (n, v)
        for n, v in _reference(incoming, RESPONSE_DROP)
        if not n.lower().startswith(CORS_PREFIX)
    ]
    assert list(response_headers(incoming).items()) == expected


TARGET_CHARS = st.sampled_from([*"/a.%2eE5cC\\ ?&=~-\x00\x7f", "é", "\t"])


@given(st.text(TARGET_CHARS, max_size=24), st.text(TARGET_CHARS, max_size=8))
def test_the_guards_fast_path_agrees_with_the_full_target_check(path: str, query: str) -> None:
    for candidate in (path, "/" + path, "/api/v1/" + path):
        assert (check_target(candidate, query) is None) == (
            full_target_check(candidate, query) is None
        )
