"""Cheating trunk executors, for tests and the detection benchmark only (never a server option).

Each builds an :class:`~lambda_split._llm_trunk.LLMExecutor` that does *not* run the declared trunk
while the service still signs its answers, exactly as a dishonest operator's server would:

* ``skip``     — one layer of the span contributes nothing (its attention and MLP outputs are zero);
* ``int4``     — every linear weight is quantised to 4 bits (symmetric, groups of 32) and back;
* ``perturb``  — Gaussian noise of ``scale`` times each weight's standard deviation is added;
* ``noise``    — honest, except that a ``fraction`` of steps return noise of the output's scale;
* ``replay``   — decode steps return the first decode answer it computed (a cached answer).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lambda_split._codec import Frame
from lambda_split._llm_trunk import LLMExecutor
from lambda_split._parts import Trunk
from lambda_split._service import ServiceLimits

CHEATS = ("skip", "int4", "perturb", "noise", "replay")


def _zero_output(module: nn.Module) -> None:
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]), *out[1:])
        return torch.zeros_like(out)

    module.forward = forward


def skip_layer(trunk: Trunk, index: int | None = None) -> Trunk:
    """A copy of ``trunk`` whose layer ``index`` (default: the middle one) adds nothing; its KV
    cache is still filled, so the session bookkeeping is that of the real trunk."""
    cheat = copy.deepcopy(trunk)
    layer: Any = cheat.layers[len(cheat.layers) // 2 if index is None else index]
    _zero_output(layer.self_attn)
    _zero_output(layer.mlp)
    return cheat


def quantise_int4(trunk: Trunk, group: int = 32) -> Trunk:
    cheat = copy.deepcopy(trunk)
    with torch.no_grad():
        for module in cheat.modules():
            if isinstance(module, nn.Linear) and module.weight.shape[1] % group == 0:
                weight = module.weight.view(-1, group)  # (N, group)
                scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7.0
                module.weight.copy_((torch.round(weight / scale).clamp(-8, 7) * scale).view_as(module.weight))
    return cheat


def perturb(trunk: Trunk, scale: float = 0.01, seed: int = 0) -> Trunk:
    cheat = copy.deepcopy(trunk)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in cheat.modules():
            if isinstance(module, nn.Linear):
                noise = torch.randn(module.weight.shape, generator=generator, dtype=module.weight.dtype)
                module.weight.add_(noise * module.weight.std() * scale)
    return cheat


class NoisyExecutor(LLMExecutor):
    """Honest, but a ``fraction`` of steps answer random noise of the right scale instead."""

    def __init__(self, trunk: Trunk, fraction: float = 0.01, seed: int = 0) -> None:
        super().__init__(trunk)
        self.fraction = fraction
        self._rng = random.Random(seed)

    def step_as(self, owner: str, state: Any, frame: Frame, limits: ServiceLimits) -> dict[str, torch.Tensor]:
        out = super().step_as(owner, state, frame, limits)
        if self._rng.random() < self.fraction:
            hidden = out["hidden"]
            out = {"hidden": torch.randn_like(hidden) * hidden.std()}
        return out


class ReplayExecutor(LLMExecutor):
    """Computes (so its caches stay consistent) but answers every decode step after the first with
    the first decode step's output: a server replaying a cached answer."""

    def __init__(self, trunk: Trunk) -> None:
        super().__init__(trunk)
        self._cached: dict[tuple[int, ...], torch.Tensor] = {}

    def step_as(self, owner: str, state: Any, frame: Frame, limits: ServiceLimits) -> dict[str, torch.Tensor]:
        out = super().step_as(owner, state, frame, limits)
        hidden = out["hidden"]
        if hidden.shape[1] != 1:  # prefill
            return out
        cached = self._cached.setdefault(tuple(hidden.shape), hidden.clone())
        return {"hidden": cached.clone()}


def cheating_executor(name: str, trunk: Trunk, **options: Any) -> LLMExecutor:
    """The executor of cheat ``name`` (one of :data:`CHEATS`) built on the honest ``trunk``."""
    builders: dict[str, Callable[..., LLMExecutor]] = {
        "skip": lambda: LLMExecutor(skip_layer(trunk, options.get("index"))),
        "int4": lambda: LLMExecutor(quantise_int4(trunk)),
        "perturb": lambda: LLMExecutor(perturb(trunk, options.get("scale", 0.01))),
        "noise": lambda: NoisyExecutor(trunk, options.get("fraction", 0.01), options.get("seed", 0)),
        "replay": lambda: ReplayExecutor(trunk),
    }
    if name not in builders:
        raise ValueError(f"unknown cheat {name!r}; choose one of {', '.join(CHEATS)}")
    return builders[name]()
