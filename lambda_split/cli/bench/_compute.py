"""Sections 1-3: decode tokens/s by security mode, time to first token, KV cache vs recompute.

Every figure is a ratio of runs made side by side: the variants of one repetition run
back to back in rotated order, and ratios pair the samples of the same repetition.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from lambda_split._parts import Trunk
from lambda_split.cli.bench._harness import Bench, ModelEnv, ProgressFn
from lambda_split.cli.bench._stats import ratios, rotated, summarize
from secure_channel import SECURITY_MODES, Transport

GOAL_MODE, GOAL_RATIO = "tls+aesgcm", 0.9


class RecomputeTrunk:
    """Benchmark baseline only: the reference Λ-Split trunk, which keeps no KV cache.

    It keeps the full history of hidden states it was sent and reruns the whole
    sequence through the trunk on every step, returning the newest positions.
    """

    def __init__(self, trunk: Trunk) -> None:
        self.trunk = trunk
        self.hidden: torch.Tensor | None = None  # (B, S, C)
        self.mask: torch.Tensor | None = None  # (B, S)
        self.lengths: list[int] = []

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden if self.hidden is None else torch.cat([self.hidden, hidden], dim=1)
        self.mask = mask if self.mask is None else torch.cat([self.mask, mask], dim=1)
        self.lengths.append(self.hidden.shape[1])
        out: torch.Tensor = self.trunk(self.hidden, self.mask, self.trunk.new_state())  # (B, S, C)
        return out[:, -hidden.shape[1] :]


class _Stamps:
    """A transformers streamer that only timestamps: the prompt, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_runner(env: ModelEnv, prompt: tuple[torch.Tensor, torch.Tensor]) -> Callable[[int], float]:
    model = env.full_model()
    pad = env.tokenizer.pad_token_id if env.tokenizer.pad_token_id is not None else env.tokenizer.eos_token_id

    def run(tokens: int) -> float:
        stamps = _Stamps()
        with torch.inference_mode():
            model.generate(
                input_ids=prompt[0],
                attention_mask=prompt[1],
                max_new_tokens=tokens,  # type: ignore[operator]
                min_new_tokens=tokens,
                do_sample=False,
                streamer=stamps,
                pad_token_id=pad,
            )
        return (tokens - 1) / max(stamps.times[-1] - stamps.times[1], 1e-9)

    return run


def _remote_runner(
    env: ModelEnv, transport: Transport, prompt: tuple[torch.Tensor, torch.Tensor]
) -> Callable[[int], float]:
    return lambda tokens: env.run_remote(transport, "fp32", prompt, tokens).decode_tokens_per_s


def decode_throughput(
    bench: Bench, model: str, *, tokens: int, reps: int, hf_generate: bool, progress: ProgressFn
) -> dict[str, Any]:
    """Section 1: decode tokens/s of the split in every security mode vs the monolithic model."""
    env = bench.env(model)
    prompt = env.prompt()
    runners: dict[str, Callable[[int], float]] = {
        "monolithic": lambda n: env.run_local(prompt, n).decode_tokens_per_s
    }
    for mode in SECURITY_MODES:
        runners[mode] = _remote_runner(env, bench.servers.connect(env, mode), prompt)
    if hf_generate:
        runners["hf_generate"] = _hf_runner(env, prompt)
    progress(f"decode: warming up {len(runners)} variants")
    for runner in runners.values():
        runner(min(4, tokens))
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(reps):
        for name in rotated(list(runners), rep):
            samples[name].append(runners[name](tokens))
        progress(
            f"decode: repetition {rep + 1}/{reps}: "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items())
            + " tokens/s"
        )
    mono = samples["monolithic"]
    ratio = {
        name: summarize(ratios(values, mono)) for name, values in samples.items() if name != "monolithic"
    }
    out: dict[str, Any] = {
        "model": model,
        "split": [env.spec.start, env.spec.stop],
        "wire": "fp32",
        "prompt_tokens": int(prompt[0].shape[1]),
        "new_tokens": tokens,
        "reps": reps,
        "tokens_per_s": {name: summarize(values) for name, values in samples.items()},
        "ratio_vs_monolithic": ratio,
        "added_ms_per_token_vs_monolithic": {
            name: summarize([1000 / a - 1000 / b for a, b in zip(values, mono, strict=True)], 2)
            for name, values in samples.items()
            if name != "monolithic"
        },
        "samples_tokens_per_s": {name: [round(v, 3) for v in values] for name, values in samples.items()},
        "goal": {
            "mode": GOAL_MODE,
            "target_ratio": GOAL_RATIO,
            "median_ratio": ratio[GOAL_MODE]["median"],
            "met": bool(ratio[GOAL_MODE]["median"] >= GOAL_RATIO),
        },
    }
    if hf_generate:
        out["ratio_vs_hf_generate"] = {
            name: summarize(ratios(values, samples["hf_generate"]))
            for name, values in samples.items()
            if name != "hf_generate"
        }
    return out


