"""The deployment benchmark: the trunk server in its own process, clients in their own processes.

Per security mode, one ``lambda-split serve`` child. Sections:

- ``decode``: this process is one device. Per repetition, in rotated order: transformers'
  ``generate()`` of the whole model (the monolithic reference) and one split generation per
  (mode, transport). Ratios pair the runs of one repetition; time to first token comes from the same runs.
- ``wire``: socket bytes per decode step (both directions) per mode, transport and wire encoding,
  from the transport's byte counters.
- ``concurrency``: 1, 2, 4, ... client processes start one generation each at the same instant;
  aggregate tokens/s, per-token latency, and every client's tokens against a solo run (greedy).
- ``failover`` (only when asked for, ``--sections``): replicas of their own, one killed mid-generation;
  detection, reconnection, replay and stall against history length, 2 replicas against 1 (:mod:`._failover`).
- ``replicas`` (only when asked for): aggregate tokens/s of concurrent clients on 2 replicas against 1
  (:mod:`._replicas`).
- ``link`` (only when asked for): decode as in ``decode``, the goal mode's stream directly and through a
  loopback relay that adds each of ``--link-rtt-ms`` round trips (:mod:`._link`).
- ``capacity`` (only when asked for): the trunk server's own aggregate with 1, 2, 4, ... devices that
  replay a recorded generation's trunk steps, so that no head or tail shares its cores (:mod:`._capacity`).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lambda_split.cli.bench import _capacity, _failover, _replicas
from lambda_split.cli.bench._clients import (
    ClientModel,
    Connections,
    Reference,
    Target,
    export_device_model,
    summary,
)
from lambda_split.cli.bench._procs import ClientPool, LinkProcess, ServerProcess
from lambda_split.cli.bench._scaling import scaling_with_batching, scrape, step_time_delta
from lambda_split.cli.bench._stats import STEADY_CV, ratios, rotated, steadiness, summarize
from secure_channel import generate_credentials

ProgressFn = Callable[[str], None]
GOAL_MODE = "tls+aesgcm"
GOALS = {"decode_ratio": 0.95, "added_ms": 1.5, "scaling_at": 8, "scaling": 3.0, "int8_over_fp16": 0.55}


@dataclass(frozen=True)
class DeployPlan:
    """What the deployment benchmark runs (``--modes``, ``--transports``, ``--clients``, ...)."""

    model: str = "smollm2-135m"
    split: str = "2:-2"
    modes: tuple[str, ...] = ("plain", "tls", "aesgcm", "tls+aesgcm")
    transports: tuple[str, ...] = ("stream", "http")
    wire: str = "fp16"  # the wire of the decode and concurrency sections
    wires: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")  # the wires whose bytes are counted
    tokens: int = 48
    reps: int = 6
    byte_tokens: int = 4  # bytes per step are the same at every decode step; 3 of them give the median
    clients: tuple[int, ...] = (1, 2, 4, 8, 16)
    concurrency_modes: tuple[str, ...] = ("tls+aesgcm",)
    concurrency_tokens: int = 16
    concurrency_reps: int = 2
    threads: int | None = None  # torch threads of every process (None: the environment's choice)
    sections: tuple[str, ...] = ("decode", "wire", "concurrency")  # "failover" is asked for by name
    failover_modes: tuple[str, ...] = ("tls+aesgcm",)
    failover_history: tuple[int, ...] = (32, 128, 512)  # positions the lost trunk held
    failover_replicas: tuple[int, ...] = (2, 1)  # replicas the client knows (1: the killed one restarts)
    failover_reps: int = 3
    failover_kill_after: int = 8  # the replica is killed right after this token
    failover_deadline: float = 120.0  # seconds the client may wait for a replica (the restart, with one)
    failover_transport: str = "stream"
    replica_clients: int = 8  # client processes of the replicas section, spread over 1 or 2 replicas
    replica_reps: int = 3
    link_rtts_ms: tuple[float, ...] = (20.0, 50.0)  # round trips the link section's relay adds


def collect(plan: DeployPlan, progress: ProgressFn, record: dict[str, Any]) -> None:
    """Run every section of ``plan`` into ``record`` (a section that fails is recorded, the rest run)."""
    with tempfile.TemporaryDirectory(prefix="lambda-split-bench-") as workdir:
        keys = f"{workdir}/keys"
        generate_credentials(keys, days=1)
        servers: dict[str, ServerProcess] = {}
        try:
            for mode in _shared_modes(plan):
                progress(
                    f"starting lambda-split serve --model {plan.model} --split {plan.split} --security {mode}"
                )
                servers[mode] = ServerProcess(
                    plan.model, plan.split, mode, keys, workdir=workdir, threads=plan.threads
                )
            reference = ", and the whole model for generate()" if "decode" in plan.sections else ""
            progress(f"loading {plan.model} here (head and tail{reference}) while the servers load")
            client = ClientModel(plan.model, plan.split)
            for mode, server in servers.items():
                progress(f"{mode} server (pid {server.pid}) listening on {server.ready()}")
            targets = {m: Target(s.url, m, keys if m != "plain" else None) for m, s in servers.items()}
            record["processes"] = {"bench_pid": _pid(), "servers": {m: s.pid for m, s in servers.items()}}
            works: dict[str, Callable[[], Any]] = {
                "decode": lambda: decode(plan, client, targets, progress),
                "wire": lambda: wire_bytes(plan, client, targets, progress),
                "concurrency": lambda: concurrency(plan, targets, progress, record, client, workdir),
                "link": lambda: link(plan, client, targets, progress, record, workdir),
                "capacity": lambda: _capacity.collect(plan, targets, progress, record, client, workdir),
                "failover": lambda: _failover.collect(plan, client, keys, workdir, progress),
                "replicas": lambda: _replicas.collect(
                    plan, client, keys, _device_dir(client, workdir, progress), workdir, progress
                ),
            }
            for name, work in works.items():
                if name in plan.sections:
                    _section(record, name, progress, work)
        finally:
            codes = {mode: server.stop() for mode, server in servers.items()}
            record.setdefault("processes", {})["server_exit_codes"] = codes
    record["goals"] = goals(record)


def _shared_modes(plan: DeployPlan) -> list[str]:
    """The modes whose one server the decode, wire and concurrency sections share (failover has its own)."""
    modes = [*plan.modes] if {"decode", "wire"} & set(plan.sections) else []
    modes += [GOAL_MODE] if "link" in plan.sections and GOAL_MODE not in modes else []
    modes += plan.concurrency_modes if {"concurrency", "capacity"} & set(plan.sections) else ()
    return list(dict.fromkeys(modes))


def _device_dir(client: ClientModel, workdir: str, progress: ProgressFn) -> str:
    """The head's and tail's weights, written once, for client processes to load."""
    from pathlib import Path

    device = Path(workdir) / "device"
    if not (device / "tokenizer_config.json").exists():  # written last
        device.mkdir(exist_ok=True)
        progress("writing the head's and tail's weights for the client processes")
        export_device_model(client, str(device))
    return str(device)


def _pid() -> int:
    import os

    return os.getpid()


def _section(record: dict[str, Any], name: str, progress: ProgressFn, work: Callable[[], Any]) -> None:
    progress(f"--- {name} ---")
    try:
        record[name] = work()
    except Exception as exc:  # recorded; the other sections still run
        progress(f"{name} failed: {type(exc).__name__}: {exc}")
        record[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        record["failed_sections"].append(name)


def _variants(plan: DeployPlan) -> list[str]:
    return [f"{mode}/{kind}" for mode in plan.modes for kind in plan.transports]


def decode(
    plan: DeployPlan, client: ClientModel, targets: dict[str, Target], progress: ProgressFn
) -> dict[str, Any]:
    """Paired, interleaved decode speed and time to first token: split per (mode, transport) vs generate()."""
    conns = {mode: Connections(targets[mode]) for mode in plan.modes}
    try:
        runners = {}
        for variant in _variants(plan):
            mode, kind = variant.split("/")  # /metrics is read on the mode's own connections
            runners[variant] = _split_runner(client, conns[mode], kind, plan.wire, conns[mode])
        return _paired_decode(plan, client, runners, progress, "decode", notes=[
            "variant = security mode / transport; every run is greedy with a forced number of new tokens"])  # fmt: skip
    finally:
        for c in conns.values():
            c.close()


def link(
    plan: DeployPlan,
    client: ClientModel,
    targets: dict[str, Target],
    progress: ProgressFn,
    record: dict[str, Any],
    workdir: str,
) -> dict[str, Any]:
    """Through an emulated link (:mod:`._link`): decode of the goal mode's stream directly and through
    a relay that adds each of ``plan.link_rtts_ms``, interleaved with generate() as in :func:`decode`;
    then ``plan.clients`` concurrent client processes behind each relay (``record["link_concurrency"]``)."""
    mode = GOAL_MODE  # (collect starts its server when the link section is asked for)
    direct = targets[mode]
    with contextlib.ExitStack() as stack:
        relays: dict[float, LinkProcess] = {}
        conns = {_link_variant(mode, None): stack.enter_context(contextlib.closing(Connections(direct)))}
        for rtt in plan.link_rtts_ms:
            progress(
                f"link: starting a relay that adds {rtt:g} ms of round trip in front of the {mode} server"
            )
            relays[rtt] = stack.enter_context(LinkProcess(direct.url, rtt))
            conns[_link_variant(mode, rtt)] = stack.enter_context(
                contextlib.closing(Connections(Target(relays[rtt].url, mode, direct.keys)))
            )
        meter = conns[_link_variant(mode, None)]  # /metrics read directly, not through a relay
        runners = {
            variant: _split_runner(client, c, "stream", plan.wire, meter) for variant, c in conns.items()
        }
        result = _paired_decode(plan, client, runners, progress, "link", notes=[
            f"variant = {mode}/stream, directly or through a loopback relay that holds every chunk for half the "
            "added round trip in each direction (benchmarks/README.md)",
            "added_beyond_link_ms = added_ms_per_token - the round trip the relay adds"])  # fmt: skip
        record["link_concurrency"] = _link_concurrency(plan, client, direct, relays, progress, workdir)
    for rtt in plan.link_rtts_ms:
        entry = result["by_variant"][_link_variant(mode, rtt)]
        entry["link_rtt_ms"] = rtt
        added = entry["added_ms_per_token"]
        entry["added_beyond_link_ms"] = {
            k: (None if v is None else round(v - rtt, 3)) for k, v in added.items()
        }
    result["mode"] = mode
    return result


def _link_concurrency(
    plan: DeployPlan,
    client: ClientModel,
    direct: Target,
    relays: dict[float, LinkProcess],
    progress: ProgressFn,
    workdir: str,
) -> dict[str, Any]:
    """The concurrency section's scaling, with every client process behind one relay at a time."""
    device = _device_dir(client, workdir, progress)
    out = _scaling_record(plan)
    same = _same_tokens(_solo_tokens(plan, client, direct, "stream"))
    for rtt, relay in relays.items():
        variant = _link_variant(direct.mode, rtt)
        progress(f"link: starting {max(plan.clients)} client processes behind the {rtt:g} ms link")
        pool = ClientPool(max(plan.clients), device, plan.split, Target(relay.url, direct.mode, direct.keys),
                          threads=plan.threads)  # fmt: skip
        try:
            out["by_variant"][variant] = scaling_with_batching(
                plan, pool, direct, "stream", variant, same, progress, section="link"
            )
        finally:
            pool.close()
    out["notes"] = [
        "as the concurrency section, with every client process connected through the relay that adds the "
        "variant's round trip; the server's batching counters are read directly",
    ]
    return out


