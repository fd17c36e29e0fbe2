"""The objects one running proxy shares between its routes, under one typed app key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from .config import Settings
from .login import PendingLogins
from .proxy import Forwarder
from .store import TokenStore
from .tokens import TokenProvider
from .upstream_proxy import UpstreamRoute


@dataclass
class Services:
    """Built once at startup, closed once at shutdown."""

    settings: Settings
    session: aiohttp.ClientSession
    store: TokenStore
    provider: TokenProvider
    forwarder: Forwarder
    upstream_route: UpstreamRoute | None = None
    pending: PendingLogins = field(default_factory=PendingLogins)
    started: float = field(default_factory=time.monotonic)


SERVICES = web.AppKey("services", Services)
