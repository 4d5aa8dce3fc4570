"""Receipts, audits and the detection of cheating trunk servers (issue 17).

    OMP_NUM_THREADS=1 python benchmarks/verify/run.py --out benchmarks/verify [--quick]

Everything runs in this process: a TrunkService (the serving path, with its cross-session
batching scheduler) behind LocalTransport, signed receipts, one transcript per run, then
``lambda_split._audit.audit`` on it. Cheating servers come from threat_model.cheats.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from lambda_split import (
    LocalTransport,
    SplitClient,
    SplitSpec,
    TrunkService,
    fingerprint,
    load_parts,
    resolve,
)
from lambda_split._audit import TOLERANCE, audit
from lambda_split._generate import GenerationConfig, encode_prompts
from lambda_split._llm_trunk import LLMExecutor
from lambda_split._receipts import ReceiptSigner
from lambda_split._verify import enable_verification
from lambda_split.protocol import PROTOCOL_VERSION
from secure_channel import generate_credentials, load_credentials
from threat_model.cheats import cheating_executor

TOPICS = ["rivers", "bread", "chess", "volcanoes", "jazz", "bees", "rust", "tides", "glass", "owls",
          "trains", "salt", "maps", "snow", "clocks", "ink"]  # fmt: skip
WIRES = ("fp32", "fp16", "bf16", "int8")


def prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"Tell me {rng.randint(2, 9)} facts about {rng.choice(TOPICS)} and {rng.choice(TOPICS)}."
        for _ in range(count)
    ]


class Rig:
    """A model's head/tail client and an honest trunk, with keys, in one process."""

    def __init__(self, model: str, split: str, keys: Path) -> None:
        self.checkpoint = resolve(model)
        self.spec = SplitSpec.parse(split, self.checkpoint.config.num_hidden_layers)
        trunk = load_parts(self.checkpoint, self.spec, ("trunk",)).trunk
        if trunk is None:
            raise RuntimeError("no trunk")
        self.trunk = trunk
        self.keys = keys
        self.credentials = load_credentials(keys, "server")
        self.info: dict[str, Any] = {
            "model": self.checkpoint.name,
            "fingerprint": fingerprint(self.checkpoint, (self.spec.start, self.spec.stop)),
            "split": [self.spec.start, self.spec.stop], "num_layers": self.spec.num_layers,
            "hidden_size": self.checkpoint.config.hidden_size, "security": "plain",
            "protocol_version": PROTOCOL_VERSION,
        }  # fmt: skip
        self.parts: Any = None

    def run(self, executor: LLMExecutor, wire: str, texts: list[str], tokens: int, transcript: Path,
            concurrency: int = 4) -> float:  # fmt: skip
        """Generate for ``texts`` (``concurrency`` sessions at a time, batched by the service)."""
        service = TrunkService(executor)
        service.receipts = ReceiptSigner(lambda: self.credentials, self.info)
        transport = LocalTransport(service, self.info)
        if self.parts is None:
            client = SplitClient.from_transport(transport, self.checkpoint, wire=wire)
            self.parts = client.model
        else:
            from lambda_split._client import ServerInfo

            client = SplitClient(transport, self.parts, ServerInfo.parse(self.info), wire=wire)
        verification = enable_verification(client, keys=self.keys, transcript=transcript)
        config = GenerationConfig(max_new_tokens=tokens, stop_on_eos=False)
        # tokenised here: a fast tokenizer must not be called from several threads at once
        queue = [encode_prompts(client.tokenizer, [text], chat=True) for text in texts]
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    ids, mask = queue.pop()
                client.generate_ids(ids, mask, config)

        started = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        verification.close()
        return time.perf_counter() - started


def step_verdicts(report: dict[str, Any]) -> list[list[bool]]:
    """Per session, per step: True if the step fails the audit."""
    return [[not v["match"] for v in s["steps"] if v["audited"]] for s in report["sessions"]]


def detection_curve(sessions: list[list[bool]], p: float, rates: list[float], lengths: list[int],
                    trials: int, rng: random.Random) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for n in lengths:
        windows = [s[:n] for s in sessions if len(s) >= n]
        for q in rates:
            hits = 0
            for _ in range(trials):
                window = rng.choice(windows)
                hits += any(bad and rng.random() < q for bad in window)
            rows.append({"n": n, "q": q, "measured": hits / trials, "predicted": 1 - (1 - p * q) ** n})
    return rows


