"""Drop one transformers warning that every diffusion command printed.

Importing a Stable Diffusion pipeline makes transformers look up ``CLIPImageProcessor``; without
torchvision it falls back to the PIL image processor and says so on stderr. The pipelines here
never preprocess images (the safety checker's feature extractor is unused), so the fallback is
exactly right and torchvision would be a large dependency for nothing. Only that message is
dropped; every other transformers warning still shows. Imported before diffusers.
"""

from __future__ import annotations

import logging

_FALLBACK = "requires torchvision (not installed); falling back"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _FALLBACK not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())
