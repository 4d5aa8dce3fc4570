"""Deliberately leaky baselines: what the detectors must flag.

:class:`CloudBaselineServer` is a "cloud-only" completion API on loopback: the client
POSTs the prompt as JSON and gets the text back as JSON, or streamed token by token
as server-sent events (the setting of Weiss et al. 2024). Run in plaintext it is the
positive control of the leak suite; wrapped in TLS it is the control for traffic
analysis (content hidden, sizes not). ``POST /v1/upload`` takes any body (an image, packed
token ids) and answers with its length: the "upload it to the cloud" baseline.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

Responder = Callable[[str], Sequence[tuple[int, str]]]
COMPLETIONS_PATH = "/v1/completions"
UPLOAD_PATH = "/v1/upload"


def echo_responder(prompt: str) -> list[tuple[int, str]]:
    """A stand-in model: 'generates' the prompt's words back, one token per word."""
    words = prompt.split(" ")
    return [(1000 + 7 * i + len(w), (" " if i else "") + w) for i, w in enumerate(words)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == UPLOAD_PATH:
            self._send(200, json.dumps({"bytes": len(body)}).encode(), "application/json")
            return
        request = json.loads(body)
        tokens = list(self.server.responder(str(request["prompt"])))
        if not request.get("stream"):
            payload = json.dumps({"text": "".join(t for _, t in tokens), "token_ids": [i for i, _ in tokens]})
            self._send(200, payload.encode(), "application/json")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for token_id, text in tokens:
            event = f"data: {json.dumps({'token': text, 'id': token_id})}\n\n".encode()
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    responder: Responder


class CloudBaselineServer:
    """A completion API on ``127.0.0.1``:ephemeral, plaintext or TLS (``ssl_context``)."""

    def __init__(
        self, *, responder: Responder = echo_responder, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.responder = responder
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> CloudBaselineServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def cloud_complete(
    port: int, prompt: str, *, stream: bool = False, ssl_context: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """POST ``prompt`` to a :class:`CloudBaselineServer` and return the parsed answer."""
    conn: http.client.HTTPConnection
    if ssl_context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ssl_context)
    try:
        body = json.dumps({"prompt": prompt, "stream": stream})
        conn.request("POST", COMPLETIONS_PATH, body=body, headers={"Content-Type": "application/json"})
        raw = conn.getresponse().read()
    finally:
        conn.close()
    if not stream:
        result: dict[str, Any] = json.loads(raw)
        return result
    events = [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: ")]
    return {"text": "".join(e["token"] for e in events), "token_ids": [e["id"] for e in events]}


def cloud_upload(port: int, data: bytes, *, content_type: str = "application/octet-stream") -> int:
    """POST ``data`` in plaintext to a :class:`CloudBaselineServer`; return the length it acknowledged."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", UPLOAD_PATH, body=data, headers={"Content-Type": content_type})
        reply: dict[str, Any] = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return int(reply["bytes"])
