"""A multi-hop trunk: the trunk's layers spread over several span servers, relayed by the device.

Each span server runs ``serve --split A:B`` for its own contiguous span. The device runs the head
``[0, A1)``, sends the hidden state to span 1, sends span 1's answer to span 2, ... and runs the tail
``[Bk, N)`` on the last answer (device relay). Every hop is its own transport in the chosen security
mode (its own TLS and AES-GCM handshake, mutual authentication as for one trunk server), its own
trunk session and KV cache, and by default its own persistent stream.

Why device relay and not server forwarding: a server sees only its own span's inputs and outputs,
and never talks to another server, so no server-to-server role is needed in the PKI and no server
holds a client credential. The cost is one device round trip per hop per token (benchmarks/README.md
measures it). Server forwarding (span k sends to span k+1 itself) was not built.

Failover is per hop: each hop keeps the inputs it relayed to its span (the device has them: it
sent them) and, when that span's server is lost, replays them to a replica of the same span; the
other hops are untouched (see lambda_split._failover).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lambda_split._client import RemoteTrunk, ServerInfo, SplitClient
from lambda_split._codec import Encoding
from lambda_split._errors import FingerprintMismatch, ModeMismatch, ProtocolMismatch
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
from lambda_split._session import check_reply, connect_verified
from lambda_split._stream import HTTPLink, StreamLink, TransportKind, make_link
from lambda_split.protocol import INFO_PATH, check_protocol_version
from secure_channel import Request, SecurityMode, Transport, WireStats

ProgressFn = Callable[[str], None]


class ChainMismatch(FingerprintMismatch):
    """The span servers do not form one trunk: a gap, an overlap, another model, or no common
    wire encoding. Nothing was sent. (A FingerprintMismatch: the CLI exits 4.)"""


@dataclass(frozen=True)
class _HopInfo:
    """What one hop's server said in /v1/info, plus what the chain needs beyond :class:`ServerInfo`."""

    info: ServerInfo
    wire_encodings: tuple[str, ...] | None  # None: the server does not say


def check_chain(spans: Sequence[tuple[int, int]], num_layers: int) -> SplitSpec:
    """The head/tail split a chain of ``spans`` (in order) leaves to the device; ChainMismatch on a
    gap or an overlap between consecutive spans, an empty span, or no hop at all."""
    if not spans:
        raise ChainMismatch("a chain needs at least one hop")
    for index, (start, stop) in enumerate(spans):
        if stop <= start:
            raise ChainMismatch(f"hop {index + 1} serves the empty span {start}:{stop}")
    for index, ((_, stop), (start, _)) in enumerate(itertools.pairwise(spans)):
        if start > stop:
            raise ChainMismatch(
                f"gap between hop {index + 1} (ends at layer {stop}) and hop {index + 2} (starts at {start}): "
                f"layers {stop}:{start} run nowhere"
            )
        if start < stop:
            raise ChainMismatch(
                f"overlap between hop {index + 1} (ends at layer {stop}) and hop {index + 2} (starts at "
                f"{start}): layers {start}:{stop} would run twice"
            )
    try:
        return SplitSpec(spans[0][0], spans[-1][1], num_layers)
    except ValueError as exc:
        raise ChainMismatch(f"the chain {spans[0][0]}:{spans[-1][1]} is not a valid split: {exc}") from None


def _fetch_hop_info(transport: Transport) -> _HopInfo:
    data = check_reply(transport.exchange(Request("GET", INFO_PATH)), 200).json()
    info = ServerInfo.parse(data)
    check_protocol_version(info.protocol_version)
    encodings = data.get("wire_encodings") if isinstance(data, dict) else None
    wires = tuple(str(w) for w in encodings) if isinstance(encodings, list) else None
    return _HopInfo(info, wires)


class SpanHop(_FailoverMixin):
    """One hop: a verified span server (and the replicas that may take over its span)."""

    def __init__(
        self,
        transport: Transport,
        info: ServerInfo,
        *,
        wire: Encoding,
        url: str,
        reconnector: Reconnector | None,
        transport_kind: TransportKind | None,
    ) -> None:
        self.transport = transport
        self.link = make_link(transport, transport_kind)
        self.info = info
        self.wire = wire
        self.url = url
        self.reconnector = reconnector
        self.failovers = 0
        self.failover_s = 0.0
        self._transport_kind = transport_kind
        self._switching = threading.Lock()
        self._retired: list[tuple[Transport, HTTPLink | StreamLink]] = []
        self._closed_stats = WireStats()

    def check_limits(self, batch: int, prompt_tokens: int, max_new_tokens: int) -> int:
        # SplitClient.check_limits reads only ``self.info``: the same rules for one hop as for one trunk.
        return SplitClient.check_limits(self, batch, prompt_tokens, max_new_tokens)  # type: ignore[arg-type]

    def open_session(self, request: tuple[int, int, int]) -> RemoteTrunk | ResilientTrunk:
        if self.reconnector is None:
            return RemoteTrunk(self.link, self.wire)
        return ResilientTrunk(self, self.reconnector, self.wire, request)

    def close(self) -> None:
        try:
            self.close_retired()
            if isinstance(self.link, StreamLink):
                self.link.shutdown()
        finally:
            self.transport.close()


