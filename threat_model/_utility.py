"""Defended sessions run locally, and what a defence costs in output quality.

A session here is the client's own decoding loop (:func:`lambda_split.generate_tokens`) with a
local trunk behind the defence, so the tokens are the ones a defended client would get, and the
frames recorded are exactly what would cross the uplink (``wire`` round trip included).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lambda_split import GenerationConfig, SplitSpec, generate_tokens, load_parts
from threat_model._frontier_defs import SessionDefence
from threat_model.attacks import wire_roundtrip

__all__ = ["DefendedSession", "PartsCache", "agreement", "perplexity", "run_session"]


class PartsCache:
    """Head, trunk and tail split at each depth ``A`` (``A:N-2``), loaded once."""

    def __init__(self, checkpoint: Any) -> None:
        self.checkpoint = checkpoint
        self.layers = int(checkpoint.config.num_hidden_layers)
        self._parts: dict[int, Any] = {}

    def __call__(self, depth: int) -> Any:
        if not 0 < depth < self.layers:
            raise ValueError(f"split depth {depth} is outside 1..{self.layers - 1}")
        if depth not in self._parts:
            spec = SplitSpec(depth, max(depth, self.layers - 2), self.layers)
            self._parts[depth] = load_parts(self.checkpoint, spec, ("head", "trunk", "tail"))
        return self._parts[depth]


@dataclass
class DefendedSession:
    depth: int
    sent: list[torch.Tensor] = field(default_factory=list)  # what crossed the uplink, per step
    returned: list[torch.Tensor] = field(default_factory=list)  # the trunk's answers, per step
    tokens: list[int] = field(default_factory=list)  # the client's generated tokens


def _trunk_fn(
    parts: Any, defence: SessionDefence, wire: str, session: DefendedSession
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    state = parts.trunk.new_state()

    def trunk(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        crossed = wire_roundtrip(defence.uplink(hidden), wire)  # (B, T, d) as the peer decodes it
        session.sent.append(crossed)
        back = wire_roundtrip(parts.trunk(defence.restore(crossed), mask, state), wire)
        session.returned.append(back)
        return back

    return trunk


@torch.inference_mode()
def run_session(
    parts_at: PartsCache,
    tokenizer: Any,
    ids: Sequence[int],
    defence: SessionDefence,
    *,
    new_tokens: int,
    wire: str = "fp32",
) -> DefendedSession:
    """One greedy session of ``new_tokens`` tokens (no early stop) for the prompt ``ids``."""
    parts = parts_at(defence.depth)
    session = DefendedSession(defence.depth)
    input_ids = torch.tensor([list(ids)])
    result = generate_tokens(
        parts.head,
        _trunk_fn(parts, defence, wire, session),
        parts.tail,
        tokenizer,
        input_ids,
        torch.ones_like(input_ids),
        GenerationConfig(max_new_tokens=new_tokens, stop_on_eos=False),
    )
    session.tokens = result.token_ids[0]
    return session


def agreement(reference: Sequence[int], tokens: Sequence[int]) -> float:
    """The share of ``reference`` that ``tokens`` reproduces before the first difference."""
    same = 0
    for a, b in zip(reference, tokens, strict=False):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


@torch.inference_mode()
def perplexity(
    parts_at: PartsCache,
    texts: Sequence[Sequence[int]],
    make_defence: Callable[[int], SessionDefence],
    *,
    wire: str = "fp32",
) -> tuple[float, int]:
    """Perplexity of the split model with the defence on the uplink over token sequences
    ``texts`` (teacher forcing, one defended session per text); (perplexity, tokens scored)."""
    total, count = 0.0, 0
    for index, ids in enumerate(texts):
        defence = make_defence(index)
        parts = parts_at(defence.depth)
        x = torch.tensor([list(ids)])
        crossed = wire_roundtrip(defence.uplink(parts.head(x)), wire)
        hidden = wire_roundtrip(parts.trunk(defence.restore(crossed)), wire)
        logits = parts.tail(hidden)[0, :-1].float()  # (T-1, V)
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        total += float(nll)
        count += x.shape[1] - 1
    return math.exp(total / max(count, 1)), count
