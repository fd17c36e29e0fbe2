"""status_document: what `closeproxy status --json` and /admin/status say of the grant."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from .grant import GrantStore, TokenSet


def status_document(
    tokens: TokenSet | None, store: GrantStore, now: float | None = None
) -> dict[str, Any]:
    """What `closeproxy status --json` prints; never a secret."""
    now = time.time() if now is None else now
    doc: dict[str, Any] = {"logged_in": False, **store.status_fields()}
    if tokens is None:
        doc["problem"] = "not logged in: run `closeproxy login`"
        return doc
    expires_in = tokens.expires_in(now)
    doc.update(
        logged_in=tokens.refresh_rejected is None,
        organization_id=tokens.organization_id or None,
        user_id=tokens.user_id or None,
        scope=tokens.scope or None,
        api_url=tokens.api_url or None,
        expires_at=datetime.fromtimestamp(tokens.expires_at, UTC).isoformat(timespec="seconds"),
        expires_in=int(expires_in),
        access_token_valid=expires_in > 0 and tokens.refresh_rejected is None,
        can_refresh=tokens.refresh_token is not None and tokens.refresh_rejected is None,
    )
    if tokens.refresh_rejected:
        doc["problem"] = "Close rejected the refresh token (invalid_grant): run `closeproxy login`"
    elif tokens.refresh_token is None:
        doc["problem"] = (
            "no refresh token (the OAuth app lacks offline_access): the session ends when "
            "the access token expires"
        )
    return doc
