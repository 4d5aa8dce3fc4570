"""What the concurrency, capacity and replicas sections share: the scaling loop over 1, 2, 4, ...
concurrent clients, and the server's batching counters read off ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lambda_split.cli.bench._clients import Connections, Target
from lambda_split.cli.bench._procs import ClientPool
from lambda_split.cli.bench._stats import quantile, ratios, rotated, summarize

ProgressFn = Callable[[str], None]


def scaling(
    plan: Any,
    pool: ClientPool,
    kind: str,
    variant: str,
    same: Callable[[dict[str, Any]], bool],
    progress: ProgressFn,
    *,
    match_key: str = "tokens_unchanged",
    section: str = "concurrency",
) -> dict[str, Any]:
    """Aggregate tokens/s and per-token latency of the first 1, 2, 4, ... clients of ``pool``, all
    starting at one instant, in rotated order per repetition; ``same(run)`` says whether a client's
    run gave what it gives alone (``match_key`` in the table)."""
    pool.run(max(plan.clients), kind, plan.wire, 2)  # warm-up: every client connects and runs once
    aggregate: dict[int, list[float]] = {n: [] for n in plan.clients}
    latencies: dict[int, list[float]] = {n: [] for n in plan.clients}
    decoding: dict[int, list[float]] = {n: [] for n in plan.clients}
    unchanged: dict[int, bool] = dict.fromkeys(plan.clients, True)
    worst: dict[int, float] = {}
    for rep in range(plan.concurrency_reps):
        for n in map(int, rotated([str(n) for n in plan.clients], rep)):
            runs = pool.run(n, kind, plan.wire, plan.concurrency_tokens)
            wall = max(r["ended"] for r in runs) - min(r["start"] for r in runs)
            aggregate[n].append(sum(r["new_tokens"] for r in runs) / wall)
            window = max(r["ended"] for r in runs) - min(r["first_decode"] for r in runs)
            decoding[n].append(sum(r["new_tokens"] - 1 for r in runs) / max(window, 1e-9))
            latencies[n].extend(lat for r in runs for lat in r["latencies_s"])
            unchanged[n] = unchanged[n] and all(same(r) for r in runs)
            if all("max_rel_diff" in r for r in runs):  # replaying devices compare every answer
                worst[n] = max([worst.get(n, 0.0), *(r["max_rel_diff"] for r in runs)])
            progress(f"{section} {variant}: {n} client(s): {aggregate[n][-1]:.1f} tokens/s in aggregate")
    base = aggregate[plan.clients[0]]
    table: dict[str, Any] = {}
    for n in plan.clients:
        ms = [1000 * v for v in latencies[n]]
        table[str(n)] = {
            "aggregate_tokens_per_s": summarize(aggregate[n], 3),
            "scaling_vs_first": summarize(ratios(aggregate[n], base), 3),
            "aggregate_decode_tokens_per_s": summarize(decoding[n], 3),
            "decode_scaling_vs_first": summarize(ratios(decoding[n], decoding[plan.clients[0]]), 3),
            "token_latency_ms": {"p50": round(quantile(ms, 0.5), 2), "p99": round(quantile(ms, 0.99), 2), "n": len(ms)},
            match_key: unchanged[n],
        }  # fmt: skip
        if n in worst:
            table[str(n)]["max_rel_diff"] = worst[n]
    return {"by_clients": table}


def scaling_with_batching(plan: Any, pool: ClientPool, target: Target, kind: str, variant: str,
                          same: Callable[[dict[str, Any]], bool], progress: ProgressFn,
                          **options: str) -> dict[str, Any]:  # fmt: skip
    """:func:`scaling`, with what the server's scheduler did meanwhile (``server_batching``)."""
    before = scrape(target)
    entry = scaling(plan, pool, kind, variant, same, progress, **options)
    entry["server_batching"] = batching_delta(before, scrape(target))
    return entry


_SCRAPED = ("lambda_split_batch_rows_bucket", "lambda_split_batch_rows_sum", "lambda_split_batch_rows_count",
            "lambda_split_step_queue_wait_seconds_sum", "lambda_split_step_queue_wait_seconds_count",
            "lambda_split_prefills_total", "lambda_split_prefill_batches_total",
            "lambda_split_step_seconds_sum", "lambda_split_step_seconds_count")  # fmt: skip


def scrape(where: Target | Connections) -> dict[str, float]:
    """The server's batching counters and step times from ``/metrics`` (over this mode's own
    authenticated channel): on a new connection to a target, or on the kept HTTP connection of
    ``Connections`` (no handshake when it is open already)."""
    from lambda_split.protocol import METRICS_PATH
    from secure_channel import Request

    conns = where if isinstance(where, Connections) else Connections(where)
    try:
        transport, _ = conns.get("http")
        text = transport.exchange(Request("GET", METRICS_PATH)).content.decode()
    finally:
        if conns is not where:
            conns.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(_SCRAPED):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def step_time_delta(
    before: dict[str, float], after: dict[str, float], phase: str = "decode"
) -> tuple[int, float]:
    """Steps of ``phase`` the server answered between two scrapes and the seconds it spent in
    them (``lambda_split_step_seconds``: from a step's frame to its reply, inside the service)."""

    def delta(part: str) -> float:
        key = f'lambda_split_step_seconds_{part}{{phase="{phase}"}}'
        return after.get(key, 0.0) - before.get(key, 0.0)

    return int(delta("count")), delta("sum")


def batching_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server's scheduler did between two scrapes: decode batches by rows, queue waits."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = delta.get("lambda_split_batch_rows_count", 0.0)
    waits = delta.get("lambda_split_step_queue_wait_seconds_count", 0.0)
    buckets = {k.split('le="')[1].rstrip('"}'): int(v) for k, v in delta.items() if "batch_rows_bucket" in k}
    return {
        "decode_batches": int(batches),
        "mean_rows_per_decode_batch": round(delta.get("lambda_split_batch_rows_sum", 0.0) / batches, 2)
        if batches else None,
        "decode_batches_with_rows_at_most": buckets,
        "prefills": int(delta.get("lambda_split_prefills_total", 0.0)),
        "prefill_batches": int(delta.get("lambda_split_prefill_batches_total", 0.0)),
        "mean_queue_wait_ms": round(1000 * delta.get("lambda_split_step_queue_wait_seconds_sum", 0.0) / waits, 3)
        if waits else None,
    }  # fmt: skip