def receipt_costs(keys: Path, reps: int = 2000) -> dict[str, float]:
    key = load_credentials(keys, "server").private_key
    data = b"x" * 56
    started = time.perf_counter()
    signatures = [key.sign(data, ec.ECDSA(hashes.SHA256())) for _ in range(reps)]
    sign_us = (time.perf_counter() - started) / reps * 1e6
    public = key.public_key()
    started = time.perf_counter()
    for signature in signatures:
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    verify_us = (time.perf_counter() - started) / reps * 1e6
    return {"sign_us": sign_us, "verify_us": verify_us,
            "signature_bytes_mean": statistics.mean(len(s) for s in signatures),
            "receipt_bytes_per_step": 1 + 7 + 1 + 1 + 4 + 8 + max(len(s) for s in signatures)}  # fmt: skip


def honest(rig: Rig, count: int, tokens: int, work: Path, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for wire in WIRES:
        path = work / f"honest-{rig.checkpoint.name}-{wire}.jsonl"
        gen_s = rig.run(LLMExecutor(rig.trunk), wire, prompts(count, seed), tokens, path)
        started = time.perf_counter()
        report = audit(path, rig.checkpoint.name, trunk=rig.trunk)
        audit_s = time.perf_counter() - started
        devs = [v["deviation"] for s in report["sessions"] for v in s["steps"] if v["audited"]]
        failed_sessions = sum(any(row) for row in step_verdicts(report))
        out[wire] = {"sessions": len(report["sessions"]), "steps": len(devs), "max_deviation": max(devs),
                     "p99_deviation": sorted(devs)[int(0.99 * (len(devs) - 1))], "tolerance": TOLERANCE[wire],
                     "false_positive_sessions": failed_sessions, "generate_s": gen_s, "audit_s": audit_s,
                     "audit_ms_per_step": audit_s / len(devs) * 1e3,
                     "transcript_bytes_per_step": path.stat().st_size / len(devs)}  # fmt: skip
        print(f"honest {rig.checkpoint.name} {wire}: {out[wire]}", file=sys.stderr, flush=True)
    return out


def cheats(rig: Rig, names: list[str], count: int, tokens: int, work: Path, seed: int, wire: str,
           options: dict[str, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    rng = random.Random(seed)
    for name in names:
        path = work / f"cheat-{rig.checkpoint.name}-{name}-{wire}.jsonl"
        executor = cheating_executor(name, rig.trunk, **options.get(name, {}))
        rig.run(executor, wire, prompts(count, seed + 1), tokens, path)
        report = audit(path, rig.checkpoint.name, trunk=rig.trunk)
        verdicts = step_verdicts(report)
        steps = sum(len(v) for v in verdicts)
        p = sum(sum(v) for v in verdicts) / steps
        lengths = [n for n in (8, 32, 128) if n <= tokens]
        curve = detection_curve(verdicts, p, [0.01, 0.05, 0.1, 0.25, 1.0], lengths, 4000, rng)
        devs = [v["deviation"] for s in report["sessions"] for v in s["steps"] if v["audited"]]
        out[name] = {"options": options.get(name, {}), "sessions": len(verdicts), "steps": steps,
                     "p_step": p, "full_audit_caught_sessions": sum(any(v) for v in verdicts),
                     "median_deviation": statistics.median(devs), "wire": wire, "curve": curve}  # fmt: skip
        print(f"cheat {rig.checkpoint.name} {name} {wire}: p={p:.4f} caught "
              f"{out[name]['full_audit_caught_sessions']}/{len(verdicts)}", file=sys.stderr, flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/verify"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        keys = work / "keys"
        generate_credentials(keys)
        results["receipt_costs"] = receipt_costs(keys)
        tiny = Rig("tiny-random-llama", "2:-2", keys)
        results["honest_tiny"] = honest(tiny, 8 if quick else 32, 16 if quick else 32, work, 1)
        options = {"perturb": {"scale": 0.01}, "noise": {"fraction": 0.01}}
        results["cheats_tiny"] = {}
        for wire in WIRES:
            results["cheats_tiny"][wire] = cheats(
                tiny, ["skip", "int4", "perturb", "replay"], 6 if quick else 16, 32, work, 2, wire, options
            )
        results["cheats_tiny"]["fp16"].update(
            cheats(tiny, ["noise"], 8 if quick else 64, 128, work, 3, "fp16", options)
        )
        if not quick:
            small = Rig("smollm2-135m", "2:-2", keys)
            results["honest_smollm2"] = honest(small, 8, 12, work, 4)
            results["cheats_smollm2"] = cheats(small, ["int4", "skip"], 3, 12, work, 5, "int8", options)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
