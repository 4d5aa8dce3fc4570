"""Head, trunk and tail: slices of a transformers decoder, each with its own KV cache.

The parts reuse the model's own decoder layers, rotary embedding and mask builder;
nothing of the model is re-implemented. A part holds only the weights it runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from lambda_split._families import SLIDING, Family, _materialise_buffers, family_of
from lambda_split._models import Checkpoint, meta_model

PART_NAMES = ("head", "trunk", "tail")


@dataclass(frozen=True)
class SplitSpec:
    """Layers ``[0, start)`` run in the head, ``[start, stop)`` in the trunk, ``[stop, N)`` in the tail."""

    start: int
    stop: int
    num_layers: int

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.stop <= self.num_layers:
            raise ValueError(
                f"split {self.start}:{self.stop} needs 1 <= A <= B <= {self.num_layers} "
                "(the head keeps at least one layer so that raw embeddings never cross the wire)"
            )

    @classmethod
    def parse(cls, text: str, num_layers: int) -> SplitSpec:
        """Parse ``A:B``; a negative B counts from the end, so ``2:-2`` of 30 layers is ``2:28``."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(-?\d+)\s*", text)
        if not match:
            raise ValueError(f"split must look like A:B, got {text!r}")
        start, stop = int(match[1]), int(match[2])
        if stop < 0:
            stop += num_layers
        return cls(start, stop, num_layers)

    def layers(self, part: str) -> range:
        return {
            "head": range(0, self.start),
            "trunk": range(self.start, self.stop),
            "tail": range(self.stop, self.num_layers),
        }[part]

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}"


@dataclass
class PartState:
    """A part's KV cache and the 2-D attention mask of every position it has seen."""

    cache: DynamicCache
    mask: torch.Tensor | None = None  # (B, S) of 0/1
    seen: int = field(default=0)

    def cache_bytes(self) -> int:
        total = 0
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate() derives them: padding is skipped, left padding is 0."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


class _LayerStack(nn.Module):
    """A contiguous run of decoder layers with the model's rotary embedding (if it has one)."""

    def __init__(
        self,
        config: PretrainedConfig,
        family: Family,
        layers: list[nn.Module],
        first: int,
        rotary: nn.Module | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.family = family
        self.layers = nn.ModuleList(layers)
        self.first = first
        self.rotary_emb = rotary
        self.kinds = family.layer_kinds(config)[first : first + len(layers)]
        #: (kind, cache type) whose mask transformers found unneeded for an unpadded one-token step
        self._maskless_steps: set[tuple[str, type]] = set()

    def new_state(self) -> PartState:
        return PartState(cache=DynamicCache(config=self.config))

    def run(self, hidden: torch.Tensor, mask: torch.Tensor, state: PartState, skip: int = 0) -> torch.Tensor:
        """Run the layers (but the first ``skip``) on ``hidden`` (B, T, C) whose positions are the
        last T of ``mask`` (B, S)."""
        length = hidden.shape[1]
        if len(self.layers) <= skip:
            return hidden
        position_ids = positions_from_mask(mask)[:, -length:]  # (B, T)
        return self._layers(hidden, mask, position_ids, state.cache, skip)

    def _layers(
        self, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache: Any, skip: int = 0
    ) -> torch.Tensor:
        """The layers from the ``skip``-th on ``hidden`` (B, T, C); ``mask`` (B, S) covers the cache's
        keys, ``position_ids`` is (B, T)."""
        layers, kinds = list(self.layers)[skip:], self.kinds[skip:]
        masks = {
            kind: self._mask(kind, hidden, mask, position_ids, cache, self.first + skip + kinds.index(kind))
            for kind in dict.fromkeys(kinds)
        }
        extra: dict[str, Any] = {}
        if self.rotary_emb is not None:
            extra["position_embeddings"] = self.rotary_emb(hidden, position_ids=position_ids)
        for layer, kind in zip(layers, kinds, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_ids=position_ids,
                use_cache=True,
                **extra,
                **{_cache_kwarg(type(layer)): cache},  # type: ignore[arg-type]
            )
        return hidden

    def _mask(
        self, kind: str, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache: Any,
        layer_idx: int,
    ) -> Any:  # fmt: skip
        """The model's own attention mask for layers of ``kind``, sized against ``layer_idx`` (the first
        layer of that kind that runs: a sliding layer's cache keeps only the window, a full one all).

        A decode step (one new token, no padding) of a full-attention kind needs no mask when
        transformers says so (SDPA's and flash attention's builders answer None): the one query
        sees every cached key, whatever their number. That answer is kept and the builder, a
        tenth of a millisecond of Python per part and token, is not asked again for such steps.
        """
        step = hidden.shape[1] == 1 and kind != SLIDING and bool(mask.all())
        key = (kind, type(cache))
        if step and key in self._maskless_steps:
            return None
        mask_args: dict[str, Any] = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=mask,
            position_ids=position_ids,
            layer_idx=layer_idx,
        )
        mask_args[_MASK_CACHE_KWARG] = cache
        build = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
        built = build(**mask_args)
        if step and built is None:
            self._maskless_steps.add(key)
        return built


