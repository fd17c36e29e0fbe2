"""Everything the simulator knows: config, tokens, codes, counters, logs and knobs.

All mutation happens synchronously on the event loop, so a validate-then-rotate
step with no ``await`` in between is atomic: two concurrent refreshes with the
same token cannot both succeed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from aiohttp import web

from closeproxy.sim.leads import LeadStore

TokenMode = Literal["ok", "down", "drop", "slow", "lose_reply"]
TOKEN_MODES: frozenset[str] = frozenset(get_args(TokenMode))

ACCESS_PREFIX: str = "simacc_"
REFRESH_PREFIX: str = "simref_"
CODE_PREFIX: str = "simcode_"
SCOPE: str = "all.full_access offline_access"
CODE_LIFETIME: float = 60.0


@dataclass
class SimConfig:
    """How the simulated Close is set up; fields marked live are read on every request."""

    client_id: str = "sim-client"
    client_secret: str = field(default="sim-secret", repr=False)
    token_lifetime: float = 3600.0  # live
    organization_id: str = "orga_sim"
    user_id: str = "user_sim"
    auto_consent: bool = True  # live
    rate_limit: int | None = None  # live; requests per window on /api/v1/
    rate_window: float = 1.0  # live
    default_redirect_uri: str = "https://example.com/callback/close"
    log_limit: int | None = 10_000  # newest entries kept in each log; None keeps all


@dataclass
class RecordedRequest:
    """One request that reached /api/v1/, as received.

    ``body_size`` grows as the body is read; ``body_sha256`` stays empty until the body
    was read to its end, which ``body_complete`` tells (False if the client went away).
    """

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_size: int = 0
    body_sha256: str = ""
    body_complete: bool = False


class OAuthError(Exception):
    """An OAuth error reply: ``{"error": ..., "error_description": ...}``."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


@dataclass
class RateVerdict:
    """Outcome of taking one slot from the fixed-window rate limiter."""

    allowed: bool
    limit: int
    remaining: int
    reset: float  # seconds until the window starts over

    def header(self) -> str:
        return f"limit={self.limit}, remaining={self.remaining}, reset={round(self.reset, 3):g}"

    def retry_after(self) -> int:
        # Retry-After is whole seconds; rounding down would invite an early retry.
        return max(1, math.ceil(self.reset))


@dataclass(eq=False)
class _Family:
    """All tokens descended from one login; killing it kills them all."""

    alive: bool = True


@dataclass(eq=False)
class _AccessToken:
    family: _Family
    expires_at: float
    revoked: bool = False


@dataclass(eq=False)
class _RefreshToken:
    family: _Family
    spent: bool = False


@dataclass(eq=False)
class _AuthCode:
    client_id: str
    redirect_uri: str | None
    code_challenge: str | None
    expires_at: float
    used: bool = False
    family: _Family | None = None


