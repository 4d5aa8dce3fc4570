"""Where a split decode token goes, against transformers' generate() of the whole model.

    OMP_NUM_THREADS=1 python benchmarks/decode_breakdown.py [--security tls+aesgcm] [--tokens 32] [--reps 6]

The trunk server runs in a process of its own (this script, ``--serve-child``: ``lambda-split
serve``'s service and server, with every trunk forward timed into a file); this process is the
device. Per repetition, interleaved: ``generate()`` of the whole model, then one split generation
whose head, trunk round trip and tail are timed per decode step. Medians over the decode steps of
each run, then over runs. The round trip minus the server's forward is the transport and dispatch
(channel, framing, event loop, thread hop); head + forward + tail against ``generate()`` is what the
split computes beyond the monolithic model.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MODEL, SPLIT = "smollm2-135m", "2:-2"


def serve_child(args: argparse.Namespace) -> int:
    import torch

    from lambda_split import load_llm_service
    from server import BackgroundServer, ServerConfig

    torch.set_num_threads(1)
    service, info = load_llm_service(MODEL, SPLIT, security=args.security)
    executor: Any = service.executor
    run, times = executor._run, open(args.times, "a", buffering=1)  # noqa: SIM115 (lives with the server)

    def timed(steps: Any) -> Any:
        started = time.perf_counter()
        out = run(steps)
        times.write(
            f"{sum(s.rows for s in steps)} {sum(s.tokens for s in steps)} {time.perf_counter() - started}\n"
        )
        return out

    executor.scheduler._run_batch = timed
    config = ServerConfig(model=MODEL, split=SPLIT, security=args.security, keys=args.keys, port=0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with BackgroundServer(config, (service, info)) as running:
        print(f"listening on {running.url}", flush=True)
        stop.wait()
    return 0


def _timing(cls: Any, name: str, into: list[float]) -> None:
    inner = getattr(cls, name)

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = inner(self, *args, **kwargs)
        into.append(time.perf_counter() - started)
        return out

    setattr(cls, name, timed)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lambda_split._client import RemoteTrunk
    from lambda_split._parts import Head, Tail
    from lambda_split.cli.bench._clients import ClientModel, Connections, Reference, Target
    from secure_channel import generate_credentials

    torch.set_num_threads(1)
    parts: dict[str, list[float]] = {"head": [], "round_trip": [], "tail": []}
    _timing(Head, "forward", parts["head"])
    _timing(Tail, "forward", parts["tail"])
    _timing(RemoteTrunk, "__call__", parts["round_trip"])
    with tempfile.TemporaryDirectory() as work:
        keys, times = f"{work}/keys", Path(work) / "forwards.txt"
        generate_credentials(keys, days=1)
        command = [sys.executable, __file__, "--serve-child", "--security", args.security, "--keys", keys,
                   "--times", str(times)]  # fmt: skip
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            line = child.stdout.readline() if child.stdout else ""
            if not line.startswith("listening on "):
                raise SystemExit(f"the server did not start: {line!r}")
            client = ClientModel(MODEL, SPLIT)
            reference = Reference(client)
            conns = Connections(
                Target(line.split()[-1], args.security, keys if args.security != "plain" else None)
            )
            transport, link = conns.get("stream")
            reference.run(4)  # warm-up: first calls, the stream and its session path
            client.run(link, transport, "fp16", 4)
            runs = []
            for rep in range(args.reps):
                mono = reference.run(args.tokens)["decode_tokens_per_s"]
                for samples in parts.values():
                    samples.clear()
                before = len(times.read_text().splitlines())
                split = client.run(link, transport, "fp16", args.tokens).decode_tokens_per_s
                forwards = [
                    float(x.split()[2])
                    for x in times.read_text().splitlines()[before:]
                    if x.split()[1] == "1"
                ]
                row = {
                    "generate_ms": 1000 / mono,
                    "split_ms": 1000 / split,
                    "forward_ms": 1000 * statistics.median(forwards),
                }
                row.update({f"{k}_ms": 1000 * statistics.median(v[1:]) for k, v in parts.items()})
                runs.append(row)
                print(f"rep {rep + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), file=sys.stderr)
            conns.close()
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(60)
    med = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    med["transport_and_dispatch_ms"] = round(med["round_trip_ms"] - med["forward_ms"], 2)
    med["compute_beyond_generate_ms"] = round(
        med["head_ms"] + med["forward_ms"] + med["tail_ms"] - med["generate_ms"], 2
    )
    med["ratio_vs_generate"] = round(med["generate_ms"] / med["split_ms"], 3)
    return {"model": MODEL, "split": SPLIT, "security": args.security, "wire": "fp16", "tokens": args.tokens,
            "reps": args.reps, "median": med, "runs": runs}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--security", default="tls+aesgcm", choices=("plain", "tls", "aesgcm", "tls+aesgcm"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    parser.add_argument("--times", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        return serve_child(args)
    print(json.dumps(measure(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
