"""Attacks that adapt to an uplink defence (the frontier sweep's attacker).

The attacker knows the public weights, the defence and its parameters (Kerckhoffs), but not the
session's secret randomness (the noise draws, the permutation, the depth drawn). Every attack
takes the rows a defended frame carried and returns token ids, scored by the caller against the
client's own tokens.

* :func:`invert_view` is SipIt (see :func:`threat_model.attacks.invert_prompt`) in a *view*
  of the hidden states: candidates and captured rows are compared after ``view`` (identity
  against noise, the same blockwise quantiser against quantisation, sorting the values of
  each row against a permutation), with an early stop at a tolerance widened to the defence's
  own error, keeping the nearest candidate otherwise.
* :func:`invert_depth_range` tries every depth the server allows and keeps the depth whose
  best candidates fit the first rows best.
* :class:`LearnedDecoder` fits a ridge map or a small MLP from defended (viewed) states of the
  attacker's own text to input embeddings, then reads the nearest embedding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from threat_model.attacks import AttackResult, OrderFn, StepFn

__all__ = ["LearnedDecoder", "View", "invert_depth_range", "invert_view", "sorted_view"]

#: A view of hidden states (..., d) -> (..., d'), applied alike to candidates and captured rows.
View = Callable[[torch.Tensor], torch.Tensor]
#: ``tolerance(captured_row)``: the distance within which a candidate is taken at once.
Tolerance = Callable[[torch.Tensor], float]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def sorted_view(x: torch.Tensor) -> torch.Tensor:
    """Each row's values in increasing order: the same for a state and any permutation of it."""
    return torch.sort(x, dim=-1).values


@torch.inference_mode()
def invert_view(
    captured: torch.Tensor,
    order_fn: OrderFn,
    step_fn: StepFn,
    *,
    view: View = identity,
    tolerance: Tolerance,
    max_candidates: int | None = None,
    batch_size: int = 256,
    positions: int | None = None,
    truth: Sequence[int] | None = None,
    name: str = "nearest_inversion",
) -> AttackResult:
    """Recover token ids from captured (defended) rows (T, d) or (1, T, d), in ``view``.

    At each position candidates go in the public model's order, in batches; the search stops at
    the first batch whose nearest candidate is within ``tolerance(row)``, else after
    ``max_candidates``, and keeps the nearest candidate seen. ``positions`` limits the rows.
    """
    rows = captured.detach().to(torch.float32).reshape(-1, captured.shape[-1])  # (T, d)
    if positions is not None:
        rows = rows[:positions]
    start = time.perf_counter()
    prefix: list[int] = []
    distances: list[float] = []
    ranks: list[int] = []
    forwards = 0
    for position in range(rows.shape[0]):
        target = view(rows[position])
        stop_at = tolerance(rows[position])
        order = order_fn(prefix)
        if max_candidates is not None:
            order = order[:max_candidates]
        best = (math.inf, int(order[0]), 0)
        for first in range(0, len(order), batch_size):
            candidates = order[first : first + batch_size]
            states = view(step_fn(prefix, candidates).to(torch.float32))  # (B, d')
            distance = (states - target).norm(dim=-1)  # (B,)
            forwards += len(candidates)
            index = int(distance.argmin())
            if float(distance[index]) < best[0]:
                best = (float(distance[index]), int(candidates[index]), first + index)
            if best[0] <= stop_at:
                break
        prefix.append(best[1])
        distances.append(best[0])
        ranks.append(best[2])
    return AttackResult(
        name,
        prefix,
        list(truth) if truth is not None else None,
        time.perf_counter() - start,
        forwards,
        distances,
        ranks,
    )


