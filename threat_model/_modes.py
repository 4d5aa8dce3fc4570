"""Judge one security mode from its captures: what the wire shows, what leaks, what the attacks recover.

Each ``evaluate_*`` function returns a JSON-ready dict whose ``checks`` list holds the
policy verdicts for that mode (``{"check": str, "passed": bool, "detail": str}``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from threat_model._capture._reassembly import TcpStream
from threat_model._live import DiffusionSession, LLMSession
from threat_model.attacks import AttackResult, cached_step_fn, invert_prompt, model_order_fn, tail_replay
from threat_model.capture import Capture
from threat_model.detectors import (
    Detector,
    HiddenStateDetector,
    ImageSignatureDetector,
    PixelDetector,
    TextLeakDetector,
    TokenIdDetector,
    encode_wire,
    scan_streams,
)
from threat_model.eavesdrop import CapturedFrame, plaintext_frames, session_tensors
from threat_model.traffic import length_leak, messages

ENCRYPTED = ("tls", "aesgcm", "tls+aesgcm")


def check(name: str, passed: bool, detail: str = "") -> dict[str, Any]:
    return {"check": name, "passed": bool(passed), "detail": detail}


def _count(detectors: Sequence[Detector], streams: Sequence[TcpStream]) -> tuple[int, list[str]]:
    findings = scan_streams(detectors, streams)
    return len(findings), [str(f) for f in findings[:3]]


def wire_view(streams: Sequence[TcpStream]) -> dict[str, Any]:
    """What a passive observer delimits: HTTP requests (ids masked), TLS records, sealed AES-GCM records."""
    requests: Counter[str] = Counter()
    records: Counter[str] = Counter()
    kinds: set[str] = set()
    sealed = 0
    for stream in streams:
        found = messages(stream)
        kinds.add(found[0].kind.split("-")[0] if found else "none")
        for message in found:
            if message.kind == "http-request":
                line = re.sub(r"/[0-9a-f]{16,}", "/{id}", message.detail.rsplit(" ", 1)[0])
                requests[line] += 1
                sealed += line.endswith("/v1/secure")
            elif message.kind == "tls-record":
                records[f"{message.direction} {message.detail}"] += 1
    return {
        "connections": len(streams),
        "complete": all(s.complete for s in streams),
        "bytes": {"c2s": sum(len(s.c2s.data) for s in streams), "s2c": sum(len(s.s2c.data) for s in streams)},
        "visible_as": sorted(kinds),
        "http_requests": dict(sorted(requests.items())),
        "tls_records": dict(sorted(records.items())),
        "sealed_records": {"c2s": sealed, "s2c": sealed},
    }


def _exchanges(capture: Capture) -> list[tuple[str, int]]:
    """Observable messages merged into alternating (direction, bytes) runs, in time order."""
    found = sorted(
        (m for s in capture.streams() for m in messages(s) if m.kind != "http-chunk"), key=lambda m: m.ts
    )
    out: list[tuple[str, int]] = []
    for message in found:
        if out and out[-1][0] == message.direction:
            out[-1] = (message.direction, out[-1][1] + message.size)
        else:
            out.append((message.direction, message.size))
    return out


@dataclass(frozen=True)
class Shape:
    prefill_bytes: int
    decode_steps: int
    reply_sizes: list[int]


def session_shape(capture: Capture) -> Shape | None:
    """The attacker's reading: the longest run of equal-sized requests is the decode loop, the one before it the prefill."""
    exchanges = _exchanges(capture)
    requests = [i for i, (direction, _) in enumerate(exchanges) if direction == "c2s"]
    best = (0, 0)  # (run length, index into requests of the run's start)
    run = 1
    for k in range(1, len(requests) + 1):
        if k < len(requests) and exchanges[requests[k]][1] == exchanges[requests[k - 1]][1]:
            run += 1
            continue
        if run > best[0] and k - run > 0:
            best = (run, k - run)
        run = 1
    length, start = best
    if length < 2:
        return None
    steps = requests[start : start + length]
    replies = [exchanges[i + 1][1] for i in steps if i + 1 < len(exchanges)]
    return Shape(exchanges[requests[start - 1]][1], length, replies)


