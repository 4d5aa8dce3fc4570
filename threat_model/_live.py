"""A real trunk server on loopback and client sessions captured on the wire.

The server is the product's own (:func:`server.build_server`, in a thread, fresh
credentials). The client is the product's own too; what it sent and received is
recorded on the device side without patching anything: the LLM loop is driven with
:func:`lambda_split.generate_tokens` around a :class:`RecordingTrunk`, and the
diffusion client runs over a :class:`Recording` transport. Sessions go over the stream
(the client's default) or over HTTP, as the caller asks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from secure_channel import Request, Response, Stream, Transport
from threat_model._capture._packets import Segment
from threat_model._completeness import SessionCapture
from threat_model._ledger import connection_ledger
from threat_model.capture import Capture, Method, capture_loopback

TransportWrapper = Callable[[Any], Any]
TransportKind = Literal["stream", "http"]  # as lambda_split's (not imported here: the CLI parser loads this)
TrunkFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``fault(kind, segments, server_port) -> segments``: plants a capture fault (the suite's self-test)
CaptureFault = Callable[[str, list[Segment], int], list[Segment]]


@dataclass
class Tap:
    """What a session's capture window recorded; ``record`` is filled when the window closes."""

    capture: Capture
    record: SessionCapture | None = None


@contextmanager
def captured(
    server: LiveServer, name: str, kind: str, method: Method, fault: CaptureFault | None
) -> Iterator[tuple[str, Tap, Callable[[Any], None]]]:
    """Capture every loopback flow and ledger every client connection while the block runs.

    Yields the URL the client must use, the tap, and ``done(transport)`` which the block calls
    after closing the transport, to take its byte counters.
    """
    counters: dict[str, int] = {}

    def done(transport: Any) -> None:
        counters.update(sent=transport.stats.bytes_sent, received=transport.stats.bytes_received)

    with (
        connection_ledger() as ledger,
        capture_loopback({server.port}, method=method, all_flows=True) as cap,
    ):
        tap = Tap(cap)
        yield client_url(server, cap), tap, done
        cap.wait_closed({c.local for c in ledger.client_connections()})
    if fault is not None:
        cap.replace_segments(fault(kind, cap.segments(), server.port))
    target = ("127.0.0.1", cap.client_port(server.port))
    tap.record = SessionCapture(
        name, cap, ledger, target, counters.get("sent", -1), counters.get("received", -1)
    )


@dataclass
class LiveServer:
    url: str
    port: int


@contextmanager
def live_server(
    service: tuple[Any, dict[str, Any]], *, model: str, split: str, security: str, keys: str | None
) -> Iterator[LiveServer]:
    """Run ``server.build_server`` on a free loopback port for the duration of the block."""
    from server import BackgroundServer, ServerConfig

    config = ServerConfig(model=model, split=split, security=security, keys=keys, port=0)
    with BackgroundServer(config, service, name=f"eavesdrop-{security}") as server:
        yield LiveServer(server.url, int(server.url.rsplit(":", 1)[1]))


def client_url(server: LiveServer, capture: Capture) -> str:
    """The URL that reaches ``server`` through the capture (the relay's port, or the server's)."""
    scheme = server.url.split("://", 1)[0]
    return f"{scheme}://127.0.0.1:{capture.client_port(server.port)}"


class RecordingTrunk:
    """Calls a trunk and keeps what crossed: the head's outputs sent and the trunk's outputs received."""

    def __init__(self, trunk: TrunkFn) -> None:
        self.trunk = trunk
        self.sent: list[torch.Tensor] = []
        self.received: list[torch.Tensor] = []

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.trunk(hidden, mask)
        self.sent.append(hidden.detach().clone())
        self.received.append(out.detach().clone())
        return out


@dataclass
class LLMSession:
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    token_texts: list[str]
    sent: list[torch.Tensor]
    received: list[torch.Tensor]
    record: SessionCapture

    @property
    def capture(self) -> Capture:
        return self.record.capture


@dataclass
class LLMClient:
    """Head and tail loaded once per mode (after verifying the server); each session opens a transport."""

    checkpoint: Any
    wire: str
    chat: bool
    wrapper: TransportWrapper | None = None
    fault: CaptureFault | None = None
    split_client: Any = field(default=None, repr=False)

    def session(
        self,
        server: LiveServer,
        security: str,
        keys: str | None,
        prompt: str,
        max_new_tokens: int,
        method: Method,
        name: str = "llm session",
        transport_kind: TransportKind = "stream",
    ) -> LLMSession:
        """One captured generation whose trunk session goes over ``transport_kind`` (``stream``:
        the client's default, one WebSocket; ``http``: one request per step)."""
        from lambda_split import (
            GenerationConfig,
            RemoteTrunk,
            SplitClient,
            StreamLink,
            encode_prompts,
            fetch_info,
            generate_tokens,
            make_link,
        )
        from secure_channel import connect_transport

        tokenizer = self.checkpoint.tokenizer
        ids, mask = encode_prompts(tokenizer, [prompt], chat=self.chat)
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_on_eos=False)
        with captured(server, name, "llm", method, self.fault) as (url, tap, done):
            transport = connect_transport(url, security, keys_dir=keys)
            if self.wrapper is not None:
                transport = self.wrapper(transport)
            try:
                if self.split_client is None:
                    self.split_client = SplitClient.from_transport(
                        transport, self.checkpoint, wire=self.wire, transport_kind=transport_kind
                    )
                else:
                    fetch_info(transport)
                link = make_link(transport, transport_kind)
                try:
                    remote = RemoteTrunk(link, self.split_client.wire)
                    recorder = RecordingTrunk(remote)
                    try:
                        result = generate_tokens(
                            self.split_client.head,
                            recorder,
                            self.split_client.tail,
                            tokenizer,
                            ids,
                            mask,
                            config,
                        )
                    finally:
                        remote.close()
                finally:
                    if isinstance(link, StreamLink):
                        link.shutdown()
            finally:
                transport.close()
                done(transport)
        tokens = result.token_ids[0]
        if tap.record is None:  # pragma: no cover - set when the capture window closes
            raise RuntimeError("capture window did not close")
        return LLMSession(
            prompt,
            ids[0].tolist(),
            tokens,
            result.texts[0],
            [str(tokenizer.decode([t])) for t in tokens],
            recorder.sent,
            recorder.received,
            tap.record,
        )