def invert_depth_range(
    captured: torch.Tensor,
    order_fn: OrderFn,
    step_fns: dict[int, StepFn],
    *,
    tolerance: Tolerance,
    view: View = identity,
    probe_positions: int = 3,
    max_candidates: int | None = None,
    truth: Sequence[int] | None = None,
) -> tuple[int, AttackResult]:
    """The attacker who knows the range of split depths: invert the first ``probe_positions``
    rows at every depth, keep the depth with the smallest mean distance (relative to the rows'
    norms), and invert the whole prompt there. Returns (depth chosen, result); the cost counts
    every depth tried."""
    rows = captured.detach().to(torch.float32).reshape(-1, captured.shape[-1])
    norms = rows[:probe_positions].norm(dim=-1).clamp_min(1e-12)
    fits: dict[int, float] = {}
    spent, seconds = 0, 0.0
    for depth, step_fn in step_fns.items():
        probe = invert_view(
            rows,
            order_fn,
            step_fn,
            view=view,
            tolerance=tolerance,
            max_candidates=max_candidates,
            positions=probe_positions,
        )
        spent += probe.forwards
        seconds += probe.seconds
        fits[depth] = float((torch.tensor(probe.distances) / norms[: len(probe.distances)]).mean())
    chosen = min(fits, key=lambda d: fits[d])
    full = invert_view(
        rows,
        order_fn,
        step_fns[chosen],
        view=view,
        tolerance=tolerance,
        max_candidates=max_candidates,
        truth=truth,
        name="depth_range_inversion",
    )
    return chosen, AttackResult(
        full.name,
        full.recovered,
        full.truth,
        full.seconds + seconds,
        full.forwards + spent,
        full.distances,
        full.ranks,
    )


@dataclass
class LearnedDecoder:
    """Defended state -> input embedding, fitted on the attacker's own defended states, then the
    nearest embedding (cosine) over the whole vocabulary. ``kind`` is ``ridge`` or ``mlp``."""

    kind: str
    embeddings: torch.Tensor  # (V, e)
    ridge: float = 1.0
    hidden: int = 512
    steps: int = 400
    seed: int = 0
    seconds: float = 0.0
    samples: int = 0

    def fit(self, states: torch.Tensor, ids: torch.Tensor) -> LearnedDecoder:
        """``states`` (N, d) already defended and viewed; ``ids`` (N,) the tokens behind them."""
        start = time.perf_counter()
        x = states.detach().to(torch.float32)
        y = self.embeddings.detach().to(torch.float32)[ids]  # (N, e)
        self.samples = x.shape[0]
        self._mean, self._std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - self._mean) / self._std
        if self.kind == "ridge":
            x64, y64 = x.to(torch.float64), y.to(torch.float64)
            y_mean = y64.mean(0)
            gram = x64.T @ x64 + self.ridge * torch.eye(x.shape[1], dtype=torch.float64)
            weights = torch.linalg.solve(gram, x64.T @ (y64 - y_mean))
            self._linear = (weights.to(torch.float32), y_mean.to(torch.float32))
        elif self.kind == "mlp":
            self._mlp = _train_mlp(x, y, self.hidden, self.steps, self.seed)
        else:
            raise ValueError(f"unknown decoder {self.kind!r}")
        self.seconds = time.perf_counter() - start
        return self

    @torch.inference_mode()
    def decode(self, states: torch.Tensor) -> list[int]:
        x = (states.detach().to(torch.float32).reshape(-1, states.shape[-1]) - self._mean) / self._std
        if self.kind == "ridge":
            weights, y_mean = self._linear
            predicted = x @ weights + y_mean
        else:
            predicted = self._mlp(x)
        table = torch.nn.functional.normalize(self.embeddings.detach().to(torch.float32), dim=-1)
        return (torch.nn.functional.normalize(predicted, dim=-1) @ table.T).argmax(dim=-1).tolist()


def _train_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, steps: int, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, y.shape[1])
    )
    optimiser = torch.optim.Adam(mlp.parameters(), lr=2e-3, weight_decay=1e-5)
    target = torch.nn.functional.normalize(y, dim=-1)
    with torch.enable_grad():
        for _ in range(steps):
            batch = torch.randint(0, x.shape[0], (min(256, x.shape[0]),), generator=generator)
            predicted = torch.nn.functional.normalize(mlp(x[batch]), dim=-1)
            loss = (1 - (predicted * target[batch]).sum(-1)).mean()  # cosine distance
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    return mlp.eval()
