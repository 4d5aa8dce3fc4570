"""Decode speed and wire bytes of the stream against the HTTP path, the trunk server in its own process.

    OMP_NUM_THREADS=1 python benchmarks/stream_vs_http.py [--model smollm2-135m] [--security tls+aesgcm]
                                                         [--reps 6] [--tokens 48]

(One torch thread per process keeps the client and the server from fighting over a small machine's cores.)

Starts ``lambda-split serve`` as a child process, then interleaves, per repetition: transformers'
``generate()`` of the whole model, split decoding over HTTP (one request per step) and over the
stream, greedy with a forced number of new tokens. Prints one JSON object: per path the median
decode tokens/s, the median paired ratio against ``generate()`` of the same repetition, and the
socket bytes per decode step (both directions) for fp16 and int8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from lambda_split._client import RemoteTrunk
from lambda_split._codec import Encoding
from lambda_split._stream import make_link
from lambda_split.cli.bench._compute import _hf_runner
from lambda_split.cli.bench._harness import ModelEnv
from secure_channel import connect_transport, generate_credentials


def serve(model: str, split: str, security: str, keys: str) -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ,
        "LAMBDA_SPLIT_RATE_LIMIT_PER_S": "1000000",
        "LAMBDA_SPLIT_RATE_LIMIT_BURST": "1000000",
    }
    command = [sys.executable, "-m", "lambda_split", "serve", "--model", model, "--split", split]
    command += ["--security", security, "--keys", keys, "--port", "0"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = child.stdout.readline() if child.stdout else ""
    if not line.startswith("listening on "):
        child.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return child, line.split()[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", default="2:-2")
    parser.add_argument("--security", default="tls+aesgcm")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    env = ModelEnv(args.model, args.split, lambda message: print(message, file=sys.stderr))
    prompt = env.prompt()
    hf = _hf_runner(env, prompt)
    with tempfile.TemporaryDirectory() as keys:
        generate_credentials(keys, days=1)
        child, url = serve(args.model, args.split, args.security, keys)
        try:
            links = {}
            for kind in ("http", "stream"):
                transport = connect_transport(url, args.security, keys_dir=keys, timeout=120)
                links[kind] = (transport, make_link(transport, kind))  # type: ignore[arg-type]

            def split_run(kind: str, wire: str) -> tuple[float, int]:
                transport, link = links[kind]
                trunk = RemoteTrunk(link, Encoding.parse(wire))
                try:
                    run = env.run(trunk, prompt, args.tokens, stats=transport.stats)
                finally:
                    trunk.close()
                per_step = [sent + received for sent, received in run.step_bytes[1:]]
                return run.decode_tokens_per_s, int(statistics.median(per_step))

            for kind in links:  # warm-up: connections, handshakes, the stream, first-call costs
                split_run(kind, "fp16")
            hf(4)
            speed: dict[str, list[float]] = {"generate": [], "http": [], "stream": []}
            ratio: dict[str, list[float]] = {"http": [], "stream": []}
            for rep in range(args.reps):
                order = ["generate", "http", "stream"]
                order = order[rep % 3 :] + order[: rep % 3]
                got: dict[str, float] = {}
                for path in order:
                    got[path] = hf(args.tokens) if path == "generate" else split_run(path, "fp16")[0]
                    speed[path].append(got[path])
                for path in ratio:
                    ratio[path].append(got[path] / got["generate"])
            wire = {kind: {w: split_run(kind, w)[1] for w in ("fp16", "int8")} for kind in links}
            out: dict[str, Any] = {
                "model": args.model,
                "split": args.split,
                "security": args.security,
                "new_tokens": args.tokens,
                "reps": args.reps,
                "decode_tokens_per_s_median": {k: round(statistics.median(v), 1) for k, v in speed.items()},
                "ratio_vs_generate_median": {k: round(statistics.median(v), 3) for k, v in ratio.items()},
                "ratio_vs_generate_range": {
                    k: [round(min(v), 3), round(max(v), 3)] for k, v in ratio.items()
                },
                "wire_bytes_per_decode_step": wire,
                "int8_over_fp16": {k: round(v["int8"] / v["fp16"], 3) for k, v in wire.items()},
            }
            print(json.dumps(out, indent=1))
        finally:
            for transport, _link in links.values():
                transport.close()
            child.terminate()
            child.wait(30)


if __name__ == "__main__":
    main()
