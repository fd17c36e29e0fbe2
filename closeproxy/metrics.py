"""Prometheus metrics (SPEC §11): one CollectorRegistry per app, the metric objects, nothing else.

Every label comes from a bounded set: a method from METHODS (else "other"), a status
code, a `closeproxy_error` code, a refresh result, a rate-limit group. Never a path.
What the token provider already counts is read at scrape time, not on the request path.

The request path adds to plain ints and dicts; prometheus_client (and its registry) is
imported and built on the first scrape of /metrics only, so a proxy that is never
scraped does not pay for it at start or in memory.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

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


class _Histogram:
    """Bucket counts kept as plain ints: one bisect and two additions per observation."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class _Collector:
    """Every family, built from the plain counts only when Prometheus scrapes (a
    prometheus_client collector: it has collect())."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self._metrics
        requests = CounterMetricFamily(
            "closeproxy_requests",
            "Proxied /api/v1/ requests, by method, response status and key name.",
            labels=["method", "status", "key"],
        )
        for (method, status, key), count in sorted(m.request_counts.items()):
            requests.add_metric([method, str(status), key], count)
        yield requests
        duration = HistogramMetricFamily(
            "closeproxy_request_duration_seconds",
            "Time from a proxied request's arrival to the end of its response, by method.",
            labels=["method"],
        )
        for method, histogram in sorted(m.durations.items()):
            duration.add_metric([method], histogram.buckets(), histogram.total)
        yield duration
        upstream = HistogramMetricFamily(
            "closeproxy_upstream_duration_seconds",
            "Time from sending a request to Close to its response head.",
        )
        upstream.add_metric([], m.upstream_durations.buckets(), m.upstream_durations.total)
        yield upstream
        yield GaugeMetricFamily(
            "closeproxy_requests_in_flight",
            "Proxied /api/v1/ requests being served now.",
            value=m.in_flight,
        )
        errors = CounterMetricFamily(
            "closeproxy_errors",
            "Errors the proxy answered itself, by closeproxy_error code.",
            labels=["code"],
        )
        for code, count in sorted(m.error_counts.items()):
            errors.add_metric([code], count)
        yield errors
        waits = CounterMetricFamily(
            "closeproxy_rate_limit_waits",
            "Times a request waited for Close's rate limit, by endpoint group.",
            labels=["group"],
        )
        waited = CounterMetricFamily(
            "closeproxy_rate_limit_wait_seconds",
            "Seconds requests spent waiting for Close's rate limit, by endpoint group.",
            labels=["group"],
        )
        for group, (count, seconds) in sorted(m.rate_limit_waits.items()):
            waits.add_metric([group], count)
            waited.add_metric([group], seconds)
        yield waits
        yield waited
        remaining = GaugeMetricFamily(
            "closeproxy_rate_limit_remaining",
            "Requests Close said are left in the current window, by endpoint group.",
            labels=["group"],
        )
        for group, left in sorted(m.rate_limit_left.items()):
            remaining.add_metric([group], left)
        yield remaining
        if m.provider is None:
            return
        counts = m.provider[0]()
        refreshes = CounterMetricFamily(
            "closeproxy_token_refreshes",
            "Token refreshes this process did, by result (ok, rejected by Close, failed).",
            labels=["result"],
        )
        for result in REFRESH_RESULTS:
            refreshes.add_metric([result], getattr(counts, result))
        yield refreshes
        expiry = GaugeMetricFamily(
            "closeproxy_token_expiry_timestamp_seconds",
            "When the current access token expires (Unix time); absent when not logged in.",
        )
        expires_at = m.provider[1]()
        if expires_at is not None:
            expiry.add_metric([], expires_at)
        yield expiry


class Metrics:
    """The counts of one proxy, and the registry that exposes them (made when scraped)."""

    def __init__(self) -> None:
        self.in_flight = 0
        # (method, status, key name): key names come from the configuration, a bounded set.
        self.request_counts: dict[tuple[str, int, str], int] = {}
        self.durations: dict[str, _Histogram] = {}
        self.upstream_durations = _Histogram()
        self.error_counts: dict[str, int] = {}
        # group -> (waits, seconds waited); group -> Close's latest `remaining`.
        self.rate_limit_waits: dict[str, tuple[int, float]] = {}
        self.rate_limit_left: dict[str, float] = {}
        self.provider: tuple[Callable[[], RefreshCounts], Callable[[], float | None]] | None = None
        self._registry: CollectorRegistry | None = None

    def watch_provider(
        self,
        refreshes: Callable[[], RefreshCounts],
        expiry: Callable[[], float | None],
    ) -> None:
        """Read a token provider's counts at scrape time."""
        self.provider = (refreshes, expiry)

    def request_done(
        self, method: str, status: int, seconds: float, key_name: str | None = None
    ) -> None:
        """One proxied request answered; `method` is folded into METHODS or "other".

        `key_name` is the configured name of the key it presented ("proxy", a [keys.NAME]
        table, "run"), never the key; "-" for none.
        """
        if method not in METHODS:
            method = OTHER
        key = (method, status, key_name or "-")
        counts = self.request_counts
        counts[key] = counts.get(key, 0) + 1
        histogram = self.durations.get(method)
        if histogram is None:
            histogram = self.durations[method] = _Histogram()
        histogram.observe(seconds)

    def error(self, code: str) -> None:
        """The proxy answered with this closeproxy_error code (a fixed set in the code)."""
        self.error_counts[code] = self.error_counts.get(code, 0) + 1

    def upstream(self, seconds: float) -> None:
        self.upstream_durations.observe(seconds)

    def rate_limit_wait(self, group: str, seconds: float) -> None:
        """A request waited `seconds` for the rate limit of a bounded endpoint group (§9)."""
        count, total = self.rate_limit_waits.get(group, (0, 0.0))
        self.rate_limit_waits[group] = (count + 1, total + seconds)

    def rate_limit_remaining(self, group: str, remaining: float) -> None:
        """Close's latest word on what is left of a group's window."""
        self.rate_limit_left[group] = remaining

    def exposition(self) -> bytes:
        """The text format, from prometheus_client itself (imported on the first call)."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry()
            self._registry.register(_Collector(self))
        return generate_latest(self._registry)
