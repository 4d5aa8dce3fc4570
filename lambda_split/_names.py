"""Names of the built-in models, importable without torch or transformers."""

from __future__ import annotations

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-random-llama"
#: tiny random checkpoints of the other supported families (lambda_split._families_tiny): name -> family
TINY_FAMILY_MODELS = {
    f"tiny-random-{family}": family
    for family in ("qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "olmo", "olmo2", "gpt2")
}
BUILTIN_MODELS = (SMOLLM2, TINY_LLAMA, *TINY_FAMILY_MODELS)
TINY_SD = "tiny-random-sd"
TINY_SDXL = "tiny-random-sdxl"
BUILTIN_DIFFUSION_MODELS = (TINY_SD, TINY_SDXL)
