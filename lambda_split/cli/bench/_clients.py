"""Clients of the deployment benchmark: the device side (head and tail) in this process or in
worker processes of their own, and transformers' ``generate()`` of the whole model as the reference.

A worker process (``multiprocessing`` spawn) loads the head and tail once, keeps one
connection (and, for ``stream``, one persistent stream) per transport kind, and answers
commands from the coordinator over a pipe: run one greedy generation, starting at a given
``time.perf_counter()`` instant (the monotonic clock is shared by the processes of one machine).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from lambda_split._client import RemoteTrunk
from lambda_split._codec import Encoding
from lambda_split._generate import GenerationConfig, encode_prompts, generate_tokens
from lambda_split._models import preload, resolve
from lambda_split._parts import SplitModel, SplitSpec, load_parts
from lambda_split._stream import HTTPLink, StreamLink, TransportKind, make_link
from lambda_split.cli.bench._harness import PROMPT, Run, _Probe
from secure_channel import Transport, check_security_mode, connect_transport


class ClientModel:
    """Head and tail of ``name`` at ``split`` (the device's parts), loaded once."""

    def __init__(self, name: str, split: str) -> None:
        self.checkpoint = preload(resolve(name))
        self.name = name
        self.config = self.checkpoint.config
        self.spec = SplitSpec.parse(split, int(self.config.num_hidden_layers))
        self.parts: SplitModel = load_parts(self.checkpoint, self.spec, ("head", "tail"))
        self.tokenizer = self.checkpoint.tokenizer

    def prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(self.tokenizer, [PROMPT], chat=True)

    def run(self, link: HTTPLink | StreamLink, transport: Transport, wire: str, tokens: int) -> Run:
        """One greedy generation of ``tokens`` new tokens through a fresh trunk session on ``link``."""
        head, tail = self.parts.head, self.parts.tail
        if head is None or tail is None:  # pragma: no cover - load_parts builds what it is asked for
            raise RuntimeError("head and tail not loaded")
        ids, mask = self.prompt()
        stats = transport.stats
        before = (stats.bytes_sent, stats.bytes_received)
        trunk = RemoteTrunk(link, Encoding.parse(wire))
        try:
            probe = _Probe(trunk, stats)
            config = GenerationConfig(max_new_tokens=tokens, stop_on_eos=False)
            result = generate_tokens(head, probe, tail, self.tokenizer, ids, mask, config)
            run = Run(
                result, probe.starts, time.perf_counter(), probe.step_bytes, decode_trunk_s=probe.decode_took
            )
        finally:
            trunk.close()
        run.session_bytes = (stats.bytes_sent - before[0], stats.bytes_received - before[1])
        return run


def export_device_model(client: ClientModel, directory: str) -> str:
    """Write the head's and tail's weights (already dequantised), config and tokenizer as a Hugging
    Face directory, so that client processes load it in a moment instead of each dequantising the GGUF."""
    from safetensors.torch import save_file

    from lambda_split._models import meta_model

    names = [n for n in meta_model(client.config).state_dict() if _device_tensor(n, client.spec)]
    tensors = client.checkpoint.read_tensors(names)
    seen: set[int] = set()
    kept: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():  # a tied LM head is rebuilt from the embeddings on load
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            kept[key] = value.contiguous()
    save_file(kept, f"{directory}/model.safetensors")
    client.config.save_pretrained(directory)
    client.tokenizer.save_pretrained(directory)
    return directory


def _device_tensor(name: str, spec: SplitSpec) -> bool:
    if not name.startswith("model.layers."):
        return True  # embeddings, final norm, LM head
    layer = int(name.split(".")[2])
    return layer < spec.start or layer >= spec.stop


class Reference:
    """transformers' ``generate()`` of the whole model, greedy, a forced number of new tokens."""

    def __init__(self, client: ClientModel) -> None:
        from transformers import AutoModelForCausalLM

        model: torch.nn.Module = AutoModelForCausalLM.from_config(client.config)  # type: ignore[no-untyped-call]
        model.load_state_dict(client.checkpoint.read_tensors(model.state_dict().keys()))
        self.model = model.eval()
        self.prompt = client.prompt()
        tok = client.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(self, tokens: int) -> dict[str, Any]:
        """Decode tokens/s (after the first), seconds to the first token, and the token ids."""
        stamps: list[float] = []

        class Stamps:
            def put(self, _value: Any) -> None:
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(  # type: ignore[operator]
                input_ids=self.prompt[0],
                attention_mask=self.prompt[1],
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                streamer=Stamps(),
                pad_token_id=self.pad,
            )
        # stamps[0] is the prompt, stamps[1] the first new token
        return {
            "decode_tokens_per_s": (tokens - 1) / max(stamps[-1] - stamps[1], 1e-9),
            "ttft_s": stamps[1] - start,
            "token_ids": [int(t) for t in out[0, self.prompt[0].shape[1] :]],
        }


def summary(run: Run) -> dict[str, Any]:
    """What the coordinator needs from a run: timings, tokens and bytes (picklable, small)."""
    return {
        "token_ids": run.result.token_ids[0],
        "new_tokens": run.result.new_tokens,
        "ttft_s": run.result.time_to_first_token_s,
        "decode_tokens_per_s": run.decode_tokens_per_s,
        "latencies_s": run.decode_latencies,
        "start": run.starts[0] if run.starts else run.ended,
        "first_decode": run.starts[1] if len(run.starts) > 1 else run.ended,
        "ended": run.ended,
        "step_bytes": run.step_bytes,
        "session_bytes": run.session_bytes,
        "decode_trunk_calls": len(run.decode_trunk_s),
        "decode_trunk_call_s": sum(run.decode_trunk_s),
    }


@dataclass(frozen=True)
class Target:
    """Where a client connects: the server's URL, its security mode and the credentials directory."""

    url: str
    mode: str
    keys: str | None


class Connections:
    """One transport and link per transport kind, opened on first use and kept (as a device would)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._open: dict[str, tuple[Transport, HTTPLink | StreamLink]] = {}

    def get(self, kind: TransportKind) -> tuple[Transport, HTTPLink | StreamLink]:
        if kind not in self._open:
            transport = connect_transport(
                self.target.url, check_security_mode(self.target.mode), keys_dir=self.target.keys, timeout=300
            )
            self._open[kind] = (transport, make_link(transport, kind))
        return self._open[kind]

    def close(self) -> None:
        for transport, link in self._open.values():
            if isinstance(link, StreamLink):
                link.shutdown()
            transport.close()
        self._open.clear()


def worker_main(model: str, split: str, target: Target, threads: int | None, conn: Connection) -> None:
    """A client process: load, say ready, then run commands until told to stop (see module doc).
    Ctrl-C is the coordinator's to handle: it stops its workers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        torch.set_num_threads(threads)
    connections: dict[Target, Connections] = {}
    try:
        client = ClientModel(model, split)
        connections[target] = Connections(target)
        conn.send(("ready", os.getpid()))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            _, kind, wire, tokens, go_at, where = command  # where: this run's server (None: the pool's)
            try:
                where = where or target
                if where not in connections:
                    connections[where] = Connections(where)
                transport, link = connections[where].get(kind)
                time.sleep(max(0.0, go_at - time.perf_counter()))
                conn.send(("ok", summary(client.run(link, transport, wire, tokens))))
            except Exception as exc:  # reported to the coordinator, which fails the section
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        for opened in connections.values():
            opened.close()
        conn.close()
