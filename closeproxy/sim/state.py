"""Everything the simulator knows: config, tokens, codes, counters, logs and knobs.

All mutation happens synchronously on the event loop, so a validate-then-rotate
step with no ``await`` in between is atomic: two concurrent refreshes with the
same token cannot both succeed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from aiohttp import web

from closeproxy.sim import seed
from closeproxy.sim.config import (
    CONFIG_KNOBS,
    SimConfig,
    boolean,
    nonneg_float,
    nonneg_int,
    one_of,
)
from closeproxy.sim.leads import Leads
from closeproxy.sim.org import DataFileError, Organization
from closeproxy.sim.ratelimit import GroupStats, RateLimiter

TokenMode = Literal["ok", "down", "drop", "slow", "lose_reply"]
TOKEN_MODES: frozenset[str] = frozenset(get_args(TokenMode))

ACCESS_PREFIX: str = "simacc_"
REFRESH_PREFIX: str = "simref_"
CODE_PREFIX: str = "simcode_"
SCOPE: str = "all.full_access offline_access"
CODE_LIFETIME: float = 60.0
TOKENS_FILE: str = "tokens.json"


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


@dataclass(frozen=True)
class Rotation:
    """One refresh granted: the successor of the refresh token it spent, and who asked."""

    successor: str
    port: int  # the client's TCP port (0 if unknown)
    at: float  # monotonic time


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


_token_mode = one_of(TOKEN_MODES)


# Knobs living on SimState; each parser validates a JSON value from /_sim/control.
STATE_KNOBS: dict[str, Callable[[object], object]] = {
    "token_endpoint": _token_mode,
    "token_delay": nonneg_float,
    "token_stall": nonneg_float,
    "force_401": nonneg_int,
    "revoke_old_access_on_refresh": boolean,
    "api_delay": nonneg_float,
    "deny": boolean,
    "revoke_down": boolean,
    "revoke_delay": nonneg_float,
}


class SimState:
    """Everything the simulator knows; in-process tests read and set it directly."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self.org = Organization(self.config.organization_id, self.config.data_dir)
        if not self.org.load():
            seed.build(self.org, seed=self.config.seed, user_id=self.config.user_id)
            self.org.save()
            self.org.flush()  # a fresh organization is on disk before the first request
        self.leads = Leads(self.org, self.config.user_id)
        self.rate = RateLimiter(self.config)

        self.token_endpoint: TokenMode = "ok"  # noqa: S105 -- a mode name, not a secret
        self.token_delay = 0.0
        # Seconds the token endpoint holds a request before acting on it; a client that
        # hangs up meanwhile is never served (as if its request had not reached Close).
        self.token_stall = 0.0
        self.force_401 = 0
        self.revoke_old_access_on_refresh = False
        self.api_delay = 0.0
        self.deny = False
        self.revoke_down = False  # only the revoke endpoint answers 503
        self.revoke_delay = 0.0  # seconds the revoke endpoint takes before answering

        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._codes: dict[str, _AuthCode] = {}
        self._load_tokens()
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the counters and empty the logs; tokens and knobs stay."""
        self.token_requests = 0
        self.refreshes = 0
        self.code_exchanges = 0
        self.reuse_detected = 0
        self.token_requests_abandoned = 0  # dropped unprocessed: the client left in a stall
        self.refresh_times: list[float] = []  # wall-clock time of each refresh granted
        self.revokes = 0
        self.api_requests = 0
        self.rejected_api_requests = 0
        self.api_log: list[RecordedRequest] = []
        self.token_log: list[dict[str, str]] = []
        # Spent refresh tokens sent again, in order (each one counted in reuse_detected).
        self.reused_refresh_tokens: list[str] = []
        # Client ports of token requests received but not answered yet (for chaos tests:
        # a process killed while one of its ports is here lost a reply).
        self.token_requests_in_flight: list[int] = []
        # Each refresh token spent by a refresh -> the rotation that spent it (for chaos
        # tests: whose reply carried the successor of a token that was sent again).
        self.rotations: dict[str, Rotation] = {}
        self.revoke_log: list[dict[str, str]] = []
        self.rate.reset()
        # Request headers the token and revoke endpoints received, newest last.
        self.oauth_headers: list[list[tuple[str, str]]] = []

    def log_api(self, record: RecordedRequest) -> None:
        self.api_log.append(record)
        self.trim(self.api_log)

    def log_token(self, form: dict[str, str]) -> None:
        self.token_log.append(form)
        self.trim(self.token_log)

    def log_oauth_headers(self, request: web.Request) -> None:
        self.oauth_headers.append(list(request.headers.items()))
        self.trim(self.oauth_headers)

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
            "token_requests_abandoned": self.token_requests_abandoned,
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
        self._save_tokens()

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
                self._save_tokens()
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

    def refresh(self, refresh_token: str, *, port: int = 0) -> dict[str, object]:
        """Strict rotation: spend the refresh token, return a new pair in the same family.

        `port`: the asking client's TCP port, kept in `rotations`."""
        record = self._refresh.get(refresh_token)
        if record is None:
            raise OAuthError("invalid_grant", "Invalid refresh token.")
        if record.spent:
            self.reuse_detected += 1
            self.reused_refresh_tokens.append(refresh_token)
            record.family.alive = False
            self._save_tokens()
            raise OAuthError("invalid_grant", "Refresh token was already used.")
        if not record.family.alive:
            raise OAuthError("invalid_grant", "Refresh token was revoked.")
        record.spent = True
        if self.revoke_old_access_on_refresh:
            for access in self._access.values():
                if access.family is record.family:
                    access.revoked = True
        self.refreshes += 1
        self.refresh_times.append(time.time())
        self.trim(self.refresh_times)
        reply = self._token_reply(record.family)
        successor = str(reply["refresh_token"])
        self.rotations[refresh_token] = Rotation(successor, port, time.monotonic())
        limit = self.config.log_limit
        if limit is not None and len(self.rotations) > limit:
            del self.rotations[next(iter(self.rotations))]
        return reply

    def revoke(self, token: str) -> None:
        """RFC 7009: unknown tokens are fine; a refresh token takes its whole family along."""
        refresh = self._refresh.get(token)
        if refresh is not None:
            refresh.family.alive = False
        access = self._access.get(token)
        if access is not None:
            access.revoked = True
        self._save_tokens()

    def _token_reply(self, family: _Family) -> dict[str, object]:
        lifetime = self.config.token_lifetime
        access = ACCESS_PREFIX + secrets.token_urlsafe(32)
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        self._access[access] = _AccessToken(family, time.monotonic() + lifetime)
        self._refresh[refresh] = _RefreshToken(family)
        # The spent refresh token and the new pair reach the disk together.
        self._save_tokens()
        return {
            "token_type": "Bearer",
            "access_token": access,
            "expires_in": int(lifetime) if float(lifetime).is_integer() else lifetime,
            "refresh_token": refresh,
            "scope": SCOPE,
            "organization_id": self.config.organization_id,
            "user_id": self.config.user_id,
        }

    # --- tokens on disk, with --data: a restarted simulator keeps its logins --------

    def _tokens_path(self) -> Path | None:
        data_dir = self.config.data_dir
        return None if data_dir is None else data_dir / TOKENS_FILE

    def _save_tokens(self) -> None:
        path = self._tokens_path()
        if path is None:
            return
        families: dict[int, _Family] = {}
        for family in [r.family for r in self._access.values()] + [
            r.family for r in self._refresh.values()
        ]:
            families.setdefault(id(family), family)
        number = {key: index for index, key in enumerate(families)}
        wall = time.time() - time.monotonic()
        document = {
            "families": [family.alive for family in families.values()],
            "access": {
                token: [number[id(r.family)], r.expires_at + wall, r.revoked]
                for token, r in self._access.items()
                if math.isfinite(r.expires_at)
            },
            "refresh": {
                token: [number[id(r.family)], r.spent] for token, r in self._refresh.items()
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(document, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    def _load_tokens(self) -> None:
        path = self._tokens_path()
        if path is None or not path.exists():
            return
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            families = [_Family(alive=bool(alive)) for alive in document["families"]]
            wall = time.time() - time.monotonic()
            for token, (family, expires_at, revoked) in document["access"].items():
                self._access[token] = _AccessToken(
                    families[family], float(expires_at) - wall, bool(revoked)
                )
            for token, (family, spent) in document["refresh"].items():
                self._refresh[token] = _RefreshToken(families[family], bool(spent))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise DataFileError(f"{path} is not simulator token data: {exc}") from None

    @property
    def rate_groups(self) -> dict[str, GroupStats]:
        """Per endpoint group (``"GET lead"``): hits, 429s sent, early arrivals."""
        return self.rate.groups


SIM_STATE = web.AppKey("sim_state", SimState)
