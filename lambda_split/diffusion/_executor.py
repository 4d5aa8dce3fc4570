"""The server side of the diffusion split: a U-Net behind :class:`TrunkService`.

Two ways to run a session. Per step (the original protocol, kept for older clients): one
DIFFUSION_CONTEXT frame with the prompt embeddings (``encoder_hidden_states`` (B, L, D)
and, for SDXL, ``text_embeds`` (B, P) and ``time_ids`` (B, K)); the reply is
``accepted`` = [B, L]. Each DIFFUSION_STEP frame then carries ``latents`` (B, C, H, W),
the scaled model input with both guidance halves, and ``timestep`` (1,) or (B,) in FP32;
the reply is ``noise_pred`` (B, C_out, H, W). A new context frame replaces the old one.

Latents on the server (what current clients use, advertised as ``latents_on_server`` in
/v1/info): one DIFFUSION_BEGIN frame, then DIFFUSION_ADVANCE frames of a step index; the
server holds the latents and the scheduler (see :mod:`lambda_split.diffusion._loop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from lambda_split._codec import Encoding, Frame, FrameError, FrameKind
from lambda_split._service import ServiceError, ServiceLimits, TrunkService
from lambda_split.diffusion._loop import BEGIN_NAMES, BYTE_NAMES, ServerLoop, input_digest, start_loop
from lambda_split.diffusion._trunk import CONTEXT_NAMES, EXACT_NAMES

MAX_ABS_TIMESTEP = 1e5


@dataclass(frozen=True)
class DiffusionLimits:
    """Bounds on one diffusion session: U-Net calls, and latent side as a multiple of the native size."""

    max_steps_per_session: int = 256
    max_side_factor: float = 2.0
    #: U-Net calls one latents-on-server frame may ask for (each holds the compute lock in turn)
    max_calls_per_frame: int = 8

    def __post_init__(self) -> None:
        if self.max_steps_per_session < 1:
            raise ValueError("max_steps_per_session must be at least 1")
        if self.max_calls_per_frame < 1:
            raise ValueError("max_calls_per_frame must be at least 1")
        if self.max_side_factor <= 0:
            raise ValueError("max_side_factor must be positive")


@dataclass
class DiffusionState:
    context: dict[str, torch.Tensor] | None = None
    steps: int = 0
    batch: int = 0
    loop: ServerLoop | None = None


class DiffusionExecutor:
    """Runs a U-Net: prompt context once per session, then latents and a timestep in, noise out."""

    step_kinds = frozenset(
        {
            FrameKind.DIFFUSION_CONTEXT,
            FrameKind.DIFFUSION_STEP,
            FrameKind.DIFFUSION_BEGIN,
            FrameKind.DIFFUSION_ADVANCE,
        }
    )
    result_kind = FrameKind.DIFFUSION_RESULT

    def __init__(self, unet: UNet2DConditionModel, limits: DiffusionLimits | None = None) -> None:
        """Wrap ``unet``; refuse U-Nets whose extra conditioning this protocol does not carry."""
        config = unet.config
        if config.class_embed_type is not None or config.time_cond_proj_dim is not None:
            raise ValueError("U-Nets with class labels or timestep conditions are not supported")
        if config.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type {config.addition_embed_type!r} is not supported")
        if not isinstance(config.cross_attention_dim, int):
            raise ValueError("per-block cross_attention_dim is not supported")
        self.unet = unet.eval()
        self.limits = limits or DiffusionLimits()
        self.in_channels = int(config.in_channels)
        self.out_channels = int(config.out_channels)
        self.context_dim = int(config.encoder_hid_dim or config.cross_attention_dim)
        size = config.sample_size
        self.sample_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.text_time = config.addition_embed_type == "text_time"
        self.add_in_features = int(unet.add_embedding.linear_1.in_features) if self.text_time else 0
        self.time_embed_dim = int(config.addition_time_embed_dim or 0)

    @property
    def pipeline(self) -> str:
        return "sdxl" if self.text_time else "sd"

    @property
    def unet_dtype(self) -> torch.dtype:
        dtype: torch.dtype = next(iter(self.unet.parameters())).dtype
        return dtype

    def new_state(self) -> DiffusionState:
        return DiffusionState()

    def step(self, state: DiffusionState, frame: Frame, limits: ServiceLimits) -> dict[str, torch.Tensor]:
        for name, encoding in frame.encodings.items():
            byte_string = frame.kind is FrameKind.DIFFUSION_BEGIN and name in BYTE_NAMES
            if (encoding is Encoding.U8) is not byte_string or (
                name in EXACT_NAMES and encoding is not Encoding.FP32
            ):
                raise FrameError(f"tensor {name!r} may not use the {encoding.wire_name} encoding")
        if frame.kind is FrameKind.DIFFUSION_CONTEXT:
            if set(frame.tensors) != self._context_names:
                raise FrameError(f"a context frame carries exactly {', '.join(sorted(self._context_names))}")
            return self._context(state, frame, limits)
        if frame.kind is FrameKind.DIFFUSION_BEGIN:
            return self._begin(state, frame, limits)
        if frame.kind is FrameKind.DIFFUSION_ADVANCE:
            return self._advance(state, frame, limits)
        return self._step(state, frame, limits)

    @property
    def _context_names(self) -> set[str]:
        return set(CONTEXT_NAMES) if self.text_time else {"encoder_hidden_states"}

    def _context(self, state: DiffusionState, frame: Frame, limits: ServiceLimits) -> dict[str, torch.Tensor]:
        hidden = frame.tensor("encoder_hidden_states", rank=3)  # (B, L, D)
        batch, length, width = hidden.shape
        if width != self.context_dim:
            raise FrameError(
                f"encoder_hidden_states width {width} does not match the U-Net's {self.context_dim}"
            )
        if batch > limits.max_batch or length > limits.max_step_tokens:
            raise ServiceError(
                413,
                "step_too_large",
                f"at most {limits.max_batch} rows of {limits.max_step_tokens} context tokens",
            )
        context = {"encoder_hidden_states": hidden}
        if self.text_time:
            text = frame.tensor("text_embeds", rank=2)  # (B, P)
            time_ids = frame.tensor("time_ids", rank=2)  # (B, K)
            if text.shape[0] != batch or time_ids.shape[0] != batch:
                raise FrameError("text_embeds and time_ids must have the batch size of encoder_hidden_states")
            if text.shape[1] + self.time_embed_dim * time_ids.shape[1] != self.add_in_features:
                raise FrameError(
                    f"text_embeds and time_ids do not add up to the U-Net's "
                    f"{self.add_in_features} added-embedding features"
                )
            context |= {"text_embeds": text, "time_ids": time_ids}
        state.context = {name: value.to(self.unet_dtype) for name, value in context.items()}
        state.batch = batch
        state.loop = None
        return {"accepted": torch.tensor([float(batch), float(length)])}

    def _step(self, state: DiffusionState, frame: Frame, limits: ServiceLimits) -> dict[str, torch.Tensor]:
        if state.context is None:
            raise ServiceError(409, "missing_context", "send the prompt context before the first step")
        if set(frame.tensors) != {"latents", "timestep"}:
            raise FrameError("a step frame carries exactly latents and timestep")
        latents = frame.tensor("latents", rank=4)  # (B, C, H, W)
        timestep = frame.tensor("timestep", rank=1)  # (1,) or (B,)
        batch, channels, height, width = latents.shape
        if channels != self.in_channels:
            raise FrameError(f"latents have {channels} channels, the U-Net takes {self.in_channels}")
        if batch != state.batch:
            raise FrameError(f"latents batch {batch} does not match the context batch {state.batch}")
        self._check_latent_size(height, width)
        if timestep.shape[0] not in (1, batch) or float(timestep.abs().max()) > MAX_ABS_TIMESTEP:
            raise FrameError("timestep must be (1,) or (batch,) with values of magnitude at most 1e5")
        self._check_step_budget(state, 1)
        return {"noise_pred": self._unet(state, latents, timestep)}

    def _check_step_budget(self, state: DiffusionState, calls: int) -> None:
        if state.steps + calls > self.limits.max_steps_per_session:
            raise ServiceError(
                422,
                "session_step_limit",
                f"a session runs at most {self.limits.max_steps_per_session} U-Net steps "
                "(limits.max_steps_per_session in /v1/info)",
            )

    def _unet(self, state: DiffusionState, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        context = state.context or {}
        added = {name: context[name] for name in ("text_embeds", "time_ids") if name in context}
        with torch.inference_mode():
            out: torch.Tensor = self.unet(
                sample.to(self.unet_dtype),
                timestep,
                encoder_hidden_states=context["encoder_hidden_states"],
                added_cond_kwargs=added or None,
                return_dict=False,
            )[0]
        state.steps += 1
        return out.float()

    def _begin(self, state: DiffusionState, frame: Frame, limits: ServiceLimits) -> dict[str, torch.Tensor]:
        names = set(frame.tensors)
        if not self._context_names <= names or not names <= self._context_names | BEGIN_NAMES:
            raise FrameError(
                f"a begin frame carries {', '.join(sorted(self._context_names))}, noise, params, "
                "scheduler and, for schedulers that draw noise, generator"
            )
        if self.out_channels != self.in_channels:
            raise FrameError("this U-Net predicts more channels than it takes; use per-step frames")
        self._context(state, frame, limits)
        noise = frame.tensor("noise", rank=4)
        self._check_latent_size(noise.shape[2], noise.shape[3])
        self._check_step_budget(state, int(min(float(frame.tensor("params", rank=1)[0]), 2**31)))
        loop = start_loop(
            frame,
            sdxl=self.text_time,
            in_channels=self.in_channels,
            max_steps=self.limits.max_steps_per_session,
        )
        self._check_step_budget(state, loop.calls)
        calls = self._calls_asked(frame.tensors["params"][3:], loop, limits)
        state.loop = loop
        return self._loop_calls(state, loop, calls)

    def _advance(self, state: DiffusionState, frame: Frame, limits: ServiceLimits) -> dict[str, torch.Tensor]:
        loop = state.loop
        if loop is None:
            raise ServiceError(409, "missing_begin", "send a begin frame before advancing")
        if set(frame.tensors) != {"step"} or frame.tensor("step", rank=1).shape[0] not in (1, 2):
            raise FrameError("an advance frame carries exactly step: (index,) or (index, calls)")
        index = float(frame.tensors["step"][0])
        if index != loop.index + 1:
            raise ServiceError(
                409, "bad_step_index", f"the next U-Net call is {loop.index + 1}, not {index:g}"
            )
        if index >= loop.calls:
            raise ServiceError(422, "denoising_finished", f"this image took all its {loop.calls} U-Net calls")
        calls = self._calls_asked(frame.tensors["step"][1:], loop, limits, start=int(index))
        self._check_step_budget(state, calls)
        loop.advance()
        return self._loop_calls(state, loop, calls)

    def _calls_asked(
        self, asked: torch.Tensor, loop: ServerLoop, limits: ServiceLimits, start: int = 0
    ) -> int:
        """How many U-Net calls a frame asks for (one if it does not say), within the limits."""
        calls = float(asked[0]) if asked.numel() else 1.0
        most = self.limits.max_calls_per_frame
        if calls != int(calls) or not 1 <= calls <= most:
            raise ServiceError(
                413, "step_too_large", f"a frame asks for 1..{most} U-Net calls (limits.max_calls_per_frame)"
            )
        if start + calls > loop.calls:
            raise ServiceError(
                422,
                "denoising_finished",
                f"this image has {loop.calls - start} U-Net calls left, not {calls:g}",
            )
        if calls * loop.latents.numel() > limits.frame.max_elements // 2:
            raise ServiceError(413, "step_too_large", "the noise of that many calls exceeds the frame limits")
        return int(calls)

    def _loop_calls(self, state: DiffusionState, loop: ServerLoop, calls: int) -> dict[str, torch.Tensor]:
        noise, digests = [], []
        for call in range(calls):
            if call:
                loop.advance()
            sample, t = loop.model_input()
            guided = loop.guide(self._unet(state, sample, t))
            loop.record(guided)
            noise.append(guided)
            digests.append(input_digest(sample, t))
        return {"noise_pred": torch.cat(noise), "input_digest": torch.stack(digests)}

    def _check_latent_size(self, height: int, width: int) -> None:
        max_h, max_w = (int(side * self.limits.max_side_factor) for side in self.sample_size)
        if height > max_h or width > max_w:
            raise ServiceError(413, "step_too_large", f"latents are at most {max_h}x{max_w}")

    def state_bytes(self, state: DiffusionState) -> int:
        context = state.context or {}
        held = sum(value.numel() * value.element_size() for value in context.values())
        return held + (state.loop.nbytes if state.loop is not None else 0)

    def state_tokens(self, state: DiffusionState) -> int:
        return state.steps

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "diffusion",
            "pipeline": self.pipeline,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "sample_size": list(self.sample_size),
            "cross_attention_dim": self.context_dim,
            "latents_on_server": True,
        }


def _unet_block_count(unet: UNet2DConditionModel) -> int:
    """Down blocks, the mid block and up blocks: what /v1/info reports as ``num_layers``."""
    return len(unet.down_blocks) + (1 if unet.mid_block is not None else 0) + len(unet.up_blocks)


def load_diffusion_service(
    model: str,
    *,
    security: str,
    limits: ServiceLimits | None = None,
    diffusion_limits: DiffusionLimits | None = None,
    progress: Any = None,
) -> tuple[TrunkService, dict[str, Any]]:
    """Load only the U-Net of ``model`` and wrap it in a service; also return the /v1/info body.

    The whole U-Net is the trunk, so ``split`` is ``[0, num_layers]`` with ``num_layers``
    the U-Net's block count, and ``hidden_size`` is the latent channel count.
    """
    from lambda_split.diffusion._sources import resolve_diffusion
    from lambda_split.protocol import PROTOCOL_VERSION, WIRE_ENCODINGS

    say = progress or (lambda _message: None)
    source = resolve_diffusion(model)
    say(f"loading the U-Net of {source.name}")
    executor = DiffusionExecutor(source.load_unet(), diffusion_limits)
    say(f"fingerprinting the U-Net of {source.name}")
    service = TrunkService(executor, limits=limits)
    blocks = _unet_block_count(executor.unet)
    info = {
        "model": source.name,
        "fingerprint": source.fingerprint,
        "split": [0, blocks],
        "num_layers": blocks,
        "hidden_size": executor.in_channels,
        "security": security,
        "protocol_version": PROTOCOL_VERSION,
        **executor.describe(),
        "wire_encodings": list(WIRE_ENCODINGS),
        "limits": {
            "max_batch": service.limits.max_batch,
            "max_steps_per_session": executor.limits.max_steps_per_session,
            "max_calls_per_frame": executor.limits.max_calls_per_frame,
            "max_latent_size": [int(side * executor.limits.max_side_factor) for side in executor.sample_size],
            "max_frame_bytes": service.limits.frame.max_bytes,
        },
    }
    return service, info
