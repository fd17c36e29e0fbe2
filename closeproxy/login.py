"""The authorization-code login: authorize URL, callback checks, code exchange, storage.

Shared by `closeproxy login` (loopback listener or pasted URL) and the proxy's
/admin/login and /admin/callback routes. The `state` is checked before any code is
exchanged, and each pending login can be completed once.
"""

from __future__ import annotations

import hmac
import html
import logging
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from yarl import URL

from .admin_routes import CALLBACK_PATH
from .config import Settings, is_loopback_host
from .errors import (
    ConfigError,
    LoginFailed,
    ServiceError,
    TokenServiceUnavailable,
    TokenStoreError,
)
from .grant import GrantStore, SealedGrant, TokenSet, UnreadableGrant, Version
from .oauth import OAuthClient
from .oauth_authorize import authorize_url, pkce_pair

log = logging.getLogger("closeproxy.login")

PENDING_LIFETIME = 600.0
MAX_PENDING = 32


@dataclass(frozen=True)
class PendingLogin:
    """One started login: what the callback must match, and the PKCE verifier."""

    state: str
    redirect_uri: str | None
    verifier: str | None
    url: str
    created: float = field(default_factory=time.monotonic)

    def __repr__(self) -> str:
        return f"PendingLogin(redirect_uri={self.redirect_uri!r}, state='[secure]')"


def start_login(settings: Settings, *, redirect_uri: str | None, pkce: bool = True) -> PendingLogin:
    """A fresh state (256 random bits) and, unless turned off, a PKCE pair."""
    client_id, _ = settings.require_client()
    state = secrets.token_urlsafe(32)
    verifier, challenge = pkce_pair() if pkce else (None, None)
    url = authorize_url(
        settings.app_url,
        client_id=client_id,
        state=state,
        redirect_uri=redirect_uri,
        code_challenge=challenge,
    )
    return PendingLogin(state, redirect_uri, verifier, url)


@dataclass(frozen=True)
class Callback:
    """What came back from the browser: a code or an error, and the state."""

    code: str | None
    state: str | None
    error: str | None
    # A code typed or pasted on its own: the user vouches for it, there is no state to check.
    bare: bool = False

    @classmethod
    def from_query(cls, query: dict[str, list[str]]) -> Callback:
        def one(name: str) -> str | None:
            values = query.get(name)
            return values[0] if values and len(values) == 1 else None

        return cls(one("code"), one("state"), one("error"))

    @classmethod
    def from_pasted(cls, text: str) -> Callback:
        """A pasted landing URL, its query string, or just the bare code."""
        text = text.strip()
        if not text:
            raise LoginFailed("nothing was entered: paste the URL your browser landed on")
        if "=" not in text and "?" not in text and "/" not in text:
            return cls(code=text, state=None, error=None, bare=True)
        query = urlsplit(text).query if "?" in text or "://" in text else text
        return cls.from_query(parse_qs(query.lstrip("?"), keep_blank_values=True))


def check_callback(pending: PendingLogin, callback: Callback) -> str:
    """The authorization code, or LoginFailed; nothing is exchanged before this passes."""
    if callback.state is None and not callback.bare:
        raise LoginFailed(
            "the callback has no state parameter, so it cannot be matched to this login: "
            "paste the whole URL the browser landed on, or run `closeproxy login` again"
        )
    if callback.state is not None and not hmac.compare_digest(
        callback.state.encode(), pending.state.encode()
    ):
        raise LoginFailed(
            "the callback's state does not match this login (a stale or forged link): "
            "run `closeproxy login` again and use the link it gives"
        )
    if callback.error is not None:
        if callback.error == "access_denied":
            raise LoginFailed(
                "access was declined on Close's consent page: run `closeproxy login` again "
                "and choose Allow"
            )
        # The error value is not repeated: it is request input, and pages never echo that.
        raise LoginFailed(
            "Close reported an error instead of a code: check the OAuth app's client id and "
            "redirect URI, then run `closeproxy login` again"
        )
    if not callback.code:
        raise LoginFailed("the callback carries no code: paste the whole URL the browser landed on")
    return callback.code


@dataclass(frozen=True)
class LoginResult:
    """The stored grant, and the one it replaced (if the file held another)."""

    tokens: TokenSet
    previous: TokenSet | None = None


async def finish_login(
    oauth: OAuthClient, store: GrantStore, pending: PendingLogin, code: str
) -> LoginResult:
    """Exchange the code and store the grant, under the same lock refreshes take."""
    # An encrypted grant this process cannot open must not be replaced: say so before the
    # code is spent (SealedGrant names the missing setting).
    try:
        await store.load()
    except (SealedGrant, TokenServiceUnavailable):
        raise  # nowhere to put the new grant: stop before the code is spent
    except TokenStoreError:
        pass  # unreadable: the new grant replaces it
    sent_at = time.time()
    reply = await oauth.exchange_code(
        code, redirect_uri=pending.redirect_uri, code_verifier=pending.verifier
    )
    tokens = TokenSet.from_reply(reply, received_at=sent_at, api_url=str(oauth.api_url))
    async with store.locked():
        version: Version | None = None
        try:
            # Read under the lock: the newest refresh token of the old grant, not a stale one.
            previous, version = await store.load()
        except SealedGrant:
            raise
        except UnreadableGrant as exc:
            previous, version = None, exc.version  # not a grant: the new one replaces it
        except TokenStoreError:
            previous = None  # unreadable: nothing to retire, and the new grant replaces it
        await store.save(tokens, expected=version)
    return LoginResult(tokens, previous)


