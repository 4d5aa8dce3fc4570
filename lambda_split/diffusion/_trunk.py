"""The U-Net seam on the device: a stand-in module for the pipeline, and the trunks it can call.

A trunk is any callable ``trunk(latent_model_input, timestep, context) -> noise_pred``;
``context`` holds ``encoder_hidden_states`` and, for SDXL, ``text_embeds`` and
``time_ids``. :class:`TrunkUNet` takes the U-Net's place inside an unmodified diffusers
pipeline, so the pipeline's own ``__call__`` (prompt encoding, latent initialisation,
scheduler, guidance, VAE decode) runs on the device and only the U-Net call leaves it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from lambda_split._codec import Encoding, Frame, FrameKind
from lambda_split._errors import ProtocolMismatch
from lambda_split._session import RemoteSession
from lambda_split._stream import Link
from lambda_split.diffusion._sources import meta_unet
from secure_channel import Transport

Context = Mapping[str, torch.Tensor]
TrunkFn = Callable[[torch.Tensor, torch.Tensor, Context], torch.Tensor]
CONTEXT_NAMES = ("encoder_hidden_states", "text_embeds", "time_ids")
#: Tensors that must cross exactly, whatever the wire encoding (SDXL time ids reach 1024+; the initial
#: noise, loop parameters, byte strings and step index of the latents-on-server frames).
EXACT_NAMES = frozenset({"time_ids", "timestep", "noise", "params", "step"})


class TrunkUNet(torch.nn.Module):
    """Stands in for a pipeline's ``UNet2DConditionModel``: same config, but ``forward`` calls a trunk."""

    def __init__(
        self,
        config: Mapping[str, Any],
        trunk: TrunkFn | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        """``config`` is the U-Net config as stored; the full config is rebuilt on the meta device."""
        super().__init__()
        skeleton = meta_unet(config)
        self.config = skeleton.config
        add = getattr(skeleton, "add_embedding", None)
        # SDXL's _get_add_time_ids reads add_embedding.linear_1.in_features; nothing else is needed.
        self.add_embedding = (
            SimpleNamespace(linear_1=SimpleNamespace(in_features=add.linear_1.in_features))
            if add is not None
            else None
        )
        self.trunk = trunk
        self._dtype = dtype
        self._device = torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        **unsupported: Any,
    ) -> Any:
        if self.trunk is None:
            raise RuntimeError("TrunkUNet has no trunk attached")
        used = [name for name, value in unsupported.items() if value is not None]
        if used:
            raise NotImplementedError(f"the split U-Net does not carry {', '.join(sorted(used))}")
        extra = dict(added_cond_kwargs or {})
        unknown = set(extra) - set(CONTEXT_NAMES)
        if unknown:
            raise NotImplementedError(f"the split U-Net does not carry {', '.join(sorted(unknown))}")
        context = {"encoder_hidden_states": encoder_hidden_states} | extra
        t = torch.as_tensor(timestep).reshape(-1)
        noise_pred = self.trunk(sample, t, context).to(sample.dtype)
        return UNet2DConditionOutput(sample=noise_pred) if return_dict else (noise_pred,)


class LocalUNetTrunk:
    """The trunk in this process: calls the U-Net exactly as the diffusers pipelines do."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        self.unet = unet
        self.calls = 0

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, context: Context) -> torch.Tensor:
        self.calls += 1
        added = {name: context[name] for name in ("text_embeds", "time_ids") if name in context}
        with torch.inference_mode():
            out: torch.Tensor = self.unet(
                latents,
                timestep,
                encoder_hidden_states=context["encoder_hidden_states"],
                added_cond_kwargs=added or None,
                return_dict=False,
            )[0]
        return out


class RemoteUNetTrunk(RemoteSession):
    """One U-Net session on the server. Sends the prompt embeddings once, then one frame per call."""

    def __init__(self, link: Transport | Link, wire: Encoding) -> None:
        super().__init__(link, wire)
        self.calls = 0
        self._sent: dict[str, torch.Tensor] | None = None

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, context: Context) -> torch.Tensor:
        if not self._already_sent(context):
            self._exchange(FrameKind.DIFFUSION_CONTEXT, dict(context))
            self._sent = dict(context)
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        result = self._exchange(FrameKind.DIFFUSION_STEP, {"latents": latents, "timestep": t})
        noise_pred = result.tensor("noise_pred", rank=4)
        if noise_pred.shape[0] != latents.shape[0] or noise_pred.shape[2:] != latents.shape[2:]:
            raise ProtocolMismatch(
                f"server returned shape {tuple(noise_pred.shape)} for {tuple(latents.shape)}"
            )
        self.calls += 1
        out: torch.Tensor = noise_pred.to(latents.dtype)
        return out

    def _already_sent(self, context: Context) -> bool:
        sent = self._sent
        if sent is None or set(sent) != set(context):
            return False
        return all(sent[name] is value or torch.equal(sent[name], value) for name, value in context.items())

    def _exchange(self, kind: FrameKind, tensors: dict[str, torch.Tensor]) -> Frame:
        encoded = {
            name: (value.detach().float(), Encoding.FP32 if name in EXACT_NAMES else self.wire)
            for name, value in tensors.items()
        }
        return self.exchange(kind, encoded, FrameKind.DIFFUSION_RESULT)
