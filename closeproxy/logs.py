"""Logging that never blocks the event loop and never prints a secret.

Records go through a queue to a writer thread (stderr can be a slow pipe). The
formatter there replaces every registered secret, and anything shaped like a bearer
credential, with [secure]: a defence in depth behind never logging them at all.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import re
import sys
import threading
from collections import deque
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

REDACTED = "[secure]"
REQUEST_ID = web.RequestKey("request_id", str)
# The id of the request being handled; tasks started meanwhile (a refresh) inherit it.
CURRENT_REQUEST_ID: ContextVar[str | None] = ContextVar("closeproxy_request_id", default=None)
# The name of the key a request presented ("proxy", a [keys.NAME] name, "run"): never the key.
KEY_NAME = web.RequestKey("key_name", str)
_MAX_SECRETS = 64
# Rotating tokens: the newest few. Long-lived secrets (client secret, proxy key) are
# kept apart so that no number of refreshes can push them out.
_secrets: deque[str] = deque(maxlen=_MAX_SECRETS)
_permanent: set[str] = set()
_secrets_lock = threading.Lock()
# Credentials in the shapes they travel in, even ones this process never registered
# (the login callback's code and state included).
_SHAPES = re.compile(
    r"(?i)(\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}"
    r"|((?:access_token|refresh_token|client_secret|code_verifier|token|code|state)[\"']?\s*[:=]\s*[\"']?)"
    r"[^\s\"'&,}]{4,}"
)
_EXTRA_FIELDS: tuple[str, ...] = (
    "request_id",
    "method",
    "path",
    "status",
    "bytes",
    "duration_ms",
    "remote",
    "key",
)


def register_secret(value: str | None, *, permanent: bool = False) -> None:
    """Make sure `value` is never written by any log handler of this process."""
    if not value or len(value) < 4:
        return
    with _secrets_lock:
        if permanent:
            _permanent.add(value)
        elif value not in _secrets:
            _secrets.append(value)


def redact(text: str) -> str:
    with _secrets_lock:
        known = (*_permanent, *_secrets)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _SHAPES.sub(lambda m: (m.group(1) or m.group(2)) + REDACTED, text)


def add_request_id(record: logging.LogRecord) -> bool:
    """Filter: give a record emitted while a request is handled that request's id."""
    if getattr(record, "request_id", None) is None:
        record.request_id = CURRENT_REQUEST_ID.get()
    return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line += f" rid={request_id}"
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the request fields as their own keys."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _EXTRA_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                doc[field] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, ensure_ascii=False))


_listener: logging.handlers.QueueListener | None = None


def quiet_client_errors(record: logging.LogRecord) -> bool:
    """A malformed request is the client's problem: one debug line, not an error with a
    traceback, so that no local client can flood the log. Its details stay out: a
    too-long header line would quote the header, credentials and all."""
    exc = record.exc_info[1] if record.exc_info else None
    if not isinstance(exc, HttpProcessingError):
        return True
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    record.msg, record.args = "refused a malformed request (%s)", (type(exc).__name__,)
    record.exc_info = record.exc_text = None
    return logging.getLogger("closeproxy").isEnabledFor(logging.DEBUG)


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route the closeproxy and aiohttp loggers through one queue to `stream`."""
    global _listener
    stop_logging()
    writer = logging.StreamHandler(stream or sys.stderr)
    writer.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, writer, respect_handler_level=False)
    _listener.start()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.handlers.QueueHandler(records)
    # Here, not in the writer thread: the request's context is only visible where it logs.
    handler.addFilter(add_request_id)
    root.addHandler(handler)
    numeric = getattr(logging, level.upper())
    logging.getLogger("closeproxy").setLevel(numeric)
    # aiohttp's own chatter is only interesting when debugging; its errors always are.
    logging.getLogger("aiohttp").setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    server_log = logging.getLogger("aiohttp.server")
    if quiet_client_errors not in server_log.filters:
        server_log.addFilter(quiet_client_errors)
    root.setLevel(numeric)
    atexit.register(stop_logging)


def stop_logging() -> None:
    """Flush what is queued; called at exit."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


class AccessLogger(AbstractAccessLogger):
    """One line a request: who, what, how it ended, how long it took."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = request.raw_path
        if path.startswith("/admin/") and "?" in path:
            # The login callback's query is a one-time code and its state: not for any log.
            path = path.partition("?")[0] + "?" + REDACTED
        self.logger.info(
            '%s "%s %s" %d %d %.1fms key=%s',
            request.remote,
            request.method,
            path,
            response.status,
            response.body_length,
            time * 1000,
            request.get(KEY_NAME, "-"),
            extra={
                "request_id": request.get(REQUEST_ID),
                "method": request.method,
                "path": path,
                "status": response.status,
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 1),
                "remote": request.remote,
                "key": request.get(KEY_NAME),
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
