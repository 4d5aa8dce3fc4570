"""The device side of latents-on-server sessions: a trunk that uploads no latents.

The device runs the unmodified pipeline and its scheduler; :class:`ServerLatentsTrunk`
stands in for the U-Net call. Its first call sends the prompt context, the pipeline's
initial noise and the scheduler (one DIFFUSION_BEGIN frame); every later call sends only
the index of the call. Each reply carries the guided noise prediction, which the trunk
hands to the pipeline in both guidance halves (so the pipeline's guidance gives it back
unchanged), and the digest of the server's U-Net input, which the trunk checks against
the input the pipeline built: a server out of lock-step is an error, never a wrong image.
See :mod:`lambda_split.diffusion._loop` for the frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from lambda_split._codec import Encoding, FrameKind
from lambda_split._errors import ProtocolMismatch
from lambda_split._session import RemoteSession
from lambda_split._stream import Link
from lambda_split.diffusion._loop import SCHEDULERS, bytes_tensor, input_digest, step_accepts
from lambda_split.diffusion._trunk import EXACT_NAMES, Context
from secure_channel import Transport

#: Pipeline keyword arguments the server's loop reproduces; any other one keeps the per-step path.
LOOP_KWARGS = frozenset({"num_images_per_prompt", "eta"})


def loop_unsupported(pipe: Any, pipeline_kwargs: Mapping[str, Any]) -> str | None:
    """Why this call cannot keep its latents on the server, or None if it can."""
    extra = sorted(set(pipeline_kwargs) - LOOP_KWARGS)
    if extra:
        return f"the server's loop does not reproduce {', '.join(extra)}"
    name = type(pipe.scheduler).__name__
    if name not in SCHEDULERS:
        return f"the server's loop does not run {name}"
    if not isinstance(pipe.unet.config.sample_size, int):
        return "the U-Net's sample_size is not a single side"
    if pipe.text_encoder is not None and pipe.text_encoder.dtype != torch.float32:
        return "the device's text encoder is not float32"
    return None


def initial_noise(
    pipe: Any, prompt: str | list[str], height: int | None, width: int | None, images: int, generator: Any
) -> torch.Tensor:
    """The pipeline's own first draw: what ``prepare_latents`` would take from ``generator``."""
    rows = (1 if isinstance(prompt, str) else len(prompt)) * images
    scale = pipe.vae_scale_factor
    side = int(pipe.unet.config.sample_size) * scale
    shape = (
        rows,
        int(pipe.unet.config.in_channels),
        int(height or side) // scale,
        int(width or side) // scale,
    )
    noise: torch.Tensor = randn_tensor(
        shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32
    )
    return noise


class ServerLatentsTrunk(RemoteSession):
    """One U-Net session whose latents and scheduler live on the server for one image."""

    def __init__(
        self,
        link: Transport | Link,
        wire: Encoding,
        *,
        noise: torch.Tensor,
        scheduler: Any,
        steps: int,
        guidance: float,
        eta: float,
        generator: torch.Generator,
        calls_per_frame: int = 1,
    ) -> None:
        """``calls_per_frame``: U-Net calls asked for per round trip (the server's
        ``limits.max_calls_per_frame``); their noise waits here until the pipeline reaches them."""
        super().__init__(link, wire)
        self.calls = 0
        self.noise = noise
        self.scheduler = scheduler
        self.calls_per_frame = max(1, calls_per_frame)
        self._begin = {
            "noise": (noise.float(), Encoding.FP32),
            "scheduler": (bytes_tensor(scheduler.to_json_string().encode()), Encoding.U8),
        }
        self._params = [float(steps), float(guidance), float(eta)]
        self._generator = generator if step_accepts(scheduler, "generator") else None
        self._sent: dict[str, torch.Tensor] | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (noise (B, C, H, W), digest (64,))

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: Context) -> torch.Tensor:
        rows = self.noise.shape[0]
        if sample.shape[0] not in (rows, 2 * rows) or sample.shape[1:] != self.noise.shape[1:]:
            raise ProtocolMismatch(f"U-Net input {tuple(sample.shape)} does not match the initial noise")
        if self._sent is not None and not _same(self._sent, context):
            raise ProtocolMismatch("the prompt context changed within one image")
        if not self._pending:
            self._fetch(context)
        noise_pred, digest = self._pending.pop(0)
        if not torch.equal(digest, input_digest(sample, timestep)):
            raise ProtocolMismatch(
                f"the server's latents are out of lock-step with the device's at U-Net call {self.calls + 1}"
            )
        self.calls += 1
        both = torch.cat([noise_pred] * 2) if sample.shape[0] == 2 * rows else noise_pred
        return both.to(sample.dtype)

    def _fetch(self, context: Context) -> None:
        """Ask the server for the next U-Net calls: a begin frame first, then advance frames."""
        left = len(self.scheduler.timesteps) - self.calls  # the pipeline set the timesteps before calling
        calls = max(1, min(self.calls_per_frame, left))
        if self._sent is None:
            tensors = dict(self._begin) | {
                "params": (torch.tensor([*self._params, float(calls)]), Encoding.FP32),
                **{
                    name: (value.detach().float(), Encoding.FP32 if name in EXACT_NAMES else self.wire)
                    for name, value in context.items()
                },
            }
            if self._generator is not None:  # its state now, after the pipeline drew the initial noise
                state = bytes(self._generator.get_state().numpy().tobytes())
                tensors["generator"] = (bytes_tensor(state), Encoding.U8)
            reply = self.exchange(FrameKind.DIFFUSION_BEGIN, tensors, FrameKind.DIFFUSION_RESULT)
            self._sent = dict(context)
        else:
            step = torch.tensor([float(self.calls), float(calls)])
            reply = self.exchange(
                FrameKind.DIFFUSION_ADVANCE, {"step": (step, Encoding.FP32)}, FrameKind.DIFFUSION_RESULT
            )
        noise = reply.tensor("noise_pred", rank=4)
        digests = reply.tensor("input_digest", rank=2)
        rows = self.noise.shape[0]
        if noise.shape != (calls * rows, *self.noise.shape[1:]) or digests.shape[0] != calls:
            raise ProtocolMismatch(
                f"server returned {tuple(noise.shape)} noise for {calls} calls of {tuple(self.noise.shape)}"
            )
        self._pending = list(zip(torch.split(noise, rows), digests, strict=True))


def _same(sent: Mapping[str, torch.Tensor], context: Context) -> bool:
    return set(sent) == set(context) and all(
        sent[name] is value or torch.equal(sent[name], value) for name, value in context.items()
    )
