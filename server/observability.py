"""JSON-lines access logs and Prometheus metrics. Neither ever records a payload, prompt or output."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOGGER = logging.getLogger("lambda_split.server")
_SESSION_ID = re.compile(r"/v1/sessions/[^/]+")


def route_label(path: str) -> str:
    """The route template of ``path``, so that session ids never become label values."""
    return _SESSION_ID.sub("/v1/sessions/{id}", path)


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
            "Requests refused with a 4xx or 5xx status",
            ["status"],
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
            *_batching_metrics(getattr(service, "batching", None)),
        ]


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
    return [
        rows,
        counter("lambda_split_prefills", "Prefill steps run alone", value=stats["prefills"]),
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


class AccessLogMiddleware:
    """Logs who, what, status and duration of every request, and counts them."""

    def __init__(self, app: ASGIApp, metrics: Metrics, identify: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.identify = identify

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        sizes = {"in": 0, "out": 0}

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
            route = route_label(scope["path"])
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            if status >= 400:
                self.metrics.refusals.labels(str(status)).inc()
            fields = {
                "client": self.identify(scope),
                "method": scope["method"],
                "route": route,
                "status": status,
                "ms": round(elapsed * 1000, 2),
                "bytes_in": sizes["in"],
                "bytes_out": sizes["out"],
            }
            LOGGER.info("request", extra={"fields": fields})
