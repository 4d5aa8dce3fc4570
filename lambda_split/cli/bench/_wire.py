"""Sections 4 and 6: wire bytes per token by encoding and mode, accuracy, and the security machinery's cost.

Byte counts are ``transport.stats``: what crossed the socket, TLS records, HTTP framing
and AES-GCM records included.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import torch

from lambda_split._codec import WIRE_ENCODINGS, Encoding, FrameKind, encode_frame, encode_tensor
from lambda_split.cli.bench._harness import Bench, ProgressFn, Run
from lambda_split.cli.bench._stats import summarize
from lambda_split.protocol import HEALTH_PATH, llm_step_tensors
from secure_channel import SECURITY_MODES, ClientChannel, Request, ServerChannel, connect_transport

ACCURACY_MODE = "tls+aesgcm"
TLS13_RECORD_OVERHEAD = 5 + 1 + 16  # header, inner content type, AES-GCM tag
TLS13_MAX_RECORD = 16384


def payload_bytes(hidden_size: int, wire: str, tokens: int = 1) -> int:
    """Bytes of the hidden-state payload alone for ``tokens`` positions, as the codec encodes it."""
    return len(encode_tensor(torch.zeros(tokens * hidden_size), Encoding.parse(wire)))


def step_frame(hidden_size: int, wire: str, tokens: int = 1) -> bytes:
    """A real LLM step frame for ``tokens`` new positions, as the client sends it (no session id;
    no mask tensor, the mask being all ones)."""
    hidden = torch.randn(1, tokens, hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, tokens, dtype=torch.uint8)
    return encode_frame(FrameKind.LLM_STEP, None, 0, llm_step_tensors(hidden, mask, Encoding.parse(wire)))


def _median_int(values: list[int]) -> int:
    return int(statistics.median(values)) if values else 0


def _agreement(reference: Run, other: Run) -> dict[str, Any]:
    """Greedy agreement with fp32: the shared prefix, and the largest logit error while inputs still match."""
    ref, got = reference.result.token_ids[0], other.result.token_ids[0]
    prefix = next(
        (i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got))
    )
    # Up to and including step `prefix`, both runs saw the same tokens, so their logits are comparable.
    compared = range(min(prefix + 1, len(reference.result.logits), len(other.result.logits)))
    errors = [float((reference.result.logits[i] - other.result.logits[i]).abs().max()) for i in compared]
    same = sum(a == b for a, b in zip(ref, got, strict=False))
    scale = max(float(reference.result.logits[i].abs().max()) for i in compared) if compared else 1.0
    return {
        "tokens": len(ref),
        "matching_prefix": prefix,
        "prefix_agreement": round(prefix / max(len(ref), 1), 4),
        "positional_agreement": round(same / max(len(ref), 1), 4),
        "max_abs_logit_error": round(max(errors), 5) if errors else None,
        "max_abs_logit": round(scale, 3),
    }


def wire_costs(bench: Bench, model: str, *, tokens: int, progress: ProgressFn) -> dict[str, Any]:
    """Section 4: bytes per generated token for every encoding in every mode, and accuracy vs fp32."""
    env = bench.env(model)
    d = env.hidden_size
    prompt = env.prompt()
    ideal = 2 * d  # fp16 hidden state, per direction
    table: dict[str, dict[str, Any]] = {}
    accuracy_runs: dict[str, Run] = {}
    for mode in SECURITY_MODES:
        transport = bench.servers.connect(env, mode)
        table[mode] = {}
        for wire in WIRE_ENCODINGS:
            run = env.run_remote(transport, wire, prompt, tokens, keep_logits=mode == ACCURACY_MODE)
            if mode == ACCURACY_MODE:
                accuracy_runs[wire] = run
            sent = _median_int([s for s, _ in run.step_bytes[1:]])
            received = _median_int([r for _, r in run.step_bytes[1:]])
            table[mode][wire] = {
                "decode_step_bytes": {"sent": sent, "received": received, "total": sent + received},
                "prefill_step_bytes": {"sent": run.step_bytes[0][0], "received": run.step_bytes[0][1]},
                "all_in_bytes_per_token": round(sum(run.session_bytes) / run.result.new_tokens, 1),
                "x_ideal_fp16": round((sent + received) / (2 * ideal), 3),
            }
        transport.close()
        progress(
            f"wire bytes, {mode}: "
            + ", ".join(f"{w} {table[mode][w]['decode_step_bytes']['total']} B/token" for w in WIRE_ENCODINGS)
        )
    accuracy = {wire: _agreement(accuracy_runs["fp32"], accuracy_runs[wire]) for wire in WIRE_ENCODINGS[1:]}
    fp32_total = table[ACCURACY_MODE]["fp32"]["decode_step_bytes"]["total"]
    for wire in WIRE_ENCODINGS[1:]:
        saved = 1 - table[ACCURACY_MODE][wire]["decode_step_bytes"]["total"] / fp32_total
        accuracy[wire]["bytes_saved_vs_fp32"] = round(saved, 4)
    return {
        "model": model,
        "hidden_size": d,
        "prompt_tokens": int(prompt[0].shape[1]),
        "new_tokens": tokens,
        "ideal_fp16_bytes_per_direction": ideal,
        "payload_bytes_per_direction": {wire: payload_bytes(d, wire) for wire in WIRE_ENCODINGS},
        "frame_bytes_per_direction": {wire: len(step_frame(d, wire)) for wire in WIRE_ENCODINGS},
        "by_mode": table,
        "accuracy_vs_fp32": {"mode": ACCURACY_MODE, "greedy": True, **accuracy},
        "notes": [
            "decode_step_bytes: median socket bytes of one decode step (one token), HTTP, TLS and AES-GCM included",
            "all_in_bytes_per_token: the whole trunk session (open, prefill, decode, close) over the new tokens; "
            "connection set-up and handshakes excluded (see security)",
            "accuracy: greedy decoding diverges after the first differing token, so the logit error is taken "
            "over the steps whose inputs were still identical",
        ],
    }


def security_costs(
    bench: Bench, model: str, *, reps: int, prefill_tokens: int, progress: ProgressFn
) -> dict[str, Any]:
    """Section 6: connection set-up and handshake time and bytes, and AEAD seal/open per frame."""
    env = bench.env(model)
    setup: dict[str, Any] = {}
    for mode in SECURITY_MODES:
        times, sizes = [], []
        for _ in range(reps):
            transport = connect_transport(
                bench.servers.url(env, mode), mode, keys_dir=bench.servers.keys if mode != "plain" else None
            )
            marks, counts = [time.perf_counter()], [0]
            for _call in range(2):
                transport.exchange(Request("GET", HEALTH_PATH))
                marks.append(time.perf_counter())
                counts.append(transport.stats.bytes_sent + transport.stats.bytes_received)
            transport.close()
            # first exchange = connect (+ handshakes) + request; second = the same request on the open connection
            times.append(1000 * ((marks[1] - marks[0]) - (marks[2] - marks[1])))
            sizes.append((counts[1] - counts[0]) - (counts[2] - counts[1]))
        setup[mode] = {"ms": summarize(times, 3), "bytes": _median_int(sizes)}
    handshakes: dict[str, Any] = {}
    for mode in ("aesgcm", "tls+aesgcm"):
        transport = bench.servers.connect(env, mode)
        times, sizes = [], []
        for _ in range(reps):
            before = transport.stats.bytes_sent + transport.stats.bytes_received
            start = time.perf_counter()
            transport.handshake()  # type: ignore[attr-defined]
            times.append(1000 * (time.perf_counter() - start))
            sizes.append(transport.stats.bytes_sent + transport.stats.bytes_received - before)
        transport.close()
        handshakes[mode] = {"ms": summarize(times, 3), "bytes": _median_int(sizes)}
    progress(
        "security: connection set-up "
        + ", ".join(f"{m} {v['ms']['median']:.1f} ms" for m, v in setup.items())
    )
    return {
        "model": model,
        "connection_setup": setup,
        "aesgcm_handshake": handshakes,
        "aead_us_per_frame": aead_costs(env.hidden_size, prefill_tokens, reps=max(reps, 5)),
        "notes": [
            "connection_setup: first request on a fresh transport minus the same request on the open "
            "connection (TCP, TLS 1.3 with client certificates, and the AES-GCM SIGMA-I handshake); bytes are "
            "socket payload bytes, so the TCP handshake itself (SYN/ACK, IP and TCP headers) counts as 0",
            "aesgcm_handshake: a re-handshake on an open connection (two round trips, X25519 + ECDSA P-256)",
            "aead: AES-256-GCM record seal/open of one fp32 step frame, in this process, no network",
        ],
    }


def aead_costs(hidden_size: int, prefill_tokens: int, *, reps: int) -> dict[str, Any]:
    """Microseconds to seal and open one record around a decode-sized and a prefill-sized fp32 frame."""
    out: dict[str, Any] = {}
    for label, tokens, batch in (("decode", 1, 200), ("prefill", prefill_tokens, 10)):
        frame = step_frame(hidden_size, "fp32", tokens)
        keys = os.urandom(16), os.urandom(32), os.urandom(32)
        client, server = ClientChannel(*keys), ServerChannel(*keys)
        timings: dict[str, list[float]] = {"seal": [], "open": []}
        for _ in range(reps):
            start = time.perf_counter()
            records = [client.seal_request(frame)[0] for _ in range(batch)]
            middle = time.perf_counter()
            for record in records:
                server.open_request(record)
            stop = time.perf_counter()
            timings["seal"].append(1e6 * (middle - start) / batch)
            timings["open"].append(1e6 * (stop - middle) / batch)
        out[label] = {
            "tokens": tokens,
            "frame_bytes": len(frame),
            "record_bytes": len(records[0]),
            **{name: summarize(values, 2) for name, values in timings.items()},
        }
    return out


def overhead_breakdown(wire: dict[str, Any]) -> dict[str, Any]:
    """Per decode step and direction: bytes the frame, HTTP, TLS and the AES-GCM layer each add (fp32)."""
    by_mode = wire["by_mode"]
    frame = wire["frame_bytes_per_direction"]["fp32"]
    payload = wire["payload_bytes_per_direction"]["fp32"]
    out: dict[str, Any] = {}
    for direction in ("sent", "received"):
        plain = by_mode["plain"]["fp32"]["decode_step_bytes"][direction]
        out[direction] = {
            "payload": payload,
            "frame_header": frame - payload,
            "http_and_session": plain - frame,
            "tls": by_mode["tls"]["fp32"]["decode_step_bytes"][direction] - plain,
            "aesgcm": by_mode["aesgcm"]["fp32"]["decode_step_bytes"][direction] - plain,
            "tls+aesgcm": by_mode["tls+aesgcm"]["fp32"]["decode_step_bytes"][direction] - plain,
        }
    out["tls13_record_theory"] = {
        "per_record": TLS13_RECORD_OVERHEAD,
        "records_per_decode_frame": math.ceil(frame / TLS13_MAX_RECORD),
    }
    return out
