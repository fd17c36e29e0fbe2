"""When to refresh and why: the refresh intents, the two deadlines of a token, and the
errors that say why a grant cannot be used or refreshed at all."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ClientNotConfigured, GrantMismatch, LoginRequired, ServiceError
from .grant import GrantStore, TokenSet
from .settings import client_hint

# A token this close to expiry is refreshed before use, not in the background.
MIN_VALIDITY = 5.0


@dataclass(frozen=True)
class Force:
    """Ask Close for new tokens whatever the ones at hand look like."""


@dataclass(frozen=True)
class IfDue:
    """Refresh only if the tokens at hand are due."""


@dataclass(frozen=True)
class Rejected:
    """Close refused this access token: any other, not yet due, will do."""

    token: str

    def __repr__(self) -> str:
        return "Rejected('[secure]')"


# Why new tokens are wanted, which decides what tokens at hand already satisfy.
RefreshIntent = Force | IfDue | Rejected
FORCE = Force()
IF_DUE = IfDue()


def refresh_due_at(tokens: TokenSet, margin: float) -> float:
    """When to start refreshing; never more than half the lifetime early."""
    return tokens.expires_at - min(margin, max(tokens.lifetime, 0.0) / 2)


def must_refresh_at(tokens: TokenSet) -> float:
    """After this a request waits for the refresh instead of using the old token."""
    return tokens.expires_at - min(MIN_VALIDITY, max(tokens.lifetime, 0.0) / 10)


def satisfies(tokens: TokenSet, intent: RefreshIntent, *, margin: float, now: float) -> bool:
    """True when `tokens` already meet a non-forced intent."""
    return (
        not (isinstance(intent, Rejected) and tokens.access_token == intent.token)
        and not tokens.refresh_rejected
        and now < refresh_due_at(tokens, margin)
    )


def usable(tokens: TokenSet | None, *, store: GrantStore, api_url: str, advice: str) -> TokenSet:
    """The tokens if a proxy talking to `api_url` may use them, else the error that says
    why not; `store` is where they were looked for, `advice` how to log in. Runs on every
    request: nothing is built unless it fails."""
    if tokens is None:
        raise LoginRequired(f"not logged in to Close (no tokens in {store.describe()}): {advice}")
    issuer = tokens.api_url.rstrip("/")
    if issuer and issuer != api_url.rstrip("/"):
        # Never send a grant to a server that did not issue it.
        raise GrantMismatch(
            f"the stored tokens were issued by {issuer}, but this closeproxy talks to "
            f"{api_url}: set --api-url back to {issuer}, or run `closeproxy login` "
            f"to log in to {api_url}"
        )
    if tokens.refresh_rejected:
        raise LoginRequired(
            "Close rejected the stored refresh token (invalid_grant), so the grant is gone: "
            "run `closeproxy login` to log in again"
        )
    return tokens


def cannot_refresh_error(tokens: TokenSet) -> ServiceError:
    """Why tokens that need a refresh cannot get one here."""
    if tokens.refresh_token is None:
        return LoginRequired(
            "the access token expired and Close gave no refresh token (the OAuth app "
            "lacks offline_access): run `closeproxy login` again"
        )
    return ClientNotConfigured(
        "the access token expired and cannot be refreshed because no OAuth client is "
        f"configured: set the client id and secret of your Close OAuth app "
        f"({client_hint()}) and start closeproxy again"
    )
