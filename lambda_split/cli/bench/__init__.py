"""``lambda-split bench``: what the split costs, measured like a deployment.

The trunk server runs as ``lambda-split serve`` in a process of its own (one per security mode),
and concurrent clients run in processes of their own (see :mod:`._deploy`). Per mode and
transport (``stream``, ``http``): decode speed paired against transformers' ``generate()``,
added milliseconds per token, time to first token, wire bytes per decode token by wire encoding,
and aggregate tokens/s with p50/p99 per-token latency at 1, 2, 4, 8 and 16 clients.
``--sections failover`` adds (or, alone, runs only) the failover benchmark: a replica killed
mid-generation, 2 replicas against 1 (:mod:`._failover`); ``--sections replicas`` the aggregate
throughput of concurrent clients on 2 replicas against 1 (:mod:`._replicas`); ``--sections link`` decode
through an emulated link of ``--link-rtt-ms`` round trips (:mod:`._link`). ``--in-process`` runs the older
single-process suite (:mod:`._inprocess`) instead.

Every timing figure is a median and range of interleaved repetitions or a paired ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from lambda_split._names import SMOLLM2, TINY_LLAMA
from lambda_split.cli.bench._deploy import DeployPlan
from lambda_split.cli.bench._inprocess import Plan, full_plan, quick_plan

ProgressFn = Callable[[str], None]
MODES = ("plain", "tls", "aesgcm", "tls+aesgcm")
TRANSPORTS = ("stream", "http")
SECTIONS = ("decode", "wire", "concurrency", "capacity", "failover", "replicas", "link")
DEFAULT_SECTIONS = ("decode", "wire", "concurrency")
WIRES = ("fp32", "fp16", "bf16", "int8")

__all__ = ["MODES", "TINY_LLAMA", "DeployPlan", "Plan", "add_arguments", "deploy_plan", "run_bench"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lambda-split bench``."""
    add = parser.add_argument
    add("--out", metavar="DIR", help="write results.json, results.md and PNG plots to DIR")
    add("--json", action="store_true", help="print exactly one JSON object on stdout")
    add("--quick", action="store_true", help="fewer modes, tokens and repetitions (a few minutes); "
        "options given explicitly still win")  # fmt: skip
    add("--model", default=SMOLLM2, help="model (default smollm2-135m)")
    add("--split", default="2:-2", type=_split, help="split A:B (default 2:-2)")
    add(
        "--threads",
        type=_positive,
        help="torch intra-op threads of every process (default: the environment's)",
    )
    add(
        "--modes",
        type=_choices(MODES),
        metavar="M,..",
        help=f"security modes (default all: {','.join(MODES)})",
    )
    add("--transports", type=_choices(TRANSPORTS), metavar="T,..",
        help="session transports, before (http) and after (stream) in one run (default stream,http)")  # fmt: skip
    add("--wire", choices=WIRES, help="wire encoding of the decode and concurrency runs (default fp16)")
    add("--wires", type=_choices(WIRES), metavar="W,..", help="wire encodings whose bytes are counted "
        f"(default {','.join(WIRES)})")  # fmt: skip
    add("--tokens", type=_positive, help="new tokens per decode run (default 48)")
    add("--reps", type=_positive, help="interleaved repetitions of the decode section (default 6)")
    add("--clients", type=_counts, metavar="N,..", help="concurrent client processes (default 1,2,4,8,16)")
    add("--concurrency-modes", type=_choices(MODES), metavar="M,..",
        help="security modes of the concurrency section (default tls+aesgcm)")  # fmt: skip
    add("--concurrency-tokens", type=_positive, help="new tokens per client in the concurrency section (16)")
    add("--concurrency-reps", type=_positive, help="repetitions of the concurrency section (default 2)")
    add(
        "--sections",
        type=_choices(SECTIONS),
        metavar="S,..",
        help="sections of the deployment benchmark "
        f"(default {','.join(DEFAULT_SECTIONS)}; capacity, failover, replicas and link run only when named: "
        f"{','.join(SECTIONS)})",
    )
    add(
        "--failover-modes",
        type=_choices(MODES),
        metavar="M,..",
        help="security modes of the failover section (default tls+aesgcm)",
    )
    add(
        "--failover-history",
        type=_histories,
        metavar="N,..",
        help="positions the killed replica held, one run each (default 32,128,512)",
    )
    add(
        "--failover-replicas",
        type=_replicas,
        metavar="N,..",
        help="replicas the client knows: 2 (it moves "
        "to the other) and/or 1 (the killed one restarts and the client waits) (default 2,1)",
    )
    add("--failover-reps", type=_positive, help="repetitions of the failover section (default 3)")
    add(
        "--failover-deadline",
        type=_seconds,
        metavar="S",
        help="how long the client may wait for a replica to take over (default 120)",
    )
    add(
        "--failover-transport",
        choices=TRANSPORTS,
        help="session transport of the failover section (default stream)",
    )
    add("--replica-clients", type=_positive, help="client processes of the replicas section, on 1 then 2 "
        "replicas (default 8)")  # fmt: skip
    add("--replica-reps", type=_positive, help="repetitions of the replicas section (default 3)")
    add("--link-rtt-ms", type=_round_trips, metavar="MS,..", help="round trips the link section's relay adds "
        "in front of the tls+aesgcm server, one variant each (default 20,50)")  # fmt: skip
    add("--in-process", action="store_true", help="run the older single-process suite instead (KV cache "
        "vs recompute, security machinery, modelled links, diffusion)")  # fmt: skip


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _split(text: str) -> str:
    from lambda_split._parts import SplitSpec

    try:  # the syntax and 1 <= A <= B; B against the real depth once the model is open
        SplitSpec.parse(text, num_layers=2**31)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace(f" <= {2**31}", "")) from None
    return text


