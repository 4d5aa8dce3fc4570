"""AESGCMMiddleware in-process: limits, session lifetime, app failures, configuration."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from secure_channel import (
    AESGCMMiddleware,
    ClientChannel,
    ClientHandshake,
    Credentials,
    CredentialsError,
    Request,
    uvicorn_config,
)
from secure_channel._wire import SECURE_PATH, SESSION_HEADER, _decode_response, _encode_request


def _app(calls: list[str]) -> Starlette:
    async def echo(request: StarletteRequest) -> StarletteResponse:
        calls.append("echo")
        return StarletteResponse(await request.body(), headers={"x-a": "1"})

    async def boom(request: StarletteRequest) -> StarletteResponse:
        calls.append("boom")
        raise RuntimeError("secret detail")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/boom", boom)])


def _connect(client: TestClient, creds: Credentials) -> ClientChannel:
    hs = ClientHandshake(creds, "localhost")
    msg2 = client.post("/v1/handshake", content=hs.start()).content
    msg4 = client.post("/v1/handshake", content=hs.process_msg2(msg2)).content
    return ClientChannel(*hs.finish(msg4))


def _send(client: TestClient, channel: ClientChannel, request: Request) -> tuple[int, object]:
    record, seq = channel.seal_request(_encode_request(request))
    r = client.post(SECURE_PATH, content=record, headers={SESSION_HEADER: channel.session_id.hex()})
    if r.status_code != 200:
        return r.status_code, r.json()
    return r.status_code, _decode_response(channel.open_response(r.content, seq))


def test_sealed_round_trip_and_app_errors(server_creds: Credentials, client_creds: Credentials) -> None:
    calls: list[str] = []
    client = TestClient(AESGCMMiddleware(_app(calls), server_creds), raise_server_exceptions=False)
    channel = _connect(client, client_creds)
    status, response = _send(client, channel, Request("POST", "/echo", b"hi"))
    assert status == 200 and response.content == b"hi" and response.headers["x-a"] == "1"  # type: ignore[attr-defined]
    status, response = _send(client, channel, Request("GET", "/boom"))
    assert response.status == 500 and b"secret detail" not in response.content  # type: ignore[attr-defined]


def test_limits_and_session_lifetime(server_creds: Credentials, client_creds: Credentials) -> None:
    calls: list[str] = []
    mw = AESGCMMiddleware(_app(calls), server_creds, max_sessions=2, max_body_bytes=1000)
    client = TestClient(mw)
    first = _connect(client, client_creds)
    assert client.post("/v1/handshake", content=bytes(20_000)).status_code == 413
    status, body = _send(client, first, Request("POST", "/echo", bytes(200_000)))
    assert status == 413 and body["error"]["code"] == "payload_too_large"  # type: ignore[index]
    _connect(client, client_creds)
    _connect(client, client_creds)  # evicts the oldest session
    status, body = _send(client, first, Request("POST", "/echo", b"x"))
    assert status == 401 and body["error"]["code"] == "unknown_session"  # type: ignore[index]
    bad = client.post(SECURE_PATH, content=b"x", headers={SESSION_HEADER: "zz"})
    assert bad.status_code == 401
    assert calls == []


def test_session_ttl(server_creds: Credentials, client_creds: Credentials) -> None:
    clock = [1000.0]
    mw = AESGCMMiddleware(_app([]), server_creds, session_ttl_s=60)
    mw._clock = lambda: clock[0]
    client = TestClient(mw)
    channel = _connect(client, client_creds)
    assert _send(client, channel, Request("POST", "/echo", b"a"))[0] == 200
    clock[0] += 61
    assert _send(client, channel, Request("POST", "/echo", b"b"))[0] == 401


def test_constructor_and_config_validation(server_creds: Credentials, client_creds: Credentials) -> None:
    with pytest.raises(ValueError):
        AESGCMMiddleware(_app([]), client_creds)
    with pytest.raises(ValueError):
        AESGCMMiddleware(_app([]), server_creds, max_sessions=0)
    for mode in ("tls", "aesgcm", "tls+aesgcm"):
        with pytest.raises(CredentialsError):
            uvicorn_config(_app([]), host="127.0.0.1", port=0, security=mode)
        with pytest.raises(CredentialsError):
            uvicorn_config(_app([]), host="127.0.0.1", port=0, security=mode, credentials=client_creds)
    with pytest.raises(ValueError):
        uvicorn_config(_app([]), host="127.0.0.1", port=0, security="none")
    with pytest.raises(ValueError):
        uvicorn_config(_app([]), host="127.0.0.1", port=0, security="plain", ssl_certfile="x")
    config = uvicorn_config(
        _app([]), host="127.0.0.1", port=0, security="tls+aesgcm", credentials=server_creds
    )
    assert isinstance(config.loaded_app.app, AESGCMMiddleware) or config.ssl is not None
    assert config.ssl is not None and config.ssl.minimum_version.name == "TLSv1_3"


def test_internal_failures_are_json_not_tracebacks(
    server_creds: Credentials, client_creds: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    import secure_channel._middleware as mw_module

    def explode(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(mw_module, "ServerHandshake", explode)
    client = TestClient(AESGCMMiddleware(_app([]), server_creds))
    r = client.post("/v1/handshake", content=ClientHandshake(client_creds, "localhost").start())
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error", "message": "internal server error"}}


def _chain(app: object) -> list[object]:
    out = []
    while app is not None:
        out.append(app)
        app = getattr(app, "app", None)
    return out


def test_uvicorn_config_adds_the_middleware_exactly_once(server_creds: Credentials) -> None:
    from starlette.middleware import Middleware

    plain_app = _app([])
    config = uvicorn_config(plain_app, host="127.0.0.1", port=0, security="aesgcm", credentials=server_creds)
    assert sum(isinstance(a, AESGCMMiddleware) for a in _chain(config.loaded_app)) == 1
    explicit = Starlette(middleware=[Middleware(AESGCMMiddleware, credentials=server_creds)])
    config = uvicorn_config(explicit, host="127.0.0.1", port=0, security="aesgcm", credentials=server_creds)
    assert not any(isinstance(a, AESGCMMiddleware) for a in _chain(config.loaded_app))
    client = TestClient(explicit)
    assert client.get("/anything").json()["error"]["code"] == "sealed_channel_required"
