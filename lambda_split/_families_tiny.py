"""Tiny random checkpoints of every supported family, built in code: seeded, no downloads.

Each shares tiny-random-llama's shape (8 layers, width 64, the 260-token byte tokenizer) and
keeps what makes its family differ at the cut: Qwen2's sliding layers after ``max_window_layers``,
Mistral's and Phi-3's window on every layer, Gemma's scaled embeddings, Gemma-2's alternating
local/global attention with soft-capping, GPT-2's learned positions and tied head. Windows are
a few tokens wide so that every test prompt runs past them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lambda_split._names import TINY_FAMILY_MODELS

WINDOW = 5  # tokens of a sliding-window layer's view: far shorter than any test prompt

_COMMON: dict[str, Any] = dict(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)

_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": (  # tied, as Qwen2.5's small models are
        "qwen2",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3, tie_word_embeddings=True),
    ),
    "qwen3": (
        "qwen3",
        dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=5),
    ),
    "mistral": ("mistral", dict(sliding_window=WINDOW, tie_word_embeddings=False)),
    "phi3": ("phi3", dict(sliding_window=WINDOW, tie_word_embeddings=False)),
    "gemma": ("gemma", dict(head_dim=16)),
    "gemma2": (
        "gemma2",
        dict(
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=4.0,  # small caps, so that capping changes the numbers
            final_logit_softcapping=3.0,
        ),
    ),
    "olmo": ("olmo", dict(tie_word_embeddings=False)),
    "gpt2": (
        "gpt2",
        dict(
            vocab_size=260,
            n_embd=64,
            n_layer=8,
            n_head=4,
            n_positions=1024,
            bos_token_id=256,
            eos_token_id=257,
            pad_token_id=258,
            tie_word_embeddings=True,
        ),
    ),
    "olmo2": ("olmo2", dict(tie_word_embeddings=False)),
}

EMBED_STD = 0.3
LAYER_GAIN = 2.0
# Fixed per family; a seed whose greedy output repeats one token (olmo2's 9) is skipped.
SEEDS = {
    "qwen2": 1,
    "qwen3": 2,
    "mistral": 3,
    "phi3": 4,
    "gemma": 5,
    "gemma2": 6,
    "olmo": 7,
    "gpt2": 8,
    "olmo2": 10,
}


def _tiny_config(family: str) -> PretrainedConfig:
    model_type, extra = _CONFIGS[family]
    base = {} if model_type == "gpt2" else _COMMON
    config = AutoConfig.for_model(model_type, **{**base, **extra})
    config.dtype = torch.float32
    return config


@functools.cache
def _tiny_state(family: str) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS[family])
        model: Any = AutoModelForCausalLM.from_config(_tiny_config(family))  # type: ignore[no-untyped-call]
        # Random init gives near-uniform logits; wider embeddings and head make greedy decoding
        # decisive, so that split and monolithic agree on every argmax for a reason.
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        # Gemma scales embeddings by sqrt(width): keep the scaled embedding at unit size.
        scale = float(getattr(embed, "scalar_embed_scale", 1.0))
        torch.nn.init.normal_(embed.weight, std=EMBED_STD / scale)
        if head.weight is not embed.weight:
            torch.nn.init.normal_(head.weight, std=0.5)
        # Layers strong enough to move the residual: with a tied head, weak layers would make
        # the model echo its last input token, which tests nothing.
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and weight is not embed.weight and weight is not head.weight:
                fan_in = weight.shape[0] if "c_" in name.split(".")[-2] else weight.shape[1]  # GPT-2 Conv1D
                torch.nn.init.normal_(weight, std=LAYER_GAIN * fan_in**-0.5)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _tiny_family_parts(
    name: str,
) -> tuple[PretrainedConfig, Callable[[Iterable[str]], dict[str, torch.Tensor]], Callable[[str], bytes]]:
    """The config, tensor reader and raw-bytes reader of built-in model ``name``."""
    family = TINY_FAMILY_MODELS[name]

    def read_tensors(names: Iterable[str]) -> dict[str, torch.Tensor]:
        state = _tiny_state(family)
        return {key: state[key].clone() for key in names}

    def raw_tensor_bytes(key: str) -> bytes:
        return bytes(_tiny_state(family)[key].numpy().tobytes())

    return _tiny_config(family), read_tensors, raw_tensor_bytes