def _link_variant(mode: str, rtt: float | None) -> str:
    """The name of the link section's variant: the stream directly (``rtt`` None) or through a relay."""
    return f"{mode}/stream, {'direct' if rtt is None else f'{rtt:g} ms'}"


def _split_runner(
    client: ClientModel, conns: Connections, kind: str, wire: str, server: Connections
) -> Callable[[int], dict[str, Any]]:
    """One split run; the server's ``/metrics`` is read on ``server``'s kept HTTP connection before
    and after it (outside the timed part) for the time the server spent in the run's decode steps
    (``server_steps``: count, seconds)."""

    def run(tokens: int) -> dict[str, Any]:
        transport, link = conns.get(kind)  # type: ignore[arg-type]
        before = scrape(server)
        out = summary(client.run(link, transport, wire, tokens))
        out["server_steps"] = step_time_delta(before, scrape(server))
        return out

    return run


def _link_time(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per decode step, averaged over each run's decode steps (the prompt's step left out): the
    server's own time and the rest of the device's round trip (the link). Runs whose server counted
    other decode steps than the device made (another client) are left out."""
    server, link = [], []
    for r in runs:
        steps, seconds = r.get("server_steps", (0, 0.0))
        if steps and steps == r["decode_trunk_calls"]:
            server.append(1000 * seconds / steps)
            link.append(1000 * (r["decode_trunk_call_s"] - seconds) / steps)
    return {"server_ms_per_step": summarize(server, 3), "link_ms_per_step": summarize(link, 3)}


def _paired_decode(
    plan: DeployPlan,
    client: ClientModel,
    runners: dict[str, Callable[[int], dict[str, Any]]],
    progress: ProgressFn,
    section: str,
    *,
    notes: list[str],
) -> dict[str, Any]:
    """generate() and each runner, ``plan.reps`` times in rotated order; the speeds paired per repetition."""
    reference = Reference(client)
    variants = ["generate", *runners]

    def one(variant: str, tokens: int) -> dict[str, Any]:
        return reference.run(tokens) if variant == "generate" else runners[variant](tokens)

    progress(f"{section}: warming up {len(variants)} variants (connections, streams, first calls)")
    for variant in variants:
        one(variant, 4)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep in range(plan.reps):
        for variant in rotated(variants, rep):
            runs[variant].append(one(variant, plan.tokens))
        progress(f"{section}: repetition {rep + 1}/{plan.reps}: " + ", ".join(
            f"{v} {r[-1]['decode_tokens_per_s']:.1f}" for v, r in runs.items()) + " tokens/s")  # fmt: skip
    speed = {v: [r["decode_tokens_per_s"] for r in rs] for v, rs in runs.items()}
    gen = speed["generate"]
    steady = _steadiness(
        section, {("generate()" if v == "generate" else v): s for v, s in speed.items()}, progress
    )
    table: dict[str, Any] = {}
    for variant in variants[1:]:
        table[variant] = {
            "decode_tokens_per_s": summarize(speed[variant], 3),
            "ratio_vs_generate": summarize(ratios(speed[variant], gen), 4),
            "added_ms_per_token": summarize([1000 / a - 1000 / b for a, b in zip(speed[variant], gen, strict=True)], 3),
            "ttft_ms": summarize([1000 * r["ttft_s"] for r in runs[variant]], 2),
            "tokens_equal_generate": sum(r["token_ids"] == runs["generate"][0]["token_ids"] for r in runs[variant]),
            **_link_time(runs[variant]),
            "samples_tokens_per_s": [round(v, 3) for v in speed[variant]],
        }  # fmt: skip
    return {
        "model": plan.model,
        "split": [client.spec.start, client.spec.stop],
        "wire": plan.wire,
        "prompt_tokens": int(reference.prompt[0].shape[1]),
        "new_tokens": plan.tokens,
        "reps": plan.reps,
        "generate": {
            "decode_tokens_per_s": summarize(gen, 3),
            "ttft_ms": summarize([1000 * r["ttft_s"] for r in runs["generate"]], 2),
            "samples_tokens_per_s": [round(v, 3) for v in gen],
        },
        "by_variant": table,
        "steadiness": steady,
        "notes": [
            *notes,
            "ratio_vs_generate pairs each split run with the generate() run of the same repetition; the order "
            "of the variants rotates from one repetition to the next",
            "added_ms_per_token = 1000/split tokens/s - 1000/generate() tokens/s, paired per repetition",
            "link_ms_per_step = (the device's decode trunk calls - the server's time in those steps, from "
            '/metrics lambda_split_step_seconds{phase="decode"}) / steps: the device\'s codec, framing, TLS '
            "and AES-GCM, the network or loopback, both event loops and the server's thread hop; "
            "server_ms_per_step = the server's own time (forward, queue, codecs); both averaged over a run's "
            "decode steps (the prompt's step left out)",
            "tokens_equal_generate: runs (of reps) whose tokens equal generate()'s; the fp16 wire may flip a "
            "close greedy choice",
        ],
    }


def _steadiness(section: str, speeds: dict[str, list[float]], progress: ProgressFn) -> dict[str, Any]:
    """:func:`steadiness` of a paired section's speeds, with a warning through ``progress`` when unsteady."""
    steady = steadiness(speeds)
    if steady["steady"] is False:
        worst = speeds[steady["variant"]]
        progress(f"{section}: warning: {steady['variant']} ran at {min(worst):.1f}–{max(worst):.1f} tokens/s across "
                 f"the repetitions (variation {steady['cv']:.0%}, steady is ≤ {STEADY_CV:.0%}): the machine was busy "
                 "and the paired ratios are not reliable; rerun on a quiet machine or with more --reps")  # fmt: skip
    return steady


