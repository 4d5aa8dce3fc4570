"""What a passive eavesdropper on a plain-mode diffusion session can rebuild.

Per-step sessions show every DIFFUSION_STEP frame (scaled latents and timestep) and every
DIFFUSION_RESULT frame (noise prediction). Latents-on-server sessions show no latents
after the first frame, but the DIFFUSION_BEGIN frame carries the initial noise, the
scheduler config and the generator state, and each result the guided noise the device
stepped with: the attacker replays the scheduler exactly as the server does and gets the
same latents at every step. The attacker also holds the public model: its VAE and
scheduler config. For variance-preserving training schedules every scheduler's U-Net
input is ``x_in = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (sigma schedulers reach this
through ``scale_model_input``), so at each step the attacker can decode

* the raw latents: ``vae.decode(x_in)``, and
* the predicted clean image: ``x0 = (x_in - sqrt(1 - a_t) eps) / sqrt(a_t)``
  (``x0 = sqrt(a_t) x_in - sqrt(1 - a_t) v`` for v-prediction models),

and compare each with the image the victim finally saw.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lambda_split._codec import Frame, FrameError, FrameKind, decode_frame
from lambda_split.diffusion._loop import ServerLoop, start_loop
from lambda_split.diffusion._metrics import psnr, ssim
from secure_channel import Request, Response, Transport, WireStats


class RecordingTransport(Transport):
    """Wraps a transport and keeps every request and response body, as a plain-mode tap would see them."""

    def __init__(self, inner: Transport) -> None:
        """Record everything ``inner`` exchanges; security mode and byte counters are ``inner``'s."""
        self.inner = inner
        self.security = inner.security
        self.stats: WireStats = inner.stats
        self.records: list[tuple[Request, Response]] = []

    def exchange(self, request: Request) -> Response:
        response = self.inner.exchange(request)
        self.records.append((request, response))
        return response

    def close(self) -> None:
        self.inner.close()

    def bodies(self) -> list[tuple[bytes, bytes]]:
        return [(request.content, response.content) for request, response in self.records]


@dataclass(frozen=True)
class CapturedStep:
    latents: torch.Tensor  # (B, C, H, W), the scaled U-Net input
    timestep: float
    noise_pred: torch.Tensor  # (B, C, H, W)


def captured_steps(bodies: Sequence[tuple[bytes, bytes]]) -> list[CapturedStep]:
    """The U-Net calls of captured request and response bodies; anything not a frame is skipped."""
    pairs = []
    for sent, received in bodies:
        try:
            pairs.append((decode_frame(sent), decode_frame(received)))
        except FrameError:
            continue
    return captured_frame_steps(pairs)


def captured_frame_steps(pairs: Iterable[tuple[Frame, Frame]]) -> list[CapturedStep]:
    """Each U-Net call of decoded (request, reply) frame pairs, in order: per-step calls as sent,
    latents-on-server calls by replaying the server's scheduler from the begin frame."""
    steps = []
    loop: ServerLoop | None = None
    for request, reply in pairs:
        if reply.kind is not FrameKind.DIFFUSION_RESULT or "noise_pred" not in reply.tensors:
            continue
        noise = reply.tensors["noise_pred"]
        if request.kind is FrameKind.DIFFUSION_STEP:
            timestep = float(request.tensors["timestep"].reshape(-1)[0])
            steps.append(CapturedStep(request.tensors["latents"], timestep, noise))
            continue
        try:
            if request.kind is FrameKind.DIFFUSION_BEGIN:
                loop = _replay(request)
            elif (
                request.kind is FrameKind.DIFFUSION_ADVANCE and loop is not None and loop.received is not None
            ):
                loop.advance()
            else:
                continue
            rows = loop.latents.shape[0]
            for call, guided in enumerate(torch.split(noise, rows)):
                if call:
                    loop.advance()
                sample, t = loop.model_input()
                loop.received = guided  # what the device stepped with, as the server keeps it
                steps.append(CapturedStep(sample[:rows], float(t), guided))
        except (FrameError, KeyError, IndexError):
            loop = None
            continue
    return steps


def _replay(begin: Frame) -> ServerLoop:
    """The server's loop, rebuilt from a captured begin frame."""
    noise = begin.tensors["noise"]
    return start_loop(
        begin, sdxl="text_embeds" in begin.tensors, in_channels=int(noise.shape[1]), max_steps=2**20
    )


@dataclass(frozen=True)
class StepLeak:
    step: int
    timestep: float
    ssim_latents: float
    ssim_x0: float
    psnr_x0: float
    images: dict[str, np.ndarray] = field(repr=False, default_factory=dict)


def alpha_bar(alphas_cumprod: torch.Tensor, timestep: float) -> float:
    """The training schedule's cumulative alpha at a (possibly fractional) timestep."""
    last = alphas_cumprod.shape[0] - 1
    t = min(max(timestep, 0.0), float(last))
    low = int(t)
    high = min(low + 1, last)
    frac = t - low
    return float((1 - frac) * alphas_cumprod[low] + frac * alphas_cumprod[high])


def _decode(vae: Any, latents: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        image: torch.Tensor = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    pixels: np.ndarray = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
    return pixels


def eavesdrop_decode(
    vae: Any,
    scheduler_config: Any,
    steps: Sequence[CapturedStep],
    final_image: Any,
    *,
    guidance_scale: float | None = None,
    keep_images: bool = False,
) -> list[StepLeak]:
    """Decode each captured step with the public VAE and score it against the victim's ``final_image``.

    With classifier-free guidance the batch holds two equal latent halves; the attacker
    uses one, and the guided noise if ``guidance_scale`` is known, else the conditional half.
    """
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_config(scheduler_config).alphas_cumprod
    prediction = dict(scheduler_config).get("prediction_type", "epsilon")
    reference = np.asarray(final_image, dtype=np.float32)
    reference = reference[0] if reference.ndim == 4 else reference
    leaks = []
    for index, step in enumerate(steps):
        latents, noise = step.latents, step.noise_pred
        if latents.shape[0] % 2 == 0 and torch.equal(*latents.chunk(2)):
            uncond, cond = noise.chunk(2)
            noise = cond if guidance_scale is None else uncond + guidance_scale * (cond - uncond)
            latents = latents.chunk(2)[0]
        a = alpha_bar(alphas, step.timestep)
        if prediction == "v_prediction":
            x0 = a**0.5 * latents - (1 - a) ** 0.5 * noise
        else:
            x0 = (latents - (1 - a) ** 0.5 * noise) / a**0.5
        raw_image, x0_image = _decode(vae, latents)[0], _decode(vae, x0)[0]
        kept = {"latents": raw_image, "x0": x0_image} if keep_images else {}
        leaks.append(
            StepLeak(
                index,
                step.timestep,
                ssim(raw_image, reference),
                ssim(x0_image, reference),
                psnr(x0_image, reference),
                kept,
            )
        )
    return leaks
