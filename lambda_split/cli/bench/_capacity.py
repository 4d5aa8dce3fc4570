"""The trunk server's own capacity: concurrent devices that replay a recorded generation.

The ``concurrency`` section's clients each run a real head and tail on this machine's cores, so
with eight of them the devices' own compute bounds the aggregate (eight devices stream their head,
tail and LM-head weights once per token each, on the cores the server also uses), not the server.
Here each client process replays the uplink of one real greedy generation instead, recorded in
this process through the same server and wire: the prompt's prefill, then one hidden state per
decode step, each sent as soon as the previous answer is back. Every answer is compared with the
recorded one. What is measured is what one trunk server gives N devices whose heads and tails run
on devices of their own; the network is loopback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lambda_split._client import RemoteTrunk
from lambda_split._codec import Encoding
from lambda_split._generate import GenerationConfig, generate_tokens
from lambda_split._stream import HTTPLink, StreamLink
from lambda_split.cli.bench._clients import ClientModel, Connections, Target
from lambda_split.cli.bench._procs import ClientPool
from lambda_split.cli.bench._scaling import scaling_with_batching

ProgressFn = Callable[[str], None]
#: An answer matches its recording when it is within this fraction of the recording's largest
#: absolute value: the rounding of the wire encoding (fp16: 2**-11 relative) and nothing more.
MATCH = 4e-3

Steps = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (hidden, mask, answer) per step


class _Recorder:
    def __init__(self, trunk: RemoteTrunk) -> None:
        self.trunk = trunk
        self.steps: Steps = []

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.trunk(hidden, mask)
        self.steps.append((hidden.clone(), mask.clone(), out.clone()))
        return out


def record_steps(client: ClientModel, target: Target, kind: str, wire: str, tokens: int, path: str) -> int:
    """Run one greedy generation of ``tokens`` tokens through ``target`` and save its trunk steps
    to ``path`` (safetensors); return the number of steps."""
    head, tail = client.parts.head, client.parts.tail
    if head is None or tail is None:  # pragma: no cover - ClientModel loads both
        raise RuntimeError("head and tail not loaded")
    conns = Connections(target)
    try:
        _, link = conns.get(kind)  # type: ignore[arg-type]
        trunk = RemoteTrunk(link, Encoding.parse(wire))
        try:
            recorder = _Recorder(trunk)
            ids, mask = client.prompt()
            config = GenerationConfig(max_new_tokens=tokens, stop_on_eos=False)
            generate_tokens(head, recorder, tail, client.tokenizer, ids, mask, config)
        finally:
            trunk.close()
    finally:
        conns.close()
    tensors = {}
    for index, (hidden, mask, out) in enumerate(recorder.steps):
        tensors.update({f"{index}.hidden": hidden, f"{index}.mask": mask, f"{index}.out": out})
    save_file(tensors, path)
    return len(recorder.steps)


def load_steps(path: str) -> Steps:
    tensors = load_file(path)
    count = len(tensors) // 3
    return [(tensors[f"{i}.hidden"], tensors[f"{i}.mask"], tensors[f"{i}.out"]) for i in range(count)]


def replay(link: HTTPLink | StreamLink, wire: str, steps: Steps) -> dict[str, Any]:
    """Send the recorded steps through a fresh trunk session, each as soon as the last is answered."""
    trunk = RemoteTrunk(link, Encoding.parse(wire))
    starts: list[float] = []
    worst = 0.0
    try:
        for hidden, mask, expected in steps:
            starts.append(time.perf_counter())
            worst = max(worst, float((trunk(hidden, mask) - expected).abs().max()))
        ended = time.perf_counter()
    finally:
        trunk.close()
    scale = max(float(out.abs().max()) for _, _, out in steps)
    return {
        "new_tokens": len(steps),
        "start": starts[0],
        "first_decode": starts[1] if len(starts) > 1 else ended,
        "ended": ended,
        "latencies_s": [b - a for a, b in zip(starts[1:], [*starts[2:], ended], strict=True)],
        "max_abs_diff": worst,
        "max_rel_diff": worst / scale if scale else worst,
    }


def replay_main(recording: str, _split: str, target: Target, threads: int | None, conn: Connection) -> None:
    """A replaying device (the :class:`ClientPool` worker protocol of ``_clients.worker_main``)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads or 1)
    connections = Connections(target)
    try:
        steps = load_steps(recording)
        conn.send(("ready", os.getpid()))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            _, kind, wire, _tokens, go_at, _where = command
            try:
                _, link = connections.get(kind)
                time.sleep(max(0.0, go_at - time.perf_counter()))
                conn.send(("ok", replay(link, wire, steps)))
            except Exception as exc:  # reported to the coordinator, which fails the section
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        connections.close()
        conn.close()


def matches(run: dict[str, Any]) -> bool:
    return bool(run["max_rel_diff"] <= MATCH)


def collect(
    plan: Any,
    targets: dict[str, Target],
    progress: ProgressFn,
    record: dict[str, Any],
    client: ClientModel,
    workdir: str,
) -> dict[str, Any]:
    """Aggregate tokens/s of 1, 2, 4, ... replaying devices, per concurrency mode and transport."""
    out: dict[str, Any] = {"model": plan.model, "wire": plan.wire, "new_tokens_per_client": plan.concurrency_tokens,
                           "reps": plan.concurrency_reps, "clients": list(plan.clients), "match": MATCH,
                           "by_variant": {}}  # fmt: skip
    for mode in plan.concurrency_modes:
        for kind in plan.transports:
            path = str(Path(workdir) / f"capacity-{mode}-{kind}.safetensors".replace("+", "-"))
            progress(f"capacity: recording one generation's trunk steps ({mode}/{kind})")
            record_steps(client, targets[mode], kind, plan.wire, plan.concurrency_tokens, path)
            progress(f"capacity: starting {max(plan.clients)} replaying device processes ({mode}/{kind})")
            pool = ClientPool(
                max(plan.clients), path, plan.split, targets[mode], threads=1, worker=replay_main
            )
            record.setdefault("processes", {}).setdefault("capacity_clients", {})[f"{mode}/{kind}"] = (
                pool.pids
            )
            try:
                out["by_variant"][f"{mode}/{kind}"] = scaling_with_batching(
                    plan, pool, targets[mode], kind, f"{mode}/{kind}", matches, progress,
                    match_key="outputs_match", section="capacity",
                )  # fmt: skip
            finally:
                pool.close()
    out["notes"] = [
        "each device is a process of its own that replays the trunk steps of one real greedy generation "
        "(recorded through the same server and wire: the prefill, then one hidden state per decode step), "
        "each step sent as soon as the previous answer is back; no head or tail runs, so the devices' "
        "compute does not share the server's cores as in the concurrency section",
        "aggregate tokens/s counts one token per step (the prefill gives the first); decode tokens/s the rest",
        f"outputs_match: every answer of every device is within {MATCH:g} of the recorded answer's largest "
        "absolute value (batched rows against the recording made alone)",
    ]
    return out
