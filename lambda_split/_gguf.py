"""Per-part GGUF loading: read and dequantise only the tensors a part runs.

transformers' ``load_gguf_checkpoint`` dequantises every tensor of the file before a part
can keep its own, so each process briefly holds the whole model in float32. Here the file is
memory-mapped by :class:`gguf.GGUFReader`; a tensor's quantised blocks are read and
dequantised only when a part asks for it. Names are mapped the way transformers maps them
(gguf-py's standard tensor-name table), and Llama's query/key rows are un-permuted as
llama.cpp's converter permuted them. Architectures whose tensors transformers rewrites in
other ways (GPT-2, Gemma-2, mixture-of-experts, ...) are not handled here: :func:`supports`
says so, and the caller falls back to transformers' whole-file loading.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig

#: GGUF ``general.architecture`` values whose tensors need no rewrite beyond Llama's permutation.
_PLAIN_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2"})
_TIED_HEAD = ("lm_head.weight", "model.embed_tokens.weight")
_ROWS_PER_CHUNK = 2048


class _GGUFTensors:
    """The tensors of one GGUF file, by Hugging Face parameter name, read on demand."""

    def __init__(self, path: Path, config: PretrainedConfig, hf_names: Iterable[str]) -> None:
        self.path = path
        self.config = config
        self._hf_names = list(hf_names)

    @functools.cached_property
    def _reader(self) -> Any:
        from gguf import GGUFReader

        return GGUFReader(str(self.path))  # memory-maps the file; reads nothing yet

    @functools.cached_property
    def _stored(self) -> dict[str, Any]:
        return {tensor.name: tensor for tensor in self._reader.tensors}

    @functools.cached_property
    def architecture(self) -> str:
        field = self._reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()

    def supports(self) -> bool:
        return self.architecture in _PLAIN_ARCHITECTURES

    @functools.cached_property
    def names(self) -> dict[str, str]:
        """Hugging Face parameter name -> GGUF tensor name, for every parameter the file stores."""
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

        arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == self.architecture)
        table = get_tensor_name_map(arch, int(self.config.num_hidden_layers))
        mapping: dict[str, str] = {}
        for hf_name in self._hf_names:
            module, _, suffix = hf_name.rpartition(".")
            gguf_name = table.get_name(module)
            if gguf_name is not None and f"{gguf_name}.{suffix}" in self._stored:
                mapping[hf_name] = f"{gguf_name}.{suffix}"
        return mapping

    def raw_bytes(self, hf_name: str) -> bytes:
        """The stored (quantised) bytes of one tensor: cheap, nothing is dequantised."""
        return bytes(self._stored[self.names[hf_name]].data.tobytes())

    def read(self, hf_names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Dequantise the tensors ``hf_names`` into float32; a tied LM head shares the embedding."""
        requested = list(dict.fromkeys(hf_names))
        tensors: dict[str, torch.Tensor] = {}
        for hf_name in requested:
            source = hf_name
            if hf_name not in self.names and hf_name == _TIED_HEAD[0]:
                source = _TIED_HEAD[1]
            if source in tensors:
                tensors[hf_name] = tensors[source]
                continue
            if source not in self.names:
                raise KeyError(f"{self.path.name} stores no tensor for {hf_name}")
            tensors[hf_name] = self._dequantise(self.names[source])
            tensors[source] = tensors[hf_name]
        return {name: tensors[name] for name in requested}

    def _dequantise(self, gguf_name: str) -> torch.Tensor:
        from gguf import dequantize

        stored = self._stored[gguf_name]
        data = stored.data  # (rows, bytes per row) of quantised blocks, or (rows, values) if float
        if data.ndim < 2 or data.shape[0] <= _ROWS_PER_CHUNK:
            weights: np.ndarray[Any, Any] = dequantize(data, stored.tensor_type)
        else:
            # Row by row in chunks: dequantize's temporaries stay a chunk's size, not the tensor's.
            first = dequantize(data[:_ROWS_PER_CHUNK], stored.tensor_type)
            weights = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
            weights[:_ROWS_PER_CHUNK] = first
            for row in range(_ROWS_PER_CHUNK, data.shape[0], _ROWS_PER_CHUNK):
                weights[row : row + _ROWS_PER_CHUNK] = dequantize(
                    data[row : row + _ROWS_PER_CHUNK], stored.tensor_type
                )
        if self.architecture == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = int(self.config.num_attention_heads)
            if ".attn_k." in gguf_name:
                heads = int(getattr(self.config, "num_key_value_heads", None) or heads)
            weights = _unpermute(weights, heads)
        # A float32 tensor may come back as a read-only view of the mapped file: copy only then.
        return torch.from_numpy(np.require(weights, dtype=np.float32, requirements=["C", "W"]))


def _unpermute(weights: np.ndarray[Any, Any], heads: int) -> np.ndarray[Any, Any]:
    """Undo llama.cpp's interleaving of each head's rotary halves in the query/key rows."""
    dim = weights.shape[0] // heads // 2
    grouped = weights.reshape(heads, dim, 2, *weights.shape[1:])
    return grouped.swapaxes(2, 1).reshape(weights.shape)
