"""The admin route table is the one list: the app serves exactly what it declares."""

from __future__ import annotations

from closeproxy.admin_routes import ADMIN_ROUTES, CALLBACK, KEYLESS_PATHS, Access
from closeproxy.app import create_app
from closeproxy.config import load_settings


def test_the_app_registers_every_declared_admin_route_and_no_other() -> None:
    app = create_app(load_settings({}, {}))
    served: set[tuple[str, str]] = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith(("/admin", "/healthz", "/metrics")):
            served.add((path, route.method))
    declared = {(r.path, r.method) for r in ADMIN_ROUTES}
    # A GET route answers HEAD too.
    declared |= {(r.path, "HEAD") for r in ADMIN_ROUTES if r.method == "GET"}
    assert served == declared


def test_only_the_health_check_and_the_callback_go_without_a_key() -> None:
    assert sorted(KEYLESS_PATHS) == ["/admin/callback", "/healthz"]
    assert [r for r in ADMIN_ROUTES if r.access is Access.NAVIGATION] == [CALLBACK]
