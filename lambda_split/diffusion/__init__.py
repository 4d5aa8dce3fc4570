"""The diffusion split: text encoders, scheduler and VAE on the device, the U-Net on the server.

Prompt text and pixels never leave the device. Once per session the prompt embeddings
cross (with SDXL's pooled ``text_embeds`` and ``time_ids``); then each U-Net call sends
the scaled latents and timestep and receives the noise prediction.
"""

from __future__ import annotations

from lambda_split.diffusion._client import (
    DiffusionClient,
    DiffusionResult,
    DiffusionServerInfo,
    ImagineStats,
    fetch_diffusion_info,
    imagine,
    make_scheduler,
)
from lambda_split.diffusion._eavesdrop import (
    CapturedStep,
    RecordingTransport,
    StepLeak,
    alpha_bar,
    captured_steps,
    eavesdrop_decode,
)
from lambda_split.diffusion._executor import (
    DiffusionExecutor,
    DiffusionLimits,
    DiffusionState,
    load_diffusion_service,
)
from lambda_split.diffusion._metrics import psnr, ssim
from lambda_split.diffusion._sources import (
    BUILTIN_DIFFUSION_MODELS,
    TINY_SD,
    TINY_SDXL,
    DiffusionSource,
    meta_unet,
    resolve_diffusion,
    tiny_tokenizer,
    unet_fingerprint,
)
from lambda_split.diffusion._trunk import LocalUNetTrunk, RemoteUNetTrunk, TrunkFn, TrunkUNet

__all__ = [
    "BUILTIN_DIFFUSION_MODELS",
    "TINY_SD",
    "TINY_SDXL",
    "CapturedStep",
    "DiffusionClient",
    "DiffusionExecutor",
    "DiffusionLimits",
    "DiffusionResult",
    "DiffusionServerInfo",
    "DiffusionSource",
    "DiffusionState",
    "ImagineStats",
    "LocalUNetTrunk",
    "RecordingTransport",
    "RemoteUNetTrunk",
    "StepLeak",
    "TrunkFn",
    "TrunkUNet",
    "alpha_bar",
    "captured_steps",
    "eavesdrop_decode",
    "fetch_diffusion_info",
    "imagine",
    "load_diffusion_service",
    "make_scheduler",
    "meta_unet",
    "psnr",
    "resolve_diffusion",
    "ssim",
    "tiny_tokenizer",
    "unet_fingerprint",
]
