"""The device side: head and tail run here, the trunk runs behind a transport."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lambda_split._codec import Encoding, FrameKind
from lambda_split._errors import FingerprintMismatch, ProtocolMismatch
from lambda_split._generate import (
    GenerationConfig,
    GenerationResult,
    TextCallback,
    encode_prompts,
    generate_tokens,
)
from lambda_split._models import Checkpoint, fingerprint, resolve
from lambda_split._parts import SplitModel, SplitSpec, load_parts
from lambda_split._session import RemoteSession, check_reply, connect_verified
from lambda_split._stream import StreamLink, TransportKind, make_link
from lambda_split.protocol import (
    INFO_PATH,
    PROTOCOL_VERSION,
)
from secure_channel import Request, SecurityMode, Transport

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class ServerInfo:
    model: str
    fingerprint: str
    split: tuple[int, int]
    num_layers: int
    hidden_size: int
    security: str
    protocol_version: int
    kind: str = "llm"

    @classmethod
    def parse(cls, data: Any) -> ServerInfo:
        try:
            start, stop = data["split"]
            return cls(
                str(data["model"]),
                str(data["fingerprint"]),
                (int(start), int(stop)),
                int(data["num_layers"]),
                int(data["hidden_size"]),
                str(data["security"]),
                int(data["protocol_version"]),
                str(data.get("kind", "llm")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolMismatch(f"malformed /v1/info reply: {exc}") from None


class RemoteTrunk(RemoteSession):
    """One trunk session on the server, called like the local trunk: ``hidden, mask -> hidden``."""

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tensors = {"hidden": (hidden, self.wire), "mask": (mask.to(torch.uint8), Encoding.U8)}
        result = self.exchange(FrameKind.LLM_STEP, tensors, FrameKind.LLM_RESULT)
        out = result.tensor("hidden", rank=3)
        if out.shape != hidden.shape:
            raise ProtocolMismatch(f"server returned shape {tuple(out.shape)} for {tuple(hidden.shape)}")
        return out.to(hidden.dtype)


class SplitClient:
    """Runs a model's head and tail locally and its trunk on a server, through ``transport``.

    The transport is required: the security mode is whatever the caller built, and
    nothing here can fall back to plaintext. Before any hidden state is sent, the client
    checks the server's protocol version, split and model fingerprint.
    """

    def __init__(
        self,
        transport: Transport,
        model: SplitModel,
        info: ServerInfo,
        *,
        wire: str = "fp32",
        prompt_bucket: int = 0,
        transport_kind: TransportKind | None = None,
    ) -> None:
        """``transport_kind`` is ``stream`` (one persistent stream for all sessions), ``http`` (one
        request per step) or None: the stream when ``transport`` can open one."""
        if not isinstance(transport, Transport):
            raise TypeError("transport must be a secure_channel.Transport")
        if model.head is None or model.tail is None:
            raise ValueError("the client needs the head and the tail")
        self.transport = transport
        self.link = make_link(transport, transport_kind)
        self.model = model
        self.head, self.tail = model.head, model.tail
        self.info = info
        self.wire = Encoding.parse(wire)
        if prompt_bucket < 0:
            raise ValueError("prompt_bucket must be >= 0")
        #: Left-pad prompts to a multiple of this many tokens (0: off). Hides the exact prompt
        #: length from anyone who sees frame sizes, at the cost of computing the padding.
        self.prompt_bucket = prompt_bucket

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        security: SecurityMode,
        keys: str | Path | None = None,
        model: str | Checkpoint = "smollm2-135m",
        wire: str = "fp32",
        timeout: float = 60.0,
        progress: ProgressFn | None = None,
        prompt_bucket: int = 0,
        transport_kind: TransportKind = "stream",
    ) -> SplitClient:
        """Open a transport in the named security mode and verify the server. ``security`` has no default;
        steps go over one persistent stream unless ``transport_kind="http"``."""
        return connect_verified(
            url,
            security,
            keys,
            timeout,
            lambda transport: cls.from_transport(
                transport,
                model,
                wire=wire,
                progress=progress,
                prompt_bucket=prompt_bucket,
                transport_kind=transport_kind,
            ),
        )

    @classmethod
    def from_transport(
        cls,
        transport: Transport,
        model: str | Checkpoint,
        *,
        wire: str = "fp32",
        progress: ProgressFn | None = None,
        prompt_bucket: int = 0,
        transport_kind: TransportKind | None = None,
    ) -> SplitClient:
        say = progress or (lambda _message: None)
        Encoding.parse(wire)
        make_link(transport, transport_kind)  # an unusable transport kind fails before any model loads
        info = fetch_info(transport)
        if info.kind != "llm":
            raise ProtocolMismatch(f"the server runs a {info.kind} trunk, not a language model")
        if info.security != transport.security:
            raise ProtocolMismatch(
                f"server runs in {info.security!r} mode, this client in {transport.security!r}"
            )
        checkpoint = resolve(model) if isinstance(model, str) else model
        if info.num_layers != checkpoint.config.num_hidden_layers:
            raise FingerprintMismatch(
                f"server model has {info.num_layers} layers, local model "
                f"{checkpoint.config.num_hidden_layers}"
            )
        spec = SplitSpec(info.split[0], info.split[1], info.num_layers)
        say(f"verifying the server's trunk {spec} of {checkpoint.name}")
        local = fingerprint(checkpoint, (spec.start, spec.stop))
        if local != info.fingerprint:
            raise FingerprintMismatch(
                f"server trunk {info.model} [{spec}] has fingerprint {info.fingerprint}, "
                f"the local model {local}; refusing to send hidden states"
            )
        say(f"loading head and tail of {checkpoint.name}")
        parts = load_parts(checkpoint, spec, ("head", "tail"))
        return cls(
            transport, parts, info, wire=wire, prompt_bucket=prompt_bucket, transport_kind=transport_kind
        )

    @property
    def tokenizer(self) -> Any:
        return self.model.checkpoint.tokenizer

    def generate(
        self,
        prompt: str | list[str],
        config: GenerationConfig | None = None,
        *,
        chat: bool = True,
        on_text: TextCallback | None = None,
    ) -> GenerationResult:
        """Generate for one prompt or a batch. The trunk session lives for this call only."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        input_ids, mask = encode_prompts(
            self.tokenizer, prompts, chat=chat, pad_to_multiple_of=self.prompt_bucket
        )
        return self.generate_ids(input_ids, mask, config or GenerationConfig(), on_text=on_text)

    def generate_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        config: GenerationConfig,
        *,
        on_text: TextCallback | None = None,
        keep_logits: bool = False,
    ) -> GenerationResult:
        trunk = RemoteTrunk(self.link, self.wire)
        try:
            return generate_tokens(
                self.head,
                trunk,
                self.tail,
                self.tokenizer,
                input_ids,
                attention_mask,
                config,
                on_text=on_text,
                keep_logits=keep_logits,
            )
        finally:
            trunk.close()

    def stream(
        self, prompt: str, config: GenerationConfig | None = None, *, chat: bool = True
    ) -> Iterator[str]:
        """Yield text as it is generated."""
        chunks: queue.Queue[str | BaseException | None] = queue.Queue()

        def work() -> None:
            try:
                self.generate(prompt, config, chat=chat, on_text=lambda _row, text: chunks.put(text))
                chunks.put(None)
            except BaseException as exc:  # handed to the consumer below
                chunks.put(exc)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
        worker.join()

    def close(self) -> None:
        if isinstance(self.link, StreamLink):
            self.link.shutdown()
        self.transport.close()

    def __enter__(self) -> SplitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_info(transport: Transport) -> ServerInfo:
    info = ServerInfo.parse(check_reply(transport.exchange(Request("GET", INFO_PATH)), 200).json())
    if info.protocol_version != PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"server speaks protocol {info.protocol_version}, this client {PROTOCOL_VERSION}"
        )
    return info
