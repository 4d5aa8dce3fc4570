"""Fixtures: throw-away PKIs and real uvicorn servers on loopback, one per security mode."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from secure_channel import Credentials, generate_credentials, load_credentials, peer_identity, uvicorn_config
from secure_channel._keys import _EKU, _issue, _key_pem, _name, _pem, _san


@dataclass
class PKI:
    """A CA whose key we keep, so tests can issue odd certificates under it."""

    root: Path
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, root: Path) -> PKI:
        key = ec.generate_private_key(ec.SECP256R1())
        ca = _issue(_name("Test CA"), key, None, key, days=5, eku=None, san=None)
        root.mkdir(parents=True, exist_ok=True)
        (root / "ca.pem").write_bytes(_pem(ca))
        pki = cls(root, ca, key)
        pki.issue("server", "server", ["localhost", "127.0.0.1", "::1"])
        pki.issue("client", "client", ["lambda-split-client"])
        return pki

    def issue(
        self,
        filename: str,
        eku: str,
        names: list[str],
        *,
        not_before: dt.datetime | None = None,
        days: int = 5,
        directory: Path | None = None,
    ) -> Path:
        """Write ``<filename>.pem``/``.key`` (plus ``ca.pem``) into ``directory``; return it."""
        out = directory or self.root
        out.mkdir(parents=True, exist_ok=True)
        (out / "ca.pem").write_bytes(_pem(self.ca))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            _name(names[0]),
            key,
            self.ca,
            self.ca_key,
            days=days,
            eku=_EKU[eku],
            san=_san(names),
            not_before=not_before,
        )
        (out / f"{filename}.pem").write_bytes(_pem(cert))
        (out / f"{filename}.key").write_bytes(_key_pem(key))
        (out / f"{filename}.key").chmod(0o600)
        return out


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete, valid credentials directory from a different CA."""
    directory = tmp_path_factory.mktemp("other")
    generate_credentials(directory)
    return directory


@pytest.fixture(scope="session")
def server_creds(pki: PKI) -> Credentials:
    return load_credentials(pki.root, "server")


@pytest.fixture(scope="session")
def client_creds(pki: PKI) -> Credentials:
    return load_credentials(pki.root, "client")


@dataclass
class EchoServer:
    mode: str
    url: str
    calls: list[str] = field(default_factory=list)


def echo_app(calls: list[str]) -> Starlette:
    async def echo(request: Request) -> Response:
        calls.append("echo")
        body = await request.body()
        return Response(
            body,
            media_type="application/octet-stream",
            headers={"x-peer": peer_identity(request.scope) or "none"},
        )

    async def whoami(request: Request) -> JSONResponse:
        calls.append("whoami")
        return JSONResponse({"identity": peer_identity(request.scope), "query": request.url.query})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/echo", echo, methods=["POST"]),
            Route("/whoami", whoami),
            Route("/healthz", healthz),
        ]
    )


def _start(config: uvicorn.Config) -> tuple[uvicorn.Server, threading.Thread, int]:
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, port


@pytest.fixture(scope="session")
def servers(server_creds: Credentials) -> Iterator[dict[str, EchoServer]]:
    """One live server per security mode, each with its own handler-call log."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []
    out: dict[str, EchoServer] = {}
    for mode in ("plain", "tls", "aesgcm", "tls+aesgcm"):
        calls: list[str] = []
        opts: dict[str, Any] = {"log_level": "critical", "access_log": False, "lifespan": "off"}
        config = uvicorn_config(
            echo_app(calls),
            host="127.0.0.1",
            port=0,
            security=mode,
            credentials=None if mode == "plain" else server_creds,
            **opts,
        )
        server, thread, port = _start(config)
        running.append((server, thread))
        scheme = "https" if mode.startswith("tls") else "http"
        out[mode] = EchoServer(mode, f"{scheme}://127.0.0.1:{port}", calls)
    yield out
    for server, _ in running:
        server.should_exit = True
    for _, thread in running:
        thread.join(timeout=5)