def _median_int(values: list[int]) -> int:
    return int(statistics.median(values)) if values else 0


def wire_bytes(
    plan: DeployPlan, client: ClientModel, targets: dict[str, Target], progress: ProgressFn
) -> dict[str, Any]:
    """Median socket bytes of one decode step, both directions, by mode, transport and wire."""
    table: dict[str, Any] = {}
    for mode in plan.modes:
        conns = Connections(targets[mode])
        try:
            for kind in plan.transports:
                entry: dict[str, Any] = {}
                for wire in plan.wires:
                    transport, link = conns.get(kind)  # type: ignore[arg-type]
                    run = client.run(link, transport, wire, plan.byte_tokens)
                    sent = _median_int([s for s, _ in run.step_bytes[1:]])
                    received = _median_int([r for _, r in run.step_bytes[1:]])
                    entry[wire] = {"sent": sent, "received": received, "total": sent + received,
                                   "prefill": {"sent": run.step_bytes[0][0], "received": run.step_bytes[0][1]},
                                   "session_per_token": round(sum(run.session_bytes) / run.result.new_tokens, 1)}  # fmt: skip
                if "fp16" in entry and "int8" in entry:
                    entry["int8_over_fp16"] = round(entry["int8"]["total"] / entry["fp16"]["total"], 4)
                table[f"{mode}/{kind}"] = entry
                progress(f"wire bytes per decode token, {mode}/{kind}: "
                         + ", ".join(f"{w} {entry[w]['total']}" for w in plan.wires))  # fmt: skip
        finally:
            conns.close()
    hidden = int(client.config.hidden_size)
    return {
        "model": plan.model,
        "hidden_size": hidden,
        "new_tokens": plan.byte_tokens,
        "payload_bytes_per_direction": {w: _payload(hidden, w) for w in plan.wires},
        "by_variant": table,
        "notes": [
            "sent/received/total: median socket bytes of one decode step (one token), from the transport's "
            "counters: TLS records, HTTP or WebSocket framing and AES-GCM records included",
            "session_per_token: the whole trunk session (open, prefill, decode, close) over the new tokens",
        ],
    }


