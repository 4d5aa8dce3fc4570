"""The wire protocol shared by client and server: paths, content types, error bodies and frames.

HTTP API (protocol version 3: frame version 3, see lambda_split._codec)::

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

A step frame carries ``hidden`` (B, T, C) in the session's wire encoding (or, for the uplink
defences ``quant:int4|int2``, in INT4 or INT2) and ``mask`` (B, T) as U8 0/1 for the new
positions; a frame without ``mask`` means all ones, which is what every decode step sends
(:func:`llm_step_tensors`). The result frame carries ``hidden`` (B, T, C) in the session's wire
encoding, with the same sequence number, and the session id if and only if the step frame had one
(the client's frames leave it out: the URL names the session).

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
          with its session id
    BOUND_STEP handle (u8) || frame         BOUND_STEP result frame (no session id)
          without a session id
    CLOSE session id (32 hex, ASCII)        CLOSE JSON {"closed": true}
                                            ERROR JSON {"status": int, "error": {"code", "message"}}

The OPEN reply on a stream adds ``"handle": 1..255``, the session's number on that stream (unique
among the stream's open sessions); ``BOUND_STEP`` names the session by it, which saves the 16-byte
id on every step (the client always uses it).

In the AES-GCM modes every message is a sealed record (see secure_channel._sealed_stream);
sessions opened on a stream are closed when it ends. A refusal that ends the stream is a
WebSocket close with a code (1008 policy, 1009 too big, 1003 not binary, 1013 try later) and a reason.
"""

from __future__ import annotations

import enum
import json

import torch

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
    frame_session_id,
    wire_roundtrip,
)
from lambda_split._codec import VERSION as FRAME_VERSION
from lambda_split._errors import ProtocolMismatch

PROTOCOL_VERSION = 3
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
    BOUND_STEP = 4


def check_protocol_version(server_version: object) -> None:
    """Raise ProtocolMismatch if a server's ``/v1/info`` announces another ``protocol_version``: both
    sides would refuse each other's frames, so the client parts before sending one."""
    if server_version != PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"server speaks protocol {server_version}, this client {PROTOCOL_VERSION} "
            f"(frame version {FRAME_VERSION} on the wire); upgrade the older of the two"
        )


def session_path(session_id: str) -> str:
    return f"{SESSIONS_PATH}/{session_id}"


def step_path(session_id: str) -> str:
    return f"{SESSIONS_PATH}/{session_id}/step"


def llm_step_tensors(
    hidden: torch.Tensor, mask: torch.Tensor, encoding: Encoding
) -> dict[str, tuple[torch.Tensor, Encoding]]:
    """The tensors of an LLM step frame: ``hidden`` (B, T, C) in ``encoding``, and ``mask`` (B, T)
    as U8 unless it is all ones (every decode step), which the server assumes when it is absent."""
    if bool(mask.bool().all()):
        return {"hidden": (hidden, encoding)}
    return {"hidden": (hidden, encoding), "mask": (mask.to(torch.uint8), Encoding.U8)}


def llm_step_inputs(frame: Frame) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden (B, T, C), mask (B, T) of 0/1, uint8)`` of an LLM step frame, the mask all ones when
    the frame carries none; FrameError if a tensor is missing, of the wrong rank, shape or values."""
    hidden = frame.tensor("hidden", rank=3)
    if hidden.dtype is not torch.float32:
        raise FrameError("hidden must be a floating-point encoding")
    if "mask" not in frame.tensors:
        return hidden, torch.ones(hidden.shape[:2], dtype=torch.uint8)
    mask = frame.tensor("mask", rank=2)
    if tuple(mask.shape) != tuple(hidden.shape[:2]) or frame.encodings["mask"] is not Encoding.U8:
        raise FrameError("mask must be U8 of shape (batch, tokens)")
    if int(mask.max()) > 1:
        raise FrameError("mask values must be 0 or 1")
    return hidden, mask


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
    "check_protocol_version",
    "decode_frame",
    "encode_frame",
    "encode_tensor",
    "error_body",
    "frame_session_id",
    "llm_step_inputs",
    "llm_step_tensors",
    "session_path",
    "step_path",
    "wire_roundtrip",
]
