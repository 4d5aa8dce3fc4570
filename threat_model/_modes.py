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
from threat_model._completeness import completeness
from threat_model._live import DiffusionSession, LLMSession
from threat_model._websocket import is_websocket
from threat_model.attacks import (
    AttackResult,
    cached_step_fn,
    invert_prompt,
    model_order_fn,
    tail_replay,
    wire_roundtrip,
)
from threat_model.detectors import (
    IN_FRAME,
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


DETECTOR_CHECKS = {
    "text": "no prompt or output text on the wire",
    "token_ids": "no token-id sequences on the wire",
    "hidden_states": "no plaintext hidden-state windows",
}


def check(name: str, passed: bool, detail: str = "") -> dict[str, Any]:
    return {"check": name, "passed": bool(passed), "detail": detail}


def scan_llm(
    streams: Sequence[TcpStream],
    texts: Sequence[str],
    ids: Sequence[Sequence[int]],
    tensors: Sequence[torch.Tensor],
    wire: str,
) -> tuple[dict[str, int], list[str]]:
    """Run the text, token-id and hidden-state detectors; findings per detector and a few examples."""
    text, text_examples = _count([TextLeakDetector(texts)], streams)
    token, token_examples = _count([TokenIdDetector(ids)], streams)
    found = scan_streams([HiddenStateDetector(tensors, wire)], streams)
    masked = sum(f.direction == "c2s" and f.variant.endswith(IN_FRAME) for f in found)
    counts = {
        "text": text,
        "token_ids": token,
        "hidden_states": len(found),
        "hidden_in_masked_frames": masked,
    }
    return counts, text_examples + token_examples + [str(f) for f in found[:3]]


def _count(detectors: Sequence[Detector], streams: Sequence[TcpStream]) -> tuple[int, list[str]]:
    findings = scan_streams(detectors, streams)
    return len(findings), [str(f) for f in findings[:3]]


def wire_view(streams: Sequence[TcpStream], mode: str = "plain") -> dict[str, Any]:
    """What a passive observer delimits: HTTP requests (ids masked), WebSocket messages, TLS records,
    sealed AES-GCM records (``/v1/secure`` bodies; in ``aesgcm`` also binary stream messages, each
    one sealed record, as the allowlist checks)."""
    requests: Counter[str] = Counter()
    records: Counter[str] = Counter()
    frames: Counter[str] = Counter()
    kinds: set[str] = set()
    sealed = {"c2s": 0, "s2c": 0}
    for stream in streams:
        found = messages(stream)
        kinds.add(
            "websocket"
            if any(m.kind == "ws-message" for m in found)
            else found[0].kind.split("-")[0]
            if found
            else "none"
        )
        for message in found:
            if message.kind == "http-request":
                line = re.sub(r"/[0-9a-f]{16,}", "/{id}", message.detail.rsplit(" ", 1)[0])
                requests[line] += 1
                if line.endswith("/v1/secure"):
                    sealed["c2s"] += 1
                    sealed["s2c"] += 1
            elif message.kind == "ws-message":
                frames[f"{message.direction} {message.detail}"] += 1
                if mode == "aesgcm" and message.detail == "binary":
                    sealed[message.direction] += 1
            elif message.kind == "tls-record":
                records[f"{message.direction} {message.detail}"] += 1
    return {
        "connections": len(streams),
        "complete": all(s.complete for s in streams),
        "bytes": {"c2s": sum(len(s.c2s.data) for s in streams), "s2c": sum(len(s.s2c.data) for s in streams)},
        "visible_as": sorted(kinds),
        "http_requests": dict(sorted(requests.items())),
        "tls_records": dict(sorted(records.items())),
        "websocket_messages": dict(sorted(frames.items())),
        "sealed_records": sealed,
    }


def _exchanges(streams: Sequence[TcpStream]) -> list[tuple[str, int]]:
    """Observable messages merged into alternating (direction, bytes) runs, in time order."""
    found = sorted((m for s in streams for m in messages(s) if m.kind != "http-chunk"), key=lambda m: m.ts)
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


def session_shape(streams: Sequence[TcpStream]) -> Shape | None:
    """The attacker's reading: the longest run of equal-sized requests is the decode loop, the one before it the prefill."""
    exchanges = _exchanges(streams)
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
    shapes = [session_shape(s.record.streams()) for s in sessions]
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
        self.hidden_size = int(checkpoint.config.hidden_size)
        self.order = model_order_fn(self._logits, self.vocab, checkpoint.tokenizer.bos_token_id)

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.parts.tail(self.parts.trunk(self.parts.head(ids)))  # (B, T, V)
        return out

    @torch.inference_mode()
    def invert(self, captured: Sequence[torch.Tensor], wire: str, truth: Sequence[int]) -> AttackResult:
        """SipIt on the first head output the capture yielded (none: the attack recovers nothing)."""
        step = cached_step_fn(self.parts.head)
        rows = captured[0] if captured else torch.empty(0, self.hidden_size)
        return invert_prompt(rows, None, self.order, encoding=wire, truth=truth, step_fn=step)

    def replay(
        self, returned: Sequence[torch.Tensor], prompt_length: int, truth: Sequence[int]
    ) -> AttackResult:
        """Tail replay of the trunk outputs the capture yielded, scored against the client's tokens."""
        return tail_replay(returned, self.parts.tail, prompt_length=prompt_length, truth=truth)


def _score(result: AttackResult, frames: int) -> dict[str, Any]:
    return {
        "ran_on_frames": frames,
        "recovered": sum(a == b for a, b in zip(result.recovered, result.truth or [], strict=False)),
        "of": len(result.truth or []),
        "accuracy": result.accuracy,
        "forwards_per_token": round(result.forwards_per_token, 1),
        "seconds": round(result.seconds, 3),
    }


def evaluate_llm(
    mode: str, sessions: Sequence[LLMSession], *, wire: str, attacker: Attacker
) -> dict[str, Any]:
    """Completeness first, then the allowlist, the detectors and the attacks on what the capture yields."""
    from threat_model.allowlist import allowlist_checks

    complete, checks = completeness([s.record for s in sessions])
    per_session = [s.record.streams() for s in sessions]
    streams = [stream for found in per_session for stream in found]
    texts = [s.prompt for s in sessions] + [s.text for s in sessions if len(s.text) >= 8]
    ids = [s.prompt_ids for s in sessions] + [s.token_ids for s in sessions]
    # what the head computed, what a peer decodes from it (wire-rounded), and what came back
    tensors = [t for s in sessions for t in s.sent + [wire_roundtrip(x, wire) for x in s.sent] + s.received]
    counts, examples = scan_llm(streams, texts, ids, tensors, wire)
    main = sessions[0]
    frames = plaintext_frames(per_session[0])
    head_out, trunk_out = session_tensors(frames)
    # Scored against the client's own prompt and output tokens, never against the capture.
    inversion = attacker.invert(head_out, wire, main.prompt_ids)
    replay = attacker.replay(trunk_out, len(main.prompt_ids), main.token_ids)
    result: dict[str, Any] = {
        "completeness": complete,
        "wire": wire_view(streams, mode),
        "detectors": counts,
        "examples": examples,
        "frames_decoded": len(frames),
        "attacks": {"inversion": _score(inversion, len(frames)), "tail_replay": _score(replay, len(frames))},
        "traffic": traffic_leak(sessions),
        "prompt_tokens": len(main.prompt_ids),
        "new_tokens": len(main.token_ids),
    }
    if mode != "plain":
        checks += allowlist_checks(mode, per_session)
    checks += [
        check(DETECTOR_CHECKS[name], counts[name] == 0, f"{counts[name]} findings")
        for name in ("text", "token_ids")
    ]
    hidden = counts["hidden_states"]
    if mode == "plain":
        checks.append(check("plain shows hidden-state windows (control)", hidden > 0, f"{hidden} findings"))
        if any(is_websocket(s) for s in streams):
            masked = counts["hidden_in_masked_frames"]
            checks.append(
                check(
                    "plain: hidden states found inside the masked client-to-server WebSocket frames (control)",
                    masked > 0,
                    f"{masked} findings",
                )
            )
        for name, res in (("exact inversion", inversion), ("tail replay", replay)):
            checks.append(
                check(
                    f"plain: {name} of the capture recovers 100 %",
                    res.accuracy == 1.0,
                    f"accuracy {res.accuracy}",
                )
            )
    else:
        recovered = _score(inversion, 0)["recovered"] + _score(replay, 0)["recovered"]
        checks += [
            check(DETECTOR_CHECKS["hidden_states"], hidden == 0, f"{hidden} findings"),
            check(
                "no frame decodes, 0 tokens recovered",
                not frames and recovered == 0,
                f"{len(frames)} frames, {recovered} tokens recovered",
            ),
        ]
    result["checks"] = checks
    return result


def _diffusion_steps(frames: Sequence[CapturedFrame]) -> list[Any]:
    """The U-Net calls an eavesdropper rebuilds from decoded frames: per-step calls as sent, and
    latents-on-server calls by replaying the server's scheduler from the session's first frame."""
    from lambda_split.diffusion import captured_frame_steps
    from lambda_split.protocol import FrameKind

    replies = {(f.stream, f.frame.seq): f.frame for f in frames if f.frame.kind is FrameKind.DIFFUSION_RESULT}
    requests = {
        (f.stream, f.frame.seq): f.frame for f in frames if f.frame.kind is not FrameKind.DIFFUSION_RESULT
    }
    return list(captured_frame_steps((requests[k], replies[k]) for k in sorted(requests) if k in replies))


def _recorded_tensors(bodies: Sequence[tuple[bytes, bytes]]) -> tuple[list[bytes], list[torch.Tensor]]:
    """The tensors (embeddings, latents, noise) of every frame the client sent or received:
    as the codec encoded them, and decoded (for the other float formats and text armour)."""
    from lambda_split.protocol import Encoding, FrameError, decode_frame

    encoded, decoded = [], []
    for body in (b for pair in bodies for b in pair):
        try:
            frame = decode_frame(body)
        except FrameError:
            continue
        for name, tensor in frame.tensors.items():
            if frame.encodings[name] is Encoding.U8:  # byte strings (a scheduler's JSON): as sent
                encoded.append(bytes(tensor.numpy().tobytes()))
                continue
            encoded.append(encode_wire(tensor, frame.encodings[name].wire_name))
            if tensor.numel() >= 32:
                decoded.append(tensor)
    return encoded, decoded


def evaluate_diffusion(mode: str, session: DiffusionSession, *, wire: str, guidance: float) -> dict[str, Any]:
    from threat_model.allowlist import allowlist_checks

    complete, checks = completeness([session.record])
    streams = session.record.streams()
    pixels = (np.clip(np.asarray(session.image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    text, text_examples = _count([TextLeakDetector([session.prompt])], streams)
    floats = HiddenStateDetector([session.image], "fp32", window=256, name="pixels")
    image, image_examples = _count([PixelDetector([pixels]), ImageSignatureDetector(), floats], streams)
    token, token_examples = _count([TokenIdDetector([session.prompt_ids])], streams)
    encoded, decoded = _recorded_tensors(session.bodies)
    exact = HiddenStateDetector(encoded, lambda b: b, name="latents", widen=False)
    latents, latent_examples = _count([exact, HiddenStateDetector(decoded, "fp32", name="latents")], streams)
    frames = plaintext_frames(streams)
    steps = _diffusion_steps(frames)
    leaks = []
    if steps:
        from lambda_split.diffusion import eavesdrop_decode

        pipe = session.pipeline
        leaks = eavesdrop_decode(
            pipe.vae, pipe.scheduler.config, steps, session.image, guidance_scale=guidance
        )
    if mode != "plain":
        checks += allowlist_checks(mode, [streams])
    checks += [
        check("no prompt text on the wire", text == 0, f"{text} findings"),
        check("no pixels or encoded images on the wire", image == 0, f"{image} findings"),
        check("no prompt token ids on the wire", token == 0, f"{token} findings"),
    ]
    if mode == "plain":
        checks.append(check("plain shows the latents (control)", latents > 0, f"{latents} findings"))
        checks.append(
            check("plain: the captured steps decode to images (control)", bool(leaks), f"{len(leaks)} steps")
        )
    else:
        checks += [
            check("no plaintext latents or noise", latents == 0, f"{latents} findings"),
            check("no frame decodes", not frames, f"{len(frames)} frames"),
        ]
    return {
        "completeness": complete,
        "wire": wire_view(streams, mode),
        "detectors": {"text": text, "pixels": image, "token_ids": token, "latents": latents},
        "examples": text_examples + image_examples + token_examples + latent_examples,
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
