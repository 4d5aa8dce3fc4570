"""Attack sweep: how much of a session a frame reader recovers, per split depth and wire encoding.

The tensors are exactly those a plaintext frame would carry (computed locally through the
wire encoding's round trip, which tests show equals the codec), so the sweep needs no
server. For each depth ``A`` (split ``A:B``, ``B`` fixed at ``N - 2`` or ``A`` if deeper):

* exact inversion (SipIt) of the head's prefill output -> prompt tokens, with its cost in
  candidate head forwards per token;
* tail replay of the trunk's outputs -> generated tokens (greedy);
* ridge probe and nearest single-token dictionary: cheap baselines, fitted once per depth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from threat_model.attacks import (
    AttackResult,
    cached_step_fn,
    dictionary_attack,
    invert_prompt,
    model_order_fn,
    ridge_probe_attack,
    tail_replay,
    wire_roundtrip,
)

WIRES = ("fp32", "fp16", "bf16", "int8")
ATTACKS = ("inversion", "tail_replay", "ridge_probe", "dictionary")
DEFAULT_DEPTHS = {"tiny-random-llama": (1, 2, 4, 6), "smollm2-135m": (1, 2, 4, 8, 12)}

__all__ = ["ATTACKS", "DEFAULT_DEPTHS", "WIRES", "attack_sweep", "default_depths"]


def default_depths(model: str, num_layers: int) -> tuple[int, ...]:
    if model in DEFAULT_DEPTHS:
        return DEFAULT_DEPTHS[model]
    return tuple(sorted({d for d in (1, 2, 4, num_layers // 4, num_layers // 2) if 0 < d < num_layers}))


Capture = Callable[[torch.Tensor, str], torch.Tensor]


def frame_capture(tensor: torch.Tensor, wire: str) -> torch.Tensor:
    """What an eavesdropper decodes from the plaintext frame carrying ``tensor``: the project's
    own frame, encoded and decoded again (a broken decoder would show here, not be assumed away)."""
    from lambda_split.protocol import Encoding, FrameKind, decode_frame, encode_frame

    frame = encode_frame(FrameKind.LLM_STEP, bytes(16), 0, {"hidden": (tensor, Encoding.parse(wire))})
    decoded: torch.Tensor = decode_frame(frame).tensors["hidden"]
    return decoded


@torch.inference_mode()
def _session(
    parts: Any, ids: torch.Tensor, steps: int, wire: str, capture: Capture
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """A greedy split session: (prefill as captured, trunk outputs as captured, the client's tokens).

    The client computes on what it sent and received; the attacker gets what ``capture``
    yields for each frame. The tokens are the client's, so scoring against them is scoring
    against ground truth, not against something recomputed from the capture.
    """
    states = [parts.head.new_state(), parts.trunk.new_state(), parts.tail.new_state()]
    first: torch.Tensor | None = None
    returned, tokens, x = [], [], ids
    for _ in range(steps):
        sent = wire_roundtrip(parts.head(x, state=states[0]), wire)
        first = capture(sent, wire) if first is None else first
        back = wire_roundtrip(parts.trunk(sent, state=states[1]), wire)
        returned.append(capture(back, wire))
        tokens.append(int(parts.tail(back, state=states[2])[0, -1].argmax()))
        x = torch.tensor([[tokens[-1]]])
    if first is None:
        raise ValueError("steps must be at least 1")
    return first, returned, tokens


def _logits_fn(parts: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def logits(ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = parts.tail(parts.trunk(parts.head(ids)))  # (B, T, V)
        return out

    return logits


def _row(depth: int, wire: str, attack: str, result: AttackResult, tokens: int) -> dict[str, Any]:
    hits = sum(a == b for a, b in zip(result.recovered[:tokens], result.truth or [], strict=False))
    return {
        "depth": depth,
        "wire": wire,
        "attack": attack,
        "accuracy": hits / max(tokens, 1),
        "tokens": tokens,
        "forwards_per_token": round(result.forwards / max(tokens, 1), 1),
        # candidates an unbatched SipIt would try per token (rank of the truth in the model's order, + 1)
        "mean_candidates": round(sum(r + 1 for r in result.ranks) / len(result.ranks), 1)
        if result.ranks
        else None,
        "seconds": round(result.seconds, 3),
    }


def attack_sweep(
    checkpoint: Any,
    prompt_ids: Sequence[int],
    *,
    depths: Sequence[int],
    wires: Sequence[str] = WIRES,
    new_tokens: int = 8,
    progress: Callable[[str], None] = lambda _m: None,
    capture: Capture = frame_capture,
) -> list[dict[str, Any]]:
    """One row per (depth, wire, attack): accuracy against the client's tokens, cost, seconds.

    ``capture`` turns each tensor the client sent or received into what the eavesdropper
    holds (by default: the plaintext frame, decoded).
    """
    from lambda_split import SplitSpec, load_parts

    layers = int(checkpoint.config.num_hidden_layers)
    vocab = int(checkpoint.config.vocab_size)
    ids = torch.tensor([list(prompt_ids)])
    bos = checkpoint.tokenizer.bos_token_id
    bos_first = bos if prompt_ids and prompt_ids[0] == bos else None
    rows: list[dict[str, Any]] = []
    for depth in depths:
        if not 0 < depth < layers:
            raise ValueError(f"split depth {depth} is outside 1..{layers - 1}")
        spec = SplitSpec(depth, max(depth, layers - 2), layers)
        parts: Any = load_parts(checkpoint, spec, ("head", "trunk", "tail"))
        order = model_order_fn(_logits_fn(parts), vocab, bos)
        captured: dict[str, torch.Tensor] = {}
        for wire in wires:
            progress(f"sweep: split {spec}, {wire} wire")
            sent, returned, generated = _session(parts, ids, new_tokens, wire, capture)
            captured[wire] = sent
            truth = list(prompt_ids)
            inversion = invert_prompt(
                sent, None, order, encoding=wire, truth=truth, step_fn=cached_step_fn(parts.head)
            )
            rows.append(_row(depth, wire, "inversion", inversion, len(truth)))
            replay = tail_replay(returned, parts.tail, prompt_length=ids.shape[1], truth=generated)
            rows.append(_row(depth, wire, "tail_replay", replay, len(generated)))
        # One fit and one table per depth, applied to every wire's capture at once.
        stacked = torch.cat([captured[w].reshape(-1, captured[w].shape[-1]) for w in wires])
        truth_all = list(prompt_ids) * len(wires)
        embeddings = parts.head.embed_tokens.weight
        ridge = ridge_probe_attack(stacked, parts.head, embeddings, truth=truth_all, bos_id=bos_first)
        lookup = dictionary_attack(stacked, parts.head, vocab, bos_id=bos_first, truth=truth_all)
        n = len(prompt_ids)
        for k, wire in enumerate(wires):
            for name, result in (("ridge_probe", ridge), ("dictionary", lookup)):
                part = AttackResult(
                    result.name,
                    result.recovered[k * n : (k + 1) * n],
                    list(prompt_ids),
                    result.seconds,
                    result.forwards,
                )
                rows.append(_row(depth, wire, name, part, n))
    return rows


def recovery_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """``table[attack][wire][depth] = accuracy``."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for row in rows:
        table.setdefault(row["attack"], {}).setdefault(row["wire"], {})[int(row["depth"])] = float(
            row["accuracy"]
        )
    return table