def time_to_first_token(
    bench: Bench,
    model: str,
    *,
    lengths: tuple[int, ...],
    reps: int,
    progress: ProgressFn,
    modes: tuple[str, ...] = ("plain", "tls+aesgcm"),
) -> dict[str, Any]:
    """Section 2: prefill plus first token, by prompt length, split vs monolithic."""
    env = bench.env(model)
    transports = {mode: bench.servers.connect(env, mode) for mode in modes}

    def ttft(name: str, prompt: tuple[torch.Tensor, torch.Tensor]) -> float:
        run = (
            env.run_local(prompt, 1)
            if name == "monolithic"
            else env.run_remote(transports[name], "fp32", prompt, 1)
        )
        return run.result.time_to_first_token_s

    variants = ["monolithic", *modes]
    for name in variants:
        ttft(name, env.prompt(min(lengths)))
    by_length: dict[str, Any] = {}
    for length in lengths:
        prompt = env.prompt(length)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(reps):
            for name in rotated(variants, rep):
                samples[name].append(ttft(name, prompt))
        progress(
            f"time to first token, {length}-token prompt: "
            + ", ".join(f"{k} {1000 * v[-1]:.0f} ms" for k, v in samples.items())
        )
        by_length[str(length)] = {
            "ttft_s": {name: summarize(values, 5) for name, values in samples.items()},
            "slowdown_vs_monolithic": {
                name: summarize(ratios(values, samples["monolithic"]))
                for name, values in samples.items()
                if name != "monolithic"
            },
        }
    return {
        "model": model,
        "split": [env.spec.start, env.spec.stop],
        "wire": "fp32",
        "reps": reps,
        "prompt_tokens": list(lengths),
        "by_prompt_tokens": by_length,
    }


def cache_vs_recompute(
    bench: Bench, model: str, *, lengths: tuple[int, ...], reps: int, progress: ProgressFn
) -> dict[str, Any]:
    """Section 3: our trunk KV cache vs the reference method that reruns the whole sequence each step.

    Both trunks run in this process (no network), so the figure isolates the trunk's compute.
    Tokens/s here covers the whole generation, prefill included.
    """
    env = bench.env(model)
    prompt = env.prompt()
    by_length: dict[str, Any] = {}
    for length in lengths:
        samples: dict[str, list[float]] = {"kv_cache": [], "recompute": []}
        same = True
        history: list[int] = []
        for rep in range(reps):
            tokens: dict[str, list[list[int]]] = {}
            for name in rotated(list(samples), rep):
                trunk = RecomputeTrunk(env.trunk) if name == "recompute" else None
                run = env.run(trunk, prompt, length) if trunk else env.run_local(prompt, length)
                samples[name].append(run.result.new_tokens / run.result.elapsed_s)
                tokens[name] = run.result.token_ids
                history = trunk.lengths if trunk else history
            same = same and tokens["kv_cache"] == tokens["recompute"]
        progress(
            f"KV cache vs recompute, {model}, {length} tokens: cache {samples['kv_cache'][-1]:.1f}, "
            f"recompute {samples['recompute'][-1]:.1f} tokens/s"
        )
        mean_history = sum(history) / max(len(history), 1)
        by_length[str(length)] = {
            "tokens_per_s": {name: summarize(values) for name, values in samples.items()},
            "speedup_cache_over_recompute": summarize(ratios(samples["kv_cache"], samples["recompute"])),
            "same_tokens": same,
            "fp16_payload_up_per_step_bytes": {
                "kv_cache": 2 * env.hidden_size,
                "recompute_mean": round(2 * env.hidden_size * mean_history),
            },
        }
    return {
        "model": model,
        "split": [env.spec.start, env.spec.stop],
        "reps": reps,
        "prompt_tokens": int(prompt[0].shape[1]),
        "generated_tokens": list(lengths),
        "by_generated_tokens": by_length,
    }


@torch.inference_mode()
def part_times(env: ModelEnv, steps: int) -> dict[str, Any]:
    """Milliseconds per decode token of head, trunk and tail, each timed alone, in this process."""
    head, tail, trunk = env.parts.head, env.parts.tail, env.trunk
    if head is None or tail is None:  # pragma: no cover
        raise RuntimeError("head and tail not loaded")
    ids, mask = env.prompt()
    states = head.new_state(), trunk.new_state(), tail.new_state()
    times: dict[str, list[float]] = {"head": [], "trunk": [], "tail": []}
    for step in range(steps + 1):
        marks = [time.perf_counter()]
        hidden = head(ids, mask, states[0])
        marks.append(time.perf_counter())
        hidden = trunk(hidden, mask, states[1])
        marks.append(time.perf_counter())
        logits = tail(hidden, mask, states[2], last_only=True)[:, -1, :]
        marks.append(time.perf_counter())
        if step:  # step 0 is the prefill
            for name, start, stop in zip(times, marks, marks[1:], strict=False):
                times[name].append(1000 * (stop - start))
        ids = logits.argmax(-1, keepdim=True)
        mask = torch.ones_like(ids)
    layers = {name: len(env.spec.layers(name)) for name in times}
    return {
        "model": env.name,
        "steps": steps,
        "layers": layers,
        "ms_per_token": {name: summarize(values) for name, values in times.items()},
    }
