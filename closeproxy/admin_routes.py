"""The admin route table: every route the proxy answers itself, declared once.

Each route has its path, its method and who may use it. admin.py registers a handler
for each; the guard reads the access rules; the 404 for an unknown path lists them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Access(enum.Enum):
    """Who may use a route when keys are configured (cross-site browsers: see NAVIGATION)."""

    KEY = "key"  # the proxy key; scoped keys are refused
    OPEN = "open"  # no key: health checks
    # No key, and a browser may arrive cross-site: the OAuth callback, reached by the
    # redirect from Close and protected by its single-use state instead.
    NAVIGATION = "navigation"


@dataclass(frozen=True)
class AdminRoute:
    path: str
    method: str  # "GET" (HEAD too) or "POST"
    access: Access = Access.KEY
    # How the 404 for an unknown path names it; None keeps it out of that list.
    listed: str | None = None


HEALTHZ = AdminRoute("/healthz", "GET", Access.OPEN, listed="/healthz")
METRICS = AdminRoute("/metrics", "GET", listed="/metrics")
PAGE = AdminRoute("/admin/", "GET", listed="/admin/ (the dashboard)")
PAGE_REDIRECT = AdminRoute("/admin", "GET")
STATUS = AdminRoute("/admin/status", "GET", listed="/admin/status")
REFRESH = AdminRoute("/admin/refresh", "POST", listed="/admin/refresh")
REVOKE = AdminRoute("/admin/revoke", "POST", listed="/admin/revoke")
LOGIN = AdminRoute("/admin/login", "GET", listed="/admin/login")
CALLBACK = AdminRoute("/admin/callback", "GET", Access.NAVIGATION)

ADMIN_ROUTES: tuple[AdminRoute, ...] = (
    HEALTHZ,
    METRICS,
    PAGE,
    PAGE_REDIRECT,
    STATUS,
    REFRESH,
    REVOKE,
    LOGIN,
    CALLBACK,
)

CALLBACK_PATH = CALLBACK.path
# Paths that take no key, and (path, method) pairs a cross-site browser may use.
KEYLESS_PATHS: frozenset[str] = frozenset(
    r.path for r in ADMIN_ROUTES if r.access is not Access.KEY
)
CROSS_SITE_ROUTES: frozenset[tuple[str, str]] = frozenset(
    (r.path, r.method) for r in ADMIN_ROUTES if r.access is Access.NAVIGATION
)
LISTED = ", ".join(r.listed for r in ADMIN_ROUTES if r.listed is not None)
