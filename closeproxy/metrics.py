"""Prometheus metrics (SPEC §11): one CollectorRegistry per app, the metric objects, nothing else.

Every label comes from a bounded set: a method from METHODS (else "other"), a status
code, a `closeproxy_error` code, a refresh result, a rate-limit group. Never a path.
What the token provider already counts is read at scrape time, not on the request path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
METHODS: frozenset[str] = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER: Final = "other"
# Seconds: Close answers most calls in tens of milliseconds; exports take longer.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
REFRESH_RESULTS: tuple[str, ...] = ("ok", "rejected", "failed")


@dataclass(frozen=True)
class RefreshCounts:
    """What a token provider has counted, as the refresh collector reads it."""

    ok: int = 0
    rejected: int = 0
    failed: int = 0


class _ProviderCollector(Collector):
    """Refresh outcomes and token expiry, read from the provider when Prometheus scrapes."""

    def __init__(
        self,
        refreshes: Callable[[], RefreshCounts],
        expiry: Callable[[], float | None],
    ) -> None:
        self._refreshes = refreshes
        self._expiry = expiry

    def collect(self) -> Iterable[Metric]:
        counts = self._refreshes()
        family = CounterMetricFamily(
            "closeproxy_token_refreshes",
            "Token refreshes this process did, by result (ok, rejected by Close, failed).",
            labels=["result"],
        )
        for result in REFRESH_RESULTS:
            family.add_metric([result], getattr(counts, result))
        yield family
        expiry = GaugeMetricFamily(
            "closeproxy_token_expiry_timestamp_seconds",
            "When the current access token expires (Unix time); absent when not logged in.",
        )
        expires_at = self._expiry()
        if expires_at is not None:
            expiry.add_metric([], expires_at)
        yield expiry


class Metrics:
    """The metric objects of one proxy, registered in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "closeproxy_requests",
            "Proxied /api/v1/ requests, by method and response status.",
            ["method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "closeproxy_request_duration_seconds",
            "Time from a proxied request's arrival to the end of its response, by method.",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "closeproxy_upstream_duration_seconds",
            "Time from sending a request to Close to its response head.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        # A plain int the request path bumps, read by the gauge at scrape time: cheaper
        # than the gauge's lock twice a request.
        self.in_flight = 0
        Gauge(
            "closeproxy_requests_in_flight",
            "Proxied /api/v1/ requests being served now.",
            registry=registry,
        ).set_function(lambda: self.in_flight)
        self.errors = Counter(
            "closeproxy_errors",
            "Errors the proxy answered itself, by closeproxy_error code.",
            ["code"],
            registry=registry,
        )
        self.rate_limit_waits = Counter(
            "closeproxy_rate_limit_waits",
            "Times a request waited for Close's rate limit, by endpoint group.",
            ["group"],
            registry=registry,
        )
        self.rate_limit_wait_seconds = Counter(
            "closeproxy_rate_limit_wait_seconds",
            "Seconds requests spent waiting for Close's rate limit, by endpoint group.",
            ["group"],
            registry=registry,
        )
        self.rate_limit_remaining_gauge = Gauge(
            "closeproxy_rate_limit_remaining",
            "Requests Close said are left in the current window, by endpoint group.",
            ["group"],
            registry=registry,
        )
        # Children cached by label values: labels() costs more than the increment itself.
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        self._error_children: dict[str, Counter] = {}

    def watch_provider(
        self,
        refreshes: Callable[[], RefreshCounts],
        expiry: Callable[[], float | None],
    ) -> None:
        """Register the scrape-time collector of a token provider's counts."""
        self.registry.register(_ProviderCollector(refreshes, expiry))

    def request_done(self, method: str, status: int, seconds: float) -> None:
        """One proxied request answered; `method` is folded into METHODS or "other"."""
        key = (method, status)
        child = self._request_children.get(key)
        if child is None:
            label = method if method in METHODS else OTHER
            child = self.requests.labels(label, str(status))
            if method in METHODS:  # never let odd methods grow the cache
                self._request_children[key] = child
        child.inc()
        duration = self._duration_children.get(method)
        if duration is None:
            label = method if method in METHODS else OTHER
            duration = self.request_duration.labels(label)
            if method in METHODS:
                self._duration_children[method] = duration
        duration.observe(seconds)

    def error(self, code: str) -> None:
        """The proxy answered with this closeproxy_error code (a fixed set in the code)."""
        child = self._error_children.get(code)
        if child is None:
            child = self._error_children[code] = self.errors.labels(code)
        child.inc()

    def upstream(self, seconds: float) -> None:
        self.upstream_duration.observe(seconds)

    def rate_limit_wait(self, group: str, seconds: float) -> None:
        """A request waited `seconds` for the rate limit of a bounded endpoint group (§9)."""
        self.rate_limit_waits.labels(group).inc()
        self.rate_limit_wait_seconds.labels(group).inc(seconds)

    def rate_limit_remaining(self, group: str, remaining: float) -> None:
        """Close's latest word on what is left of a group's window."""
        self.rate_limit_remaining_gauge.labels(group).set(remaining)

    def exposition(self) -> bytes:
        """The text format, from prometheus_client itself."""
        return generate_latest(self.registry)
