"""The address a login opens in the browser: Close's authorize page, state and PKCE."""

from __future__ import annotations

import base64
import hashlib
import secrets

from yarl import URL

AUTHORIZE_PATH = "/oauth2/authorize/"


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier (43+ chars, RFC 7636) and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorize_url(
    app_url: URL,
    *,
    client_id: str,
    state: str,
    redirect_uri: str | None,
    code_challenge: str | None,
) -> str:
    params: list[tuple[str, str]] = [("client_id", client_id), ("response_type", "code")]
    if redirect_uri is not None:
        params.append(("redirect_uri", redirect_uri))
    params.append(("state", state))
    if code_challenge is not None:
        params += [("code_challenge", code_challenge), ("code_challenge_method", "S256")]
    return str(app_url.with_path(app_url.path.rstrip("/") + AUTHORIZE_PATH).with_query(params))
