"""Known-model attacks on captured hidden states: what a plaintext frame gives away.

The attacker has the public model (the weights are the same on every device) and the
tensors of a session: the head's outputs (sent to the trunk) and the trunk's outputs
(returned). Everything here takes plain callables, so the attacks run against
``lambda_split``'s parts or against any model sliced by hand:

``head_fn(ids)``            (B, T) token ids -> (B, T, d) hidden states at the cut
``order_fn(prefix)``        list of ids -> 1-D tensor of all candidate ids, most likely first
``tail_fn(hidden)``         (B, T, d) trunk outputs -> (B, T, V) logits

* :func:`tail_replay` runs the public tail on captured trunk outputs and reads off the
  generated tokens (exactly, under greedy decoding).
* :func:`invert_prompt` recovers the prompt token by token, SipIt-style ("Language Models
  are Injective and Hence Invertible", 2025): at position i it tries candidates in the
  order the public model predicts, runs the head on prefix+candidate in batches, and keeps
  the candidate whose hidden state is nearest (L2) to the captured one; it stops early once
  the distance is within the wire quantisation bound, so fp16/bf16/int8 rounding does not
  defeat it.
* :func:`ridge_probe_attack` and :func:`dictionary_attack` are the cheap baselines: a linear
  map fitted on random sequences only, and nearest neighbour among single-token states.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "AttackResult",
    "cached_step_fn",
    "dictionary_attack",
    "invert_prompt",
    "model_order_fn",
    "quantisation_bound",
    "recompute_step_fn",
    "ridge_probe_attack",
    "tail_replay",
    "wire_roundtrip",
]

HeadFn = Callable[[torch.Tensor], torch.Tensor]
OrderFn = Callable[[Sequence[int]], torch.Tensor]
TailFn = Callable[[torch.Tensor], torch.Tensor]
#: ``step_fn(prefix, candidates)``: (B,) candidate ids after ``prefix`` -> (B, d) hidden at that position.
StepFn = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackResult:
    """Recovered token ids, scored against the truth when it is known."""

    name: str
    recovered: list[int]
    truth: list[int] | None
    seconds: float
    forwards: int = 0  # candidate sequences run through the head
    distances: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)  # where the kept candidate sat in the search order

    @property
    def accuracy(self) -> float | None:
        if self.truth is None:
            return None
        if not self.truth:
            return 1.0
        hits = sum(a == b for a, b in zip(self.recovered, self.truth, strict=False))
        return hits / len(self.truth)

    @property
    def forwards_per_token(self) -> float:
        return self.forwards / max(len(self.recovered), 1)

    def summary(self) -> dict[str, float | int | str | None]:
        return {
            "attack": self.name,
            "tokens": len(self.recovered),
            "accuracy": self.accuracy,
            "forwards_per_token": self.forwards_per_token,
            "seconds": round(self.seconds, 3),
        }


def wire_roundtrip(tensor: torch.Tensor, encoding: str) -> torch.Tensor:
    """What the peer decodes: ``tensor`` encoded in a wire encoding and decoded again (float32)."""
    x = tensor.detach().to("cpu", torch.float32)
    if encoding == "fp32":
        return x.clone()
    if encoding in ("fp16", "bf16"):
        return x.to(torch.float16 if encoding == "fp16" else torch.bfloat16).to(torch.float32)
    if encoding != "int8":
        raise ValueError(f"unknown wire encoding {encoding!r}")
    flat = x.reshape(-1)
    blocks = math.ceil(flat.numel() / 64)
    padded = torch.zeros(blocks * 64)
    padded[: flat.numel()] = flat
    padded = padded.view(blocks, 64)  # (nblocks, 64)
    # each block's scale max|x| / 127 travels as fp16, rounded up, at least 2**-24 (frame version 2)
    exact = padded.abs().amax(dim=1).numpy().astype(np.float64) / 127.0
    half = exact.astype(np.float16)
    with np.errstate(over="ignore"):
        half = np.where(half < exact, np.nextafter(half, np.float16(np.inf)), half)
    scales = torch.from_numpy(np.maximum(half, np.float16(2.0**-24)).astype(np.float32))
    q = torch.round(padded / scales[:, None]).clamp(-127, 127)
    return (q * scales[:, None]).reshape(-1)[: flat.numel()].view_as(x)


def quantisation_bound(row: torch.Tensor, encoding: str) -> float:
    """An upper bound on ``||x - roundtrip(x)||`` for a captured row, plus slack for batching noise."""
    row = row.detach().to(torch.float32).reshape(-1)
    norm = float(row.norm())
    relative = {"fp32": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8}
    if encoding in relative:
        bound = relative[encoding] * norm
    elif encoding == "int8":
        blocks = torch.nn.functional.pad(row, (0, (-row.numel()) % 64)).view(-1, 64)
        bound = float(((blocks.abs().amax(dim=1) / 254.0) ** 2 * 64).sum().sqrt())
    else:
        raise ValueError(f"unknown wire encoding {encoding!r}")
    return 1.5 * bound + 1e-4 * norm + 1e-6


@torch.inference_mode()
def tail_replay(
    trunk_outputs: Sequence[torch.Tensor],
    tail_fn: TailFn,
    *,
    prompt_length: int,
    truth: Sequence[int] | None = None,
) -> AttackResult:
    """Run the public tail over the captured trunk outputs of one greedy session.

    ``trunk_outputs`` are the returned tensors in order: the prefill (1, T, d) then one
    (1, 1, d) per decode step. The argmax at the last prompt position and at every step is
    the generated token.
    """
    start = time.perf_counter()
    recovered: list[int] = []
    if trunk_outputs:  # nothing captured: the attack runs and recovers nothing
        hidden = torch.cat([t.to(torch.float32).reshape(1, -1, t.shape[-1]) for t in trunk_outputs], dim=1)
        logits = tail_fn(hidden)  # (1, L, V)
        recovered = logits[0, max(prompt_length - 1, 0) :].argmax(dim=-1).tolist()
    if truth is not None:
        recovered = recovered[: len(truth)]
    return AttackResult(
        "tail_replay", recovered, list(truth) if truth is not None else None, time.perf_counter() - start
    )


def model_order_fn(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], vocab_size: int, bos_id: int | None = None
) -> OrderFn:
    """Candidate order from the public model: most likely next token first.

    For the empty prefix, BOS comes first (the tokenizer usually adds it), then the
    model's prediction after BOS; without a BOS, ids in increasing order.
    """

    @torch.inference_mode()
    def order(prefix: Sequence[int]) -> torch.Tensor:
        if not prefix:
            if bos_id is None:
                return torch.arange(vocab_size)
            after = logits_fn(torch.tensor([[bos_id]]))[0, -1, :vocab_size]
            ranked = torch.argsort(after, descending=True)
            return torch.cat([torch.tensor([bos_id]), ranked[ranked != bos_id]])
        logits = logits_fn(torch.tensor([list(prefix)]))[0, -1, :vocab_size]  # (V,)
        return torch.argsort(logits, descending=True)

    return order


def recompute_step_fn(head_fn: HeadFn) -> StepFn:
    """A step function that reruns the head on the whole prefix for every candidate batch."""

    def step(prefix: Sequence[int], candidates: torch.Tensor) -> torch.Tensor:
        context = torch.tensor(list(prefix), dtype=torch.long).expand(len(candidates), len(prefix))
        return head_fn(torch.cat([context, candidates[:, None]], dim=1))[:, -1]  # (B, d)

    return step


def cached_step_fn(head: Any) -> StepFn:
    """A step function that reuses the prefix KV cache of a ``lambda_split`` Head.

    The prefix is run once (extended by one token per position) and its cache is
    repeated across the candidate batch, so each candidate costs one token, not i + 1.
    """
    memo: dict[str, Any] = {"prefix": [], "state": None}

    def step(prefix: Sequence[int], candidates: torch.Tensor) -> torch.Tensor:
        prefix = list(prefix)
        if not prefix:
            first: torch.Tensor = head(candidates[:, None])[:, -1]
            return first
        known: list[int] = memo["prefix"]
        if memo["state"] is None or prefix[: len(known)] != known or len(known) > len(prefix):
            memo["state"], known = head.new_state(), []
        if len(known) < len(prefix):
            head(torch.tensor([prefix[len(known) :]]), state=memo["state"])
            memo["prefix"] = prefix
        state = copy.deepcopy(memo["state"])
        state.cache.batch_repeat_interleave(len(candidates))
        state.mask = state.mask.repeat(len(candidates), 1)
        out: torch.Tensor = head(candidates[:, None], state=state)[:, -1]  # (B, d)
        return out

    return step


@torch.inference_mode()
def invert_prompt(
    captured: torch.Tensor,
    head_fn: HeadFn | None,
    order_fn: OrderFn,
    *,
    encoding: str = "fp32",
    batch_size: int = 256,
    truth: Sequence[int] | None = None,
    max_candidates: int | None = None,
    step_fn: StepFn | None = None,
) -> AttackResult:
    """Recover the token ids behind captured head outputs ``captured`` (T, d) or (1, T, d).

    At each position the search stops at the first batch holding a candidate within
    :func:`quantisation_bound` of the captured row; otherwise (or after ``max_candidates``)
    the nearest candidate seen is kept. ``step_fn`` (e.g. :func:`cached_step_fn`) replaces
    rerunning ``head_fn`` on the whole prefix.
    """
    if step_fn is None:
        if head_fn is None:
            raise ValueError("give head_fn or step_fn")
        step_fn = recompute_step_fn(head_fn)
    rows = captured.detach().to(torch.float32).reshape(-1, captured.shape[-1])  # (T, d)
    start = time.perf_counter()
    prefix: list[int] = []
    distances: list[float] = []
    ranks: list[int] = []
    forwards = 0
    for position in range(rows.shape[0]):
        target = rows[position]
        bound = quantisation_bound(target, encoding)
        order = order_fn(prefix)
        if max_candidates is not None:
            order = order[:max_candidates]
        best = (math.inf, int(order[0]), 0)
        for first in range(0, len(order), batch_size):
            candidates = order[first : first + batch_size]
            distance = (step_fn(prefix, candidates).to(torch.float32) - target).norm(dim=-1)  # (B,)
            forwards += len(candidates)
            index = int(distance.argmin())
            if float(distance[index]) < best[0]:
                best = (float(distance[index]), int(candidates[index]), first + index)
            if best[0] <= bound:
                break
        prefix.append(best[1])
        distances.append(best[0])
        ranks.append(best[2])
    return AttackResult(
        "sipit_inversion",
        prefix,
        list(truth) if truth is not None else None,
        time.perf_counter() - start,
        forwards,
        distances,
        ranks,
    )


def _nearest(queries: torch.Tensor, table: torch.Tensor, *, cosine: bool) -> list[int]:
    if cosine:
        queries = torch.nn.functional.normalize(queries, dim=-1)
        table = torch.nn.functional.normalize(table, dim=-1)
        return (queries @ table.T).argmax(dim=-1).tolist()
    return torch.cdist(queries, table).argmin(dim=-1).tolist()


@torch.inference_mode()
def ridge_probe_attack(
    captured: torch.Tensor,
    head_fn: HeadFn,
    embeddings: torch.Tensor,
    *,
    train_sequences: int = 64,
    length: int = 32,
    ridge: float = 1.0,
    seed: int = 0,
    truth: Sequence[int] | None = None,
    bos_id: int | None = None,
) -> AttackResult:
    """Fit hidden -> input embedding by ridge regression on random sequences, then nearest embedding."""
    start = time.perf_counter()
    vocab, _ = embeddings.shape
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (train_sequences, length), generator=generator)
    if bos_id is not None:
        ids[:, 0] = bos_id
    x = head_fn(ids).reshape(-1, captured.shape[-1]).to(torch.float64)  # (N, d)
    y = embeddings.to(torch.float64)[ids.reshape(-1)]  # (N, e)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    weights = torch.linalg.solve(
        xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=torch.float64), xc.T @ (y - y_mean)
    )
    rows = captured.detach().reshape(-1, captured.shape[-1]).to(torch.float64)
    predicted = (rows - x_mean) @ weights + y_mean
    recovered = _nearest(predicted, embeddings.to(torch.float64), cosine=True)
    return AttackResult(
        "ridge_probe",
        recovered,
        list(truth) if truth is not None else None,
        time.perf_counter() - start,
        forwards=train_sequences * length,
    )


@torch.inference_mode()
def dictionary_attack(
    captured: torch.Tensor,
    head_fn: HeadFn,
    vocab_size: int,
    *,
    bos_id: int | None = None,
    batch_size: int = 1024,
    truth: Sequence[int] | None = None,
) -> AttackResult:
    """Nearest neighbour among the head outputs of every single token (after BOS if there is one)."""
    start = time.perf_counter()
    states = []
    for first in range(0, vocab_size, batch_size):
        ids = torch.arange(first, min(first + batch_size, vocab_size))[:, None]  # (B, 1)
        if bos_id is not None:
            ids = torch.cat([torch.full_like(ids, bos_id), ids], dim=1)
        states.append(head_fn(ids)[:, -1].to(torch.float32))
    table = torch.cat(states)  # (V, d)
    rows = captured.detach().reshape(-1, captured.shape[-1]).to(torch.float32)
    recovered = _nearest(rows, table, cosine=False)
    return AttackResult(
        "dictionary_nn",
        recovered,
        list(truth) if truth is not None else None,
        time.perf_counter() - start,
        forwards=vocab_size,
    )