@dataclass
class DiffusionSession:
    prompt: str
    image: Any  # (H, W, 3) float in [0, 1]
    bodies: list[tuple[bytes, bytes]]
    record: SessionCapture
    pipeline: Any = field(repr=False)
    prompt_ids: list[int] = field(default_factory=list)

    @property
    def capture(self) -> Capture:
        return self.record.capture


def diffusion_session(
    server: LiveServer,
    security: str,
    keys: str | None,
    source: Any,
    prompt: str,
    *,
    wire: str,
    steps: int,
    guidance: float,
    seed: int,
    method: Method,
    fault: CaptureFault | None = None,
    wrapper: TransportWrapper | None = None,
    transport_kind: TransportKind = "stream",
    name: str = "diffusion session",
) -> DiffusionSession:
    from lambda_split.diffusion import DiffusionClient
    from secure_channel import connect_transport

    with captured(server, name, "diffusion", method, fault) as (url, tap, done):
        inner = connect_transport(url, security, keys_dir=keys)
        transport = Recording(wrapper(inner) if wrapper is not None else inner)
        try:
            with DiffusionClient.from_transport(
                transport, source, wire=wire, transport_kind=transport_kind
            ) as client:
                result = client.generate(
                    prompt, steps=steps, seed=seed, guidance_scale=guidance, output_type="np"
                )
        finally:
            transport.close()
            done(transport)
    if tap.record is None:  # pragma: no cover - set when the capture window closes
        raise RuntimeError("capture window did not close")
    ids = [int(i) for i in client.pipeline.tokenizer(prompt).input_ids]  # the client's own tokenizer
    return DiffusionSession(prompt, result.images[0], transport.bodies(), tap.record, client.pipeline, ids)


class RecordingStream(Stream):
    """A stream that appends (message sent, reply), each without its op byte (and a step's stream
    handle), to ``bodies``."""

    def __init__(self, inner: Stream, bodies: list[tuple[bytes, bytes]]) -> None:
        self.inner, self.stats, self.bodies, self._sent = inner, inner.stats, bodies, b""

    def send(self, message: bytes) -> None:
        from lambda_split.protocol import StreamOp

        self.inner.send(message)
        self._sent = message[2:] if message[:1] == bytes((StreamOp.BOUND_STEP,)) else message[1:]

    def recv(self) -> bytes:
        reply = self.inner.recv()
        self.bodies.append((self._sent, reply[1:]))
        return reply

    def close(self) -> None:
        self.inner.close()


class Recording(Transport):
    """Wraps a transport and keeps every request and response body, and every stream message
    pair, as a plain-mode tap would see them (the client's own view, to build detectors from)."""

    def __init__(self, inner: Transport) -> None:
        self.inner, self.security, self.stats = inner, inner.security, inner.stats
        self.recorded: list[tuple[bytes, bytes]] = []

    def exchange(self, request: Request) -> Response:
        response = self.inner.exchange(request)
        self.recorded.append((request.content, response.content))
        return response

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        return RecordingStream(self.inner.open_stream(path, headers), self.recorded)

    def close(self) -> None:
        self.inner.close()

    def bodies(self) -> list[tuple[bytes, bytes]]:
        return list(self.recorded)


class ServerTap:
    """Wraps the trunk service's executor: keeps, per server session, the hidden states it received
    and returned. This is the curious server's view, taken from the server in every mode."""

    def __init__(self, executor: Any) -> None:
        self.inner = executor
        self.sessions: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._states: list[Any] = []  # keeps each state alive so its id is never reused

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, state: Any, frame: Any, limits: Any) -> Any:
        return self._record(state, frame, self.inner.step(state, frame, limits))

    def _record(self, state: Any, frame: Any, out: Any) -> Any:
        if "hidden" in frame.tensors and "hidden" in out:
            if id(state) not in self.sessions:
                self._states.append(state)
            seen, returned = self.sessions.setdefault(id(state), ([], []))
            seen.append(frame.tensors["hidden"].detach().clone())
            returned.append(out["hidden"].detach().clone())
        return out

    def views(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """(received, returned) hidden states of each server session, in the order they started."""
        return list(self.sessions.values())


class BatchingServerTap(ServerTap):
    """A :class:`ServerTap` for a batching executor: the service calls ``step_as`` on it, which
    the plain tap would forward to the executor unseen."""

    def step_as(self, owner: str, state: Any, frame: Any, limits: Any) -> Any:
        return self._record(state, frame, self.inner.step_as(owner, state, frame, limits))


def tap_service(service: tuple[Any, dict[str, Any]]) -> ServerTap:
    """Install a :class:`ServerTap` on a loaded ``(TrunkService, info)`` and return it."""
    from lambda_split import BatchingExecutor

    executor = service[0].executor
    tap = BatchingServerTap(executor) if isinstance(executor, BatchingExecutor) else ServerTap(executor)
    service[0].executor = tap
    return tap
