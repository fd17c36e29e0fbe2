"""Logging that never blocks the event loop and never prints a secret.

Each record is formatted where it is logged and the line appended to a buffer; a
writer thread empties the buffer into the stream every few milliseconds (stderr can be
a slow pipe), so a busy proxy hands over one batch, not one line, at a time. The
formatter replaces every registered secret, and anything shaped like a bearer
credential, with [secure]: a defence in depth behind never logging them at all.
The access line (access_log.py) is built from known fields and skips that scan.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import sys
import threading
from collections import deque
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

REDACTED = "[secure]"
# A request's number in this process; as text (request_id_text) only where a line needs it.
REQUEST_ID = web.RequestKey("request_id", int)
# The id of the request being handled; tasks started meanwhile (a refresh) inherit it.
CURRENT_REQUEST_ID: ContextVar[int | None] = ContextVar("closeproxy_request_id", default=None)
# The name of the key a request presented ("proxy", a [keys.NAME] name, "run"): never the key.
KEY_NAME: web.RequestKey[str | None] = web.RequestKey("key_name")
ACCESS_LOGGER = "closeproxy.access"
_ROOT = logging.getLogger()
_CLOSEPROXY = logging.getLogger("closeproxy")
_ACCESS = logging.getLogger(ACCESS_LOGGER)
# The writer wakes this often, or sooner once this many lines wait.
FLUSH_INTERVAL = 0.05
_WAKE_AT = 512
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


# This process's id in hex, the prefix of its request ids: os.getpid() is a system call,
# too dear for every line. A forked child works out its own.
_pid_hex = f"{os.getpid():x}"


def _after_fork() -> None:
    global _pid_hex
    _pid_hex = f"{os.getpid():x}"


os.register_at_fork(after_in_child=_after_fork)


def request_id_text(number: int) -> str:
    """A request id as logs show it: unique across the processes sharing a log."""
    return f"{_pid_hex}-{number}"


def add_request_id(record: logging.LogRecord) -> bool:
    """Filter: give a record emitted while a request is handled that request's id."""
    if getattr(record, "request_id", None) is None:
        number = CURRENT_REQUEST_ID.get()
        record.request_id = None if number is None else request_id_text(number)
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
            "message": redact(record.getMessage()),
        }
        for field in _EXTRA_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                doc[field] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        # Each value redacted before encoding: a scan of the encoded line could swallow
        # an escaping backslash and leave a line that is no longer JSON.
        return json.dumps(doc, ensure_ascii=False)


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


class LineSink:
    """Lines in, written by a thread of its own in batches: appending never blocks."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines: deque[str] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="closeproxy-log", daemon=True)
        self._thread.start()

    def put(self, line: str) -> None:
        """`line` ends in a newline; it is written within FLUSH_INTERVAL."""
        self._lines.append(line)
        if len(self._lines) >= _WAKE_AT:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        lines = self._lines
        if not lines:
            return
        batch = []
        with contextlib.suppress(IndexError):
            while True:
                batch.append(lines.popleft())
        try:
            self.stream.write("".join(batch))
            self.stream.flush()
        except (OSError, ValueError):
            pass  # the stream is gone (a closed pipe): nothing left to tell it

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5.0)


class SinkHandler(logging.Handler):
    """Formats in the logging thread (where the request's context is) into a LineSink."""

    def __init__(self, sink: LineSink, formatter: logging.Formatter) -> None:
        super().__init__()
        self.sink = sink
        self.setFormatter(formatter)
        self.json = isinstance(formatter, JsonFormatter)
        # Here, not in the writer thread: the request's context is only visible where it logs.
        self.addFilter(add_request_id)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.put(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


# The handler setup_logging installed, while it is the only one a record meets.
_handler: SinkHandler | None = None


def direct_handler() -> SinkHandler | None:
    """The sink handler when an access line would reach nothing else: then the line may
    be written to it directly, without a LogRecord (a test's capture turns this off)."""
    handler = _handler
    if handler is None or _ACCESS.handlers or _ACCESS.filters or _CLOSEPROXY.handlers:
        return None
    if _ROOT.handlers != [handler]:
        return None
    return handler


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route the closeproxy and aiohttp loggers through one batching writer to `stream`."""
    global _handler
    stop_logging()
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler = SinkHandler(LineSink(stream or sys.stderr), formatter)
    root = _ROOT
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    _handler = handler
    numeric = getattr(logging, level.upper())
    _CLOSEPROXY.setLevel(numeric)
    # aiohttp's own chatter is only interesting when debugging; its errors always are.
    logging.getLogger("aiohttp").setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    server_log = logging.getLogger("aiohttp.server")
    if quiet_client_errors not in server_log.filters:
        server_log.addFilter(quiet_client_errors)
    root.setLevel(numeric)
    atexit.register(stop_logging)


def stop_logging() -> None:
    """Write what is buffered and stop the writer; called at exit."""
    global _handler
    handler, _handler = _handler, None
    if handler is not None:
        _ROOT.removeHandler(handler)
        handler.sink.close()
