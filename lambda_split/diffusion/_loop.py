"""Latents on the server: the server keeps the latents and its own copy of the device's scheduler.

The device still runs the unmodified diffusers pipeline, scheduler included; the server
runs the same scheduler over the same numbers, so the device never uploads latents::

    up                                                  down (DIFFUSION_RESULT), n calls
    DIFFUSION_BEGIN    encoder_hidden_states (R, L, D)   noise_pred   (n*B, C, H, W), wire encoding
                       [text_embeds (R, P), time_ids      input_digest (n, 64)
                        (R, K) FP32: SDXL]
                       noise     (B, C, H, W) FP32: the pipeline's initial draw, before init_noise_sigma
                       params    (3,) or (4,) FP32: num_inference_steps, guidance_scale, eta[, n]
                       scheduler (n,) U8: the scheduler's diffusers JSON (``to_json_string``)
                       [generator (m,) U8: torch CPU generator state, if the scheduler's
                        step draws noise]
    DIFFUSION_ADVANCE  step (1,) or (2,) FP32: the index of the next U-Net call (1, 2, ...)[, n]

``R`` is ``2B`` with classifier-free guidance (the unconditional rows first), else ``B``.
``n`` (default 1, at most ``limits.max_calls_per_frame`` in /v1/info) is how many U-Net
calls the frame asks for; their noise comes back in call order.
The server sets the timesteps, scales the noise, and for each U-Net call builds the model
input exactly as the pipeline does, applies the guidance, and returns the guided noise
(half the rows). Before the next call it steps its scheduler with that noise *as the
device decoded it* (after the wire encoding), so both sides stay in lock-step even on a
quantised wire. ``input_digest`` holds, per call, the first 31 bytes of SHA-256 over the
model input and timestep (fp32, little-endian) as 62 nibbles between two markers of 127:
64 small integers, one int8 block, which every wire encoding carries exactly. The device
checks it against its own U-Net input at every call.
The wire encoding of the loop is that of ``encoder_hidden_states`` in the begin frame.
Byte strings cross as U8 tensors, one element per byte; they are a few kilobytes, once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch

from lambda_split._codec import INT8_BLOCK, Encoding, Frame, FrameError, wire_roundtrip

#: Scheduler classes the server builds: diffusers' own list of schedulers for these U-Nets.
SCHEDULERS = frozenset(
    {
        "DDIMScheduler",
        "DDPMScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DEISMultistepScheduler",
        "UniPCMultistepScheduler",
    }
)
MAX_SCHEDULER_BYTES = 64 * 1024
MAX_GENERATOR_BYTES = 16 * 1024
MAX_TRAIN_TIMESTEPS = 10_000
MAX_GUIDANCE = 1e3
#: Each digest row is one int8 block (64 values) that holds 127, so its scale is exactly 1.
DIGEST_MARK = 127.0
DIGEST_WIDTH = INT8_BLOCK
BEGIN_NAMES = frozenset({"noise", "params", "scheduler", "generator"})
BYTE_NAMES = frozenset({"scheduler", "generator"})  # byte strings, U8


def bytes_tensor(raw: bytes) -> torch.Tensor:
    """A byte string as a uint8 tensor (sent in the U8 encoding)."""
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def input_digest(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A (64,) tensor naming a U-Net input and timestep, exact in every wire encoding."""
    digest = hashlib.sha256()
    digest.update(sample.detach().float().contiguous().numpy().astype("<f4").tobytes())
    digest.update(torch.as_tensor(timestep).detach().float().reshape(-1).numpy().astype("<f4").tobytes())
    nibbles = [value for byte in digest.digest()[:31] for value in (byte >> 4, byte & 15)]
    return torch.tensor([DIGEST_MARK, *nibbles, DIGEST_MARK], dtype=torch.float32)


def step_accepts(scheduler: Any, name: str) -> bool:
    """Whether the scheduler's ``step`` takes ``name`` (the pipelines' own test for eta and generator)."""
    return name in inspect.signature(scheduler.step).parameters


def build_scheduler(raw: bytes) -> Any:
    """A scheduler from its diffusers JSON config, refusing classes and sizes outside the limits."""
    if len(raw) > MAX_SCHEDULER_BYTES:
        raise FrameError(f"the scheduler config is at most {MAX_SCHEDULER_BYTES} bytes")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FrameError("the scheduler tensor is not a JSON config") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in SCHEDULERS:
        raise FrameError(f"scheduler {name!r} is not served; one of {', '.join(sorted(SCHEDULERS))}")
    trains = config.get("num_train_timesteps", 1000)
    if not isinstance(trains, int) or isinstance(trains, bool) or not 1 <= trains <= MAX_TRAIN_TIMESTEPS:
        raise FrameError(f"num_train_timesteps must be an integer in 1..{MAX_TRAIN_TIMESTEPS}")
    try:
        return getattr(diffusers, name).from_config(config)
    except Exception as exc:  # a config diffusers refuses, whatever the exception type
        raise FrameError(f"scheduler config refused: {type(exc).__name__}") from None