def s256(verifier: str) -> str:
    """PKCE S256 transform: base64url(sha256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _nonneg_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError("expected a number >= 0")
    return float(value)


def _positive_float(value: object) -> float:
    number = _nonneg_float(value)
    if number == 0:
        raise ValueError("expected a number > 0")
    return number


def _nonneg_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _optional_nonneg_int(value: object) -> int | None:
    return None if value is None else _nonneg_int(value)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _token_mode(value: object) -> str:
    if not isinstance(value, str) or value not in TOKEN_MODES:
        raise ValueError(f"expected one of {sorted(TOKEN_MODES)}")
    return value


# Knobs living on SimState; each parser validates a JSON value from /_sim/control.
STATE_KNOBS: dict[str, Callable[[object], object]] = {
    "token_endpoint": _token_mode,
    "token_delay": _nonneg_float,
    "force_401": _nonneg_int,
    "revoke_old_access_on_refresh": _boolean,
    "api_delay": _nonneg_float,
    "deny": _boolean,
}
# Knobs living on SimConfig, read live so they can change while the simulator runs.
CONFIG_KNOBS: dict[str, Callable[[object], object]] = {
    "token_lifetime": _nonneg_float,
    "auto_consent": _boolean,
    "rate_limit": _optional_nonneg_int,
    "rate_window": _positive_float,
}


class SimState:
    """Everything the simulator knows; in-process tests read and set it directly."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self.leads = LeadStore(self.config.organization_id)

        self.token_endpoint: TokenMode = "ok"  # noqa: S105 -- a mode name, not a secret
        self.token_delay = 0.0
        self.force_401 = 0
        self.revoke_old_access_on_refresh = False
        self.api_delay = 0.0
        self.deny = False

        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._codes: dict[str, _AuthCode] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the counters and empty the logs; tokens and knobs stay."""
        self.token_requests = 0
        self.refreshes = 0
        self.code_exchanges = 0
        self.reuse_detected = 0
        self.revokes = 0
        self.api_requests = 0
        self.rejected_api_requests = 0
        self.api_log: list[RecordedRequest] = []
        self.token_log: list[dict[str, str]] = []
        # Client ports of token requests received but not answered yet (for chaos tests:
        # a process killed while one of its ports is here lost a reply).
        self.token_requests_in_flight: list[int] = []
        # (client port, monotonic time) of token requests answered, newest last.
        self.token_requests_answered: list[tuple[int, float]] = []
        self.revoke_log: list[dict[str, str]] = []
        self._window_start = -math.inf
        self._window_count = 0

    def log_api(self, record: RecordedRequest) -> None:
        self.api_log.append(record)
        self.trim(self.api_log)

    def log_token(self, form: dict[str, str]) -> None:
        self.token_log.append(form)
        self.trim(self.token_log)

    def log_revoke(self, form: dict[str, str]) -> None:
        self.revoke_log.append(form)
        self.trim(self.revoke_log)

    def trim(self, log: list[Any]) -> None:
        # A benchmark sends far more requests than any test inspects.
        limit = self.config.log_limit
        if limit is not None and len(log) > limit:
            del log[: len(log) - limit]

    def counters(self) -> dict[str, int]:
        return {
            "token_requests": self.token_requests,
            "refreshes": self.refreshes,
            "code_exchanges": self.code_exchanges,
            "reuse_detected": self.reuse_detected,
            "revokes": self.revokes,
            "api_requests": self.api_requests,
            "rejected_api_requests": self.rejected_api_requests,
        }

    def knobs(self) -> dict[str, object]:
        values: dict[str, object] = {name: getattr(self, name) for name in STATE_KNOBS}
        values.update({name: getattr(self.config, name) for name in CONFIG_KNOBS})
        return values

    def set_knobs(self, changes: Mapping[str, object]) -> None:
        """Validate every change first, then apply them all; ValueError names the bad key."""
        parsed: dict[str, object] = {}
        for name, value in changes.items():
            parser = STATE_KNOBS.get(name) or CONFIG_KNOBS.get(name)
            if parser is None:
                raise ValueError(f"unknown knob {name!r}")
            try:
                parsed[name] = parser(value)
            except ValueError as exc:
                raise ValueError(f"knob {name!r}: {exc}") from None
        for name, value in parsed.items():
            setattr(self if name in STATE_KNOBS else self.config, name, value)

    # --- tokens -----------------------------------------------------------

    def issue_tokens(self) -> dict[str, object]:
        """Start a new token family, as a fresh login would, and return Close's token reply."""
        return self._token_reply(_Family())

    def issued_secrets(self) -> set[str]:
        """Every token and code this simulator handed out, and the client secret."""
        return {*self._access, *self._refresh, *self._codes, self.config.client_secret}

    def expire_access_token(self, token: str) -> None:
        """Make an access token invalid as if its time ran out; KeyError if unknown."""
        self._access[token].expires_at = -math.inf

    def access_token_valid(self, token: str) -> bool:
        record = self._access.get(token)
        return (
            record is not None
            and not record.revoked
            and record.family.alive
            and time.monotonic() < record.expires_at
        )

    def client_ok(self, client_id: str | None, client_secret: str | None) -> bool:
        if client_id is None or client_secret is None:
            return False
        return client_id == self.config.client_id and hmac.compare_digest(
            client_secret.encode(), self.config.client_secret.encode()
        )

    def create_code(
        self, client_id: str, redirect_uri: str | None, code_challenge: str | None
    ) -> str:
        code = CODE_PREFIX + secrets.token_urlsafe(32)
        self._codes[code] = _AuthCode(
            client_id=client_id,
            redirect_uri=redirect_uri,
            code_challenge=code_challenge,
            expires_at=time.monotonic() + CODE_LIFETIME,
        )
        return code

    def exchange_code(
        self,
        *,
        client_id: str,
        code: str,
        redirect_uri: str | None,
        code_verifier: str | None,
    ) -> dict[str, object]:
        """Redeem an authorization code; raises OAuthError('invalid_grant') on any mismatch."""
        grant = self._codes.get(code)
        if grant is None:
            raise OAuthError("invalid_grant", "Invalid authorization code.")
        if grant.used:
            # RFC 6749 4.1.2: a replayed code should revoke what it was exchanged for.
            self.reuse_detected += 1
            if grant.family is not None:
                grant.family.alive = False
            raise OAuthError("invalid_grant", "Authorization code was already used.")
        if time.monotonic() >= grant.expires_at:
            raise OAuthError("invalid_grant", "Authorization code expired.")
        if grant.client_id != client_id:
            raise OAuthError("invalid_grant", "Authorization code was issued to another client.")
        if grant.redirect_uri != redirect_uri:
            raise OAuthError(
                "invalid_grant", "redirect_uri does not match the one sent to the authorize page."
            )
        if grant.code_challenge is None:
            if code_verifier is not None:
                raise OAuthError("invalid_grant", "code_verifier sent but no code_challenge was.")
        elif code_verifier is None:
            raise OAuthError("invalid_grant", "code_verifier is required.")
        elif not hmac.compare_digest(s256(code_verifier), grant.code_challenge):
            raise OAuthError("invalid_grant", "code_verifier does not match code_challenge.")
        grant.used = True
        grant.family = _Family()
        self.code_exchanges += 1
        return self._token_reply(grant.family)

    def refresh(self, refresh_token: str) -> dict[str, object]:
        """Strict rotation: spend the refresh token, return a new pair in the same family."""
        record = self._refresh.get(refresh_token)
        if record is None:
            raise OAuthError("invalid_grant", "Invalid refresh token.")
        if record.spent:
            self.reuse_detected += 1
            record.family.alive = False
            raise OAuthError("invalid_grant", "Refresh token was already used.")
        if not record.family.alive:
            raise OAuthError("invalid_grant", "Refresh token was revoked.")
        record.spent = True
        if self.revoke_old_access_on_refresh:
            for access in self._access.values():
                if access.family is record.family:
                    access.revoked = True
        self.refreshes += 1
        return self._token_reply(record.family)

    def revoke(self, token: str) -> None:
        """RFC 7009: unknown tokens are fine; a refresh token takes its whole family along."""
        refresh = self._refresh.get(token)
        if refresh is not None:
            refresh.family.alive = False
        access = self._access.get(token)
        if access is not None:
            access.revoked = True

    def _token_reply(self, family: _Family) -> dict[str, object]:
        lifetime = self.config.token_lifetime
        access = ACCESS_PREFIX + secrets.token_urlsafe(32)
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        self._access[access] = _AccessToken(family, time.monotonic() + lifetime)
        self._refresh[refresh] = _RefreshToken(family)
        return {
            "token_type": "Bearer",
            "access_token": access,
            "expires_in": int(lifetime) if float(lifetime).is_integer() else lifetime,
            "refresh_token": refresh,
            "scope": SCOPE,
            "organization_id": self.config.organization_id,
            "user_id": self.config.user_id,
        }

    # --- rate limit -------------------------------------------------------

    def take_rate_slot(self) -> RateVerdict | None:
        """Count one /api/v1/ request against the fixed window; None when the limit is off."""
        verdict = self.rate_status()
        if verdict is None or not verdict.allowed:
            return verdict
        self._window_count += 1
        verdict.remaining -= 1
        return verdict

    def rate_status(self) -> RateVerdict | None:
        limit = self.config.rate_limit
        if limit is None:
            return None
        window = self.config.rate_window
        now = time.monotonic()
        if now - self._window_start >= window:
            self._window_start = now
            self._window_count = 0
        remaining = max(0, limit - self._window_count)
        reset = self._window_start + window - now
        return RateVerdict(allowed=remaining > 0, limit=limit, remaining=remaining, reset=reset)


SIM_STATE = web.AppKey("sim_state", SimState)
