"""The access line: one a request, built from known fields, cheap enough to leave on.

Every field is the proxy's own (status, sizes, timing, the key's configured name) or
the request line, so no secret can be in it by construction: the line skips the
redaction scan of free-form messages. The only part a client writes freely, the query,
is still scanned, and only when there is one; the login callback's query (a one-time
code and its state) is never written at all.

While setup_logging's writer is the only place a line would go, the line is formatted
here and handed to it directly, without a LogRecord; otherwise (a test capturing
records, another handler added) it is an ordinary record of `closeproxy.access`.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .logs import (
    ACCESS_LOGGER,
    KEY_NAME,
    REDACTED,
    REQUEST_ID,
    SinkHandler,
    direct_handler,
    redact,
)
from .logs import request_id_text as _rid

_LEVEL = logging.INFO


class _Clock:
    """The text formatter's `asctime`, re-rendered once a second, not once a line."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def asctime(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._text},{int((now - second) * 1000):03d}"


_clock = _Clock()


def _path(request: web.BaseRequest) -> str:
    path = request.raw_path
    if "?" not in path:
        return path
    if path.startswith("/admin/"):
        # The login callback's query is a one-time code and its state: not for any log.
        return path.partition("?")[0] + "?" + REDACTED
    return redact(path)


class AccessLogger(AbstractAccessLogger):
    """One line a request: who, what, how it ended, how long it took."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = _path(request)
        key = request.get(KEY_NAME)
        number = request.get(REQUEST_ID)
        rid = None if number is None else _rid(number)
        message = (
            f'{request.remote} "{request.method} {path}" {response.status} '
            f"{response.body_length} {time * 1000:.1f}ms key={key or '-'}"
        )
        handler = direct_handler() if self.logger.name == ACCESS_LOGGER else None
        if handler is not None:
            handler.sink.put(_line(handler, message, request, response, path, time, key, rid))
            return
        self.logger.info(
            "%s",
            message,
            extra={
                "request_id": rid,
                "method": request.method,
                "path": path,
                "status": response.status,
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 1),
                "remote": request.remote,
                "key": key,
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(_LEVEL)


def _line(
    handler: SinkHandler,
    message: str,
    request: web.BaseRequest,
    response: web.StreamResponse,
    path: str,
    took: float,
    key: str | None,
    rid: str | None,
) -> str:
    """What TextFormatter or JsonFormatter would write for the record, newline included."""
    now = time.time()
    if not handler.json:
        line = f"{_clock.asctime(now)} INFO {ACCESS_LOGGER}: {message}"
        return f"{line} rid={rid}\n" if rid is not None else line + "\n"
    doc: dict[str, object] = {
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        "level": "info",
        "logger": ACCESS_LOGGER,
        "message": message,
    }
    fields = (
        ("request_id", rid),
        ("method", request.method),
        ("path", path),
        ("status", response.status),
        ("bytes", response.body_length),
        ("duration_ms", round(took * 1000, 1)),
        ("remote", request.remote),
        ("key", key),
    )
    for name, value in fields:
        if value is not None:
            doc[name] = value
    return json.dumps(doc, ensure_ascii=False) + "\n"
