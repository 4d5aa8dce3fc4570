"""A real trunk server on loopback and client sessions captured on the wire.

The server is the product's own (:func:`server.build_server`, in a thread, fresh
credentials). The client is the product's own too; what it sent and received is
recorded on the device side without patching anything: the LLM loop is driven with
:func:`lambda_split.generate_tokens` around a :class:`RecordingTrunk`, and the
diffusion client runs over a :class:`lambda_split.diffusion.RecordingTransport`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from threat_model.capture import Capture, Method, capture_loopback

TransportWrapper = Callable[[Any], Any]
TrunkFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    capture: Capture


@dataclass
class LLMClient:
    """Head and tail loaded once per mode (after verifying the server); each session opens a transport."""

    checkpoint: Any
    wire: str
    chat: bool
    wrapper: TransportWrapper | None = None
    split_client: Any = field(default=None, repr=False)

    def session(
        self,
        server: LiveServer,
        security: str,
        keys: str | None,
        prompt: str,
        max_new_tokens: int,
        method: Method,
    ) -> LLMSession:
        from lambda_split import (
            GenerationConfig,
            RemoteTrunk,
            SplitClient,
            encode_prompts,
            fetch_info,
            generate_tokens,
        )
        from secure_channel import connect_transport

        tokenizer = self.checkpoint.tokenizer
        ids, mask = encode_prompts(tokenizer, [prompt], chat=self.chat)
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_on_eos=False)
        with capture_loopback({server.port}, method=method) as cap:
            transport = connect_transport(client_url(server, cap), security, keys_dir=keys)
            if self.wrapper is not None:
                transport = self.wrapper(transport)
            try:
                if self.split_client is None:
                    self.split_client = SplitClient.from_transport(transport, self.checkpoint, wire=self.wire)
                else:
                    fetch_info(transport)
                remote = RemoteTrunk(transport, self.split_client.wire)
                recorder = RecordingTrunk(remote)
                try:
                    result = generate_tokens(
                        self.split_client.head, recorder, self.split_client.tail, tokenizer, ids, mask, config
                    )
                finally:
                    remote.close()
            finally:
                transport.close()
        tokens = result.token_ids[0]
        return LLMSession(
            prompt,
            ids[0].tolist(),
            tokens,
            result.texts[0],
            [str(tokenizer.decode([t])) for t in tokens],
            recorder.sent,
            recorder.received,
            cap,
        )


@dataclass
class DiffusionSession:
    prompt: str
    image: Any  # (H, W, 3) float in [0, 1]
    bodies: list[tuple[bytes, bytes]]
    capture: Capture
    pipeline: Any = field(repr=False)


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
) -> DiffusionSession:
    from lambda_split.diffusion import DiffusionClient, RecordingTransport
    from secure_channel import connect_transport

    with capture_loopback({server.port}, method=method) as cap:
        transport = RecordingTransport(connect_transport(client_url(server, cap), security, keys_dir=keys))
        with DiffusionClient.from_transport(transport, source, wire=wire) as client:
            result = client.generate(
                prompt, steps=steps, seed=seed, guidance_scale=guidance, output_type="np"
            )
    return DiffusionSession(prompt, result.images[0], transport.bodies(), cap, client.pipeline)
