"""Section 5: many clients against one trunk server, each with its own connection and session."""

from __future__ import annotations

import threading
import time
from typing import Any

from lambda_split.cli.bench._harness import Bench, ProgressFn, Run
from lambda_split.cli.bench._stats import quantile, rotated, summarize


def concurrency(
    bench: Bench,
    model: str,
    *,
    clients: tuple[int, ...],
    tokens: int,
    reps: int,
    progress: ProgressFn,
    mode: str = "tls+aesgcm",
) -> dict[str, Any]:
    """Aggregate decode tokens/s and per-token latency for 1, 2, 4, ... concurrent clients (threads)."""
    env = bench.env(model)
    prompt = env.prompt()
    transports = [bench.servers.connect(env, mode) for _ in range(max(clients))]
    env.run_remote(transports[0], "fp32", prompt, min(tokens, 4))  # warm-up
    aggregate: dict[int, list[float]] = {n: [] for n in clients}
    latencies: dict[int, list[float]] = {n: [] for n in clients}
    per_client: dict[int, list[float]] = {n: [] for n in clients}
    for rep in range(reps):
        for n in map(int, rotated([str(n) for n in clients], rep)):
            runs, began = _together(env.run_remote, transports[:n], prompt, tokens)
            wall = max(run.ended for run in runs) - min(began)
            aggregate[n].append(sum(run.result.new_tokens for run in runs) / wall)
            per_client[n].extend(run.decode_tokens_per_s for run in runs)
            latencies[n].extend(lat for run in runs for lat in run.decode_latencies)
            progress(f"concurrency: {n} client(s): {aggregate[n][-1]:.1f} tokens/s in aggregate")
    base = aggregate[clients[0]]
    table = {}
    for n in clients:
        lat_ms = [1000 * value for value in latencies[n]]
        table[str(n)] = {
            "aggregate_tokens_per_s": summarize(aggregate[n]),
            "scaling_vs_1": summarize([a / b for a, b in zip(aggregate[n], base, strict=True)]),
            "per_client_decode_tokens_per_s": summarize(per_client[n]),
            "token_latency_ms": {
                "p50": round(quantile(lat_ms, 0.5), 2),
                "p99": round(quantile(lat_ms, 0.99), 2),
                "n": len(lat_ms),
            },
        }
    for transport in transports:
        transport.close()
    return {
        "model": model,
        "security": mode,
        "wire": "fp32",
        "new_tokens_per_client": tokens,
        "reps": reps,
        "by_clients": table,
        "notes": [
            "clients are threads in the benchmark process, each with its own connection, AES-GCM session and "
            "trunk session; server and clients share this machine's cores and one Python interpreter",
            "the trunk batches the decode steps of concurrent sessions into one forward "
            "(lambda_split/_scheduler.py); the clients' head/tail work shares the same cores",
        ],
    }


def _together(run: Any, transports: list[Any], prompt: Any, tokens: int) -> tuple[list[Run], list[float]]:
    """Start one generation per transport at the same moment; return the runs and their start times."""
    count = len(transports)
    barrier = threading.Barrier(count)
    runs: list[Run | None] = [None] * count
    began = [0.0] * count
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            barrier.wait()
            began[index] = time.perf_counter()
            runs[index] = run(transports[index], "fp32", prompt, tokens)
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), name=f"bench-client-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [r for r in runs if r is not None], began
