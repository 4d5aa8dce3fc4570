"""The defence settings of the frontier sweep, and what the adapted attacker derives from each.

``noise`` and ``quant`` are the client's real options (:mod:`lambda_split._defences`), run
through the same code. Two more:

* ``permutation``: a secret per-session permutation of the hidden dimensions. An unmodified
  trunk cannot undo it, so as a client option it is meaningless (the trunk would compute on
  garbage); a server whose weights absorb it must know it. It is kept as the known-broken
  control: the sweep lets the trunk compute on the unpermuted state (utility as if absorbed)
  while the attacker sees the permuted one, and sorting the values of each row undoes it.
* ``depth``: a split depth drawn per session from a range ``[lo, hi]``, by the client's own draw
  (:func:`lambda_split._head_depth.choose_depth`, seeded here so that a sweep repeats; ``generate
  --head-depth random`` draws with ``secrets``). The server side is real (``serve --head-depths``:
  a trunk holding layers ``[lo, B)`` that each session enters at its depth); the sweep runs each
  session on the split ``d:B``, which is exactly what that trunk computes for it
  (tests/test_head_depth.py). The frames are the same either way: what the attacker holds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lambda_split._defences import QUANT_LEVELS, Defence, quantise_blockwise
from lambda_split._head_depth import HeadDepths, choose_depth
from threat_model._adaptive import View, identity, sorted_view
from threat_model.attacks import quantisation_bound

__all__ = ["SessionDefence", "Setting", "parse_setting"]


@dataclass(frozen=True)
class SessionDefence:
    """One session's defence: ``uplink`` is what crosses (and what the attacker holds),
    ``restore`` what the trunk then computes on (the identity but for the permutation)."""

    depth: int
    uplink: Callable[[torch.Tensor], torch.Tensor]
    restore: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Setting:
    """``none``, ``noise:SIGMA``, ``quant:int4|int2``, ``permutation`` or ``depth:LO-HI``."""

    family: str
    value: float | str = ""

    @property
    def name(self) -> str:
        if self.value == "":
            return self.family
        if isinstance(self.value, float):
            return f"{self.family}:{self.value:g}"
        return f"{self.family}:{self.value}"

    @property
    def defence(self) -> Defence | None:
        if self.family == "noise":
            return Defence("noise", sigma=float(self.value))
        if self.family == "quant":
            return Defence("quant", levels=str(self.value))
        return None

    def depths(self, base: int) -> tuple[int, ...]:
        if self.family != "depth":
            return (base,)
        lo, hi = (int(v) for v in str(self.value).split("-"))
        return tuple(range(lo, hi + 1))

    def session(self, base: int, seed: int, width: int) -> SessionDefence:
        """The defence of one session, with its secret randomness drawn from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        depths = self.depths(base)
        drawn = int(torch.randint(len(depths), (1,), generator=generator))  # (keeps the later draws)
        if self.family == "depth":  # the client's own draw, seeded
            drawn = choose_depth(HeadDepths(depths[0], depths[-1]), random.Random(seed)) - depths[0]
        depth = depths[drawn]
        defence = self.defence
        if defence is not None:
            transform = Defence(defence.kind, defence.sigma, defence.levels, seed=seed).session()
            return SessionDefence(depth, transform, identity)
        if self.family == "permutation":
            perm = torch.randperm(width, generator=generator)
            inverse = torch.argsort(perm)
            return SessionDefence(depth, lambda x: x[..., perm], lambda x: x[..., inverse])
        return SessionDefence(depth, identity, identity)

    def view(self) -> View:
        """How the adapted attacker compares candidates with captured rows."""
        if self.family == "quant":
            levels = QUANT_LEVELS[str(self.value)]
            return lambda x: quantise_blockwise(x, levels)
        if self.family == "permutation":
            return sorted_view
        return identity

    def tolerance(self, wire: str) -> Callable[[torch.Tensor], float]:
        """The widened tolerance: the distance the true candidate is expected within."""
        if self.family == "noise":
            sigma = float(self.value)
            if sigma * (1 + 4 / math.sqrt(2 * 64)) >= 0.5:
                # A noise ball that wide also holds wrong candidates: no early stop, the nearest of
                # every candidate searched is kept.
                return lambda row: quantisation_bound(row, wire)

            def noisy(row: torch.Tensor) -> float:
                # the captured norm is about sqrt(1 + sigma^2) times the clean one; the noise's norm
                # concentrates at sigma times it, within a few 1/sqrt(2d) of its size
                clean = float(row.norm()) / math.sqrt(1 + sigma**2)
                return sigma * clean * (1 + 4 / math.sqrt(2 * row.numel())) + quantisation_bound(row, wire)

            return noisy
        return lambda row: quantisation_bound(row, wire)


def parse_setting(text: str) -> Setting:
    family, _, value = text.partition(":")
    if family in ("none", "permutation") and not value:
        return Setting(family)
    if family == "noise":
        return Setting("noise", float(Defence.parse(text).sigma))
    if family == "quant":
        return Setting("quant", Defence.parse(text).levels)
    if family == "depth":
        lo, _, hi = value.partition("-")
        if not (lo.isdigit() and hi.isdigit() and 0 < int(lo) < int(hi)):
            raise ValueError(f"depth range must be depth:LO-HI with 0 < LO < HI, not {text!r}")
        return Setting("depth", f"{int(lo)}-{int(hi)}")
    raise ValueError(f"unknown setting {text!r}: none, noise:S, quant:int4|int2, permutation, depth:LO-HI")
