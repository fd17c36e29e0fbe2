"""The objects one running proxy shares between its routes, under one typed app key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from .config import Settings
from .dashboard import PageTokens, Recent
from .grant import GrantStore
from .login import PendingLogins
from .metrics import Metrics
from .proxy import Forwarder
from .tokens import TokenProvider
from .upstream_proxy import UpstreamRoute


@dataclass
class Services:
    """Built once at startup, closed once at shutdown."""

    settings: Settings
    session: aiohttp.ClientSession
    store: GrantStore
    provider: TokenProvider
    forwarder: Forwarder
    upstream_route: UpstreamRoute | None = None
    metrics: Metrics | None = None  # None: metrics are off (--metrics off)
    recent: Recent = field(default_factory=Recent)
    page_tokens: PageTokens = field(default_factory=PageTokens)
    # What the dashboard's last button press did, shown on the page after its redirect.
    notice: str | None = None
    pending: PendingLogins = field(default_factory=PendingLogins)
    started: float = field(default_factory=time.monotonic)


SERVICES = web.AppKey("services", Services)
# Set on a request by the features that know them (rate limiting, scoped keys), shown in
# the dashboard's table of recent requests: seconds waited, and the name of the key used.
