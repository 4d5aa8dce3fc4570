"""The diffusion split: text encoders, scheduler and VAE on the device, the U-Net on the server.

Prompt text and pixels never leave the device. Once per session the prompt embeddings
cross (with SDXL's pooled ``text_embeds`` and ``time_ids``), with the initial noise and
the scheduler config; the server then holds the latents and a copy of the scheduler, and
each U-Net call sends a step index and receives the guided noise prediction, which the
device's own scheduler applies. Servers that predate this get the scaled latents and
timestep at every call instead.
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
    captured_frame_steps,
    captured_steps,
    eavesdrop_decode,
)
from lambda_split.diffusion._executor import (
    DiffusionExecutor,
    DiffusionLimits,
    DiffusionState,
    load_diffusion_service,
)
from lambda_split.diffusion._loop import (
    SCHEDULERS,
    ServerLoop,
    build_scheduler,
    bytes_tensor,
    input_digest,
    start_loop,
    step_accepts,
)
from lambda_split.diffusion._metrics import psnr, ssim
from lambda_split.diffusion._mirror import ServerLatentsTrunk, initial_noise, loop_unsupported
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
    "SCHEDULERS",
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
    "ServerLatentsTrunk",
    "ServerLoop",
    "StepLeak",
    "TrunkFn",
    "TrunkUNet",
    "alpha_bar",
    "build_scheduler",
    "bytes_tensor",
    "captured_frame_steps",
    "captured_steps",
    "eavesdrop_decode",
    "fetch_diffusion_info",
    "imagine",
    "initial_noise",
    "input_digest",
    "load_diffusion_service",
    "loop_unsupported",
    "make_scheduler",
    "meta_unet",
    "psnr",
    "resolve_diffusion",
    "ssim",
    "start_loop",
    "step_accepts",
    "tiny_tokenizer",
    "unet_fingerprint",
]
