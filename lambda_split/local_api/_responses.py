"""Chat completion objects in OpenAI's shape, whole or as server-sent-event chunks.

A stream is: a chunk with the assistant role, one chunk per text delta, a last choice chunk with
an empty delta and ``finish_reason`` (as OpenAI sends it), a usage chunk with no choices when
``stream_options.include_usage`` is set, then ``data: [DONE]``. An error after the answer began is
one ``data: {"error": ...}`` event, then ``[DONE]``. The completion, and the last choice chunk,
carry an extra ``lambda_split`` object: this answer's speed and trunk traffic (see README).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from lambda_split._errors import FingerprintMismatch, LimitExceeded, ProtocolMismatch, ServerError
from lambda_split.local_api._engine import Cancelled, Completion, Job, LocalEngine
from lambda_split.local_api._schema import APIError, ChatRequest
from secure_channel import ChannelError, TransportError

LOGGER = logging.getLogger("lambda_split.local")


def as_api_error(exc: BaseException) -> APIError:
    """The OpenAI-shaped error for ``exc``; never the prompt or output, never a traceback."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, LimitExceeded):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, ServerError):
        status = 503 if exc.status in (429, 503) else 502
        return APIError(status, f"trunk server: {exc}", code="trunk_error", type="server_error")
    if isinstance(exc, TransportError | ChannelError | ProtocolMismatch | FingerprintMismatch):
        return APIError(
            502, f"trunk server unreachable: {exc}", code="trunk_unavailable", type="server_error"
        )
    LOGGER.error("completion failed: %s", type(exc).__name__)  # the type only: messages may quote inputs
    return APIError(500, "internal error in the local endpoint", code="internal_error", type="server_error")


class Answer:
    """The fields every object of one answer shares."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.engine.model_id}

    def completion(self, done: Completion) -> dict[str, Any]:
        message = {"role": "assistant", "content": done.text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
        return {
            **self._base("chat.completion"),
            "choices": [choice],
            "usage": usage(done),
            "lambda_split": stats(done),
        }

    def chunk(self, delta: dict[str, Any], finish: Completion | None = None, *, with_usage: bool) -> bytes:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": None if finish is None else finish.finish_reason,
        }
        data = {**self._base("chat.completion.chunk"), "choices": [choice]}
        if with_usage:
            data["usage"] = None
        if finish is not None:
            data["lambda_split"] = stats(finish)
        return event(data)

    def usage_chunk(self, done: Completion) -> bytes:
        return event({**self._base("chat.completion.chunk"), "choices": [], "usage": usage(done)})


def usage(done: Completion) -> dict[str, Any]:
    """Exact counts: every prompt token, and every token generated (an end-of-sequence token too)."""
    completion_tokens = len(done.token_ids)
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": done.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def stats(done: Completion) -> dict[str, Any]:
    return {
        "tokens_per_s": round(done.tokens_per_s, 3),
        "time_to_first_token_s": round(done.time_to_first_token_s, 4),
        "bytes_sent": done.bytes_sent,
        "bytes_received": done.bytes_received,
        "reused_tokens": done.cached_tokens,
        "head_depth": done.head_depth,
    }


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def start_stream(engine: LocalEngine, job: Job, request: ChatRequest) -> AsyncIterator[bytes]:
    """Start decoding ``job`` on a worker thread now, and return the SSE body that relays it.

    The worker starts here, not when the body is first read, so a prepared job always runs to its
    end (or to a cancel) and its trunk session is always closed or kept. Closing the body (the
    client went away) cancels the job: it stops after the current step and closes its session.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            put(("done", engine.run(job, lambda text: put(("text", text)))))
        except Cancelled:
            pass
        except BaseException as exc:  # relayed to the client below
            put(("error", exc))

    threading.Thread(target=work, name="local-completion", daemon=True).start()
    return _relay(Answer(engine), queue, job, request.include_usage)


async def _relay(
    answer: Answer, queue: asyncio.Queue[tuple[str, Any]], job: Job, include_usage: bool
) -> AsyncIterator[bytes]:
    try:
        yield answer.chunk({"role": "assistant", "content": ""}, with_usage=include_usage)
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield answer.chunk({"content": value}, with_usage=include_usage)
            elif kind == "error":
                yield event(as_api_error(value).body())
                break
            else:
                yield answer.chunk({}, value, with_usage=include_usage)
                if include_usage:
                    yield answer.usage_chunk(value)
                break
        yield DONE
    finally:
        job.cancel.set()  # a no-op once the job is done