def _payload(hidden: int, wire: str) -> int:
    import torch

    from lambda_split._codec import Encoding, encode_tensor

    return len(encode_tensor(torch.zeros(hidden), Encoding.parse(wire)))


def concurrency(
    plan: DeployPlan,
    targets: dict[str, Target],
    progress: ProgressFn,
    record: dict[str, Any],
    client: ClientModel,
    workdir: str,
) -> dict[str, Any]:
    """Aggregate tokens/s and per-token latency of 1, 2, 4, ... concurrent client processes."""
    device = _device_dir(client, workdir, progress)
    out = _scaling_record(plan)
    for mode in plan.concurrency_modes:
        progress(f"concurrency: starting {max(plan.clients)} client processes ({mode})")
        pool = ClientPool(max(plan.clients), device, plan.split, targets[mode], threads=plan.threads)
        record.setdefault("processes", {}).setdefault("clients", {})[mode] = pool.pids
        try:
            for kind in plan.transports:
                same = _same_tokens(_solo_tokens(plan, client, targets[mode], kind))
                out["by_variant"][f"{mode}/{kind}"] = scaling_with_batching(
                    plan, pool, targets[mode], kind, f"{mode}/{kind}", same, progress
                )
        finally:
            pool.close()
    out["notes"] = [
        "each client is a process of its own (multiprocessing spawn) with its own connection and trunk "
        "session; all start one generation at the same instant; server and clients share this machine's cores",
        "aggregate tokens/s = all clients' new tokens / (last client's end - first client's start), prefills "
        "included; aggregate decode tokens/s = the tokens after each client's first / (last end - first "
        "decode step of any client), so the prefills of the others still fall inside it",
        "tokens_unchanged: every client's greedy tokens equal those of a single client alone (a run of the "
        "benchmark process on the same variant and wire)",
    ]
    return out