def _takes_cache(function: Any) -> bool:
    return "cache" in inspect.signature(function).parameters


# transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns on every call).
_MASK_CACHE_KWARG = "cache" if _takes_cache(create_causal_mask) else "past_key_values"


@functools.cache
def _cache_kwarg(layer_class: type[nn.Module]) -> str:
    return "cache" if _takes_cache(layer_class.forward) else "past_key_values"


def _advance(state: PartState, new_mask: torch.Tensor) -> torch.Tensor:
    state.mask = new_mask if state.mask is None else torch.cat([state.mask, new_mask], dim=1)
    state.seen += new_mask.shape[1]
    return state.mask


class Head(_LayerStack):
    """Embeddings and layers ``[0, A)``: token ids in, hidden states out. Runs on the device."""

    def __init__(
        self,
        config: PretrainedConfig,
        family: Family,
        embed: nn.Module,
        layers: list[nn.Module],
        rotary: nn.Module | None,
        positions: nn.Module | None = None,
    ):
        super().__init__(config, family, layers, 0, rotary)
        self.embed_tokens = embed
        self.embed_positions = positions

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: PartState | None = None,
    ) -> torch.Tensor:
        state = state if state is not None else self.new_state()
        new_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        mask = _advance(state, new_mask)  # (B, S)
        hidden = self.embed_tokens(input_ids)  # (B, T, C)
        if self.embed_positions is not None:  # learned absolute positions (GPT-2)
            hidden = hidden + self.embed_positions(positions_from_mask(mask)[:, -input_ids.shape[1] :])
        return self.run(hidden, mask, state)

    def up_to(self, depth: int) -> Head:
        """This head stopped after layer ``depth - 1`` (a session's own split depth; shares the weights)."""
        if not 1 <= depth <= len(self.layers):
            raise ValueError(f"head depth {depth} is outside 1..{len(self.layers)}")
        layers = list(self.layers)[:depth]
        return Head(
            self.config, self.family, self.embed_tokens, layers, self.rotary_emb, self.embed_positions
        )


class Trunk(_LayerStack):
    """Layers ``[A, B)``: hidden states in, hidden states out. Runs on the server.

    ``start`` (default A) enters the trunk at a deeper layer: a session whose head ran layers
    ``[0, start)`` runs layers ``[start, B)`` here, exactly the trunk of split ``start:B``."""

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: PartState | None = None,
        *,
        start: int | None = None,
    ) -> torch.Tensor:
        state = state if state is not None else self.new_state()
        new_mask = attention_mask if attention_mask is not None else _ones(hidden)
        return self.run(hidden, _advance(state, new_mask), state, self.skip(start))

    def forward_batch(self, hidden: torch.Tensor, batch: Any, *, start: int | None = None) -> torch.Tensor:
        """Run rows of several sessions at once; ``batch`` is a :class:`~lambda_split._kvslots.PoolBatch`
        that supplies their KV cache, key mask (R, L) and position ids (R, T). Every row enters at ``start``."""
        skip = self.skip(start)
        if len(self.layers) <= skip:
            return hidden
        return self._layers(hidden, batch.mask, batch.positions, batch, skip)  # (R, T, C)

    @property
    def stop(self) -> int:
        return self.first + len(self.layers)

    def skip(self, start: int | None) -> int:
        """How many of this trunk's layers a session entering at layer ``start`` skips."""
        if start is None:
            return 0
        if not self.first <= start <= self.stop:
            raise ValueError(f"layer {start} is outside this trunk's layers {self.first}..{self.stop}")
        return start - self.first


