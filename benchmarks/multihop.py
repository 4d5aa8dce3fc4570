"""Multi-hop trunk benchmark: tokens/s and wire bytes per token for 1, 2 and 3 hops, and the planner's
expected speed against the measured one on a heterogeneous set of span servers.

Every span server runs in a process of its own (this script re-runs itself with ``_serve``), the
device (head, tail, relay) in this process. Heterogeneity is simulated, and said so in the output:
a server started with ``--delay-ms D`` sleeps D ms in every decoder layer's forward (a forward hook),
on top of its real compute; the planner does not know D, it probes each server (``lambda_split._plan_probe``).

    python benchmarks/multihop.py --out benchmarks/multihop [--tokens 32] [--reps 3] [--security tls+aesgcm]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m"
#: 1, 2 and 3 hops over the trunk 2:28 of SmolLM2's 30 layers.
CHAINS = {1: ["2:28"], 2: ["2:15", "15:28"], 3: ["2:11", "11:20", "20:28"]}
#: The heterogeneous case: artificial per-layer delays (ms) and memory budgets (in layers) of three servers.
HETERO = [("slow-big", 40.0, 26), ("fast-small", 10.0, 12), ("medium-small", 20.0, 12)]
SERVER_TOML = """\
rate_limit_per_s = 1000000.0
rate_limit_burst = 1000000
handshake_rate_per_s = 1000000.0
handshake_burst = 1000000
"""


# --- a span server in a process of its own -------------------------------------------------------


def serve_child(args: argparse.Namespace) -> int:
    import torch

    from lambda_split import load_llm_service
    from server import BackgroundServer, ServerConfig

    torch.set_num_threads(1)
    service = load_llm_service(args.model, args.split, security=args.security)
    if args.delay_ms:
        delay = args.delay_ms / 1000
        trunk = service[0].executor.trunk  # type: ignore[attr-defined]
        for layer in trunk.layers:  # ARTIFICIAL: a slower server, simulated (see the module docstring)
            layer.register_forward_hook(lambda *_: time.sleep(delay))
    config = ServerConfig(
        model=args.model,
        split=args.split,
        security=args.security,
        keys=args.keys,
        port=0,
        rate_limit_per_s=1e6,
        rate_limit_burst=10**6,
        handshake_rate_per_s=1e6,
        handshake_burst=10**6,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with BackgroundServer(config, service) as running:
        print(f"listening on {running.url}", flush=True)
        stop.wait()
    return 0


class Span:
    """A ``_serve`` child: one span server."""

    def __init__(self, split: str, security: str, keys: str, delay_ms: float = 0.0) -> None:
        command = [
            sys.executable,
            __file__,
            "_serve",
            "--split",
            split,
            "--security",
            security,
            "--keys",
            keys,
        ]
        command += ["--delay-ms", str(delay_ms)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.split = split
        self.child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        self.url = ""

    def ready(self, timeout_s: float = 600) -> str:
        assert self.child.stdout is not None
        deadline = time.monotonic() + timeout_s
        while not self.url:
            line = self.child.stdout.readline()
            if line.startswith("listening on "):
                self.url = line.split()[-1]
            elif not line or time.monotonic() > deadline:
                raise RuntimeError(f"span server {self.split} did not start (exit {self.child.poll()})")
        return self.url

    def stop(self) -> None:
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(30)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait(10)


@contextlib.contextmanager
def spans(
    splits: Sequence[str], security: str, keys: str, delays: Sequence[float] = ()
) -> Iterator[list[str]]:
    started = [
        Span(s, security, keys, d) for s, d in zip(splits, [*delays, *[0.0] * len(splits)], strict=False)
    ]
    try:
        yield [span.ready() for span in started]
    finally:
        for span in started:
            span.stop()


# --- the device ----------------------------------------------------------------------------------


def connect(urls: Sequence[str], security: str, keys: str, wire: str) -> Any:
    from lambda_split._chain import ChainClient

    return ChainClient.connect(list(urls), security=security, keys=keys, model=MODEL, wire=wire)  # type: ignore[arg-type]


def measure(client: Any, tokens: int) -> dict[str, Any]:
    """One greedy generation of ``tokens`` forced tokens over the chain: decode tokens/s, wire bytes
    per decode token (all hops, both directions), time to first token."""
    from lambda_split import GenerationConfig, encode_prompts

    ids, mask = encode_prompts(client.tokenizer, ["Explain why the sky is blue."], chat=True)
    before = client.wire_stats
    result = client.generate_ids(ids, mask, GenerationConfig(max_new_tokens=tokens, stop_on_eos=False))
    after = client.wire_stats
    decode_s = result.elapsed_s - result.time_to_first_token_s
    total = after.bytes_sent + after.bytes_received - before.bytes_sent - before.bytes_received
    return {
        "tokens_per_s": (tokens - 1) / decode_s,
        "ms_per_token": decode_s / (tokens - 1) * 1e3,
        "ttft_s": result.time_to_first_token_s,
        "wire_bytes_per_token": total / tokens,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = runs[0].keys()
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in keys}  # fmt: skip


def hops_section(args: argparse.Namespace, keys: str) -> dict[str, Any]:
    every = [split for chain in CHAINS.values() for split in chain]
    out: dict[str, Any] = {}
    with spans(every, args.security, keys) as urls:
        url_of = dict(zip(every, urls, strict=True))
        clients = {
            n: connect([url_of[s] for s in chain], args.security, keys, args.wire)
            for n, chain in CHAINS.items()
        }
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in CHAINS}
        try:
            for client in clients.values():
                measure(client, 2)  # warm-up
            for rep in range(args.reps):  # interleaved: each repetition runs 1, 2, 3 hops in turn
                for n, client in clients.items():
                    runs[n].append(measure(client, args.tokens))
                    print(
                        f"rep {rep + 1}: {n} hop(s) {runs[n][-1]['tokens_per_s']:.1f} tokens/s",
                        file=sys.stderr,
                    )
        finally:
            for client in clients.values():
                client.close()
        for n, chain in CHAINS.items():
            out[str(n)] = {"spans": chain, **summary(runs[n])}
    return out


def hetero_section(args: argparse.Namespace, keys: str) -> dict[str, Any]:
    from lambda_split._models import resolve
    from lambda_split._plan import ServerSpec, layer_costs, optimal_plan, proportional_plan
    from lambda_split._plan_probe import probe_speed
    from secure_channel import connect_transport

    costs = layer_costs(resolve(MODEL), 2, 28)
    per_layer = max(costs.memory)
    delays = [delay for _, delay, _ in HETERO]
    memories = [layers * per_layer + per_layer // 2 for _, _, layers in HETERO]
    # 1. Probe each server (at a span of equal length; the planner never sees the delays).
    probe_spans = ["2:11", "11:20", "20:28"]
    servers = []
    with spans(probe_spans, args.security, keys, delays) as urls:
        for (name, _, _), url, memory in zip(HETERO, urls, memories, strict=True):
            transport = connect_transport(url, args.security, keys_dir=keys, timeout=60)
            try:
                found = probe_speed(transport, url, steps=12, warmup=3)
            finally:
                transport.close()
            servers.append(ServerSpec(name, (url,), memory, found.layer_s, found.rtt_s))
    best, naive = optimal_plan(costs, servers), proportional_plan(costs, servers)
    out: dict[str, Any] = {"servers": [
        {"name": s.name, "artificial_delay_ms_per_layer": d, "memory_mb": s.memory_bytes / 2**20,
         "probed_layer_ms": s.layer_s * 1e3, "probed_rtt_ms": s.rtt_s * 1e3}
        for s, d in zip(servers, delays, strict=True)
    ]}  # fmt: skip
    # 2. Run each plan on servers started at its spans (same delays), both at once, interleaved.
    by_name = {name: delay for name, delay, _ in HETERO}
    plans = {"optimal": best, "memory_proportional": naive}
    splits = {t: [f"{s.split[0]}:{s.split[1]}" for s in p.stages] for t, p in plans.items()}
    every = [split for chain in splits.values() for split in chain]
    every_delay = [by_name[s.server] for p in plans.values() for s in p.stages]
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in plans}
    with spans(every, args.security, keys, every_delay) as urls:
        first = len(splits["optimal"])
        clients = {"optimal": connect(urls[:first], args.security, keys, args.wire),
                   "memory_proportional": connect(urls[first:], args.security, keys, args.wire)}  # fmt: skip
        try:
            for client in clients.values():
                measure(client, 2)  # warm-up
            for _ in range(args.reps):
                for title, client in clients.items():
                    runs[title].append(measure(client, args.hetero_tokens))
        finally:
            for client in clients.values():
                client.close()
    for title, plan in plans.items():
        out[title] = {
            "hops": [{"server": s.server, "split": list(s.split)} for s in plan.stages],
            "feasible": plan.feasible,
            "expected_ms_per_token": plan.latency_s * 1e3,
            "expected_bottleneck_ms": plan.bottleneck_s * 1e3,
            "measured": summary(runs[title]),
        }
        print(f"{title}: expected {plan.latency_s * 1e3:.1f} ms/token, measured "
              f"{out[title]['measured']['ms_per_token']['median']:.1f}", file=sys.stderr)  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("_serve")
    child.add_argument("--model", default=MODEL)
    child.add_argument("--split", required=True)
    child.add_argument("--security", required=True)
    child.add_argument("--keys")
    child.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--security", default="tls+aesgcm")
    parser.add_argument("--wire", default="fp16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hetero-tokens", type=int, default=16)
    parser.add_argument("--sections", default="hops,hetero")
    parser.add_argument("--out", help="directory for results.json")
    args = parser.parse_args(argv)
    if args.command == "_serve":
        return serve_child(args)
    from lambda_split.cli import main as cli

    started = time.time()
    with tempfile.TemporaryDirectory() as keys:
        cli(["keys", "init", keys, "--force"])
        results: dict[str, Any] = {"model": MODEL, "security": args.security, "wire": args.wire,
                                   "tokens": args.tokens, "reps": args.reps, "cpus": os.cpu_count(),
                                   "load_avg_start": os.getloadavg()}  # fmt: skip
        if "hops" in args.sections:
            results["hops"] = hops_section(args, keys)
        if "hetero" in args.sections:
            results["heterogeneous"] = hetero_section(args, keys)
    results["load_avg_end"] = os.getloadavg()
    results["elapsed_s"] = time.time() - started
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
