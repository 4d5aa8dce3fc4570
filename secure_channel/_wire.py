"""The sealed-channel wire protocol shared by :class:`AESGCMTransport` and :class:`AESGCMMiddleware`.

HTTP surface (everything else is refused in aesgcm modes, except ``GET /healthz``)::

    POST /v1/handshake   body: msg1 -> msg2, or msg3 -> msg4 (application/octet-stream)
    POST /v1/secure      header x-lambda-session: hex session id; body: one sealed request record
                         -> 200, body: one sealed response record

Sealed plaintext (inside a record)::

    u32 meta length | meta (UTF-8 JSON, <= 64 KiB) | body bytes
    request meta:  {"method": str, "path": str, "headers": {str: str}}
    response meta: {"status": int, "headers": {str: str}}
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from typing import Any

from secure_channel._base import Request, Response

HANDSHAKE_PATH = "/v1/handshake"
SECURE_PATH = "/v1/secure"
HEALTH_PATH = "/healthz"
SESSION_HEADER = "x-lambda-session"
#: Random per stream, in the clear on the upgrade request, so a reverse proxy can hash on it
#: (nginx ``hash $http_x_lambda_route consistent``); bound into the sealed opening record.
ROUTE_HEADER = "x-lambda-route"
CONTENT_TYPE = "application/octet-stream"
MAX_META = 64 * 1024
_LEN = struct.Struct(">I")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SKIPPED_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding", "keep-alive"})


class _WireFormatError(ValueError):
    """A sealed plaintext did not parse. Only raised after the record authenticated."""


def _headers(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise _WireFormatError("headers must map str to str")
    return {k.lower(): v for k, v in raw.items() if k.lower() not in _SKIPPED_HEADERS}


def _pack(meta: Mapping[str, Any], body: bytes) -> bytes:
    encoded = json.dumps(meta, separators=(",", ":")).encode()
    if len(encoded) > MAX_META:
        raise ValueError("request metadata too large")
    return _LEN.pack(len(encoded)) + encoded + body


def _unpack(data: bytes) -> tuple[dict[str, Any], bytes]:
    if len(data) < _LEN.size:
        raise _WireFormatError("truncated")
    (size,) = _LEN.unpack_from(data)
    if size > MAX_META or len(data) < _LEN.size + size:
        raise _WireFormatError("bad metadata length")
    try:
        meta = json.loads(data[_LEN.size : _LEN.size + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _WireFormatError("metadata is not JSON") from exc
    if not isinstance(meta, dict):
        raise _WireFormatError("metadata is not an object")
    return meta, data[_LEN.size + size :]


def _encode_request(request: Request) -> bytes:
    if not _TOKEN.fullmatch(request.method) or not request.path.startswith("/"):
        raise ValueError("bad request method or path")
    headers = {k.lower(): v for k, v in request.headers.items() if k.lower() not in _SKIPPED_HEADERS}
    return _pack({"method": request.method, "path": request.path, "headers": headers}, request.content)


def _decode_request(data: bytes) -> Request:
    meta, body = _unpack(data)
    method, path = meta.get("method"), meta.get("path")
    if not isinstance(method, str) or not _TOKEN.fullmatch(method):
        raise _WireFormatError("bad method")
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 8192 or not path.isprintable():
        raise _WireFormatError("bad path")
    return Request(method=method, path=path, content=body, headers=_headers(meta.get("headers", {})))


def _encode_response(status: int, headers: Mapping[str, str], body: bytes) -> bytes:
    return _pack({"status": status, "headers": dict(headers)}, body)


def _decode_response(data: bytes) -> Response:
    meta, body = _unpack(data)
    status = meta.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise _WireFormatError("bad status")
    return Response(status=status, content=body, headers=_headers(meta.get("headers", {})))


def _error_body(code: str, message: str) -> bytes:
    """The project's JSON error shape: ``{"error": {"code": ..., "message": ...}}``."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()
