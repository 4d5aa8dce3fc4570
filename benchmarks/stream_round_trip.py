"""What the transport stack costs per trunk step, per security mode and session transport.

    OMP_NUM_THREADS=1 python benchmarks/stream_round_trip.py [--modes plain,tls,aesgcm,tls+aesgcm]
        [--transports stream,http] [--rounds 8] [--steps 200] [--json FILE]

One ``lambda-split serve`` per mode, each in a process of its own, serves a near-empty trunk (one
layer of the 64-wide tiny-random-llama), so the stack is most of each step: this process is the
device. Every round opens a trunk session on each variant (mode / transport) in a rotated order,
feeds an 8-token prompt, then ``--steps`` one-token steps, and reads the server's
``lambda_split_step_seconds`` off ``/metrics`` before and after the steps (outside the timed calls).

Per variant, the median over rounds of:
- ``round trip``: the median time of one trunk call on the device;
- ``server``: the server's own time per step (forward, queue, codecs);
- ``link``: the device's trunk calls less the server's time in the same steps, per step: the
  device's codec, framing, TLS and AES-GCM, loopback, both event loops and the server's thread hop.

Compare the variants of one run: they share the machine's state. On a busy VM the level of every
variant moved by about 0.4 ms per step between two runs 25 minutes apart, and the order of the
security modes on the stream changed, while the stream stayed 1.4-2.0 ms per step ahead of HTTP
in each (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

MODEL, SPLIT, WIDTH = "tiny-random-llama", "4:5", 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="plain,tls,aesgcm,tls+aesgcm")
    parser.add_argument("--transports", default="stream,http")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", metavar="FILE", help="also write every round's figures here")
    args = parser.parse_args()

    import torch

    from lambda_split.cli.bench._clients import Connections, Target
    from lambda_split.cli.bench._procs import ServerProcess
    from lambda_split.cli.bench._stats import rotated
    from secure_channel import check_security_mode, generate_credentials

    torch.set_num_threads(1)
    modes = [check_security_mode(m) for m in args.modes.split(",")]
    kinds = args.transports.split(",")
    variants = [f"{mode}/{kind}" for mode in modes for kind in kinds]
    rounds: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="lambda-split-rtt-") as workdir:
        keys = f"{workdir}/keys"
        generate_credentials(keys, days=1)
        servers = {m: ServerProcess(MODEL, SPLIT, m, keys, workdir=workdir, threads=1) for m in modes}
        conns: dict[str, Connections] = {}
        try:
            for mode, server in servers.items():
                conns[mode] = Connections(Target(server.ready(), mode, keys if mode != "plain" else None))
            for variant in variants:  # connections, streams and first calls
                _round(conns, variant, 8)
            for r in range(args.rounds):
                for variant in rotated(variants, r):
                    rounds[variant].append(_round(conns, variant, args.steps))
                print(f"round {r + 1}/{args.rounds}", flush=True)
        finally:
            for c in conns.values():
                c.close()
            for server in servers.values():
                server.stop()

    print(f"\n{MODEL} {SPLIT} (a one-layer trunk), fp16 wire, {args.steps} one-token steps per round, "
          f"median of {args.rounds} rounds (ms per step):")  # fmt: skip
    print(f"{'variant':<22}{'round trip':>12}{'server':>10}{'link':>10}")
    table: dict[str, dict[str, float]] = {}
    for variant, runs in rounds.items():
        table[variant] = {
            k: statistics.median(run[k] for run in runs) for k in ("round_trip", "server", "link")
        }
        row = table[variant]
        print(f"{variant:<22}{row['round_trip']:>12.3f}{row['server']:>10.3f}{row['link']:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": MODEL, "split": SPLIT, "steps": args.steps, "median_ms": table,
                       "rounds_ms": rounds}, f, indent=2)  # fmt: skip


def _round(conns: dict[str, Any], variant: str, steps: int) -> dict[str, float]:
    """One session on ``variant``: a prompt, then ``steps`` timed one-token steps."""
    import torch

    from lambda_split._client import RemoteTrunk
    from lambda_split._codec import Encoding
    from lambda_split.cli.bench._scaling import scrape, step_time_delta

    mode, kind = variant.split("/")
    connections = conns[mode]
    _, link = connections.get(kind)
    trunk = RemoteTrunk(link, Encoding.parse("fp16"))
    took: list[float] = []
    try:
        trunk(torch.randn(1, 8, WIDTH), torch.ones(1, 8, dtype=torch.long))
        before = scrape(connections)  # on the kept HTTP connection: no handshake per read
        hidden, mask = torch.randn(1, 1, WIDTH), torch.ones(1, 1, dtype=torch.long)
        for _ in range(steps):
            started = time.perf_counter()
            trunk(hidden, mask)
            took.append(time.perf_counter() - started)
        counted, seconds = step_time_delta(before, scrape(connections))
    finally:
        trunk.close()
    if counted != steps:
        raise RuntimeError(f"the {mode} server counted {counted} steps, the device made {steps}")
    return {
        "round_trip": 1000 * statistics.median(took),
        "server": 1000 * seconds / steps,
        "link": 1000 * (sum(took) - seconds) / steps,
    }


if __name__ == "__main__":
    main()