def _scaling_record(plan: DeployPlan) -> dict[str, Any]:
    """The head of a concurrency table (its variants go in ``by_variant``)."""
    return {"model": plan.model, "wire": plan.wire, "new_tokens_per_client": plan.concurrency_tokens,
            "reps": plan.concurrency_reps, "clients": list(plan.clients), "by_variant": {}}  # fmt: skip


def _same_tokens(solo: list[int]) -> Callable[[dict[str, Any]], bool]:
    return lambda run: bool(run["token_ids"] == solo)


def _solo_tokens(plan: DeployPlan, client: ClientModel, target: Target, kind: str) -> list[int]:
    """The greedy tokens of one client alone (this process), which every concurrent client must match."""
    conns = Connections(target)
    try:
        transport, link = conns.get(kind)  # type: ignore[arg-type]
        return list(client.run(link, transport, plan.wire, plan.concurrency_tokens).result.token_ids[0])
    finally:
        conns.close()


def goals(record: dict[str, Any]) -> dict[str, Any]:
    """The issue's three goals, read off this run's figures (None where the run did not measure them)."""
    out: dict[str, Any] = {}
    decode_table = record.get("decode", {}).get("by_variant", {})
    wire_table = record.get("wire", {}).get("by_variant", {})
    conc = record.get("concurrency", {}).get("by_variant", {})
    for kind in ("stream", "http"):
        variant = f"{GOAL_MODE}/{kind}"
        entry: dict[str, Any] = {}
        if variant in decode_table:
            ratio = decode_table[variant]["ratio_vs_generate"]["median"]
            added = decode_table[variant]["added_ms_per_token"]["median"]
            entry["decode"] = {"ratio": ratio, "added_ms": added, "target_ratio": GOALS["decode_ratio"],
                               "target_added_ms": GOALS["added_ms"],
                               "steady": record["decode"].get("steadiness", {}).get("steady"),
                               "met": bool(ratio >= GOALS["decode_ratio"] and added <= GOALS["added_ms"])}  # fmt: skip
        at = str(GOALS["scaling_at"])
        if variant in conc and at in conc[variant]["by_clients"]:
            scaling = conc[variant]["by_clients"][at]["scaling_vs_first"]["median"]
            entry["scaling"] = {"clients": int(at), "x_one_client": scaling, "target": GOALS["scaling"],
                                "tokens_unchanged": conc[variant]["by_clients"][at]["tokens_unchanged"],
                                "met": bool(scaling >= GOALS["scaling"] and conc[variant]["by_clients"][at]["tokens_unchanged"])}  # fmt: skip
        if variant in wire_table and "int8_over_fp16" in wire_table[variant]:
            value = wire_table[variant]["int8_over_fp16"]
            entry["int8_bytes"] = {"int8_over_fp16": value, "target": GOALS["int8_over_fp16"],
                                   "met": bool(value <= GOALS["int8_over_fp16"])}  # fmt: skip
        if entry:
            out[variant] = entry
    return out
