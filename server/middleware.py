"""Hardening, one concern per ASGI middleware. The stack is listed once, in server/app.py."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Refused(Exception):
    """Raised inside the stack to answer with a JSON error instead of the app's response."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


async def send_error(send: Send, error: Refused) -> None:
    body = json.dumps({"error": {"code": error.code, "message": error.message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.retry_after is not None:
        headers.append((b"retry-after", str(error.retry_after).encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _run_guarded(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run ``app``; if it raises Refused before responding, answer with the error instead."""
    started = False

    async def tracking_send(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, tracking_send)
    except Refused as error:
        if started:
            raise
        await send_error(send, error)


class SecurityHeadersMiddleware:
    """No caching of anything, no content sniffing. Sets (replaces) these headers, so a response
    that already carries one, such as the AES-GCM layer's, does not carry it twice."""

    HEADERS = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"))
    NAMES = frozenset(name for name, _ in HEADERS)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self.NAMES]
                message = {**message, "headers": [*kept, *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes`` + ``allowance``, whether declared by Content-Length or
    streamed chunked. ``allowance`` covers framing around the payload (a sealed record's header,
    tag and inner request head); the message states ``max_bytes``, the limit a client can act on.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, allowance: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.ceiling = max_bytes + allowance

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = Refused(
            413,
            "body_too_large",
            f"request body exceeds the {self.max_bytes:,}-byte limit (limits.max_frame_bytes in /v1/info)",
        )
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.ceiling):
            return await send_error(send, too_large)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.ceiling:
                raise too_large
            return message

        await _run_guarded(self.app, scope, counting_receive, send)


class ReceiveDeadlineMiddleware:
    """408 when a client takes longer than ``timeout_s`` to send its whole request body."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.timeout_s
        body_done = False

        async def deadline_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()  # waiting for a disconnect is not sending slowly
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise Refused(
                    408, "receive_timeout", f"request body not received within {self.timeout_s} s"
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await _run_guarded(self.app, scope, deadline_receive, send)


class RateLimitMiddleware:
    """A token bucket per client identity; 429 with Retry-After when it runs dry.

    ``only_paths`` restricts it to those paths (the AES-GCM handshake, which costs the server
    signature work before any identity is known).
    """

    def __init__(
        self,
        app: ASGIApp,
        rate_per_s: float,
        burst: int,
        identify: Callable[[Scope], str],
        *,
        max_clients: int = 10_000,
        only_paths: frozenset[str] | None = None,
    ) -> None:
        self.app = app
        self.only_paths = only_paths
        self.rate, self.burst = rate_per_s, burst
        self.identify = identify
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or path == "/healthz" or (self.only_paths and path not in self.only_paths):
            return await self.app(scope, receive, send)
        key, now = self.identify(scope), time.monotonic()
        tokens, last = self.buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self.rate)
            return await send_error(send, Refused(429, "rate_limited", "too many requests", retry_after=wait))
        self.buckets[key] = (tokens - 1.0, now)
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        await self.app(scope, receive, send)


class ConcurrencyLimitMiddleware:
    """At most ``limit`` requests in flight; the rest get 503 with Retry-After at once, not a queue."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/healthz":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            return await send_error(send, Refused(503, "overloaded", "server is at capacity", retry_after=1))
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
