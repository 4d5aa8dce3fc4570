"""The local endpoint's ASGI app: routes and middleware, listed once.

Routes: the chat page (``/`` and ``/static``), ``GET /v1/models``, ``POST /v1/chat/completions``
and ``GET /v1/local/info`` (model, security mode, split and wire of this endpoint, for the page).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from lambda_split.local_api._engine import LocalEngine
from lambda_split.local_api._responses import Answer, as_api_error, start_stream
from lambda_split.local_api._schema import APIError, parse_chat_request

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 8 * 1024 * 1024
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def error_response(error: APIError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class LocalGuard:
    """Refuses, in OpenAI's error shape, what must not reach the routes: a ``Host`` that is not this
    machine's loopback name while listening on loopback (a DNS-rebinding page), an API request
    without the API key, and a POST that is not JSON (a cross-site form cannot send one without
    the browser asking first, and nothing here answers that question)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, loopback_only: bool) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self._refusal(scope)
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.loopback_only and _host_name(headers.get("host", "")) not in LOOPBACK_NAMES:
            return APIError(403, "this endpoint answers only to localhost", code="forbidden_host")
        if not scope["path"].startswith("/v1/"):
            return None
        if self.api_key is not None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                return APIError(
                    401, "missing or incorrect API key (Authorization: Bearer KEY)", code="invalid_api_key"
                )
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["method"] == "POST" and content_type != "application/json":
            return APIError(415, "send the request body as application/json", code="unsupported_media_type")
        return None


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class PageHeaders:
    """Security headers on every response (the chat page may load only its own files)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [
                    (k.encode(), v.encode()) for k, v in PAGE_HEADERS.items() if k.encode() not in present
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


def build_app(
    engine: LocalEngine,
    *,
    api_key: str | None = None,
    loopback_only: bool = True,
    expire_every_s: float = 30.0,
) -> ASGIApp:
    """The app for ``engine``. ``api_key`` (None: none) guards ``/v1/``; ``loopback_only`` refuses
    requests whose Host is not a loopback name."""

    async def chat_completions(request: Request) -> Response:
        try:
            chat = parse_chat_request(await _read_json(request))
            job = await asyncio.to_thread(engine.prepare, chat)
        except Exception as exc:
            return error_response(as_api_error(exc))
        if chat.stream:
            return StreamingResponse(
                start_stream(engine, job, chat), media_type="text/event-stream", headers=SSE_HEADERS
            )
        try:
            done = await asyncio.to_thread(engine.run, job)
        except Exception as exc:
            return error_response(as_api_error(exc))
        return JSONResponse(Answer(engine).completion(done))

    async def models(_request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model(engine)]})

    async def model(request: Request) -> Response:
        if request.path_params["name"] != engine.model_id:
            return error_response(APIError(404, "no such model here", code="model_not_found", param="model"))
        return JSONResponse(_model(engine))

    async def info(_request: Request) -> Response:
        return JSONResponse(engine.describe())

    async def page(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async def sweep() -> None:
            while True:
                await asyncio.sleep(expire_every_s)
                await asyncio.to_thread(engine.expire)

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(engine.close)

    routes = [
        Route("/", page),
        Mount("/static", StaticFiles(directory=STATIC)),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/local/info", info),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    # outermost first: security headers on everything, then the guard, then the routes
    return PageHeaders(LocalGuard(app, api_key=api_key, loopback_only=loopback_only))


async def _http_error(_request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    return error_response(APIError(status, str(getattr(exc, "detail", "error")), code=code))


def _model(engine: LocalEngine) -> dict[str, Any]:
    return {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "lambda-split"}


async def _read_json(request: Request) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(
                413, f"the request body is over {MAX_BODY_BYTES:,} bytes", code="request_too_large"
            )
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
