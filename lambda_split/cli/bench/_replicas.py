"""The replicas section of the deployment benchmark: aggregate throughput of 2 trunk replicas against 1.

Per security mode (``--concurrency-modes``), two ``lambda-split serve`` replicas run in child
processes, and ``--replica-clients`` client processes (spawned, each with its own head and tail)
start one generation each at the same instant, in rotated order per repetition: all on replica A
(1 replica), or client ``i`` on replica ``i mod 2`` (2 replicas: the spread a reverse proxy's
consistent hash gives sessions with random routing keys). Aggregate tokens/s = all new tokens /
(last end - first start); the ratio pairs the two runs of one repetition. Every client's greedy
tokens are compared with a solo run.

On one machine both replicas share its cores, so the ratio shows what a second replica process
gains or costs here (each replica batches half the sessions), not the capacity a second machine adds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lambda_split.cli.bench._clients import ClientModel, Connections, Target
from lambda_split.cli.bench._procs import ClientPool, ServerProcess
from lambda_split.cli.bench._stats import ratios, rotated, summarize

ProgressFn = Callable[[str], None]
NOTES = [
    "1 replica: every client on replica A; 2 replicas: client i on replica i mod 2 (as a reverse proxy's "
    "consistent hash spreads sessions with random routing keys); runs of one repetition are paired",
    "aggregate tokens/s = all clients' new tokens / (last client's end - first client's start), prefills included",
    "both replicas and every client share this machine's cores: the ratio is what a second replica process "
    "gains or costs here, not the capacity a second machine would add",
]


def collect(plan: Any, client: ClientModel, keys: str, device_dir: str, workdir: str,
            progress: ProgressFn) -> dict[str, Any]:  # fmt: skip
    """Run the section for every mode of ``plan.concurrency_modes``."""
    out: dict[str, Any] = {"model": plan.model, "wire": plan.wire, "clients": plan.replica_clients,
                           "new_tokens_per_client": plan.concurrency_tokens, "reps": plan.replica_reps,
                           "by_mode": {}, "notes": NOTES}  # fmt: skip
    for mode in plan.concurrency_modes:
        replicas: list[ServerProcess] = []
        try:
            for name in ("a", "b"):
                progress(f"replicas: starting replica {name.upper()} ({mode})")
                replicas.append(ServerProcess(plan.model, plan.split, mode, keys, workdir=workdir,
                                              threads=plan.threads, name=f"replica-{name}-{mode}"))  # fmt: skip
            targets = [Target(r.ready(), mode, keys if mode != "plain" else None) for r in replicas]
            out["by_mode"][mode] = _measure(plan, client, device_dir, targets, progress)
        finally:
            out["by_mode"].setdefault(mode, {})["replica_exit_codes"] = [r.stop() for r in replicas]
    return out


def _measure(plan: Any, client: ClientModel, device_dir: str, targets: list[Target],
             progress: ProgressFn) -> dict[str, Any]:  # fmt: skip
    kind, count = plan.transports[0], plan.replica_clients
    solo = _solo(plan, client, targets[0], kind)
    pool = ClientPool(count, device_dir, plan.split, targets[0], threads=plan.threads)
    try:
        pool.run(count, kind, plan.wire, 2, targets=targets)  # warm-up: every client connects to both
        pool.run(count, kind, plan.wire, 2, targets=targets[::-1])
        aggregate: dict[str, list[float]] = {"1": [], "2": []}
        unchanged = {"1": True, "2": True}
        sessions = {"1": [0, 0], "2": [0, 0]}  # prefills each replica ran, read off its /metrics
        for rep in range(plan.replica_reps):
            for replicas in rotated(["1", "2"], rep):
                before = [_prefills(t) for t in targets]
                runs = pool.run(count, kind, plan.wire, plan.concurrency_tokens,
                                targets=targets[: int(replicas)])  # fmt: skip
                for index, target in enumerate(targets):
                    sessions[replicas][index] += _prefills(target) - before[index]
                wall = max(r["ended"] for r in runs) - min(r["start"] for r in runs)
                aggregate[replicas].append(sum(r["new_tokens"] for r in runs) / wall)
                unchanged[replicas] = unchanged[replicas] and all(r["token_ids"] == solo for r in runs)
                progress(f"replicas: {count} clients on {replicas} replica(s): "
                         f"{aggregate[replicas][-1]:.1f} tokens/s in aggregate")  # fmt: skip
    finally:
        pool.close()
    return {
        "transport": kind,
        "by_replicas": {
            n: {
                "aggregate_tokens_per_s": summarize(v, 3),
                "tokens_unchanged": unchanged[n],
                "prefills_per_replica": sessions[n],
            }
            for n, v in aggregate.items()
        },
        "two_over_one": summarize(ratios(aggregate["2"], aggregate["1"]), 3),
    }


def _prefills(target: Target) -> int:
    from lambda_split.cli.bench._scaling import scrape

    return int(scrape(target).get("lambda_split_prefills_total", 0.0))


def _solo(plan: Any, client: ClientModel, target: Target, kind: str) -> list[int]:
    conns = Connections(target)
    try:
        transport, link = conns.get(kind)  # type: ignore[arg-type]
        return list(client.run(link, transport, plan.wire, plan.concurrency_tokens).result.token_ids[0])
    finally:
        conns.close()
