"""Chat completions on the device: messages to token ids, then head, trunk session, tail.

A completion runs in two phases, both blocking (the app runs them on worker threads):
:meth:`LocalEngine.prepare` renders and tokenises the messages, checks the limits and picks a
conversation to continue or opens a new trunk session; :meth:`LocalEngine.run` decodes. Errors
of the first phase become HTTP errors before any byte of the answer is sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lambda_split._client import SplitClient
from lambda_split._defences import defended
from lambda_split._errors import LimitExceeded, ProtocolMismatch, ServerError
from lambda_split._generate import GenerationConfig, generate_tokens
from lambda_split.local_api._conversations import Conversation, ConversationCache
from lambda_split.local_api._schema import APIError, ChatRequest
from secure_channel import TransportError

DEFAULT_MAX_TOKENS = 512


class Cancelled(Exception):
    """The client went away; the completion stopped and its trunk session was closed."""


@dataclass
class Job:
    """One prepared completion; it owns ``conversation`` until :meth:`LocalEngine.run` or ``abandon``."""

    ids: list[int]  # the whole prompt
    config: GenerationConfig
    chunk: int
    conversation: Conversation
    cached_tokens: int  # prompt tokens the continued conversation had already fed
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    cached_tokens: int
    time_to_first_token_s: float
    elapsed_s: float
    bytes_sent: int  # socket bytes to and from the trunk server while this ran (all requests' bytes)
    bytes_received: int
    head_depth: int  # the layer the conversation's trunk session entered at

    @property
    def tokens_per_s(self) -> float:
        new = len(self.token_ids)
        decode_s = self.elapsed_s - self.time_to_first_token_s
        return (new - 1) / decode_s if new > 1 and decode_s > 0 else new / max(self.elapsed_s, 1e-9)


class LocalEngine:
    """Serves chat completions with ``client``'s head and tail and sessions on its trunk server.

    ``cache`` keeps conversations for multi-turn reuse (capacity 0: every request prefills all).
    ``default_max_tokens`` applies when a request names no limit.
    """

    def __init__(
        self, client: SplitClient, cache: ConversationCache, *, default_max_tokens: int = DEFAULT_MAX_TOKENS
    ) -> None:
        if default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        self.client = client
        self.cache = cache
        self.default_max_tokens = default_max_tokens
        self.model_id = client.model.checkpoint.name
        context = getattr(client.model.config, "max_position_embeddings", None)
        self.context: int | None = context if isinstance(context, int) else None

    def describe(self) -> dict[str, Any]:
        """What the chat page shows: model, security mode, split, wire encoding, the uplink defence,
        the head-depth setting (``"random"``, a layer, or None: the split's own) and the server's range."""
        depths = self.client.info.depths
        return {
            "model": self.model_id,
            "security": self.client.transport.security,
            "split": list(self.client.info.split),
            "wire": self.client.wire.wire_name,
            "defence": self.client.defence.name if self.client.defence is not None else None,
            "head_depth": self.client.head_depth,
            "head_depths": [depths.lo, depths.hi],
            "reuse": self.cache.capacity > 0,
        }

    def encode(self, request: ChatRequest) -> list[int]:
        tokenizer = self.client.tokenizer
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if tokenizer.chat_template:
            text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])

    def prepare(self, request: ChatRequest) -> Job:
        ids = self.encode(request)
        max_new = self._max_new_tokens(request, len(ids))
        try:
            chunk = self.client.check_limits(1, len(ids), max_new)
            config = request.generation_config(max_new)
        except (LimitExceeded, ValueError) as exc:
            raise APIError(400, str(exc), code="context_length_exceeded", param="messages") from None
        conversation, expired = self.cache.take(ids)
        _close(expired)
        cached = len(conversation.fed) if conversation is not None else 0
        return Job(ids, config, chunk, conversation or self._new_conversation(), cached)

    def run(self, job: Job, on_text: Callable[[str], None] | None = None) -> Completion:
        """Decode ``job``; ``job.cancel`` set from another thread stops it (raises :class:`Cancelled`)."""
        stats = self.client.transport.stats
        sent, received = stats.bytes_sent, stats.bytes_received
        steps = 0

        def on_step() -> None:
            nonlocal steps
            steps += 1
            if job.cancel.is_set():
                raise Cancelled

        conversation = job.conversation
        try:
            try:
                result = self._decode(job, conversation, on_text, on_step)
            except (ServerError, TransportError, ProtocolMismatch):
                if not job.cached_tokens or steps:
                    raise
                # The kept session may have expired on the server: start over, nothing was sent yet,
                # at the conversation's own head depth (a random one is not drawn again).
                conversation.close()
                conversation = job.conversation = self._new_conversation(restarting=conversation)
                job.cached_tokens = 0
                result = self._decode(job, conversation, on_text, on_step)
        except BaseException:
            conversation.close()
            raise
        tokens = result.token_ids[0]
        conversation.fed = job.ids + tokens[:-1]  # the last token chosen was never fed
        _close(self.cache.put(conversation))
        return Completion(
            token_ids=tokens,
            text=result.texts[0],
            finish_reason=result.finish_reasons[0],
            prompt_tokens=len(job.ids),
            cached_tokens=job.cached_tokens,
            time_to_first_token_s=result.time_to_first_token_s,
            elapsed_s=result.elapsed_s,
            bytes_sent=stats.bytes_sent - sent,
            bytes_received=stats.bytes_received - received,
            head_depth=conversation.depth,
        )

    def abandon(self, job: Job) -> None:
        """Close a prepared job that will not run."""
        job.conversation.close()

    def close(self) -> None:
        _close(self.cache.drain())

    def expire(self) -> None:
        _close(self.cache.expire())

    def _decode(
        self,
        job: Job,
        conversation: Conversation,
        on_text: Callable[[str], None] | None,
        on_step: Callable[[], None],
    ) -> Any:
        new = torch.tensor([job.ids[len(conversation.fed) :]])  # (1, T): only what the parts have not seen
        return generate_tokens(
            conversation.head,
            conversation.send or conversation.trunk,
            self.client.tail,
            self.client.tokenizer,
            new,
            torch.ones_like(new),
            job.config,
            on_text=None if on_text is None else lambda _row, text: on_text(text),
            prefill_chunk=job.chunk,
            head_state=conversation.head_state,
            tail_state=conversation.tail_state,
            on_step=on_step,
        )

    def _new_conversation(self, *, restarting: Conversation | None = None) -> Conversation:
        """A conversation on a new trunk session: at ``restarting``'s head depth if given (its session
        was lost), else at the setting's (drawn once per conversation under ``--head-depth random``)."""
        depth = self.client.session_depth() if restarting is None else restarting.trunk.head_depth
        while True:
            try:
                trunk = self.client.open_trunk(depth)  # with a quant: defence, the uplink in its encoding
                break
            except ServerError as exc:
                # The trunk holds only so many sessions (per stream, per identity, in all): a kept
                # idle conversation gives up its session before a new request is refused.
                oldest = self.cache.pop_oldest() if exc.code.startswith("too_many_sessions") else None
                if oldest is None:
                    raise
                oldest.close()
        head = self.client.head_at(depth)
        return Conversation(
            trunk,
            head,
            self.client.info.split[0] if depth is None else depth,
            head.new_state(),
            self.client.tail.new_state(),
            send=defended(trunk, self.client.defence) if self.client.defence is not None else None,
        )

    def _max_new_tokens(self, request: ChatRequest, prompt_tokens: int) -> int:
        room: list[int] = [self.context - prompt_tokens] if self.context else []
        per_session = self.client.info.limits.max_tokens_per_session
        if per_session is not None:
            room.append(per_session - prompt_tokens + 1)
        if room and min(room) < 1:
            raise APIError(
                400,
                f"the conversation is {prompt_tokens:,} tokens, more than the model or the trunk server holds",
                code="context_length_exceeded",
                param="messages",
            )
        if request.max_tokens is not None:
            if room and request.max_tokens > min(room):
                raise APIError(
                    400,
                    f"the conversation is {prompt_tokens:,} tokens; at most {min(room):,} more fit, "
                    f"{request.max_tokens:,} were asked for",
                    code="context_length_exceeded",
                    param="max_tokens",
                )
            return request.max_tokens
        return min([self.default_max_tokens, *room])


def _close(conversations: list[Conversation]) -> None:
    for conversation in conversations:
        conversation.close()