class ChainTrunk:
    """The composed trunk: ``hidden, mask -> hidden`` through every hop's session in order."""

    def __init__(self, trunks: Sequence[RemoteTrunk | ResilientTrunk]) -> None:
        self.trunks = list(trunks)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for trunk in self.trunks:
            hidden = trunk(hidden, mask)  # (B, T, C): this span's output is the next span's input
        return hidden

    def close(self) -> None:
        first: BaseException | None = None
        for trunk in self.trunks:
            try:
                trunk.close()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first


class ChainClient:
    """Head and tail on the device, the trunk over a chain of span servers (see the module docstring).

    ``hops`` are verified: one model fingerprint per span, contiguous spans, a common wire encoding.
    """

    def __init__(self, model: SplitModel, hops: Sequence[SpanHop], *, prompt_bucket: int = 0) -> None:
        if model.head is None or model.tail is None:
            raise ValueError("the client needs the head and the tail")
        if not hops:
            raise ValueError("a chain needs at least one hop")
        self.model = model
        self.head, self.tail = model.head, model.tail
        self.hops = list(hops)
        self.wire = hops[0].wire
        self.prompt_bucket = prompt_bucket

    @classmethod
    def connect(
        cls,
        hops: Sequence[str | Sequence[str]],
        *,
        security: SecurityMode,
        keys: str | Path | None = None,
        model: str | Checkpoint = "smollm2-135m",
        wire: str = "fp32",
        timeout: float = 60.0,
        failover: FailoverPolicy | None = FailoverPolicy(),  # noqa: B008 (frozen)
        on_failover: Callable[[int, Any], None] | None = None,
        transport_factory: Callable[[str], Transport] | None = None,
        progress: ProgressFn | None = None,
        prompt_bucket: int = 0,
        spans: Sequence[str] | None = None,
        transport_kind: TransportKind | None = None,
    ) -> ChainClient:
        """Connect to each hop in order: ``hops[i]`` is a URL or a list of replica URLs of span i (the
        first that answers is used, the others take over on failover). ``spans[i]`` (``A:B``), if given,
        is the span hop i must serve (from a plan). ``on_failover(hop_index, event)`` sees each
        failover event. Raises ChainMismatch when the spans do not form one trunk."""
        if not hops:
            raise ValueError("no hop given")
        if spans is not None and len(spans) != len(hops):
            raise ValueError(f"{len(spans)} spans for {len(hops)} hops")
        encoding = Encoding.parse(wire)
        checkpoint = resolve(model) if isinstance(model, str) else model
        say = progress or (lambda _message: None)
        from secure_channel import connect_transport

        def factory(target: str) -> Transport:
            if transport_factory is not None:
                return transport_factory(target)
            return connect_transport(target, security, keys_dir=keys, timeout=timeout)

        fingerprints: dict[tuple[int, int], str] = {}
        opened: list[SpanHop] = []
        try:
            for index, given in enumerate(hops):
                urls = [given] if isinstance(given, str) else list(given)
                if not urls:
                    raise ValueError(f"hop {index + 1} has no server URL")
                callback = _hop_callback(on_failover, index)
                reconnector = None if failover is None else Reconnector(urls, factory, failover, callback)
                expected = None if spans is None else spans[index]
                say(f"connecting to hop {index + 1}: {', '.join(urls)} ({security})")

                def verify(
                    transport: Transport,
                    url: str,
                    r: Reconnector | None = reconnector,
                    e: str | None = expected,
                ) -> SpanHop:
                    return _verify_hop(
                        transport, checkpoint, encoding, url, r, transport_kind, e, fingerprints, say
                    )

                opened.append(_open_hop(urls, verify, security, keys, timeout, factory, progress))
            spec = check_chain([hop.info.split for hop in opened], checkpoint.config.num_hidden_layers)
            say(f"loading head and tail of {checkpoint.name} around the chain's trunk {spec}")
            parts = load_parts(checkpoint, spec, ("head", "tail"))
        except BaseException:
            for hop in opened:
                with contextlib.suppress(Exception):
                    hop.close()
            raise
        return cls(parts, opened, prompt_bucket=prompt_bucket)

    @property
    def tokenizer(self) -> Any:
        return self.model.checkpoint.tokenizer

    @property
    def failovers(self) -> int:
        return sum(hop.failovers for hop in self.hops)

    @property
    def failover_s(self) -> float:
        return sum(hop.failover_s for hop in self.hops)

    @property
    def wire_stats(self) -> WireStats:
        every = [hop.wire_stats for hop in self.hops]
        return WireStats(sum(s.bytes_sent for s in every), sum(s.bytes_received for s in every))

    @property
    def split(self) -> tuple[int, int]:
        return self.hops[0].info.split[0], self.hops[-1].info.split[1]

    def generate(
        self,
        prompt: str | list[str],
        config: GenerationConfig | None = None,
        *,
        chat: bool = True,
        on_text: TextCallback | None = None,
    ) -> GenerationResult:
        """Generate for one prompt or a batch; each hop's session lives for this call only."""
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
        request = (input_ids.shape[0], input_ids.shape[1], config.max_new_tokens)
        chunk = min(hop.check_limits(*request) for hop in self.hops)
        trunks: list[RemoteTrunk | ResilientTrunk] = []
        failovers = [hop.failovers for hop in self.hops]
        try:
            for hop in self.hops:
                trunks.append(hop.open_session(request))
            chain = ChainTrunk(trunks)
            return generate_tokens(
                self.head,
                chain,
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
                ChainTrunk(trunks).close()
            finally:
                for hop, trunk, before in zip(self.hops, trunks, failovers, strict=False):
                    if isinstance(trunk, ResilientTrunk):
                        hop.failovers = before + trunk.failovers
                        hop.failover_s += trunk.failover_s

    def close(self) -> None:
        first: BaseException | None = None
        for hop in self.hops:
            try:
                hop.close()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> ChainClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_hop(
    urls: Sequence[str],
    verify: Callable[[Transport, str], SpanHop],
    security: SecurityMode,
    keys: str | Path | None,
    timeout: float,
    factory: Callable[[str], Transport],
    progress: ProgressFn | None,
) -> SpanHop:
    """The first of ``urls`` that answers and passes ``verify``."""

    def attempt(url: str) -> SpanHop:
        return connect_verified(
            url, security, keys, timeout, lambda transport: verify(transport, url), factory
        )

    return _connect_first(urls, attempt, progress)


def _hop_callback(on_failover: Callable[[int, Any], None] | None, index: int) -> FailoverCallback | None:
    if on_failover is None:
        return None
    return lambda event: on_failover(index, event)


def _verify_hop(
    transport: Transport,
    checkpoint: Checkpoint,
    wire: Encoding,
    url: str,
    reconnector: Reconnector | None,
    transport_kind: TransportKind | None,
    expected: str | None,
    fingerprints: dict[tuple[int, int], str],
    say: ProgressFn,
) -> SpanHop:
    """The hop behind ``transport``, after checking its server runs a span of the local model."""
    make_link(transport, transport_kind)  # an unusable transport kind fails before anything else
    hop = _fetch_hop_info(transport)
    info = hop.info
    if info.kind != "llm":
        raise ProtocolMismatch(f"the server at {url} runs a {info.kind} trunk, not a language model")
    if info.security != transport.security:
        raise ModeMismatch(
            f"the server at {url} is in mode {info.security}, not {transport.security}; "
            "every hop of a chain uses the same mode"
        )
    layers = int(checkpoint.config.num_hidden_layers)
    if info.num_layers != layers:
        raise ChainMismatch(
            f"the server at {url} runs {info.model} ({info.num_layers} layers), this client "
            f"{checkpoint.name} ({layers} layers)"
        )
    if expected is not None:
        want = SplitSpec.parse(expected, layers)
        if (want.start, want.stop) != info.split:
            raise ChainMismatch(
                f"the server at {url} serves span {info.split[0]}:{info.split[1]}, the plan says {want}"
            )
    if hop.wire_encodings is not None and wire.wire_name not in hop.wire_encodings:
        raise ChainMismatch(
            f"the server at {url} does not take the {wire.wire_name} wire (it takes {', '.join(hop.wire_encodings)})"
        )
    span = info.split
    if span not in fingerprints:
        say(f"verifying span {span[0]}:{span[1]} of {checkpoint.name}")
        fingerprints[span] = fingerprint(checkpoint, span)
    if fingerprints[span] != info.fingerprint:
        raise ChainMismatch(
            f"the server at {url} serves span {span[0]}:{span[1]} of {info.model} with fingerprint "
            f"{info.fingerprint}, the local model {fingerprints[span]}; refusing to send hidden states"
        )
    return SpanHop(
        transport, info, wire=wire, url=url, reconnector=reconnector, transport_kind=transport_kind
    )
