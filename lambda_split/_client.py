"""The device side: head and tail run here, the trunk runs behind a transport."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lambda_split._codec import Encoding, FrameKind
from lambda_split._defences import Defence, defended
from lambda_split._errors import FingerprintMismatch, LimitExceeded, ModeMismatch, ProtocolMismatch
from lambda_split._failover import (
    FailoverCallback,
    FailoverPolicy,
    Reconnector,
    ResilientTrunk,
    _connect_first,
)
from lambda_split._failover_client import _FailoverMixin
from lambda_split._generate import (
    GenerationConfig,
    GenerationResult,
    TextCallback,
    encode_prompts,
    generate_tokens,
)
from lambda_split._models import Checkpoint, fingerprint, resolve
from lambda_split._parts import SplitModel, SplitSpec, load_parts
from lambda_split._receipts import ReceiptPolicy
from lambda_split._session import RemoteSession, check_reply, connect_verified
from lambda_split._stream import HTTPLink, Link, StreamLink, TransportKind, make_link
from lambda_split.protocol import (
    INFO_PATH,
    PROTOCOL_VERSION,
    llm_step_tensors,
)
from secure_channel import Request, SecurityMode, Transport, WireStats

ProgressFn = Callable[[str], None]

#: What servers that do not advertise ``max_step_tokens`` accept per step (ServiceLimits' default).
LEGACY_MAX_STEP_TOKENS = 2048
_FRAME_OVERHEAD = 4096  # header, tensor descriptors and the mask, with room to spare


@dataclass(frozen=True)
class ServerLimits:
    """The limits a server advertises in /v1/info; None where an (older) server does not say."""

    max_batch: int | None = None
    max_step_tokens: int | None = None
    max_tokens_per_session: int | None = None
    max_frame_bytes: int | None = None

    @classmethod
    def parse(cls, data: Any) -> ServerLimits:
        if not isinstance(data, dict):
            return cls()
        values = {}
        for name in ("max_batch", "max_step_tokens", "max_tokens_per_session", "max_frame_bytes"):
            value = data.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                values[name] = value
        return cls(**values)


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
    limits: ServerLimits = ServerLimits()

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
                ServerLimits.parse(data.get("limits")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolMismatch(f"malformed /v1/info reply: {exc}") from None


class RemoteTrunk(RemoteSession):
    """One trunk session on the server, called like the local trunk: ``hidden, mask -> hidden``.
    ``uplink`` is the encoding of the hidden states sent (default: the session's wire; INT4 or INT2
    under a ``quant:`` defence); the server answers in the session's wire."""

    def __init__(
        self,
        link: Transport | Link,
        wire: Encoding,
        *,
        receipts: ReceiptPolicy | None = None,
        uplink: Encoding | None = None,
    ) -> None:
        super().__init__(link, wire, receipts=receipts)
        self.uplink = uplink or wire

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tensors = llm_step_tensors(hidden, mask, self.uplink)  # no mask tensor when it is all ones
        result = self.exchange(FrameKind.LLM_STEP, tensors, FrameKind.LLM_RESULT)
        out = result.tensor("hidden", rank=3)
        if out.shape != hidden.shape:
            raise ProtocolMismatch(f"server returned shape {tuple(out.shape)} for {tuple(hidden.shape)}")
        return out.to(hidden.dtype)