def traffic_leak(sessions: Sequence[LLMSession]) -> dict[str, Any]:
    """Do sizes and counts reveal the prompt length, the output length, each token's length?"""
    shapes = [session_shape(s.capture) for s in sessions]
    if len(sessions) < 3 or any(shape is None for s, shape in zip(sessions, shapes, strict=True)):
        return {"sessions": len(sessions), "delimited": False}
    known = [(s, shape) for s, shape in zip(sessions, shapes, strict=True) if shape is not None]
    prompt = length_leak([sh.prefill_bytes for _, sh in known], [len(s.prompt_ids) for s, _ in known])
    outputs = [(sh.decode_steps + 1, len(s.token_ids)) for s, sh in known]
    sizes: list[int] = []
    token_lengths: list[int] = []
    for session, shape in known:  # the reply to decode step j yields token j + 1
        pairs = list(zip(shape.reply_sizes, session.token_texts[1:], strict=False))
        sizes += [size for size, _ in pairs]
        token_lengths += [len(token.encode()) for _, token in pairs]
    tokens = length_leak(sizes, token_lengths) if len(sizes) == len(token_lengths) >= 2 else None
    return {
        "sessions": len(sessions),
        "delimited": True,
        "prompt_length": {
            "inferable": prompt.inferable,
            "r2": round(prompt.r2, 4),
            "exact_rate": prompt.exact_rate,
            "bytes_per_token": round(1 / prompt.slope, 1) if prompt.slope else None,
        },
        "output_length": {"exact_rate": sum(a == b for a, b in outputs) / len(outputs)},
        "token_lengths": {
            "inferable": bool(tokens and tokens.inferable),
            "r2": round(tokens.r2, 4) if tokens else None,
            "distinct_reply_sizes": len(set(sizes)),
        },
    }


class Attacker:
    """A passive eavesdropper holding the public weights of the model and the split in use."""

    def __init__(self, checkpoint: Any, split: str) -> None:
        from lambda_split import SplitSpec, load_parts

        spec = SplitSpec.parse(split, int(checkpoint.config.num_hidden_layers))
        self.parts: Any = load_parts(checkpoint, spec, ("head", "trunk", "tail"))
        self.vocab = int(checkpoint.config.vocab_size)
        self.order = model_order_fn(self._logits, self.vocab, checkpoint.tokenizer.bos_token_id)

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.parts.tail(self.parts.trunk(self.parts.head(ids)))  # (B, T, V)
        return out

    @torch.inference_mode()
    def invert(self, captured: torch.Tensor, wire: str, truth: Sequence[int]) -> AttackResult:
        step = cached_step_fn(self.parts.head)
        return invert_prompt(captured, None, self.order, encoding=wire, truth=truth, step_fn=step)

    def replay(self, returned: Sequence[torch.Tensor], truth: Sequence[int]) -> AttackResult:
        return tail_replay(returned, self.parts.tail, prompt_length=returned[0].shape[1], truth=truth)


def _score(result: AttackResult | None) -> dict[str, Any]:
    if result is None:
        return {"recovered": 0, "accuracy": 0.0, "forwards_per_token": 0.0, "seconds": 0.0}
    return {
        "recovered": sum(a == b for a, b in zip(result.recovered, result.truth or [], strict=False)),
        "accuracy": result.accuracy,
        "forwards_per_token": round(result.forwards_per_token, 1),
        "seconds": round(result.seconds, 3),
    }


def evaluate_llm(
    mode: str, sessions: Sequence[LLMSession], *, wire: str, attacker: Attacker | None
) -> dict[str, Any]:
    streams = [stream for s in sessions for stream in s.capture.streams()]
    texts = [s.prompt for s in sessions] + [s.text for s in sessions if len(s.text) >= 8]
    ids = [s.prompt_ids for s in sessions] + [s.token_ids for s in sessions]
    text, text_examples = _count([TextLeakDetector(texts)], streams)
    token, token_examples = _count([TokenIdDetector(ids)], streams)
    tensors = [t for s in sessions for t in s.sent + s.received]
    hidden, hidden_examples = _count([HiddenStateDetector(tensors, wire)], streams)
    main = sessions[0]
    frames = plaintext_frames(main.capture.streams())
    head_out, trunk_out = session_tensors(frames)
    inversion = replay = None
    if attacker is not None and head_out:
        inversion = attacker.invert(head_out[0], wire, main.prompt_ids)
        replay = attacker.replay(trunk_out, main.token_ids)
    result: dict[str, Any] = {
        "wire": wire_view(streams),
        "detectors": {"text": text, "token_ids": token, "hidden_states": hidden},
        "examples": text_examples + token_examples + hidden_examples,
        "frames_decoded": len(frames),
        "attacks": {"inversion": _score(inversion), "tail_replay": _score(replay)} if attacker else {},
        "traffic": traffic_leak(sessions),
        "prompt_tokens": len(main.prompt_ids),
        "new_tokens": len(main.token_ids),
    }
    checks = [
        check("no prompt or output text on the wire", text == 0, f"{text} findings"),
        check("no token-id sequences on the wire", token == 0, f"{token} findings"),
    ]
    if mode == "plain":
        checks.append(check("plain shows hidden-state windows (control)", hidden > 0, f"{hidden} findings"))
        if attacker is not None:
            for name, res in (("exact inversion", inversion), ("tail replay", replay)):
                acc = res.accuracy if res is not None else 0.0
                checks.append(check(f"plain: {name} recovers 100 %", acc == 1.0, f"accuracy {acc}"))
    else:
        checks += [
            check("no plaintext hidden-state windows", hidden == 0, f"{hidden} findings"),
            check("no frame decodes, 0 tokens recovered", not frames, f"{len(frames)} frames"),
        ]
    result["checks"] = checks
    return result


