"""What Close's token and revoke endpoints answered, read without any I/O.

A successful token reply is read leniently (its refresh token may be the only copy);
a refusal becomes the error that names what to check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .errors import TokenRequestRejected, TokenServiceUnavailable

log = logging.getLogger("closeproxy.oauth")

DEFAULT_EXPIRES_IN = 3600


@dataclass(frozen=True)
class EndpointReply:
    """One answer of a token or revoke endpoint."""

    status: int
    body: Any  # parsed JSON, or None when the body was not JSON

    @property
    def error(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), str):
            return str(self.body["error"])
        return f"HTTP {self.status}"


def parse_token_reply(body: Any) -> dict[str, Any]:
    """The usable parts of a successful token reply; ValueError only if there is no token.

    Lenient on purpose: by the time a 200 arrives Close has rotated the refresh token, so
    refusing the reply over a quirk (a string expires_in, an odd token_type) would throw
    the only copy of the new refresh token away.
    """
    if not isinstance(body, dict):
        raise ValueError("the reply is not a JSON object")
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise ValueError("the reply has no access_token")
    reply = dict(body)
    try:
        expires_in = float(body.get("expires_in", DEFAULT_EXPIRES_IN))
    except (TypeError, ValueError):
        expires_in = 0.0
    if isinstance(body.get("expires_in"), bool) or not 0 < expires_in < float("inf"):
        log.warning("token reply has an unusable expires_in; assuming %d s", DEFAULT_EXPIRES_IN)
        expires_in = DEFAULT_EXPIRES_IN
    reply["expires_in"] = expires_in
    refresh = body.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        log.warning("token reply has an unusable refresh_token; keeping the previous one")
        reply.pop("refresh_token")
    token_type = body.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        log.warning("token reply has token_type %r; sending it as Bearer", token_type)
        reply["token_type"] = "Bearer"  # noqa: S105 - a scheme name, not a password
    return reply


def token_body(reply: EndpointReply, what: str) -> dict[str, Any]:
    """The tokens of a 200 reply, or TokenServiceUnavailable saying what that means."""
    try:
        return parse_token_reply(reply.body)
    except ValueError as exc:
        if what == "refresh":
            # A 200 means Close accepted the refresh token: it may be spent now.
            raise TokenServiceUnavailable(
                f"Close's token endpoint answered the refresh with an unusable reply "
                f"({exc}), so it may already have spent the stored refresh token; the "
                "next refresh tells: if it answers login_required, run `closeproxy login`"
            ) from None
        raise TokenServiceUnavailable(
            f"Close's token endpoint gave an unusable {what} reply ({exc}); "
            "nothing was stored, try again later"
        ) from None


def rejected(reply: EndpointReply, what: str) -> TokenRequestRejected:
    """The error for a refusal other than invalid_grant, with what to check."""
    hint = (
        "check the client id and client secret of your Close OAuth app"
        if reply.error in {"invalid_client", "unauthorized_client"} or reply.status == 401
        else "check the OAuth app settings in Close"
    )
    return TokenRequestRejected(f"Close refused to {what} ({reply.error}): {hint}")