@dataclass(frozen=True)
class Retired:
    """What became of the grant a new login replaced."""

    revoked: bool = False
    message: str | None = None  # one sentence for the user, None when there was nothing


async def retire_previous(oauth: OAuthClient, result: LoginResult) -> Retired:
    """Revoke the replaced grant at Close: best effort, one quick try, logged.

    Never raises: the new login stands whatever happens here.
    """
    old = result.previous
    if old is None or old.refresh_rejected is not None:
        return Retired()  # nothing stored before, or a grant Close already ended
    token = old.refresh_token or old.access_token
    if token in {result.tokens.refresh_token, result.tokens.access_token}:
        return Retired()  # the same grant: nothing was replaced
    issuer = old.api_url.rstrip("/")
    if issuer and issuer != str(oauth.api_url).rstrip("/"):
        # Never send a grant to a server that did not issue it.
        message = (
            f"the previous grant was issued by {issuer}, so it was not revoked here: remove "
            "the app's access in that Close account's settings if it is no longer needed"
        )
        log.warning("%s", message)
        return Retired(message=message)
    try:
        # The refresh token ends the whole grant; a grant without one has just the access token.
        await oauth.revoke(token, quick=True)
    except ServiceError as exc:
        message = (
            f"the previous grant could not be revoked: {exc}; it stays valid at Close until "
            "you remove the app's access in Close's settings"
        )
        log.warning("%s", message)
        return Retired(message=message)
    message = "revoked the previous grant at Close (the one this login replaced)"
    log.info("%s", message)
    return Retired(revoked=True, message=message)


def browser_login_works(settings: Settings) -> bool:
    """True when /admin/login on a running proxy can finish: the redirect comes back to it."""
    return settings.redirect_uri is None or URL(settings.redirect_uri).path == CALLBACK_PATH


def login_advice(settings: Settings, *, browser_login: bool, proxy_url: str | None = None) -> str:
    """What to tell someone who is not logged in, in words that work where they are."""
    try:
        settings.require_client()
    except ConfigError as exc:
        return f"{exc}; then run `closeproxy login`"
    if not browser_login:  # a proxy that lives as long as one command: log in, then rerun
        return "run `closeproxy login`, then run this command again"
    if browser_login_works(settings):
        page = f"{proxy_url}/admin/login" if proxy_url else "/admin/login on this proxy"
        return f"run `closeproxy login`, or open {page} in a browser"
    return "run `closeproxy login`"


def is_loopback_redirect(redirect_uri: str | None) -> bool:
    """True when `closeproxy login` can catch the redirect itself with a local listener."""
    if redirect_uri is None:
        return False
    url = URL(redirect_uri)
    return url.scheme == "http" and url.host is not None and is_loopback_host(url.host)


class PendingLogins:
    """The logins started through /admin/login that await their callback."""

    def __init__(self) -> None:
        self._by_state: dict[str, PendingLogin] = {}

    def add(self, pending: PendingLogin) -> None:
        self._expire()
        while len(self._by_state) >= MAX_PENDING:
            self._by_state.pop(next(iter(self._by_state)))
        self._by_state[pending.state] = pending

    def take(self, state: str | None) -> PendingLogin | None:
        """The login this state belongs to, removed so that it completes only once."""
        self._expire()
        if state is None:
            return None
        return self._by_state.pop(state, None)

    def _expire(self) -> None:
        cutoff = time.monotonic() - PENDING_LIFETIME
        for state in [s for s, p in self._by_state.items() if p.created < cutoff]:
            del self._by_state[state]


# --- the page a browser sees after the callback ------------------------------------------

PAGE_HEADERS: dict[str, str] = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>closeproxy: {title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36em;margin:4em auto;line-height:1.5}}
</style></head>
<body><h1>{title}</h1><p>{message}</p></body></html>
"""


def callback_page(status: int, title: str, message: str) -> web.Response:
    """A plain page; nothing from the request is ever echoed into it."""
    body = _PAGE.format(title=html.escape(title), message=html.escape(message))
    return web.Response(status=status, text=body, content_type="text/html", headers=PAGE_HEADERS)


def success_page(tokens: TokenSet, where: str, *, note: str | None = None) -> web.Response:
    return callback_page(
        200,
        "Logged in to Close",
        f"Organization {tokens.organization_id or '?'}, user {tokens.user_id or '?'}. "
        f"The tokens are stored in {where}. "
        + (f"{note[0].upper()}{note[1:]}. " if note else "")
        + "You can close this tab.",
    )