def _diffusion_steps(frames: Sequence[CapturedFrame]) -> list[Any]:
    from lambda_split.diffusion import CapturedStep
    from lambda_split.protocol import FrameKind

    requests = {(f.stream, f.frame.seq): f.frame for f in frames if f.frame.kind is FrameKind.DIFFUSION_STEP}
    replies = {(f.stream, f.frame.seq): f.frame for f in frames if f.frame.kind is FrameKind.DIFFUSION_RESULT}
    steps = []
    for key in sorted(requests):
        if key in replies and "noise_pred" in replies[key].tensors:
            request = requests[key]
            timestep = float(request.tensors["timestep"].reshape(-1)[0])
            steps.append(
                CapturedStep(request.tensors["latents"], timestep, replies[key].tensors["noise_pred"])
            )
    return steps


def _recorded_tensor_bytes(bodies: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """The encoded tensors (embeddings, latents, noise) of every frame the client sent or received."""
    from lambda_split.protocol import FrameError, decode_frame

    out = []
    for body in (b for pair in bodies for b in pair):
        try:
            frame = decode_frame(body)
        except FrameError:
            continue
        out += [encode_wire(t, frame.encodings[n].wire_name) for n, t in frame.tensors.items()]
    return out


def evaluate_diffusion(mode: str, session: DiffusionSession, *, wire: str, guidance: float) -> dict[str, Any]:
    streams = session.capture.streams()
    pixels = (np.clip(np.asarray(session.image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    text, text_examples = _count([TextLeakDetector([session.prompt])], streams)
    image, image_examples = _count([PixelDetector([pixels]), ImageSignatureDetector()], streams)
    latent_detector = HiddenStateDetector(_recorded_tensor_bytes(session.bodies), lambda b: b, name="latents")
    latents, latent_examples = _count([latent_detector], streams)
    frames = plaintext_frames(streams)
    steps = _diffusion_steps(frames)
    leaks = []
    if steps:
        from lambda_split.diffusion import eavesdrop_decode

        pipe = session.pipeline
        leaks = eavesdrop_decode(
            pipe.vae, pipe.scheduler.config, steps, session.image, guidance_scale=guidance
        )
    checks = [
        check("no prompt text on the wire", text == 0, f"{text} findings"),
        check("no pixels or encoded images on the wire", image == 0, f"{image} findings"),
    ]
    if mode == "plain":
        checks.append(check("plain shows the latents (control)", latents > 0, f"{latents} findings"))
    else:
        checks += [
            check("no plaintext latents or noise", latents == 0, f"{latents} findings"),
            check("no frame decodes", not frames, f"{len(frames)} frames"),
        ]
    return {
        "wire": wire_view(streams),
        "detectors": {"text": text, "pixels": image, "latents": latents},
        "examples": text_examples + image_examples + latent_examples,
        "frames_decoded": len(frames),
        "latent_attack": [
            {
                "step": leak.step,
                "timestep": round(leak.timestep, 2),
                "ssim_latents": round(leak.ssim_latents, 4),
                "ssim_x0": round(leak.ssim_x0, 4),
                "psnr_x0": round(leak.psnr_x0, 2) if math.isfinite(leak.psnr_x0) else None,
            }
            for leak in leaks
        ],
        "checks": checks,
    }
