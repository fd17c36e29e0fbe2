"""Which request targets the proxy serves: origin-form, visible ASCII, no dot segments.

A target Close could read as another path than the one the guard and the scoped keys
checked (`..`, a backslash, `%2e%2e` at any depth of encoding) is refused before any
route runs.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

# Paths: visible ASCII without backslash, and every % starts a valid escape. Queries
# reach Close as sent (a literal `50%` included), so they only need to be visible ASCII.
_PATH_OK = re.compile(r"(?:[!-$&-\[\]-~]|%[0-9A-Fa-f]{2})*")
_QUERY_OK = re.compile(r"[!-~]*")
# How many layers of percent-encoding are looked through (guard_keys.py too).
DECODE_ROUNDS: Final = 3


def _plain(text: str) -> bool:
    """Visible ASCII only (no space, no control character)."""
    return text.isascii() and text.isprintable() and " " not in text


def check_target(path: str, query: str) -> str | None:
    """Why this request target (split at its first `?`) must not be served, or None."""
    if (
        path.startswith("/")
        and _plain(path)
        and "%" not in path
        and "\\" not in path
        and "/." not in path
        and _plain(query)
    ):
        # The common plain target, in string methods instead of the regexes: what the
        # full check would accept without decoding anything.
        return None
    return full_target_check(path, query)


def full_target_check(path: str, query: str) -> str | None:
    """check_target without its fast path."""
    if not path.startswith("/"):
        return (
            "only origin-form request targets like /api/v1/me/ are accepted; "
            "this is a reverse proxy, not a forward proxy"
        )
    if not _PATH_OK.fullmatch(path):
        return (
            "the path has spaces, control or non-ASCII characters, backslashes or a stray %: "
            "percent-encode them"
        )
    if not _QUERY_OK.fullmatch(query):
        return "the query has spaces, control or non-ASCII characters: percent-encode them"
    # Decode a few times so double-encoded dots (%252e) cannot smuggle a `..` either.
    for _ in range(DECODE_ROUNDS):
        if any(segment in {".", ".."} for segment in path.split("/")):
            return "the path contains . or .. segments: send the normalized path"
        if "\\" in path or "\x00" in path:
            return "the path contains a backslash or NUL: remove it"
        decoded = unquote(path, errors="replace") if "%" in path else path
        if decoded == path:
            return None
        path = decoded
    return "the path is percent-encoded too many times: send it encoded once"