class SplitClient(_FailoverMixin):
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
        reconnector: Reconnector | None = None,
        url: str = "",
        prompt_bucket: int = 0,
        defence: Defence | None = None,
        transport_kind: TransportKind | None = None,
    ) -> None:
        """``transport_kind`` is ``stream`` (one persistent stream for all sessions; None means this
        when the transport can stream) or ``http`` (one request per step)."""
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
        #: An uplink defence (None: off, the head's output is sent as it is). Measured, not guaranteed.
        self.defence = defence
        #: The encoding of the hidden states sent: the wire's, or a ``quant:`` defence's own
        self.uplink = Encoding[defence.levels.upper()] if defence and defence.kind == "quant" else self.wire
        #: Where the trunk is now (it changes on failover), and how to find another (None: failover off).
        self.url = url
        self.reconnector = reconnector
        self.failovers = 0  # sessions rebuilt on another transport, over this client's life
        self.failover_s = 0.0  # time spent rebuilding them (or failing to)
        self._transport_kind = transport_kind
        self._switching = threading.Lock()
        self._retired: list[tuple[Transport, HTTPLink | StreamLink]] = []  # replaced by failover, still open
        self._closed_stats = WireStats()  # the byte counts of replaced transports since closed
        #: signed step receipts, checked on every step (None: not asked for); see lambda_split._verify
        self.receipts: ReceiptPolicy | None = None

    @classmethod
    def connect(
        cls,
        url: str | Sequence[str],
        *,
        security: SecurityMode,
        keys: str | Path | None = None,
        model: str | Checkpoint = "smollm2-135m",
        wire: str = "fp32",
        timeout: float = 60.0,
        failover: FailoverPolicy | None = FailoverPolicy(),  # noqa: B008 (frozen)
        on_failover: FailoverCallback | None = None,
        transport_factory: Callable[[str], Transport] | None = None,
        progress: ProgressFn | None = None,
        prompt_bucket: int = 0,
        defence: Defence | None = None,
        split: str | None = None,
        transport_kind: TransportKind | None = None,
    ) -> SplitClient:
        """Open a transport in the named security mode and verify the server. ``security`` has no default.

        ``split`` (``A:B``), if given, is the split the caller expects; another split on the server is refused.
        Steps go over one persistent stream unless ``transport_kind="http"`` (one request each).

        ``url`` is one server URL or a list: the first that answers is used, and with ``failover``
        (on by default) a session whose server is lost mid-generation is rebuilt on the same URL or
        the others (see :class:`FailoverPolicy`; ``on_failover`` receives each :class:`FailoverEvent`).
        When none answers: :class:`TrunkUnavailable`. ``transport_factory(url)``, if given, builds
        each transport instead of ``secure_channel.connect_transport`` in ``security`` mode.
        """
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("no server URL given")
        from secure_channel import connect_transport

        def factory(target: str) -> Transport:
            if transport_factory is not None:
                return transport_factory(target)
            return connect_transport(target, security, keys_dir=keys, timeout=timeout)

        reconnector = None if failover is None else Reconnector(urls, factory, failover, on_failover)
        return _connect_first(
            urls,
            lambda target: connect_verified(
                target,
                security,
                keys,
                timeout,
                lambda transport: cls.from_transport(
                    transport,
                    model,
                    wire=wire,
                    reconnector=reconnector,
                    url=target,
                    progress=progress,
                    prompt_bucket=prompt_bucket,
                    defence=defence,
                    split=split,
                    transport_kind=transport_kind,
                ),
                factory,
            ),
            progress,
        )

    @classmethod
    def from_transport(
        cls,
        transport: Transport,
        model: str | Checkpoint,
        *,
        wire: str = "fp32",
        reconnector: Reconnector | None = None,
        url: str = "",
        progress: ProgressFn | None = None,
        prompt_bucket: int = 0,
        defence: Defence | None = None,
        split: str | None = None,
        transport_kind: TransportKind | None = None,
    ) -> SplitClient:
        """A client for the server behind ``transport``, verified (see :meth:`connect`). Failover
        needs a ``reconnector`` (how to reach a server by URL) and the ``url`` of this one."""
        say = progress or (lambda _message: None)
        Encoding.parse(wire)
        make_link(transport, transport_kind)  # an unusable transport kind fails before any model loads
        info = fetch_info(transport)
        if info.kind != "llm":
            raise ProtocolMismatch(f"the server runs a {info.kind} trunk, not a language model")
        if info.security != transport.security:
            raise ModeMismatch(
                f"the server is in mode {info.security}, not {transport.security}; pass --security {info.security}"
            )
        checkpoint = resolve(model) if isinstance(model, str) else model
        if info.num_layers != checkpoint.config.num_hidden_layers:
            raise FingerprintMismatch(
                f"the server runs {info.model} ({info.num_layers} layers), this client "
                f"{checkpoint.name} ({checkpoint.config.num_hidden_layers} layers); "
                f"pass the server's model (--model {info.model}, or its path)"
            )
        spec = SplitSpec(info.split[0], info.split[1], info.num_layers)
        if split is not None:
            try:
                expected = SplitSpec.parse(split, info.num_layers)
            except ValueError as exc:
                raise FingerprintMismatch(f"the server's split is {spec}, not {split}: {exc}") from None
            if (expected.start, expected.stop) != (spec.start, spec.stop):
                raise FingerprintMismatch(
                    f"the server runs split {spec} of {info.num_layers} layers, not {split} ({expected}); "
                    "the split is the server's choice: drop --split or restart the server with it"
                )
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
            transport,
            parts,
            info,
            wire=wire,
            reconnector=reconnector,
            url=url,
            prompt_bucket=prompt_bucket,
            defence=defence,
            transport_kind=transport_kind,
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
        chunk = self.check_limits(input_ids.shape[0], input_ids.shape[1], config.max_new_tokens)
        trunk: RemoteTrunk | ResilientTrunk
        if self.reconnector is None:
            trunk = RemoteTrunk(self.link, self.wire, receipts=self.receipts, uplink=self.uplink)
        else:
            request = (input_ids.shape[0], input_ids.shape[1], config.max_new_tokens)
            trunk = ResilientTrunk(self, self.reconnector, self.uplink, request)
        try:
            return generate_tokens(
                self.head,
                defended(trunk, self.defence),  # the trunk itself when no defence is set
                self.tail,
                self.tokenizer,
                input_ids,
                attention_mask,
                config,
                on_text=on_text,
                keep_logits=keep_logits,
                prefill_chunk=chunk,
            )
        finally:
            try:
                trunk.close()
            finally:
                if isinstance(trunk, ResilientTrunk):
                    self.failovers += trunk.failovers
                    self.failover_s += trunk.failover_s

    def check_limits(self, batch: int, prompt_tokens: int, max_new_tokens: int) -> int:
        """Refuse, before anything is sent, what the server's limits cannot hold; return the prefill
        chunk (tokens per step) that keeps every step within them."""
        limits = self.info.limits
        if limits.max_batch is not None and batch > limits.max_batch:
            raise LimitExceeded(f"a batch of {batch} prompts; this server takes at most {limits.max_batch}")
        # The trunk sees the prompt and every new token but the last.
        needed = prompt_tokens + max_new_tokens - 1
        if limits.max_tokens_per_session is not None and needed > limits.max_tokens_per_session:
            most = limits.max_tokens_per_session
            hint = (
                f"lower --max-new-tokens to {most - prompt_tokens + 1:,}"
                if prompt_tokens < most
                else "shorten the prompt"
            )
            raise LimitExceeded(
                f"the prompt is {prompt_tokens:,} tokens and up to {max_new_tokens:,} new tokens are asked "
                f"for; this server holds at most {most:,} tokens per session: {hint}"
            )
        chunk = limits.max_step_tokens or LEGACY_MAX_STEP_TOKENS
        if limits.max_frame_bytes is not None:
            row_bytes = batch * (self.info.hidden_size * 4 + 1)  # fp32 bounds every wire encoding
            chunk = min(chunk, max(1, (limits.max_frame_bytes - _FRAME_OVERHEAD) // row_bytes))
        return chunk

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
        self.close_retired()
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