class Tail(_LayerStack):
    """Layers ``[B, N)``, the final norm and the LM head: hidden states in, logits out. On the device."""

    def __init__(
        self,
        config: PretrainedConfig,
        family: Family,
        layers: list[nn.Module],
        first: int,
        rotary: nn.Module | None,
        norm: nn.Module,
        lm_head: nn.Module,
    ):
        super().__init__(config, family, layers, first, rotary)
        self.norm = norm
        self.lm_head = lm_head

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: PartState | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) of every new position, or (B, 1, V) of the last one with ``last_only``
        (what decoding needs: on a prompt of T tokens the LM head is T times the tail's layers' work)."""
        state = state if state is not None else self.new_state()
        new_mask = attention_mask if attention_mask is not None else _ones(hidden)
        hidden = self.run(hidden, _advance(state, new_mask), state)
        if last_only:
            hidden = hidden[:, -1:, :]  # (B, 1, C); prompts are left-padded, so the last position is real
        logits: torch.Tensor = self.lm_head(self.norm(hidden))  # (B, T, V)
        return self.family.softcap(self.config, logits)


def _return_freed_memory() -> None:
    """Hand memory freed after loading back to the OS.

    Reading a checkpoint (GGUF dequantises all of it) frees far more than a part keeps; glibc
    holds on to those pages unless asked, which would make a part's resident memory look like
    the whole model's.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _ones(hidden: torch.Tensor) -> torch.Tensor:
    return torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)


@dataclass
class SplitModel:
    """The parts of one model that this process loaded, and what they were loaded from."""

    checkpoint: Checkpoint
    spec: SplitSpec
    head: Head | None = None
    trunk: Trunk | None = None
    tail: Tail | None = None

    @property
    def config(self) -> PretrainedConfig:
        return self.checkpoint.config


def load_parts(
    checkpoint: Checkpoint,
    spec: SplitSpec,
    parts: Iterable[str] = ("head", "tail"),
    *,
    device: str | torch.device = "cpu",
) -> SplitModel:
    """Load only the weights of ``parts`` and build them. The rest of the model never leaves the meta device."""
    parts = tuple(parts)
    unknown = set(parts) - set(PART_NAMES)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; parts are {PART_NAMES}")
    config = checkpoint.config
    if spec.num_layers != config.num_hidden_layers:
        raise ValueError(
            f"split is for {spec.num_layers} layers but the model has {config.num_hidden_layers}"
        )
    family = family_of(config)
    skeleton: Any = meta_model(config)
    stack = skeleton.get_submodule(family.layers)
    if not isinstance(stack, nn.ModuleList):  # pragma: no cover - the family table says where
        raise ValueError(f"{type(skeleton).__name__} has no {family.layers}; it cannot be split")

    wanted: dict[str, nn.Module] = {}
    for part in parts:
        for index in spec.layers(part):
            wanted[f"{family.layers}.{index}"] = stack[index]
    if "head" in parts:
        wanted[family.embed] = skeleton.get_submodule(family.embed)
        if family.positions is not None:
            wanted[family.positions] = skeleton.get_submodule(family.positions)
    if "tail" in parts:
        wanted[family.norm] = skeleton.get_submodule(family.norm)
        wanted[family.lm_head] = skeleton.get_submodule(family.lm_head)
    names = [f"{prefix}.{name}" for prefix, module in wanted.items() for name in module.state_dict()]
    tensors = checkpoint.read_tensors(names)
    for prefix, module in wanted.items():
        local = {
            key[len(prefix) + 1 :]: value.to(device)
            for key, value in tensors.items()
            if key.startswith(prefix + ".")
        }
        module.load_state_dict(local, strict=True, assign=True)
    del tensors
    _materialise_buffers(wanted.values(), device)
    _return_freed_memory()

    rotary: nn.Module | None = None
    if family.rotary is not None:
        with torch.device(device):
            rotary = type(skeleton.get_submodule(family.rotary))(config=config)
    model = SplitModel(checkpoint, spec)
    layers = [stack[i] for i in range(spec.num_layers)]
    if "head" in parts:
        positions = skeleton.get_submodule(family.positions) if family.positions else None
        embed = skeleton.get_submodule(family.embed)
        model.head = Head(config, family, embed, layers[: spec.start], rotary, positions).eval()
    if "trunk" in parts:
        model.trunk = Trunk(config, family, layers[spec.start : spec.stop], spec.start, rotary).eval()
    if "tail" in parts:
        norm, lm_head = skeleton.get_submodule(family.norm), skeleton.get_submodule(family.lm_head)
        model.tail = Tail(config, family, layers[spec.stop :], spec.stop, rotary, norm, lm_head).eval()
    return model
