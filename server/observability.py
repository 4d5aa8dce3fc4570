"""JSON-lines access logs and Prometheus metrics. Neither ever records a payload, prompt or output."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from secure_channel._identity import AESGCM_EXTENSION

LOGGER = logging.getLogger("lambda_split.server")
EXCHANGE_KEY = "lambda_split.access"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False


class Metrics:
    """The server's Prometheus collectors, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lambda_split_requests",
            "HTTP requests served",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lambda_split_request_seconds",
            "Request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.refusals = Counter(
            "lambda_split_refusals",
            "Requests refused with a 4xx or 5xx status, on the wire or inside a sealed record",
            ["status"],
            registry=self.registry,
        )
        self.sealed = Counter(
            "lambda_split_sealed_requests",
            "Requests carried inside sealed AES-GCM records, as the app answered them",
            ["method", "route", "status"],
            registry=self.registry,
        )

    def watch(self, service: Any) -> None:
        """Report the sessions of ``service`` (a TrunkService) at every scrape."""
        self.registry.register(_SessionCollector(service))


class _SessionCollector(Collector):
    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> list[Metric]:
        service = self.service
        return [
            GaugeMetricFamily(
                "lambda_split_open_sessions", "Trunk sessions held", value=service.open_sessions
            ),
            GaugeMetricFamily(
                "lambda_split_kv_cache_bytes",
                "Bytes of session state (KV cache) held",
                value=service.cache_bytes,
            ),
            CounterMetricFamily(
                "lambda_split_sessions_expired", "Sessions dropped after idling", value=service.expired
            ),
            CounterMetricFamily(
                "lambda_split_sessions_evicted", "Sessions evicted to bound memory", value=service.evicted
            ),
            _histogram(
                "lambda_split_step_seconds",
                "Time the trunk took over a step it answered, from its frame to its reply (queue, forward, "
                "codecs), by phase: decode (one new position per row), prefill, denoise (diffusion)",
                {(phase,): (t.le(), t.count, t.total) for phase, t in service.step_times.items()},
                labels=("phase",),
            ),
            *_batching_metrics(getattr(service, "batching", None)),
        ]


#: One histogram series: cumulative counts by upper bound (:meth:`lambda_split._buckets.Buckets.le`),
#: the number of values and their sum.
Series = tuple[dict[float, int], int, float]


