"""What the split must know about each model family, and the families it refuses.

A generic head/tail goes wrong at the cut in a few family-specific places: where the layers
live (``model.layers`` or GPT-2's ``transformer.h``), whether positions are rotary or a learned
table added to the embeddings, which layers attend through a sliding window, and whether the
logits are soft-capped after the LM head. A :class:`Family` names those places; everything
else is the model's own code. A ``model_type`` not listed here is refused before anything
is loaded, because running it through a generic split could silently give wrong tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from lambda_split._errors import ModelNotFoundError

FULL = "full_attention"
SLIDING = "sliding_attention"


class UnsupportedArchitecture(ModelNotFoundError):
    """The model's architecture is not one the split engine is proven to run correctly (exit 2)."""


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts, and how its attention and logits differ from Llama's."""

    model_type: str
    #: parameter prefixes of the layer list, token embedding, final norm and LM head
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    lm_head: str = "lm_head"
    #: a learned position table added to the token embeddings (GPT-2), else rotary in every layer
    positions: str | None = None
    rotary: str | None = "model.rotary_emb"
    #: "none": every layer attends fully; "uniform": every layer uses ``config.sliding_window``
    #: when it is set (Mistral, Phi-3); "per_layer": ``config.layer_types`` says (Qwen2, Gemma-2)
    sliding: str = "none"
    #: Gemma-2: logits = cap * tanh(logits / cap) with cap = config.final_logit_softcapping
    logit_softcap: bool = False

    def layer_kinds(self, config: PretrainedConfig) -> list[str]:
        """The attention kind of every layer: :data:`FULL` or :data:`SLIDING`."""
        count = int(config.num_hidden_layers)
        window = getattr(config, "sliding_window", None)
        if self.sliding == "uniform" and window is not None:
            return [SLIDING] * count
        if self.sliding == "per_layer":
            kinds = list(getattr(config, "layer_types", None) or [FULL] * count)
            unknown = set(kinds) - {FULL, SLIDING}
            if unknown or len(kinds) != count:
                raise UnsupportedArchitecture(
                    f"{self.model_type} with layer types {sorted(set(kinds))} cannot be split "
                    f"(supported: {FULL}, {SLIDING})"
                )
            return kinds
        return [FULL] * count

    def layer_index(self, name: str) -> int | None:
        """The layer a parameter name belongs to, or None for embeddings, norm and head."""
        prefix = self.layers + "."
        if name.startswith(prefix):
            index = name[len(prefix) :].split(".", 1)[0]
            if index.isdigit():
                return int(index)
        return None

    def softcap(self, config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(config, "final_logit_softcapping", None) if self.logit_softcap else None
        if cap is None:
            return logits
        capped: torch.Tensor = torch.tanh(logits / cap) * cap  # (B, T, V)
        return capped


_GPT2 = Family(
    "gpt2",
    layers="transformer.h",
    embed="transformer.wte",
    norm="transformer.ln_f",
    positions="transformer.wpe",
    rotary=None,
)

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama"),
        Family("qwen2", sliding="per_layer"),
        Family("qwen3", sliding="per_layer"),
        Family("mistral", sliding="uniform"),
        Family("phi3", sliding="uniform"),
        Family("gemma"),
        Family("gemma2", sliding="per_layer", logit_softcap=True),
        Family("olmo"),
        Family("olmo2"),
        _GPT2,
    )
}

# Config switches that change the arithmetic in ways the parts do not reproduce.
_REFUSED_SWITCHES: dict[str, tuple[str, ...]] = {
    "gpt2": ("add_cross_attention",),
}


def family_of(config: PretrainedConfig) -> Family:
    """The family of ``config``, or :class:`UnsupportedArchitecture` naming its architecture."""
    model_type = str(getattr(config, "model_type", "") or "unknown")
    family = FAMILIES.get(model_type)
    if family is None:
        architectures = ", ".join(getattr(config, "architectures", None) or []) or model_type
        raise UnsupportedArchitecture(
            f"the split engine cannot run {architectures} (model_type {model_type!r}) correctly; "
            f"supported model types: {', '.join(sorted(FAMILIES))}"
        )
    for switch in _REFUSED_SWITCHES.get(model_type, ()):
        if getattr(config, switch, False):
            raise UnsupportedArchitecture(f"{model_type} with {switch}=True cannot be split")
    family.layer_kinds(config)  # refuses unknown layer types now, not at the first step
    return family


def _materialise_buffers(modules: Iterable[nn.Module], device: str | torch.device) -> None:
    """Rebuild the non-persistent buffers a checkpoint does not store (Gemma's embedding scale).

    Modules are built on the meta device and their weights assigned from the checkpoint; a
    buffer the checkpoint does not hold would stay on meta. A buffer this does not know how to
    rebuild is an error rather than a silent wrong value.
    """
    for module in modules:
        for owner in module.modules():
            for name, buffer in list(owner.named_buffers(recurse=False)):
                if not buffer.is_meta:
                    continue
                if name == "embed_scale" and hasattr(owner, "scalar_embed_scale"):
                    value: Any = owner.scalar_embed_scale
                    setattr(owner, name, torch.tensor(value, device=device))
                else:
                    raise UnsupportedArchitecture(
                        f"{type(owner).__name__}.{name} is not stored in the checkpoint and cannot be rebuilt"
                    )
