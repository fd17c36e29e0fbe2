"""The access line's direct path (no LogRecord) writes what the formatters would."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from helpers import Proxy, ProxyFactory, seed_tokens

from closeproxy.logs import (
    JsonFormatter,
    TextFormatter,
    request_id_text,
    setup_logging,
    stop_logging,
)
from closeproxy.sim import RunningSim

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO closeproxy\.access: "
    r'127\.0\.0\.1 "GET (?P<path>\S+)" (?P<status>\d{3}) \d+ \d+\.\dms key=- rid=[0-9a-f]+-\d+$'
)
SECRET_QUERY = "/api/v1/me/?token=abcdefgh12345678"


@pytest.fixture
def own_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_logging as `serve` runs it, alone on the root logger (the secret audit's
    handler on `closeproxy` set aside), and the loggers put back afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("closeproxy")
    handlers, levels = list(root.handlers), (root.level, ours.level)
    monkeypatch.setattr(ours, "handlers", [])
    try:
        yield
    finally:
        stop_logging()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(levels[0])
        ours.setLevel(levels[1])


async def _two_calls(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as client:
        for path in ("/api/v1/me/", SECRET_QUERY):
            async with client.get(proxy.url + path) as resp:
                assert resp.status == 200


async def test_the_direct_text_line_is_the_formatters_line_and_scans_the_query(
    own_logging: None, sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    seed_tokens(sim, token_file)
    stream = io.StringIO()
    setup_logging("info", "text", stream)
    async with start_proxy() as proxy:
        await _two_calls(proxy)
    stop_logging()
    access = [line for line in stream.getvalue().splitlines() if "closeproxy.access" in line]
    matches = [TEXT_LINE.match(line) for line in access]
    assert all(matches), access
    assert [m.group("path") for m in matches if m] == ["/api/v1/me/", "/api/v1/me/?token=[secure]"]
    assert "abcdefgh12345678" not in stream.getvalue()


async def test_the_direct_json_line_has_the_record_fields(
    own_logging: None, sim: RunningSim, token_file: Path, start_proxy: ProxyFactory
) -> None:
    seed_tokens(sim, token_file)
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    async with start_proxy() as proxy:
        await _two_calls(proxy)
    stop_logging()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [r for r in records if r["logger"] == "closeproxy.access"]
    assert [r["path"] for r in access] == ["/api/v1/me/", "/api/v1/me/?token=[secure]"]
    for record in access:
        assert set(record) == {
            "time",
            "level",
            "logger",
            "message",
            "request_id",
            "method",
            "path",
            "status",
            "bytes",
            "duration_ms",
            "remote",
        }
        assert record["level"] == "info" and record["status"] == 200


async def test_with_another_handler_the_access_line_is_an_ordinary_record(
    sim: RunningSim, token_file: Path, start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    seed_tokens(sim, token_file)
    with caplog.at_level(logging.INFO, logger="closeproxy.access"):
        async with start_proxy() as proxy:
            await _two_calls(proxy)
    records = [r for r in caplog.records if r.name == "closeproxy.access"]
    assert len(records) == 2
    text = TextFormatter().format(records[1])
    assert '"GET /api/v1/me/?token=[secure]" 200' in text
    assert json.loads(JsonFormatter().format(records[1]))["path"] == "/api/v1/me/?token=[secure]"


def test_request_ids_name_the_process_that_made_them_even_after_a_fork() -> None:
    # The pid is remembered, not asked for each line: a forked child must not reuse its
    # parent's, or two processes sharing a log would write the same ids.
    assert request_id_text(7) == f"{os.getpid():x}-7"
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.write(write, request_id_text(7).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(child, 0)
    assert said == f"{child:x}-7"
