"""The wire protocol shared by client and server: paths, content types, error bodies and frames.

HTTP API (protocol version 1)::

    GET    /healthz                         200 {"status": "ok"}
    GET    /v1/info                         200 {"model", "fingerprint", "split", "num_layers", "hidden_size",
                                                 "security", "protocol_version", "wire_encodings", "limits",
                                                 "head_depths": [LO, HI], "head_depth_fingerprints": [...]}
    POST   /v1/sessions                     201 {"session_id", "wire", "max_tokens", "idle_timeout_s", "head_depth"}
                                                body: {"wire": "fp32"|"fp16"|"bf16"|"int8", "receipts": bool,
                                                       "head_depth": int (optional, in head_depths; else
                                                       400 bad_head_depth; absent: the split's A)}
    POST   /v1/sessions/{id}/step           200 frame(LLM_RESULT)   body: frame(LLM_STEP)
    DELETE /v1/sessions/{id}                200 {"closed": true}
    GET    /metrics                         Prometheus text

A step frame carries ``hidden`` (B, T, C) in the session's wire encoding and ``mask``
(B, T) as U8 0/1 for the new positions. The result frame carries ``hidden`` (B, T, C)
in the same encoding, with the same session id and sequence number.

With ``"receipts": true`` (a server with a key; else 400 ``receipts_unavailable``) the session reply
adds ``"receipts": {"version": 1, "cert": PEM}`` and every result frame ends with a U8 tensor
``receipt``, the server's signature over a hash chain of the session's steps (lambda_split._receipts).

Every error is JSON ``{"error": {"code": str, "message": str}}`` with a 4xx/5xx status.

Stream API (opt-in for the client, ``transport_kind="stream"``): ``GET /v1/stream`` upgraded to a WebSocket,
with ``x-lambda-route: <32 hex>`` (random per stream, for a reverse proxy to hash on). Each
message is binary, ``op (u8) || body``, one up and one down, strictly alternating::

    up                                      down
    OPEN  JSON {"wire": ...}                OPEN  JSON as POST /v1/sessions
    STEP  frame(LLM_STEP | DIFFUSION_*)     STEP  result frame
    CLOSE session id (32 hex, ASCII)        CLOSE JSON {"closed": true}
                                            ERROR JSON {"status": int, "error": {"code", "message"}}

In the AES-GCM modes every message is a sealed record (see secure_channel._sealed_stream);
sessions opened on a stream are closed when it ends. A refusal that ends the stream is a
WebSocket close with a code (1008 policy, 1009 too big, 1003 not binary, 1013 try later) and a reason.
"""

from __future__ import annotations

import enum
import json

from lambda_split._codec import (
    DEFAULT_LIMITS,
    INT8_BLOCK,
    SESSION_ID_BYTES,
    WIRE_ENCODINGS,
    Encoding,
    Frame,
    FrameError,
    FrameKind,
    FrameLimits,
    decode_frame,
    encode_frame,
    encode_tensor,
    wire_roundtrip,
)

PROTOCOL_VERSION = 1
FRAME_CONTENT_TYPE = "application/vnd.lambda-split.frame"
JSON_CONTENT_TYPE = "application/json"

HEALTH_PATH = "/healthz"
INFO_PATH = "/v1/info"
SESSIONS_PATH = "/v1/sessions"
METRICS_PATH = "/metrics"
STREAM_PATH = "/v1/stream"
ROUTE_HEADER = "x-lambda-route"


class StreamOp(enum.IntEnum):
    ERROR = 0
    OPEN = 1
    STEP = 2
    CLOSE = 3


def session_path(session_id: str) -> str:
    return f"{SESSIONS_PATH}/{session_id}"


def step_path(session_id: str) -> str:
    return f"{SESSIONS_PATH}/{session_id}/step"


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


__all__ = [
    "DEFAULT_LIMITS",
    "FRAME_CONTENT_TYPE",
    "HEALTH_PATH",
    "INFO_PATH",
    "INT8_BLOCK",
    "JSON_CONTENT_TYPE",
    "METRICS_PATH",
    "PROTOCOL_VERSION",
    "ROUTE_HEADER",
    "SESSIONS_PATH",
    "SESSION_ID_BYTES",
    "STREAM_PATH",
    "WIRE_ENCODINGS",
    "Encoding",
    "Frame",
    "FrameError",
    "FrameKind",
    "FrameLimits",
    "StreamOp",
    "decode_frame",
    "encode_frame",
    "encode_tensor",
    "error_body",
    "session_path",
    "step_path",
    "wire_roundtrip",
]
