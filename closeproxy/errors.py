"""Every error closeproxy raises on purpose.

    CloseProxyError                  base; `str(exc)` is one sentence with the fix
    ├── ConfigError                  a setting is missing or invalid (exit 2)
    ├── LoginFailed                  the authorization-code login did not complete
    └── ServiceError                 also answered over HTTP as {"error", "closeproxy_error"}
        ├── LoginRequired            401 login_required: no usable grant, log in again
        │   └── GrantMismatch        the grant belongs to another API base (exit 2)
        ├── ClientNotConfigured      401 client_not_configured: a refresh is due but no
        │                            client id and secret are set (exit 2)
        ├── TokenServiceUnavailable  503 token_service_unavailable: Close's token endpoint
        │                            is unreachable or failing; stored tokens are kept
        ├── TokenRequestRejected     401 token_request_rejected: Close refused the client
        │                            (bad client id or secret), not the grant
        └── TokenStoreError          500 token_store_error: the token file or its lock
                                     cannot be used

Set-up problems (no client configured, client refused) are 401, not 5xx: Close clients
retry 502/503/504 for minutes, and no retry fixes those.
Messages never contain a token, a client secret or a proxy key: they are shown to
clients of the proxy and written to logs.
"""

from __future__ import annotations

from typing import ClassVar


class CloseProxyError(Exception):
    """Base of every error closeproxy raises on purpose."""

    exit_code: int = 1  # the CLI's exit status when this ends a command


class ConfigError(CloseProxyError):
    """A setting is missing or invalid; the message names it and where it came from."""

    exit_code = 2

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class LoginFailed(CloseProxyError):
    """The authorization-code login did not complete; nothing was written."""


class ServiceError(CloseProxyError):
    """An error the proxy also reports to its HTTP clients."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"


class LoginRequired(ServiceError):
    """There is no usable grant: the user has to run `closeproxy login`."""

    status = 401
    code = "login_required"


class GrantMismatch(LoginRequired):
    """The stored grant was issued by another API base than the one configured."""

    exit_code = 2


class ClientNotConfigured(ServiceError):
    """A refresh is due, but no OAuth client id and secret are configured to do it."""

    status = 401
    code = "client_not_configured"
    exit_code = 2


class TokenServiceUnavailable(ServiceError):
    """Close's token endpoint could not be reached or failed; stored tokens are kept."""

    status = 503
    code = "token_service_unavailable"


class TokenRequestRejected(ServiceError):
    """Close refused the token request for a reason other than the grant itself."""

    # Not 5xx: the client credentials are wrong, and no retry by a client will fix them.
    status = 401
    code = "token_request_rejected"


class TokenStoreError(ServiceError):
    """The token file or its lock file cannot be read or written."""

    status = 500
    code = "token_store_error"
