"""The privacy-utility frontier of the uplink defences (``lambda-split frontier``).

For each defence setting, every prompt of the shipped set runs as one defended greedy session
through the client's own decoding loop (local trunk, no server: the frames are exactly what a
plaintext uplink or a curious server would hold). Then:

* **recovery**, scored against the client's own prompt tokens (never recomputed from the
  capture): exact inversion as published (a candidate must match within the wire's rounding
  bound), the adapted inversion (:func:`threat_model._adaptive.invert_view`, or the depth-range
  attacker), and a ridge map and an MLP trained on the attacker's own defended states of text;
  plus tail replay of the answers (the downlink is not defended);
* **utility**: greedy agreement with the undefended output (the share of the answer reproduced
  before the first difference, and the share of prompts whose first ``k`` tokens agree), and
  perplexity on shipped prose (``threat_model/data/prose.txt``), against the undefended model.

A defence counts as useful only if the strongest inversion falls to 5 % or less.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from threat_model._adaptive import LearnedDecoder, identity, invert_depth_range, invert_view
from threat_model._frontier_defs import SessionDefence, Setting
from threat_model._utility import PartsCache, agreement, perplexity, run_session
from threat_model.attacks import cached_step_fn, model_order_fn, quantisation_bound, tail_replay

__all__ = ["DEFAULT_SETTINGS", "QUICK_SETTINGS", "run_frontier", "shipped_lines"]

DATA = Path(__file__).parent / "data"
DEFAULT_SETTINGS = (  # the order a long run measures them in: one of each kind first
    "none",
    "noise:0.1",
    "noise:1",
    "quant:int4",
    "quant:int2",
    "permutation",
    "depth:1-4",
    "noise:3",
    "noise:0.3",
    "noise:10",
)
QUICK_SETTINGS = ("none", "noise:0.01", "noise:3", "quant:int2", "permutation", "depth:1-3")
KNOWLEDGE = (
    "the public weights, the tokenizer and the split range; the defence and its parameters "
    "(scale, levels, depth range); not the session's secret randomness (noise draws, permutation, "
    "depth drawn). Learned decoders: trained on the attacker's own defended states of "
    "threat_model/data/prose.txt (second half) and random token sequences."
)
Progress = Callable[[str], None]


def shipped_lines(name: str) -> list[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def token_texts(tokenizer: Any, lines: Sequence[str], budget: int, longest: int = 128) -> list[list[int]]:
    """Paragraphs of a few lines, tokenised (with the tokenizer's specials), until ``budget`` tokens."""
    texts: list[list[int]] = []
    total = 0
    for first in range(0, len(lines), 3):
        ids = list(tokenizer(" ".join(lines[first : first + 3]))["input_ids"])[:longest]
        if len(ids) < 2:
            continue
        texts.append(ids)
        total += len(ids)
        if total >= budget:
            break
    return texts


def _ppl_session(setting: Setting, depth: int, width: int, index: int) -> SessionDefence:
    return setting.session(depth, 10**5 + index, width)


class _Tally:
    """Hits and costs per attack over the prompts of one setting."""

    def __init__(self) -> None:
        self.attacks: dict[str, dict[str, float]] = {}
        self.hits: dict[str, int] = {}

    def add(
        self, name: str, recovered: Sequence[int], truth: Sequence[int], forwards: int, secs: float
    ) -> None:
        entry = self.attacks.setdefault(name, {"forwards": 0.0, "seconds": 0.0})
        entry["forwards"] += forwards
        entry["seconds"] += secs
        self.hits[name] = self.hits.get(name, 0) + sum(a == b for a, b in zip(recovered, truth, strict=False))

    def summary(self, total: int) -> dict[str, dict[str, float]]:
        for name, entry in self.attacks.items():
            entry["recovery"] = self.hits[name] / max(total, 1)
            entry["forwards_per_token"] = round(entry.pop("forwards") / max(total, 1), 1)
            entry["seconds"] = round(entry["seconds"], 2)
        return self.attacks


def _decoder_data(
    parts_at: PartsCache, setting: Setting, base: int, texts: Sequence[Sequence[int]], vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacker's training set: its own defended (viewed) states of text and random sequences."""
    generator = torch.Generator().manual_seed(7)
    sequences = [list(t) for t in texts] + torch.randint(0, vocab, (32, 32), generator=generator).tolist()
    view = setting.view()
    states, ids = [], []
    with torch.inference_mode():
        for index, seq in enumerate(sequences):
            for depth in setting.depths(base):
                width = int(parts_at.checkpoint.config.hidden_size)
                defence = setting.session(base, 10**6 + index, width)
                x = torch.tensor([seq])
                states.append(view(defence.uplink(parts_at(depth).head(x)))[0])
                ids.append(x[0])
    return torch.cat(states), torch.cat(ids)


def run_frontier(
    checkpoint: Any,
    prompts: Sequence[str],
    settings: Sequence[Setting],
    *,
    depth: int = 2,
    new_tokens: int = 12,
    first_k: int = 8,
    wire: str = "fp32",
    max_candidates: int | None = 2048,
    ppl_tokens: int = 2048,
    train_tokens: int = 3000,
    mlp_steps: int = 400,
    max_prompt_tokens: int | None = None,
    progress: Progress = lambda _m: None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the sweep; returns the report (see :func:`threat_model._frontier_report.markdown`).
    ``on_row(report)`` receives the report so far after each setting."""
    started = time.perf_counter()
    tokenizer = checkpoint.tokenizer
    vocab, width = int(checkpoint.config.vocab_size), int(checkpoint.config.hidden_size)
    parts_at = PartsCache(checkpoint)
    full = parts_at(depth)
    orders: dict[tuple[int, ...], torch.Tensor] = {}
    order_model = model_order_fn(
        lambda ids: full.tail(full.trunk(full.head(ids))), vocab, tokenizer.bos_token_id
    )

    start = (
        []
        if tokenizer.bos_token_id is not None or tokenizer.eos_token_id is None
        else [tokenizer.eos_token_id]
    )

    def order(prefix: Sequence[int]) -> torch.Tensor:  # the same public model for every setting
        # Without a BOS, the first token is ranked as the model ranks a document's first token
        # (after its end-of-text token), not by id, so a capped search still finds it.
        key = tuple(prefix)
        if key not in orders:
            orders[key] = order_model(list(prefix) or start)
        return orders[key]

    prompt_ids = [list(tokenizer(p)["input_ids"])[:max_prompt_tokens] for p in prompts]
    lines = shipped_lines("prose.txt")
    ppl_texts = token_texts(tokenizer, lines[: len(lines) // 2], ppl_tokens)
    train_texts = token_texts(tokenizer, lines[len(lines) // 2 :], train_tokens)
    embeddings = full.head.embed_tokens.weight.detach()
    reference: list[list[int]] = []
    base_ppl = 0.0
    rows: list[dict[str, Any]] = []

    def report() -> dict[str, Any]:
        return {
            "model": checkpoint.name,
            "split": f"{depth}:{parts_at.layers - 2}",
            "wire": wire,
            "new_tokens": new_tokens,
            "first_k": min(first_k, new_tokens),
            "max_candidates": max_candidates,
            "prompts": [{"text": p, "tokens": len(ids)} for p, ids in zip(prompts, prompt_ids, strict=True)],
            "attacker_knowledge": KNOWLEDGE,
            "baseline_perplexity": round(base_ppl, 3),
            "rows": rows,
            "seconds": round(time.perf_counter() - started, 1),
            "threads": torch.get_num_threads(),
        }

    for number, setting in enumerate(settings):
        progress(f"frontier: [{number + 1}/{len(settings)}] {setting.name}: {len(prompts)} sessions")
        seeds = [1000 * number + i for i in range(len(prompts))]
        sessions = [
            run_session(
                parts_at,
                tokenizer,
                ids,
                setting.session(depth, seed, width),
                new_tokens=new_tokens,
                wire=wire,
            )
            for ids, seed in zip(prompt_ids, seeds, strict=True)
        ]
        if not reference:
            if setting.family != "none":
                raise ValueError("the first setting must be none (the undefended reference)")
            reference = [s.tokens for s in sessions]
        progress(f"frontier: {setting.name}: perplexity on {len(ppl_texts)} texts")
        ppl, scored = perplexity(parts_at, ppl_texts, partial(_ppl_session, setting, depth, width), wire=wire)
        base_ppl = base_ppl or ppl
        tally = _Tally()
        total = sum(len(ids) for ids in prompt_ids)
        replay_hits = replay_total = 0
        for index, (ids, session) in enumerate(zip(prompt_ids, sessions, strict=True)):
            progress(
                f"frontier: {setting.name}: attacks on prompt {index + 1}/{len(prompts)} ({len(ids)} tokens)"
            )
            captured = session.sent[0][0]  # (T, d): the prefill frame
            steps = {d: cached_step_fn(parts_at(d).head) for d in setting.depths(depth)}
            if setting.family == "depth":
                _, adapted = invert_depth_range(
                    captured,
                    order,
                    steps,
                    tolerance=setting.tolerance(wire),
                    max_candidates=max_candidates,
                    truth=ids,
                )
            else:
                adapted = invert_view(
                    captured,
                    order,
                    steps[depth],
                    view=setting.view(),
                    tolerance=setting.tolerance(wire),
                    max_candidates=max_candidates,
                    truth=ids,
                )
            tally.add("adapted_inversion", adapted.recovered, ids, adapted.forwards, adapted.seconds)
            # Exact inversion as published: the identity view at the advertised depth, and a token
            # counts only if its candidate matched within the wire's rounding bound.
            if setting.family in ("none", "noise"):
                exact = adapted  # the same search; the widened tolerance only stops it sooner
            else:
                exact = invert_view(
                    captured,
                    order,
                    cached_step_fn(parts_at(depth).head),
                    view=identity,
                    tolerance=lambda row: quantisation_bound(row, wire),
                    max_candidates=max_candidates,
                    truth=ids,
                )
            matched = [
                token if dist <= quantisation_bound(row, wire) else -1
                for token, dist, row in zip(exact.recovered, exact.distances, captured, strict=False)
            ]
            tally.add("exact_inversion", matched, ids, exact.forwards, exact.seconds)
            parts = parts_at(session.depth)
            replay = tail_replay(session.returned, parts.tail, prompt_length=len(ids), truth=session.tokens)
            replay_hits += sum(a == b for a, b in zip(replay.recovered, session.tokens, strict=False))
            replay_total += len(session.tokens)
        if train_tokens > 0:
            progress(f"frontier: {setting.name}: training the ridge map and the MLP decoder")
            features, targets = _decoder_data(parts_at, setting, depth, train_texts, vocab)
            view = setting.view()
            for kind in ("ridge", "mlp"):
                decoder = LearnedDecoder(kind, embeddings, steps=mlp_steps).fit(features, targets)
                for ids, session in zip(prompt_ids, sessions, strict=True):
                    recovered = decoder.decode(view(session.sent[0][0]))
                    tally.add(f"{kind}_decoder", recovered, ids, 0, 0.0)
                tally.attacks[f"{kind}_decoder"]["seconds"] = decoder.seconds
                tally.attacks[f"{kind}_decoder"]["training_states"] = decoder.samples
        attacks = tally.summary(total)
        strongest = max(attacks, key=lambda n: attacks[n]["recovery"])
        agreements = [agreement(r, s.tokens) for r, s in zip(reference, sessions, strict=True)]
        k = min(first_k, new_tokens)
        rows.append(
            {
                "setting": setting.name,
                "family": setting.family,
                "value": setting.value,
                "attacks": attacks,
                "strongest": strongest,
                "recovery": attacks[strongest]["recovery"],
                "tail_replay": replay_hits / max(replay_total, 1),
                "agreement": sum(agreements) / len(agreements),
                "first_k_agree": sum(r[:k] == s.tokens[:k] for r, s in zip(reference, sessions, strict=True))
                / len(sessions),
                "perplexity": round(ppl, 3),
                "perplexity_ratio": round(ppl / base_ppl, 3),
                "ppl_tokens": scored,
                "useful": attacks[strongest]["recovery"] <= 0.05,
            }
        )
        if on_row is not None:
            on_row(report())
        progress(
            f"frontier: {setting.name}: strongest {strongest} {rows[-1]['recovery']:.0%}, "
            f"agreement {rows[-1]['agreement']:.0%}, perplexity x{rows[-1]['perplexity_ratio']:.2f}"
        )
    return report()