@dataclass
class ServerLoop:
    """The denoising state of one session: latents, scheduler, and the noise the device last received."""

    scheduler: Any
    timesteps: torch.Tensor
    latents: torch.Tensor  # (B, C, H, W), fp32
    guidance: float
    cfg: bool
    wire: Encoding
    extra: dict[str, Any] = field(default_factory=dict)  # eta and generator, as the pipeline passes them
    index: int = 0
    received: torch.Tensor | None = None  # (B, C, H, W), the guided noise as the device decoded it

    @property
    def calls(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def nbytes(self) -> int:
        held = [self.latents] + ([self.received] if self.received is not None else [])
        return sum(value.numel() * value.element_size() for value in held)

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The U-Net input and timestep of the current call, built as the pipelines build them."""
        t = self.timesteps[self.index]
        sample = torch.cat([self.latents] * 2) if self.cfg else self.latents
        return self.scheduler.scale_model_input(sample, t), t

    def guide(self, noise: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance exactly as the pipelines write it."""
        if not self.cfg:
            return noise
        uncond, text = noise.chunk(2)
        return uncond + self.guidance * (text - uncond)

    def record(self, guided: torch.Tensor) -> None:
        """Keep ``guided`` as the device will decode it, to step with before the next call."""
        self.received = wire_roundtrip(guided, self.wire)

    def advance(self) -> None:
        """Step the scheduler as the device's pipeline does: it sees the guided noise in both halves."""
        if self.received is None:
            raise FrameError("no U-Net call to step from")
        noise = self.guide(torch.cat([self.received] * 2)) if self.cfg else self.received
        t = self.timesteps[self.index]
        self.latents = self.scheduler.step(noise, t, self.latents, **self.extra, return_dict=False)[0]
        self.index += 1
        self.received = None


def start_loop(frame: Frame, *, sdxl: bool, in_channels: int, max_steps: int) -> ServerLoop:
    """Build the session's loop from a begin frame (the context is checked by the caller)."""
    noise = frame.tensor("noise", rank=4)  # (B, C, H, W)
    params = frame.tensor("params", rank=1)
    context_rows = frame.tensor("encoder_hidden_states", rank=3).shape[0]
    rows = noise.shape[0]
    if noise.shape[1] != in_channels:
        raise FrameError(f"noise has {noise.shape[1]} channels, the U-Net takes {in_channels}")
    if context_rows not in (rows, 2 * rows):
        raise FrameError("the context has one row per noise row, or two with classifier-free guidance")
    if params.shape[0] not in (3, 4):
        raise FrameError("params carries num_inference_steps, guidance_scale, eta and optionally calls")
    steps, guidance, eta = (float(value) for value in params[:3])
    if steps != int(steps) or not 1 <= steps <= max_steps:
        raise FrameError(f"num_inference_steps must be an integer in 1..{max_steps}")
    if not (abs(guidance) <= MAX_GUIDANCE and abs(eta) <= MAX_GUIDANCE):
        raise FrameError(f"guidance_scale and eta are at most {MAX_GUIDANCE:g} in magnitude")
    scheduler = build_scheduler(_bytes(frame, "scheduler", MAX_SCHEDULER_BYTES))
    try:
        scheduler.set_timesteps(int(steps), device="cpu")
        if sdxl and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as StableDiffusionXLPipeline does, and StableDiffusionPipeline not
        latents = noise * scheduler.init_noise_sigma
    except Exception as exc:  # a config diffusers accepts but cannot schedule
        raise FrameError(f"scheduler refused {int(steps)} steps: {type(exc).__name__}") from None
    extra: dict[str, Any] = {}
    if step_accepts(scheduler, "eta"):
        extra["eta"] = eta
    if step_accepts(scheduler, "generator"):
        extra["generator"] = _generator(frame)
    elif "generator" in frame.tensors:
        raise FrameError(f"{type(scheduler).__name__} draws no noise; send no generator")
    wire = frame.encodings["encoder_hidden_states"]
    return ServerLoop(
        scheduler, scheduler.timesteps, latents, guidance, context_rows == 2 * rows, wire, extra
    )


def _bytes(frame: Frame, name: str, limit: int) -> bytes:
    value = frame.tensor(name, rank=1)
    if frame.encodings[name] is not Encoding.U8:
        raise FrameError(f"tensor {name!r} must be U8 (bytes)")
    if value.shape[0] > limit:
        raise FrameError(f"tensor {name!r} is at most {limit} bytes")
    return bytes(value.numpy().tobytes())


def _generator(frame: Frame) -> torch.Generator:
    if "generator" not in frame.tensors:
        raise FrameError("this scheduler draws noise: send the generator state")
    state = torch.frombuffer(bytearray(_bytes(frame, "generator", MAX_GENERATOR_BYTES)), dtype=torch.uint8)
    generator = torch.Generator()
    try:
        generator.set_state(state)
    except (RuntimeError, ValueError):
        raise FrameError("generator is not a torch CPU generator state") from None
    return generator
