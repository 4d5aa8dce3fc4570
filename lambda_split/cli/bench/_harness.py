"""What every section needs: a model loaded once, trunk servers on loopback, and measured runs.

A run drives the engine's own decoding loop (:func:`generate_tokens`) with a probe around
the trunk callable, which timestamps each step and counts the socket bytes it moved.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lambda_split._client import RemoteTrunk
from lambda_split._codec import Encoding
from lambda_split._generate import (
    GenerationConfig,
    GenerationResult,
    TrunkFn,
    encode_prompts,
    generate_tokens,
)
from lambda_split._llm_trunk import load_llm_service
from lambda_split._models import preload, resolve
from lambda_split._parts import PART_NAMES, SplitModel, SplitSpec, Trunk, load_parts
from lambda_split._service import TrunkService
from lambda_split.protocol import INFO_PATH

if TYPE_CHECKING:
    from server import BackgroundServer

from secure_channel import (
    Request,
    SecurityMode,
    Transport,
    WireStats,
    connect_transport,
    generate_credentials,
)

ProgressFn = Callable[[str], None]
PROMPT = "Explain in a few sentences why the sky is blue and why sunsets are red."


class LocalTrunk:
    """The trunk in this process with its own KV cache: the monolithic path, no network."""

    def __init__(self, trunk: Trunk) -> None:
        self.trunk = trunk
        self.state = trunk.new_state()

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.trunk(hidden, mask, self.state)  # (B, T, C)
        return out


@dataclass
class Run:
    """One generation: the engine's result, a timestamp per trunk call and the bytes each call moved."""

    result: GenerationResult
    starts: list[float]
    ended: float
    step_bytes: list[tuple[int, int]] = field(default_factory=list)  # (sent, received) per step
    session_bytes: tuple[int, int] = (0, 0)  # session open .. close, all steps included
    #: seconds each decode trunk call (one new position per row) took, as the device saw it
    decode_trunk_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, over the time after the first token (the CLI's tokens_per_s)."""
        new = self.result.new_tokens
        return (new - 1) / max(self.result.elapsed_s - self.result.time_to_first_token_s, 1e-9)

    @property
    def decode_latencies(self) -> list[float]:
        """Seconds per decode step (head, trunk, tail and sampling), prefill excluded."""
        marks = [*self.starts[1:], self.ended]
        return [b - a for a, b in itertools.pairwise(marks)]


class _Probe:
    def __init__(self, trunk: TrunkFn, stats: WireStats | None) -> None:
        self.trunk = trunk
        self.stats = stats
        self.starts: list[float] = []
        self.step_bytes: list[tuple[int, int]] = []
        self.decode_took: list[float] = []  # the calls with one new position per row

    def _snap(self) -> tuple[int, int]:
        return (self.stats.bytes_sent, self.stats.bytes_received) if self.stats else (0, 0)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        before = self._snap()
        self.starts.append(time.perf_counter())
        out = self.trunk(hidden, mask)
        took = time.perf_counter() - self.starts[-1]
        if hidden.shape[1] == 1:
            self.decode_took.append(took)
        after = self._snap()
        self.step_bytes.append((after[0] - before[0], after[1] - before[1]))
        return out


class ModelEnv:
    """One model, loaded once: head, trunk and tail for local runs, and a trunk service for the servers."""

    def __init__(self, name: str, split: str, progress: ProgressFn) -> None:
        progress(f"loading {name} (head, trunk, tail and a trunk service)")
        checkpoint = preload(resolve(name))
        self.name = name
        self.config = checkpoint.config
        self.spec = SplitSpec.parse(split, int(self.config.num_hidden_layers))
        self.parts: SplitModel = load_parts(checkpoint, self.spec, PART_NAMES)
        self.service, self.info = load_llm_service(checkpoint, split, security="plain")
        self.tokenizer = checkpoint.tokenizer
        self.hidden_size = int(self.config.hidden_size)
        self._checkpoint = checkpoint

    @property
    def trunk(self) -> Trunk:
        if self.parts.trunk is None:  # pragma: no cover - load_parts builds every part asked for
            raise RuntimeError("trunk not loaded")
        return self.parts.trunk

    def full_model(self) -> torch.nn.Module:
        """The whole transformers model, for a generate() reference."""
        from transformers import AutoModelForCausalLM

        model: torch.nn.Module = AutoModelForCausalLM.from_config(self.config)  # type: ignore[no-untyped-call]
        model.load_state_dict(self._checkpoint.read_tensors(model.state_dict().keys()))
        return model.eval()

    def prompt(self, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The chat prompt, or ``tokens`` seeded random byte-range ids (valid in every vocabulary)."""
        if tokens is None:
            return encode_prompts(self.tokenizer, [PROMPT], chat=True)
        ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        return ids, torch.ones_like(ids)

    def run(
        self,
        trunk: TrunkFn,
        prompt: tuple[torch.Tensor, torch.Tensor],
        new_tokens: int,
        *,
        stats: WireStats | None = None,
        keep_logits: bool = False,
    ) -> Run:
        head, tail = self.parts.head, self.parts.tail
        if head is None or tail is None:  # pragma: no cover
            raise RuntimeError("head and tail not loaded")
        probe = _Probe(trunk, stats)
        config = GenerationConfig(max_new_tokens=new_tokens, stop_on_eos=False)
        result = generate_tokens(
            head, probe, tail, self.tokenizer, prompt[0], prompt[1], config, keep_logits=keep_logits
        )
        return Run(result, probe.starts, time.perf_counter(), probe.step_bytes)

    def run_local(self, prompt: tuple[torch.Tensor, torch.Tensor], new_tokens: int) -> Run:
        return self.run(LocalTrunk(self.trunk), prompt, new_tokens)

    def run_remote(
        self,
        transport: Transport,
        wire: str,
        prompt: tuple[torch.Tensor, torch.Tensor],
        new_tokens: int,
        *,
        keep_logits: bool = False,
    ) -> Run:
        """A generation whose trunk session lives on the server behind ``transport``."""
        stats = transport.stats
        before = (stats.bytes_sent, stats.bytes_received)
        trunk = RemoteTrunk(transport, Encoding.parse(wire))
        try:
            run = self.run(trunk, prompt, new_tokens, stats=stats, keep_logits=keep_logits)
        finally:
            trunk.close()
        run.session_bytes = (stats.bytes_sent - before[0], stats.bytes_received - before[1])
        return run


class Served(Protocol):
    """A loaded trunk service and its /v1/info body, under a model name."""

    name: str
    service: TrunkService
    info: dict[str, Any]


class Servers:
    """Real trunk servers on loopback, one per (model, security mode), started on first use.

    All modes of one model share that model's trunk service. Credentials are fresh and
    temporary; request and handshake rate limits are lifted so the benchmark measures compute, not throttling.
    """

    def __init__(self, progress: ProgressFn) -> None:
        self._keys = tempfile.TemporaryDirectory(prefix="lambda-split-bench-")
        self.keys = self._keys.name
        generate_credentials(self.keys, days=1)
        self.progress = progress
        self._running: dict[tuple[str, str], BackgroundServer] = {}

    def url(self, env: Served, mode: str) -> str:
        key = (env.name, mode)
        if key not in self._running:
            from server import BackgroundServer, ServerConfig

            start, stop = env.info["split"]
            config = ServerConfig(
                model=env.name,
                split=f"{start}:{stop}",
                security=mode,
                keys=self.keys if mode != "plain" else None,
                port=0,
                rate_limit_per_s=1e9,
                rate_limit_burst=10**9,
                handshake_rate_per_s=1e9,
                handshake_burst=10**9,
            )
            self._running[key] = BackgroundServer(
                config, (env.service, {**env.info, "security": mode}), name=f"bench-{mode}"
            )
            self.progress(f"trunk server for {env.name} listening on {self._running[key].url} ({mode})")
        return self._running[key].url

    def connect(self, env: Served, mode: str) -> Transport:
        """A connected transport: TCP, TLS and the AES-GCM handshake are done before this returns."""
        transport = connect_transport(
            self.url(env, mode), check_mode(mode), keys_dir=self.keys if mode != "plain" else None
        )
        transport.exchange(Request("GET", INFO_PATH))
        return transport

    def close(self) -> None:
        for server in self._running.values():
            server.server.should_exit = True  # stop them all first, then wait
        for server in self._running.values():
            server.stop()
        self._running.clear()
        self._keys.cleanup()


def check_mode(mode: str) -> SecurityMode:
    from secure_channel import check_security_mode

    return check_security_mode(mode)


class Bench:
    """Models and servers shared by the sections of one benchmark run."""

    def __init__(self, split: str, progress: ProgressFn) -> None:
        self.split = split
        self.progress = progress
        self.servers = Servers(progress)
        self._envs: dict[str, ModelEnv] = {}

    def env(self, name: str) -> ModelEnv:
        if name not in self._envs:
            self._envs[name] = ModelEnv(name, self.split, self.progress)
        return self._envs[name]

    def close(self) -> None:
        self.servers.close()

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
