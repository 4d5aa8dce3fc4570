"""Names of the built-in models, importable without torch or transformers."""

from __future__ import annotations

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-random-llama"
BUILTIN_MODELS = (SMOLLM2, TINY_LLAMA)
TINY_SD = "tiny-random-sd"
TINY_SDXL = "tiny-random-sdxl"
BUILTIN_DIFFUSION_MODELS = (TINY_SD, TINY_SDXL)
