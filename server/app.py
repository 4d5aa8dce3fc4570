"""The trunk server: routes and the middleware stack, listed once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Scope

from lambda_split import ServiceError, TrunkService
from lambda_split.protocol import FRAME_CONTENT_TYPE, METRICS_PATH, STREAM_PATH
from secure_channel import AESGCMMiddleware, Credentials, ServerTrust, peer_identity
from server.config import ServerConfig
from server.drain import DRAINING, Drain
from server.middleware import (
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    RateLimitMiddleware,
    ReceiveDeadlineMiddleware,
    SecurityHeadersMiddleware,
)
from server.observability import LOGGER, AccessLogMiddleware, Metrics, RouteLabels, SealedAccessMiddleware
from server.stream import StreamLimits, TrunkStreamEndpoint

ANONYMOUS = "anonymous"
HANDSHAKE_PATHS = frozenset({"/v1/handshake"})
# A sealed record is the inner request (method, path, headers, frame) plus the record header and
# tag; AESGCMMiddleware itself accepts max_body_bytes + 64 KiB + that overhead, which this covers.
SEALING_ALLOWANCE = 128 * 1024
UNAUTHENTICATED_BYTES = 256 * 1024 * 1024


def owner_of(scope: Scope) -> str:
    """The authenticated identity sessions are bound to; ``anonymous`` in plain mode."""
    return peer_identity(scope) or ANONYMOUS


def client_key(scope: Scope) -> str:
    """Who a request counts against for rate limits: the identity, or the source address in plain mode."""
    identity = peer_identity(scope)
    if identity:
        return identity
    client = scope.get("client")
    return f"ip:{client[0]}" if client else ANONYMOUS


def error(status: int, code: str, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class TrunkEndpoints:
    def __init__(self, service: TrunkService, info: dict[str, Any], metrics: Metrics, drain: Drain) -> None:
        self.service = service
        self.info = info
        self.metrics = metrics
        self.drain = drain

    async def healthz(self, request: Request) -> Response:
        if self.drain.draining:  # health checks take a draining replica out of the pool
            return JSONResponse({"status": DRAINING}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def get_info(self, request: Request) -> Response:
        return JSONResponse(self.info)

    async def open_session(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
            wire = body.get("wire", "fp32") if isinstance(body, dict) else None
            receipts = body.get("receipts", False) if isinstance(body, dict) else None
            head_depth = body.get("head_depth") if isinstance(body, dict) else None
        except (ValueError, UnicodeDecodeError):
            wire = receipts = head_depth = None
        if not isinstance(wire, str) or not isinstance(receipts, bool):
            return error(400, "bad_request", 'body must be JSON like {"wire": "fp16", "receipts": false}')
        self.drain.check()
        reply = self.service.open_session(
            owner_of(request.scope), wire, receipts=receipts, head_depth=head_depth
        )
        LOGGER.info("session opened", extra={"fields": {"client": owner_of(request.scope), "wire": wire}})
        return JSONResponse(reply, status_code=201)

    async def step(self, request: Request) -> Response:
        if request.headers.get("content-type", "") != FRAME_CONTENT_TYPE:
            return error(415, "unsupported_media_type", f"step bodies must be {FRAME_CONTENT_TYPE}")
        body = await request.body()
        reply = await to_thread.run_sync(
            self.service.step, owner_of(request.scope), request.path_params["session_id"], body
        )
        return Response(reply, media_type=FRAME_CONTENT_TYPE)

    async def close_session(self, request: Request) -> Response:
        self.service.close_session(owner_of(request.scope), request.path_params["session_id"])
        return JSONResponse({"closed": True})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def expire_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self.service.expire_idle():
                LOGGER.info("sessions expired", extra={"fields": {"open": self.service.open_sessions}})


async def _service_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ServiceError):  # pragma: no cover - registered for ServiceError only
        raise exc
    return error(exc.status, exc.code, exc.message, exc.retry_after)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    return error(status, code, str(getattr(exc, "detail", "error")))


async def _internal_error(request: Request, exc: Exception) -> Response:
    LOGGER.error("internal error", extra={"fields": {"route": request.url.path, "type": type(exc).__name__}})
    return error(500, "internal_error", "the server failed to handle this request")


def stream_limits(config: ServerConfig) -> StreamLimits:
    return StreamLimits(
        max_message_bytes=config.max_body_bytes + 64 * 1024,
        idle_timeout_s=config.idle_timeout_s,
        rate_per_s=config.rate_limit_per_s,
        burst=config.rate_limit_burst,
        max_streams=max(config.max_sessions, config.max_concurrency),
        max_streams_per_identity=config.max_sessions_per_identity,
    )


def build_app(
    service: TrunkService,
    info: dict[str, Any],
    config: ServerConfig,
    credentials: Credentials | ServerTrust | None = None,
    metrics: Metrics | None = None,
    drain: Drain | None = None,
) -> Starlette:
    """Assemble the trunk server. ``credentials`` are required in every mode but plain; ``drain``
    is begun by whoever handles SIGTERM (a fresh one, never begun, if not given)."""
    if config.security != "plain" and credentials is None:
        raise ValueError(f"security mode {config.security} needs server credentials")
    metrics = metrics or Metrics()
    metrics.watch(service)
    drain = drain or Drain(service, config.drain_timeout_s)
    endpoints = TrunkEndpoints(service, info, metrics, drain)
    streams = TrunkStreamEndpoint(service, stream_limits(config), owner_of, client_key, drain)
    Gauge("lambda_split_open_streams", "Open trunk streams", registry=metrics.registry).set_function(
        lambda: sum(streams.open_streams.values())
    )
    Gauge("lambda_split_draining", "1 while the replica drains", registry=metrics.registry).set_function(
        lambda: float(drain.draining)
    )
    routes = [
        Route("/healthz", endpoints.healthz, methods=["GET"]),
        Route("/v1/info", endpoints.get_info, methods=["GET"]),
        Route("/v1/sessions", endpoints.open_session, methods=["POST"]),
        Route("/v1/sessions/{session_id}/step", endpoints.step, methods=["POST"]),
        Route("/v1/sessions/{session_id}", endpoints.close_session, methods=["DELETE"]),
        Route(METRICS_PATH, endpoints.metrics_endpoint, methods=["GET"]),
        WebSocketRoute(STREAM_PATH, streams),
    ]
    sealed = config.security in ("aesgcm", "tls+aesgcm")
    labels = RouteLabels(routes, (HANDSHAKE_PATHS | {"/v1/secure"}) if sealed else ())
    # Outermost first. The access log sees every response exactly as sent, refusals included.
    # The body limit and deadline see the bytes on the wire (sealed records in aesgcm mode, which
    # may exceed the frame limit by the sealing overhead); everything below the AES-GCM layer sees
    # the authenticated inner request.
    # The HTTP-only layers let the stream (a WebSocket scope) through; it enforces its own
    # limits, and in aesgcm mode the AES-GCM layer opens every stream message before it.
    middleware = [
        Middleware(AccessLogMiddleware, metrics=metrics, identify=client_key, labels=labels),
        Middleware(SecurityHeadersMiddleware),
        Middleware(
            BodyLimitMiddleware,
            max_bytes=config.max_body_bytes,
            allowance=SEALING_ALLOWANCE if sealed else 0,
        ),
        Middleware(ReceiveDeadlineMiddleware, timeout_s=config.receive_timeout_s),
    ]
    if sealed and credentials is not None:
        middleware += [
            Middleware(  # also rate-limits handshakes per source address, one token per handshake
                AESGCMMiddleware,
                credentials=credentials,
                max_body_bytes=config.max_body_bytes,
                # room for a few requests of the largest size in flight before their tags are checked
                max_unauthenticated_bytes=max(UNAUTHENTICATED_BYTES, 4 * config.max_body_bytes),
                handshake_rate=(config.handshake_rate_per_s, config.handshake_burst),
                max_streams_per_identity=config.max_sessions_per_identity,
            ),
            Middleware(SealedAccessMiddleware, identify=client_key, labels=labels),
        ]
    middleware += [
        Middleware(
            RateLimitMiddleware,
            rate_per_s=config.rate_limit_per_s,
            burst=config.rate_limit_burst,
            identify=client_key,
        ),
        Middleware(ConcurrencyLimitMiddleware, limit=config.max_concurrency),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(endpoints.expire_forever(config.expiry_interval_s))
        try:
            yield
        finally:
            task.cancel()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            ServiceError: _service_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.endpoints = endpoints
    # Build the middleware now, not at the first request: a layer that refuses its settings must
    # fail here, before the server says it is listening.
    app.middleware_stack = app.build_middleware_stack()
    return app