def _choices(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{','.join(bad) or 'nothing'} is not one of {','.join(allowed)}"
            )
        return items

    return parse


def _counts(text: str) -> tuple[int, ...]:
    values = tuple(sorted(set(map(_positive, filter(None, (x.strip() for x in text.split(",")))))))
    if not values:
        raise argparse.ArgumentTypeError("give client counts like 1,2,4,8,16")
    if max(values) > 64:
        raise argparse.ArgumentTypeError("at most 64 client processes")
    return values


def _histories(text: str) -> tuple[int, ...]:
    values = tuple(sorted(set(map(_positive, filter(None, (x.strip() for x in text.split(",")))))))
    if not values:
        raise argparse.ArgumentTypeError("give history lengths like 32,128,512")
    if values[0] < 16:  # the kill comes after token 8 (4 with --quick), so the history holds at least that
        raise argparse.ArgumentTypeError("a history holds at least 16 positions")
    return values


def _replicas(text: str) -> tuple[int, ...]:
    values = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not values or set(values) - {"1", "2"}:
        raise argparse.ArgumentTypeError("give 2, 1 or 2,1")
    return tuple(map(int, values))


def _round_trips(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of milliseconds: {text!r}") from None
    if not all(0 < v <= 2000 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError("round trips are distinct numbers of milliseconds in (0, 2000]")
    return values


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number of seconds above 0")
    return value


_OPTION_FIELDS = {"split": "split", "threads": "threads", "modes": "modes", "transports": "transports",
                  "wire": "wire", "wires": "wires", "tokens": "tokens", "reps": "reps", "clients": "clients",
                  "concurrency_modes": "concurrency_modes", "concurrency_tokens": "concurrency_tokens",
                  "concurrency_reps": "concurrency_reps", "sections": "sections",
                  "failover_modes": "failover_modes", "failover_history": "failover_history",
                  "failover_replicas": "failover_replicas", "failover_reps": "failover_reps",
                  "failover_deadline": "failover_deadline", "failover_transport": "failover_transport",
                  "replica_clients": "replica_clients", "replica_reps": "replica_reps",
                  "link_rtt_ms": "link_rtts_ms"}  # fmt: skip


def deploy_plan(model: str, *, quick: bool, options: dict[str, Any] | None = None) -> DeployPlan:
    """The plan for ``model``: the full or ``--quick`` defaults, with the options given (not None) on top."""
    base = DeployPlan(model=model)
    if quick:
        base = dataclasses.replace(base, modes=("plain", "tls+aesgcm"), tokens=16, reps=3, byte_tokens=4,
                                   clients=(1, 2, 4, 8), concurrency_tokens=8, concurrency_reps=1,
                                   failover_history=(32, 128), failover_reps=2, failover_kill_after=4,
                                   replica_clients=4, replica_reps=1)  # fmt: skip
    given = {
        _OPTION_FIELDS[k]: v for k, v in (options or {}).items() if k in _OPTION_FIELDS and v is not None
    }
    return dataclasses.replace(base, **given)


def run_bench(*, out: str | None, as_json: bool, quick: bool, model: str, progress: ProgressFn,
              threads: int | None = None, plan: Plan | DeployPlan | None = None,
              options: dict[str, Any] | None = None) -> int:  # fmt: skip
    """Run the benchmark; print JSON (``as_json``) or markdown on stdout; write ``out`` if given.

    ``options`` are the parsed command-line options (``vars(args)``); None means the defaults.
    Returns 0, or 1 if any section failed (its error is recorded in the results).
    """
    import torch

    options = dict(options or {})
    _stop_cleanly_on_sigterm()
    if threads is not None:
        torch.set_num_threads(threads)
        options["threads"] = threads
    if plan is None:
        if options.get("in_process"):
            plan = quick_plan(model) if quick else full_plan(model)
        else:
            plan = deploy_plan(model, quick=quick, options=options)
    if isinstance(plan, Plan):
        from lambda_split.cli.bench import _inprocess, _report

        results = _inprocess.collect(plan, progress, quick=quick)
        render, write = _report.markdown, _report.write_outputs
    else:
        from lambda_split.cli.bench import _deploy_report

        results = collect(plan, progress, quick=quick)
        render, write = _deploy_report.markdown, _deploy_report.write_outputs
    if out:
        for path in write(results, out):
            progress(f"wrote {path}")
    if as_json:
        print(json.dumps(results))
    else:
        print(render(results))
    return 1 if results["failed_sections"] else 0


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the servers and client processes are stopped on the way out."""
    import signal
    import threading

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def collect(plan: DeployPlan, progress: ProgressFn, *, quick: bool = False) -> dict[str, Any]:
    """Run the deployment benchmark and return one JSON-ready dict."""
    import os

    import torch
    import transformers

    from lambda_split.cli.bench import _deploy
    from lambda_split.cli.bench._inprocess import machine

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    started = time.perf_counter()
    meta = machine(quick, plan)
    meta["kind"] = "deployment"
    results: dict[str, Any] = {"meta": meta, "failed_sections": []}
    _deploy.collect(plan, progress, results)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = list(os.getloadavg())
    meta["torch_threads"] = torch.get_num_threads()
    return results
