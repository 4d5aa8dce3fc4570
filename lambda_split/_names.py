"""Names of the built-in models, importable without torch or transformers."""

from __future__ import annotations

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-random-llama"
BUILTIN_MODELS = (SMOLLM2, TINY_LLAMA)
