"""Uplink defences: transforms of the hidden states the device sends to the trunk.

**Measured, not guaranteed.** None of these is a proof of privacy. Each one trades output
quality for resistance to the attacks of ``threat_model``; how much of each you get is what
``lambda-split frontier`` measures (SECURITY.md, *The privacy-utility frontier*). All are off
by default: without a defence the client sends exactly the head's output.

* ``noise:SIGMA`` adds isotropic Gaussian noise to every position's hidden state, with a
  standard deviation of ``SIGMA`` times that position's root-mean-square value (so the noise
  has about ``SIGMA`` times the state's norm). Fresh secret randomness per session; a failover
  replays the states already sent (the same noise), never a fresh draw of them.
* ``quant:int4`` / ``quant:int2`` quantises each position's hidden state blockwise (blocks of 64
  values, ``scale = max|x| / L`` with ``L`` = 7 or 1, stored as fp16 rounded up, so int2 keeps the
  levels -1, 0, +1) and sends it in the wire encoding of the same name (``INT4``, ``INT2``:
  lambda_split._codec): 0.53 and 0.28 bytes per value against fp16's 2. The trunk decodes exactly
  the defended values (one quantiser, :mod:`lambda_split._quant`, for hidden sizes that are a
  multiple of 64, as every supported model's is). The downlink stays at ``--wire``.

The defence runs on the device, between the head and the link, so the trunk server and anyone
on the path see only defended states. It does nothing to the trunk's answers: the downlink
still carries what the tail decodes into the generated tokens.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lambda_split import _quant

__all__ = ["DEFENCE_KINDS", "Defence", "add_noise", "defended", "quantise_blockwise"]

DEFENCE_KINDS = ("noise", "quant")
QUANT_LEVELS = _quant.LEVELS  # int8 127, int4 7, int2 1
QUANT_BLOCK = _quant.BLOCK

#: ``trunk(hidden (B, T, C), mask (B, T)) -> hidden (B, T, C)``, local or remote.
TrunkFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Defence:
    """One uplink defence (see the module docstring). ``seed`` fixes the noise for tests and
    reproducible sweeps; ``None`` (the default) draws secret randomness for every session."""

    kind: str
    sigma: float = 0.0
    levels: str = ""
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "noise":
            if not (math.isfinite(self.sigma) and self.sigma > 0):
                raise ValueError(f"noise scale must be a finite number > 0, not {self.sigma!r}")
        elif self.kind == "quant":
            if self.levels not in QUANT_LEVELS:
                raise ValueError(
                    f"quantisation must be one of {', '.join(QUANT_LEVELS)}, not {self.levels!r}"
                )
        else:
            raise ValueError(f"unknown defence {self.kind!r}; defences are {', '.join(DEFENCE_KINDS)}")

    @classmethod
    def parse(cls, text: str) -> Defence:
        """``noise:SIGMA`` (e.g. ``noise:0.1``) or ``quant:int4`` / ``quant:int2``."""
        kind, _, value = text.strip().partition(":")
        if kind == "noise":
            try:
                sigma = float(value)
            except ValueError:
                raise ValueError(f"noise needs a scale, e.g. noise:0.1, not {text!r}") from None
            return cls("noise", sigma=sigma)
        if kind == "quant":
            return cls("quant", levels=value)
        raise ValueError(f"unknown defence {text!r}: use noise:SIGMA or quant:int4|int2")

    @property
    def name(self) -> str:
        return f"noise:{self.sigma:g}" if self.kind == "noise" else f"quant:{self.levels}"

    def session(self) -> Transform:
        """The transform for one session: noise draws from a generator of its own."""
        if self.kind == "quant":
            levels = QUANT_LEVELS[self.levels]
            return lambda hidden: quantise_blockwise(hidden, levels)
        generator = torch.Generator().manual_seed(
            self.seed if self.seed is not None else secrets.randbits(63)
        )
        sigma = self.sigma
        return lambda hidden: add_noise(hidden, sigma, generator)


def add_noise(hidden: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``hidden + sigma * rms(row) * N(0, I)`` for every position (row of the last dimension)."""
    x = hidden.to(torch.float32)
    rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()  # (..., 1)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return (x + sigma * rms * noise).to(hidden.dtype)


def quantise_blockwise(hidden: torch.Tensor, levels: int, block: int = QUANT_BLOCK) -> torch.Tensor:
    """Blockwise absmax quantisation to ``-levels..levels`` along the last dimension, dequantised;
    the scales are the wire's (:func:`lambda_split._quant.scales_fp16`)."""
    if levels < 1:
        raise ValueError("levels must be at least 1")
    x = hidden.to(torch.float32)
    width = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, (-width) % block))
    blocks = padded.reshape(*x.shape[:-1], -1, block)  # (..., nblocks, block)
    scale = _quant.scales_fp16(blocks.abs().amax(dim=-1, keepdim=True), levels)
    q = torch.round(blocks / scale).clamp(-levels, levels)
    out = (q * scale).reshape(*x.shape[:-1], -1)[..., :width]
    return out.to(hidden.dtype)


def defended(trunk: TrunkFn, defence: Defence | None) -> TrunkFn:
    """``trunk`` with ``defence`` applied to every uplink hidden state; ``trunk`` itself when off."""
    if defence is None:
        return trunk
    transform = defence.session()

    def call(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return trunk(transform(hidden), mask)

    return call
