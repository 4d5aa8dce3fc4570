"""``lambda-split bench --in-process``: the older suite, everything in one process.

The trunk servers run as uvicorn threads of the benchmark process and the clients are threads,
so timings include the interpreter they share. Its sections that the deployment benchmark does
not replace: trunk KV cache vs recompute, the security machinery (handshakes, AEAD, record
overhead), part times, the modelled phone-to-cloud links and diffusion.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lambda_split._names import SMOLLM2, TINY_LLAMA

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """Which model each section runs on, and how many tokens and repetitions."""

    model: str = SMOLLM2
    split: str = "2:-2"
    decode_model: str = SMOLLM2
    decode_tokens: int = 16
    decode_reps: int = 12
    hf_generate: bool = True
    ttft_model: str = SMOLLM2
    ttft_lengths: tuple[int, ...] = (16, 128, 512)
    ttft_reps: int = 5
    cache_runs: tuple[tuple[str, tuple[int, ...]], ...] = ((TINY_LLAMA, (64, 256, 512)), (SMOLLM2, (64,)))
    cache_reps: int = 3
    wire_model: str = SMOLLM2
    wire_tokens: int = 32
    concurrency_model: str = SMOLLM2
    concurrency_clients: tuple[int, ...] = (1, 2, 4, 8)
    concurrency_tokens: int = 16
    concurrency_reps: int = 3
    security_reps: int = 10
    part_steps: int = 16
    diffusion_model: str | None = "tiny-random-sd"
    diffusion_steps: int = 4
    diffusion_reps: int = 3
    notes: tuple[str, ...] = ()


def full_plan(model: str = SMOLLM2) -> Plan:
    return Plan(model=model, decode_model=model, ttft_model=model, wire_model=model, concurrency_model=model,
                cache_runs=((TINY_LLAMA, (64, 256, 512)), (model, (64,))),
                notes=("KV cache vs recompute: the recompute baseline is quadratic in length, so the 256- and "
                       f"512-token points run on {TINY_LLAMA}; {model} is measured at 64 tokens",))  # fmt: skip


def quick_plan(model: str = SMOLLM2) -> Plan:
    return Plan(model=model, decode_model=model, decode_tokens=8, decode_reps=3, hf_generate=False,
                ttft_model=TINY_LLAMA, ttft_lengths=(16, 128, 512), ttft_reps=7,
                cache_runs=((TINY_LLAMA, (32, 64, 128)),), cache_reps=3,
                wire_model=model, wire_tokens=6, concurrency_model=TINY_LLAMA, concurrency_tokens=8,
                concurrency_reps=2, security_reps=5, part_steps=6, diffusion_steps=2, diffusion_reps=1,
                notes=(f"--quick: decode, wire bytes and the network model use {model}; time to first token, "
                       f"KV cache vs recompute and concurrency use {TINY_LLAMA} (too slow on {model} for a "
                       "3-minute run); fewer tokens and repetitions, so wider spreads",))  # fmt: skip


def collect(plan: Plan, progress: ProgressFn, *, quick: bool = False) -> dict[str, Any]:
    """Run every section of ``plan`` and return one JSON-ready dict."""
    import torch
    import transformers

    from lambda_split.cli.bench import _compute, _diffusion, _load, _wire
    from lambda_split.cli.bench._harness import Bench

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    started = time.perf_counter()
    results: dict[str, Any] = {"meta": machine(quick, plan), "failed_sections": []}

    def section(name: str, work: Callable[[], dict[str, Any]]) -> None:
        progress(f"--- {name} ---")
        try:
            results[name] = work()
        except Exception as exc:  # recorded; the other sections still run
            progress(f"{name} failed: {type(exc).__name__}: {exc}")
            results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc(limit=4)}  # fmt: skip
            results["failed_sections"].append(name)

    with Bench(plan.split, progress) as bench:
        section("decode", lambda: _compute.decode_throughput(
            bench, plan.decode_model, tokens=plan.decode_tokens, reps=plan.decode_reps,
            hf_generate=plan.hf_generate, progress=progress))  # fmt: skip
        section("time_to_first_token", lambda: _compute.time_to_first_token(
            bench, plan.ttft_model, lengths=plan.ttft_lengths, reps=plan.ttft_reps, progress=progress))  # fmt: skip
        section("kv_cache_vs_recompute", lambda: {"runs": [_compute.cache_vs_recompute(
            bench, name, lengths=lengths, reps=plan.cache_reps, progress=progress)
            for name, lengths in plan.cache_runs]})  # fmt: skip
        section("wire", lambda: _wire.wire_costs(bench, plan.wire_model, tokens=plan.wire_tokens,
                                                 progress=progress))  # fmt: skip
        section("concurrency", lambda: _load.concurrency(
            bench, plan.concurrency_model, clients=plan.concurrency_clients, tokens=plan.concurrency_tokens,
            reps=plan.concurrency_reps, progress=progress))  # fmt: skip
        section("security", lambda: _wire.security_costs(bench, plan.wire_model, reps=plan.security_reps,
                                                         prefill_tokens=128, progress=progress))  # fmt: skip
        if "wire" not in results["failed_sections"]:
            results["security"]["wire_overhead_bytes"] = _wire.overhead_breakdown(results["wire"])
        section("part_times", lambda: _compute.part_times(bench.env(plan.wire_model), plan.part_steps))
        section("network_model", lambda: _network(bench, plan, results))
        section("diffusion", lambda: _diffusion.diffusion(
            bench, plan.diffusion_model, steps=plan.diffusion_steps, reps=plan.diffusion_reps, progress=progress)
            if plan.diffusion_model else _diffusion.gap("skipped by the plan"))  # fmt: skip
    results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    results["meta"]["torch_threads"] = torch.get_num_threads()
    return results


def _network(bench: Any, plan: Plan, results: dict[str, Any]) -> dict[str, Any]:
    from lambda_split.cli.bench._paper import Shape, network_model

    for needed in ("wire", "security", "part_times"):
        if needed in results["failed_sections"]:
            raise RuntimeError(f"needs the {needed} section, which failed")
    env = bench.env(plan.wire_model)
    return network_model(shape=Shape.of(plan.wire_model, env.config), split=(env.spec.start, env.spec.stop),
                         parts=results["part_times"], wire=results["wire"],
                         aead=results["security"]["aead_us_per_frame"])  # fmt: skip


def machine(quick: bool, plan: Any) -> dict[str, Any]:
    """Cores, RAM, CPU model, library versions and the command line."""
    import os
    import platform

    import torch
    import transformers

    def first(path: str, key: str) -> str:
        try:
            with open(path) as handle:
                return next(
                    (line.split(":", 1)[1].strip() for line in handle if line.startswith(key)), "unknown"
                )
        except OSError:
            return "unknown"

    mem = first("/proc/meminfo", "MemTotal")
    return {
        "command": "lambda-split bench "
        + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "quick": quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem.split()[0]) / 1024**2, 1) if mem.split()[0].isdigit() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "plan": dataclasses.asdict(plan),
    }