def _histogram(
    name: str, documentation: str, series: dict[tuple[str, ...], Series], labels: Sequence[str] = ()
) -> Metric:
    """A histogram family with one series per tuple of label values."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, (le, count, total) in series.items():
        buckets = [(repr(float(bound)), n) for bound, n in le.items()]
        family.add_metric(list(values), [*buckets, ("+Inf", count)], sum_value=total)
    return family


def _batching_metrics(stats: dict[str, Any] | None) -> list[Metric]:
    """Batch sizes, queue waits and KV slot occupancy of a batching trunk (TrunkService.batching)."""
    if stats is None:
        return []
    rows = HistogramMetricFamily("lambda_split_batch_rows", "Rows per batched decode forward")
    sizes = sorted(stats["batch_rows"].items())
    buckets = [
        (str(bound), sum(n for size, n in sizes if size <= bound)) for bound in (1, 2, 4, 8, 16, 32, 64)
    ]
    total = sum(size * n for size, n in sizes)
    rows.add_metric([], [*buckets, ("+Inf", stats["batches"])], sum_value=total)
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    waits = _histogram("lambda_split_step_queue_wait_seconds", "Time a step waited in the queue",
                       {(): (stats.get("queue_wait_le", {}), stats.get("taken", 0), stats["queue_wait_s_total"])})  # fmt: skip
    return [
        rows,
        waits,
        counter("lambda_split_batches", "Batched decode forwards run", value=stats["batches"]),
        gauge(
            "lambda_split_step_queue_seconds_max",
            "Longest wait of a step in the queue",
            value=stats["queue_wait_s_max"],
        ),
        gauge("lambda_split_kv_slot_bytes_used", "Bytes of KV slots in use", value=stats["slot_bytes_used"]),
        counter("lambda_split_prefills", "Prefill steps", value=stats["prefills"]),
        counter(
            "lambda_split_prefill_batches",
            "Forwards that ran prefill steps (same-length prefills share one)",
            value=stats["prefill_batches"],
        ),
        counter(
            "lambda_split_step_queue_seconds",
            "Time steps waited in the queue",
            value=stats["queue_wait_s_total"],
        ),
        counter("lambda_split_steps_scheduled", "Steps the scheduler finished", value=stats["steps"]),
        counter("lambda_split_step_timeouts", "Steps failed after their deadline", value=stats["timeouts"]),
        gauge("lambda_split_steps_queued", "Steps waiting to run", value=stats["queued"]),
        gauge("lambda_split_kv_slots_used", "KV token slots in use", value=stats["slots_used"]),
        gauge("lambda_split_kv_slots_total", "KV token slots allocated", value=stats["slots_total"]),
        gauge(
            "lambda_split_kv_slot_bytes_total", "Bytes of the KV slot pool", value=stats["slot_bytes_total"]
        ),
    ]


@dataclass
class _Sealed:
    """The request carried inside a sealed AES-GCM record, as the app answered it."""

    method: str
    route: str
    status: int
    client: str


@dataclass
class _Exchange:
    sealed: _Sealed | None = None


class RouteLabels:
    """Bounded label values: a path becomes its route template, anything else ``unmatched``;
    a method the routes do not serve becomes ``other``. Random paths cannot grow /metrics."""

    UNMATCHED = "unmatched"
    OTHER = "other"

    def __init__(self, routes: Sequence[BaseRoute], extra_paths: Iterable[str] = ()) -> None:
        self.templates = [(route.path_regex, route.path) for route in routes if isinstance(route, Route)]
        self.templates += [(re.compile(re.escape(path) + "$"), path) for path in extra_paths]
        methods = {method for route in routes if isinstance(route, Route) for method in route.methods or ()}
        self.methods = frozenset(methods | {"GET", "HEAD", "POST"})

    def route(self, path: str) -> str:
        return next((template for regex, template in self.templates if regex.match(path)), self.UNMATCHED)

    def method(self, method: str) -> str:
        return method if method in self.methods else self.OTHER


class AccessLogMiddleware:
    """Logs and counts every response as it goes on the wire: client, method, route, status,
    duration and byte counts. It must be the outermost layer, so that what the layers below
    refuse (413, 408, 429, 403, 503...) is recorded with the status actually sent.

    In the aesgcm modes the wire only shows ``POST /v1/secure`` 200; :class:`SealedAccessMiddleware`
    below the AES-GCM layer adds the sealed request's method, route, status and identity.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, identify: Any, labels: RouteLabels) -> None:
        self.app = app
        self.metrics = metrics
        self.identify = identify
        self.labels = labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what uvicorn answers when the app fails before responding
        sizes = {"in": 0, "out": 0}
        exchange = _Exchange()
        scope = {**scope, "extensions": {**(scope.get("extensions") or {}), EXCHANGE_KEY: exchange}}

        async def measuring_receive() -> Message:
            message = await receive()
            sizes["in"] += len(message.get("body", b""))
            return message

        async def measuring_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            sizes["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, measuring_receive, measuring_send)
        finally:
            self._record(scope, status, sizes, time.perf_counter() - started, exchange.sealed)

    def _record(
        self, scope: Scope, status: int, sizes: dict[str, int], elapsed: float, sealed: _Sealed | None
    ) -> None:
        method, route = self.labels.method(scope["method"]), self.labels.route(scope["path"])
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(route).observe(elapsed)
        if status >= 400:
            self.metrics.refusals.labels(str(status)).inc()
        fields: dict[str, Any] = {
            "client": self.identify(scope),
            "method": method,
            "route": route,
            "status": status,
            "ms": round(elapsed * 1000, 2),
            "bytes_in": sizes["in"],
            "bytes_out": sizes["out"],
        }
        if sealed is not None:
            self.metrics.sealed.labels(sealed.method, sealed.route, str(sealed.status)).inc()
            if sealed.status >= 400:
                self.metrics.refusals.labels(str(sealed.status)).inc()
            fields["client"] = sealed.client
            fields["sealed"] = {"method": sealed.method, "route": sealed.route, "status": sealed.status}
        LOGGER.info("request", extra={"fields": fields})


class SealedAccessMiddleware:
    """Reports the request inside a sealed record to the :class:`AccessLogMiddleware` above."""

    def __init__(self, app: ASGIApp, identify: Any, labels: RouteLabels) -> None:
        self.app = app
        self.identify = identify
        self.labels = labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.get("extensions") or {}
        exchange = extensions.get(EXCHANGE_KEY)
        if scope["type"] != "http" or AESGCM_EXTENSION not in extensions or exchange is None:
            return await self.app(scope, receive, send)
        status = 500

        async def noting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            method, route = self.labels.method(scope["method"]), self.labels.route(scope["path"])
            exchange.sealed = _Sealed(method, route, status, self.identify(scope))
