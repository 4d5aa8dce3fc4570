"""The device side: head and tail run here, the trunk runs behind a transport."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
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
from lambda_split._head_depth import RANDOM, HeadDepthChoice, choose_depth
from lambda_split._models import Checkpoint, fingerprint, resolve
from lambda_split._parts import Head, SplitModel, SplitSpec, load_parts
from lambda_split._receipts import ReceiptPolicy
from lambda_split._server_info import ServerInfo as ServerInfo
from lambda_split._server_info import ServerLimits as ServerLimits
from lambda_split._server_info import _depths_used
from lambda_split._server_info import fetch_info as fetch_info
from lambda_split._session import RemoteSession, connect_verified
from lambda_split._stream import HTTPLink, Link, StreamLink, TransportKind, make_link
from lambda_split.protocol import llm_step_tensors
from secure_channel import SecurityMode, Transport, WireStats

ProgressFn = Callable[[str], None]

#: What servers that do not advertise ``max_step_tokens`` accept per step (ServiceLimits' default).
LEGACY_MAX_STEP_TOKENS = 2048
_FRAME_OVERHEAD = 4096  # header, tensor descriptors and the mask, with room to spare


class _AtDepth:
    """A failover host (the client) whose sessions all open at one head depth."""

    def __init__(self, client: SplitClient, head_depth: int | None) -> None:
        self.client = client
        self.head_depth = head_depth

    @property
    def url(self) -> str:
        return self.client.url

    @url.setter
    def url(self, value: str) -> None:
        self.client.url = value

    def open_trunk(self) -> RemoteTrunk:
        return self.client.open_trunk(self.head_depth)

    def switch_to(self, url: str) -> None:
        self.client.switch_to(url)

    def replay_chunk(self, request: tuple[int, int, int]) -> int:
        return self.client.replay_chunk(request)


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
        head_depth: int | None = None,
        uplink: Encoding | None = None,
    ) -> None:
        super().__init__(link, wire, receipts=receipts, head_depth=head_depth)
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
        head_depth: HeadDepthChoice | None = None,
    ) -> None:
        """``transport_kind`` is ``stream`` (one persistent stream for all sessions; None means this
        when the transport can stream) or ``http`` (one request per step). ``head_depth`` is each
        session's head depth: a layer number, ``"random"`` (drawn per session, with ``secrets``, in
        the server's ``head_depths``) or None (the split's own, and the server is not told);
        ``model.head`` must then hold the layers of the deepest depth used."""
        if not isinstance(transport, Transport):
            raise TypeError("transport must be a secure_channel.Transport")
        if model.head is None or model.tail is None:
            raise ValueError("the client needs the head and the tail")
        self.transport = transport
        self.link = make_link(transport, transport_kind)
        self.model = model
        self.info = info
        #: what each session's head depth is (see above), and the depth of the last session opened
        self.head_depth = head_depth
        self.last_head_depth: int | None = None
        deepest = info.depths.hi if head_depth == RANDOM else head_depth
        if isinstance(deepest, int) and deepest not in info.depths:
            raise LimitExceeded(
                f"head depth {deepest}; this server allows {info.depths} (head_depths in /v1/info)"
            )
        self._full_head = model.head
        # ``head`` is the split's own (what code that opens plain sessions pairs with them)
        start = info.split[0]
        self.head, self.tail = (
            (model.head if len(model.head.layers) == start else model.head.up_to(start)),
            model.tail,
        )
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
        head_depth: HeadDepthChoice | None = None,
    ) -> SplitClient:
        """Open a transport in the named security mode and verify the server. ``security`` has no default.

        ``split`` (``A:B``), if given, is the split the caller expects; another split on the server is refused.
        Steps go over one persistent stream unless ``transport_kind="http"`` (one request each).

        ``url`` is one server URL or a list: the first that answers is used, and with ``failover``
        (on by default) a session whose server is lost mid-generation is rebuilt on the same URL or
        the others (see :class:`FailoverPolicy`; ``on_failover`` receives each :class:`FailoverEvent`).
        When none answers: :class:`TrunkUnavailable`. ``transport_factory(url)``, if given, builds
        each transport instead of ``secure_channel.connect_transport`` in ``security`` mode.
        ``head_depth`` (a layer number or ``"random"``; None: the split's own) is each session's
        head depth, within the server's ``head_depths`` (else :class:`LimitExceeded`).
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
                    head_depth=head_depth,
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
        head_depth: HeadDepthChoice | None = None,
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
        used = _depths_used(info, head_depth)
        for depth in used:  # the layers [d, B) a session may run there are the local model's too
            if depth != spec.start and fingerprint(checkpoint, (depth, spec.stop)) != info.fingerprint_at(
                depth
            ):
                raise FingerprintMismatch(
                    f"server trunk {info.model} [{depth}:{spec.stop}] (head depth {depth}) has fingerprint "
                    f"{info.fingerprint_at(depth)}, the local model another; refusing to send hidden states"
                )
        if head_depth == RANDOM and len(used) == 1:
            say(f"the server allows only head depth {used[0]}: every session uses it")
        say(f"loading head and tail of {checkpoint.name}")
        # the head of the deepest depth used (and of A, which plain sessions of this client use)
        held = SplitSpec(max(*used, spec.start), spec.stop, spec.num_layers)
        parts = load_parts(checkpoint, held, ("head", "tail"))
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
            head_depth=head_depth,
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
        depth = self.session_depth()
        self.last_head_depth = self.info.split[0] if depth is None else depth
        trunk: RemoteTrunk | ResilientTrunk
        if self.reconnector is None:
            trunk = self.open_trunk(depth)
        else:
            request = (input_ids.shape[0], input_ids.shape[1], config.max_new_tokens)
            trunk = ResilientTrunk(_AtDepth(self, depth), self.reconnector, self.uplink, request)
        try:
            return generate_tokens(
                self.head_at(depth),
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

    def session_depth(self) -> int | None:
        """The head depth of the next session: drawn afresh for ``"random"``; None if not chosen."""
        if self.head_depth == RANDOM:
            return choose_depth(self.info.depths)
        return None if self.head_depth is None else int(self.head_depth)

    def head_at(self, depth: int | None) -> Head:
        """The head that stops at ``depth`` (None: the split's own)."""
        if depth is None or depth == self.info.split[0]:
            return self.head
        return self._full_head.up_to(depth)

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
