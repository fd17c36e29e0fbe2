"""From Settings to a token provider: the one place the grant store is chosen.

app.py (serve), cli.py (every command) and the tests build their provider here, so a
second store (issue 12: `settings.token_store`, a redis:// URL) is one branch in
`open_store` and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp

from .config import Settings
from .file_store import FileGrantStore
from .grant import GrantStore
from .oauth import DEFAULT_BACKOFF
from .sealing import parse_key
from .store_options import FILE_STORE
from .tokens import DEFAULT_LOGIN_ADVICE, REQUEST_WAIT, TokenProvider
from .upstream import oauth_client


def open_store(settings: Settings) -> GrantStore:
    """The grant store the settings name: the token file, or a key in Redis."""
    if settings.token_store == FILE_STORE:
        return FileGrantStore(settings.token_file)
    from .redis_store import RedisGrantStore  # redis-py only for those who use it

    secret = settings.token_store_secret
    return RedisGrantStore(
        settings.token_store,
        settings.token_store_key,
        secret=parse_key(secret.reveal()) if secret is not None else None,
    )


def token_provider(
    settings: Settings,
    session: aiohttp.ClientSession,
    *,
    store: GrantStore | None = None,
    backoff: Sequence[float] = DEFAULT_BACKOFF,
    login_advice: str = DEFAULT_LOGIN_ADVICE,
    log_failures: bool = True,
    request_wait: float | None = REQUEST_WAIT,
) -> TokenProvider:
    """The provider of this settings' grant, talking to Close through `session`."""
    return TokenProvider(
        open_store(settings) if store is None else store,
        oauth_client(settings, session, backoff),
        margin=settings.refresh_margin,
        api_url=str(settings.api_url),
        login_advice=login_advice,
        log_failures=log_failures,
        request_wait=request_wait,
    )
