"""Talks to Close's /oauth2/ endpoints; the parsing of replies is pure and separate.

Retries are short and bounded, and they only cover failures that say nothing about
the grant (no connection, a timeout, 5xx, 429). A retried refresh whose first attempt
did reach Close comes back invalid_grant, which is the truth about the grant then.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from .config import Secret
from .errors import (
    LoginFailed,
    LoginRequired,
    TokenRequestRejected,
    TokenServiceUnavailable,
)
from .upstream_proxy import describe_failure, is_proxy_failure, refused_message

log = logging.getLogger("closeproxy.oauth")

TOKEN_PATH = "/oauth2/token/"  # noqa: S105 - a path, not a password
REVOKE_PATH = "/oauth2/revoke/"
AUTHORIZE_PATH = "/oauth2/authorize/"
DEFAULT_BACKOFF: tuple[float, ...] = (0.5, 1.5)
ATTEMPT_TIMEOUT = 15.0
MAX_RETRY_AFTER = 5.0
DEFAULT_EXPIRES_IN = 3600
# Revoking is best effort after the local wipe: one quick retry, then say so.
REVOKE_BACKOFF: tuple[float, ...] = (0.5,)
REVOKE_TIMEOUT = 10.0
# Retiring the grant a new login replaced: one quick try, never a long wait for the user.
QUICK_REVOKE_TIMEOUT = 5.0
# A refresh that reached Close has rotated the refresh token: its reply is the only copy of
# the new one, so it is waited for much longer than a request (clients get a 503 meanwhile).
REFRESH_REPLY_TIMEOUT = 300.0
FORM_TYPE = "application/x-www-form-urlencoded"


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


class OAuthClient:
    """Refresh, code exchange and revoke against one Close API base."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_url: URL,
        client_id: str,
        client_secret: Secret,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
    ) -> None:
        self._session = session
        self.api_url = api_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._backoff = tuple(backoff)
        self._timeout = aiohttp.ClientTimeout(total=attempt_timeout)
        self._refresh_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=attempt_timeout, sock_read=REFRESH_REPLY_TIMEOUT
        )

    def __repr__(self) -> str:
        return f"OAuthClient(api_url={str(self.api_url)!r}, client_id={self._client_id!r})"

    def _endpoint(self, path: str) -> URL:
        return self.api_url.with_path(self.api_url.path.rstrip("/") + path)

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        """Spend a refresh token; the reply carries its successor."""
        reply = await self._post(
            TOKEN_PATH,
            {"grant_type": "refresh_token", "refresh_token": refresh_token},
            what="refresh the access token",
            hint="the stored tokens are kept; try again when Close is reachable",
            attempt_timeout=self._refresh_timeout,
            retry_only_unsent=True,
        )
        if reply.status == 200:
            return self._token_body(reply, "refresh")
        if reply.error == "invalid_grant":
            raise LoginRequired(
                "Close rejected the stored refresh token (invalid_grant), so the grant is "
                "gone: run `closeproxy login` to log in again"
            )
        raise self._rejected(reply, "refresh the access token")

    async def exchange_code(
        self, code: str, *, redirect_uri: str | None, code_verifier: str | None
    ) -> dict[str, Any]:
        """Trade an authorization code for the first token pair."""
        form = {"grant_type": "authorization_code", "code": code}
        if redirect_uri is not None:
            form["redirect_uri"] = redirect_uri
        if code_verifier is not None:
            form["code_verifier"] = code_verifier
        try:
            reply = await self._post(
                TOKEN_PATH,
                form,
                what="exchange the authorization code",
                hint="nothing was stored; run `closeproxy login` again when Close is reachable",
            )
        except TokenServiceUnavailable as exc:
            raise LoginFailed(str(exc)) from None
        if reply.status == 200:
            try:
                return self._token_body(reply, "code exchange")
            except TokenServiceUnavailable as exc:
                raise LoginFailed(str(exc)) from None
        if reply.error == "invalid_grant":
            raise LoginFailed(
                "Close refused the authorization code (invalid_grant): codes are single use "
                "and expire within minutes, and the redirect URI must match the one used to "
                "log in; run `closeproxy login` again"
            )
        raise LoginFailed(str(self._rejected(reply, "exchange the authorization code")))

    async def revoke(self, token: str, *, quick: bool = False) -> None:
        """Revoke a token at Close; any 2xx counts (RFC 7009 says unknown tokens are fine).

        `quick`: a single attempt with a short timeout.
        """
        reply = await self._post(
            REVOKE_PATH,
            {"token": token},
            what="revoke the grant",
            backoff=() if quick else REVOKE_BACKOFF,
            attempt_timeout=aiohttp.ClientTimeout(
                total=QUICK_REVOKE_TIMEOUT if quick else REVOKE_TIMEOUT
            ),
        )
        if not 200 <= reply.status < 300:
            raise self._rejected(reply, "revoke the grant")

    # --- plumbing ---------------------------------------------------------------------

    def _token_body(self, reply: EndpointReply, what: str) -> dict[str, Any]:
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

    def _rejected(self, reply: EndpointReply, what: str) -> TokenRequestRejected:
        hint = (
            "check the client id and client secret of your Close OAuth app"
            if reply.error in {"invalid_client", "unauthorized_client"} or reply.status == 401
            else "check the OAuth app settings in Close"
        )
        return TokenRequestRejected(f"Close refused to {what} ({reply.error}): {hint}")

    async def _post(
        self,
        path: str,
        fields: Mapping[str, str],
        *,
        what: str,
        hint: str = "",
        backoff: Sequence[float] | None = None,
        attempt_timeout: aiohttp.ClientTimeout | None = None,
        retry_only_unsent: bool = False,
    ) -> EndpointReply:
        """POST with bounded retries.

        `retry_only_unsent`: for requests that must never reach Close twice (a refresh
        spends its token), only a failure to connect is retried; any later failure may
        have reached Close, so it ends the attempts and says so.
        """
        url = self._endpoint(path)
        form = {
            "client_id": self._client_id,
            "client_secret": self._client_secret.reveal(),
            **fields,
        }
        backoff = self._backoff if backoff is None else tuple(backoff)
        attempts = len(backoff) + 1
        reason = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(backoff[attempt - 1])
            try:
                async with self._session.post(
                    url,
                    # Explicit: the shared session is told never to add a Content-Type.
                    data=urlencode(form).encode("ascii"),
                    headers={"Accept": "application/json", "Content-Type": FORM_TYPE},
                    timeout=attempt_timeout or self._timeout,
                    allow_redirects=False,
                ) as resp:
                    raw = await resp.read()
                    retry_after = resp.headers.get("Retry-After", "")
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = _describe(exc)
                log.warning("%s attempt %d/%d failed: %s", path, attempt + 1, attempts, reason)
                if retry_only_unsent and not isinstance(exc, _UNSENT):
                    raise TokenServiceUnavailable(
                        f"could not {what}: {url} failed after the request was sent "
                        f"({reason}), so Close may have replaced the refresh token without "
                        "the reply reaching closeproxy; the next refresh tells: if it answers "
                        "login_required, run `closeproxy login`"
                    ) from None
                continue
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = None
            if status == 407:
                # Only an outbound proxy says 407 (on an http:// API base, with no tunnel).
                raise TokenServiceUnavailable(
                    f"could not {what}: "
                    + refused_message(407, "Proxy Authentication Required", "in use")
                    + (f"; {hint}" if hint else "")
                )
            reply = EndpointReply(status, body)
            if status >= 500 or status == 429:
                reason = f"HTTP {status}"
                log.warning("%s attempt %d/%d answered %s", path, attempt + 1, attempts, reason)
                if status == 429 and attempt + 1 < attempts:
                    await asyncio.sleep(_retry_after(retry_after))
                continue
            return reply
        raise TokenServiceUnavailable(
            f"could not {what}: {url} failed {attempts} time{'s' if attempts > 1 else ''} "
            f"({reason})" + (f"; {hint}" if hint else "")
        )


# Failures that prove the request never left: no connection was made.
_UNSENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def _retry_after(value: str) -> float:
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return 1.0


def _describe(exc: BaseException) -> str:
    """A short reason for a network failure, with no request details in it."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if is_proxy_failure(exc):
        return describe_failure(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return type(exc).__name__
