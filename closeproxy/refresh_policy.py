"""When to refresh and why: the refresh intents and the two deadlines of a token."""

from __future__ import annotations

from dataclasses import dataclass

from .grant import TokenSet

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
