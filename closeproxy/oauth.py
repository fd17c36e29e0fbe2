"""Talks to Close's /oauth2/ endpoints; what their replies mean is read in oauth_reply.py.

Retries are short and bounded, and they only cover failures that say nothing about
the grant (no connection, a timeout, 5xx, 429). A retried refresh whose first attempt
did reach Close comes back invalid_grant, which is the truth about the grant then.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from .config import Secret
from .errors import LoginFailed, LoginRequired, TokenServiceUnavailable
from .oauth_reply import EndpointReply, rejected, token_body
from .upstream_proxy import describe_failure, is_proxy_failure, refused_message

log = logging.getLogger("closeproxy.oauth")

TOKEN_PATH = "/oauth2/token/"  # noqa: S105 - a path, not a password
REVOKE_PATH = "/oauth2/revoke/"
DEFAULT_BACKOFF: tuple[float, ...] = (0.5, 1.5)
ATTEMPT_TIMEOUT = 15.0
MAX_RETRY_AFTER = 5.0
# Revoking is best effort after the local wipe: one quick retry, then say so.
REVOKE_BACKOFF: tuple[float, ...] = (0.5,)
REVOKE_TIMEOUT = 10.0
# Retiring the grant a new login replaced: one quick try, never a long wait for the user.
QUICK_REVOKE_TIMEOUT = 5.0
# A refresh that reached Close has rotated the refresh token: its reply is the only copy of
# the new one, so it is waited for much longer than a request (clients get a 503 meanwhile).
REFRESH_REPLY_TIMEOUT = 300.0
FORM_TYPE = "application/x-www-form-urlencoded"


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
            return token_body(reply, "refresh")
        if reply.error == "invalid_grant":
            raise LoginRequired(
                "Close rejected the stored refresh token (invalid_grant), so the grant is "
                "gone: run `closeproxy login` to log in again"
            )
        raise rejected(reply, "refresh the access token")

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
                return token_body(reply, "code exchange")
            except TokenServiceUnavailable as exc:
                raise LoginFailed(str(exc)) from None
        if reply.error == "invalid_grant":
            raise LoginFailed(
                "Close refused the authorization code (invalid_grant): codes are single use "
                "and expire within minutes, and the redirect URI must match the one used to "
                "log in; run `closeproxy login` again"
            )
        raise LoginFailed(str(rejected(reply, "exchange the authorization code")))

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
            raise rejected(reply, "revoke the grant")

    # --- plumbing ---------------------------------------------------------------------

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
