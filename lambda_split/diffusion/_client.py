"""The device side of the diffusion split: everything but the U-Net runs here.

:class:`DiffusionClient` assembles the unmodified diffusers pipeline around a
:class:`TrunkUNet` whose trunk is a :class:`RemoteUNetTrunk` session, so prompt text
and pixels stay on the device and only prompt embeddings and noise predictions cross the transport: with a
current server the latents stay there for the session (one initial draw goes up once,
see :mod:`lambda_split.diffusion._mirror`); with an older one they go up every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch

from lambda_split._codec import Encoding
from lambda_split._errors import FingerprintMismatch, LimitExceeded, ModeMismatch, ProtocolMismatch
from lambda_split._session import check_reply, connect_verified
from lambda_split._stream import StreamLink, TransportKind, make_link
from lambda_split.diffusion._mirror import ServerLatentsTrunk, initial_noise, loop_unsupported
from lambda_split.diffusion._sources import DiffusionSource, resolve_diffusion
from lambda_split.diffusion._trunk import RemoteUNetTrunk, TrunkUNet
from lambda_split.protocol import INFO_PATH, check_protocol_version
from secure_channel import Request, SecurityMode, Transport

StepCallback = Callable[[int, int], None]
ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class DiffusionServerInfo:
    model: str
    fingerprint: str
    pipeline: str
    in_channels: int
    out_channels: int
    cross_attention_dim: int
    sample_size: tuple[int, int]
    security: str
    protocol_version: int
    #: U-Net steps a session may run (None: the server does not say).
    max_steps: int | None = None
    #: The server can hold the latents and scheduler for a session (DIFFUSION_BEGIN/ADVANCE frames).
    latents_on_server: bool = False
    #: U-Net calls one such frame may ask for.
    max_calls_per_frame: int = 1

    @classmethod
    def parse(cls, data: Any) -> DiffusionServerInfo:
        try:
            if data.get("kind") != "diffusion":
                raise ProtocolMismatch(
                    f"the server runs a {data.get('kind', 'llm')!r} trunk, not a diffusion U-Net"
                )
            height, width = data["sample_size"]
            return cls(
                str(data["model"]),
                str(data["fingerprint"]),
                str(data["pipeline"]),
                int(data["in_channels"]),
                int(data["out_channels"]),
                int(data["cross_attention_dim"]),
                (int(height), int(width)),
                str(data["security"]),
                int(data["protocol_version"]),
                _positive(data.get("limits"), "max_steps_per_session"),
                data.get("latents_on_server") is True,
                _positive(data.get("limits"), "max_calls_per_frame") or 1,
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ProtocolMismatch(f"malformed /v1/info reply: {exc}") from None


def _positive(data: Any, name: str) -> int | None:
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def fetch_diffusion_info(transport: Transport) -> DiffusionServerInfo:
    info = DiffusionServerInfo.parse(check_reply(transport.exchange(Request("GET", INFO_PATH)), 200).json())
    check_protocol_version(info.protocol_version)
    return info


@dataclass(frozen=True)
class DiffusionResult:
    images: list[Any]
    steps: int
    trunk_calls: int
    seconds: float
    bytes_sent: int
    bytes_received: int
    #: The latents stayed on the server (False: they went up every step).
    latents_on_server: bool = False


class DiffusionClient:
    """Runs a diffusion pipeline on the device with its U-Net on a server, through ``transport``.

    The transport is required and decides the security mode. Before any embedding is
    sent, :meth:`from_transport` checks the server's protocol, mode, pipeline type and
    U-Net fingerprint against the local model.
    """

    def __init__(
        self,
        transport: Transport,
        source: DiffusionSource,
        info: DiffusionServerInfo,
        *,
        wire: str = "fp32",
        transport_kind: TransportKind | None = None,
    ) -> None:
        """``transport_kind``: ``stream`` (None means this when the transport can stream) or ``http``."""
        if not isinstance(transport, Transport):
            raise TypeError("transport must be a secure_channel.Transport")
        self.transport = transport
        self.link = make_link(transport, transport_kind)
        self.source = source
        self.info = info
        self.wire = Encoding.parse(wire)
        self.unet = TrunkUNet(source.unet_config)
        self.pipeline = source.assemble(self.unet)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        security: SecurityMode,
        keys: str | Path | None = None,
        model: str | DiffusionSource | None = None,
        wire: str = "fp32",
        timeout: float = 120.0,
        progress: ProgressFn | None = None,
        transport_kind: TransportKind | None = None,
    ) -> DiffusionClient:
        """Open a transport in the named security mode and verify the server. ``security`` has no default."""
        return connect_verified(
            url,
            security,
            keys,
            timeout,
            lambda transport: cls.from_transport(
                transport, model, wire=wire, progress=progress, transport_kind=transport_kind
            ),
        )

    @classmethod
    def from_transport(
        cls,
        transport: Transport,
        model: str | DiffusionSource | None = None,
        *,
        wire: str = "fp32",
        progress: ProgressFn | None = None,
        transport_kind: TransportKind | None = None,
    ) -> DiffusionClient:
        """Verify the server behind ``transport`` and load the local device components of ``model``.

        ``model`` defaults to the server's model name, which works for the built-in tiny models.
        """
        say = progress or (lambda _message: None)
        Encoding.parse(wire)
        make_link(transport, transport_kind)  # an unusable transport kind fails before any model loads
        info = fetch_diffusion_info(transport)
        if info.security != transport.security:
            raise ModeMismatch(
                f"the server is in mode {info.security}, not {transport.security}; pass --security {info.security}"
            )
        source = resolve_diffusion(model or info.model) if not isinstance(model, DiffusionSource) else model
        if source.pipeline != info.pipeline:
            raise FingerprintMismatch(
                f"server runs an {info.pipeline} U-Net, the local model is {source.pipeline}"
            )
        say(f"verifying the server's U-Net against {source.name}")
        if source.fingerprint != info.fingerprint:
            raise FingerprintMismatch(
                f"server U-Net {info.model} has fingerprint {info.fingerprint}, the local "
                f"model {source.fingerprint}; refusing to send prompt embeddings"
            )
        say(f"loading the text encoders, scheduler and VAE of {source.name}")
        return cls(transport, source, info, wire=wire, transport_kind=transport_kind)

    def generate(
        self,
        prompt: str | list[str],
        *,
        steps: int = 30,
        seed: int = 0,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | Any | None = None,
        on_step: StepCallback | None = None,
        output_type: str = "pil",
        latents_on_server: bool | None = None,
        **pipeline_kwargs: Any,
    ) -> DiffusionResult:
        """Run the pipeline; the U-Net session lives for this call only.

        ``scheduler`` is a scheduler object or the class name of one in diffusers
        (``"DDIMScheduler"``), built from the pipeline's scheduler config. ``on_step``
        receives (steps done, steps in total). Extra keyword arguments go to the pipeline.
        ``latents_on_server``: None (the default) keeps the latents on the server when the
        server offers it and the call allows it (no extra keyword arguments but
        ``num_images_per_prompt`` and ``eta``, a scheduler the server runs); False sends them
        every step; True insists, raising ValueError if the call or server cannot.
        """
        if steps < 1:
            raise ValueError("steps must be at least 1")
        if self.info.max_steps is not None and steps > self.info.max_steps:
            raise LimitExceeded(
                f"{steps:,} steps asked for; this server runs at most {self.info.max_steps:,} per image"
            )
        pipe = self.pipeline
        original = pipe.scheduler
        if scheduler is not None:
            pipe.scheduler = make_scheduler(scheduler, original.config)
        start = time.perf_counter()
        sent, received = self.transport.stats.bytes_sent, self.transport.stats.bytes_received
        generator = torch.Generator().manual_seed(seed)
        trunk: RemoteUNetTrunk | ServerLatentsTrunk | None = None
        try:
            reason = loop_unsupported(pipe, pipeline_kwargs) if self.info.latents_on_server else (
                "the server does not keep latents (it predates DIFFUSION_BEGIN)"
            )  # fmt: skip
            if latents_on_server and reason is not None:
                raise ValueError(f"cannot keep the latents on the server: {reason}")
            if reason is None and latents_on_server is not False:
                images = int(pipeline_kwargs.get("num_images_per_prompt") or 1)
                noise = initial_noise(pipe, prompt, height, width, images, generator)
                trunk = ServerLatentsTrunk(
                    self.link,
                    self.wire,
                    noise=noise,
                    scheduler=pipe.scheduler,
                    steps=steps,
                    guidance=guidance_scale,
                    eta=float(pipeline_kwargs.get("eta", 0.0)),
                    generator=generator,
                    calls_per_frame=self.info.max_calls_per_frame,
                )
                pipeline_kwargs = pipeline_kwargs | {"latents": noise}
            else:
                trunk = RemoteUNetTrunk(self.link, self.wire)
            self.unet.trunk = trunk
            output = pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                generator=generator,
                output_type=output_type,
                callback_on_step_end=_step_callback(on_step, steps),
                **pipeline_kwargs,
            )
        finally:
            self.unet.trunk = None
            pipe.scheduler = original
            if trunk is not None:
                trunk.close()
        return DiffusionResult(
            list(output.images),
            steps,
            trunk.calls,
            time.perf_counter() - start,
            self.transport.stats.bytes_sent - sent,
            self.transport.stats.bytes_received - received,
            isinstance(trunk, ServerLatentsTrunk),
        )

    def close(self) -> None:
        if isinstance(self.link, StreamLink):
            self.link.shutdown()
        self.transport.close()

    def __enter__(self) -> DiffusionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_scheduler(scheduler: str | Any, config: Any) -> Any:
    """A scheduler object as given, or the diffusers scheduler class of that name built from ``config``."""
    if not isinstance(scheduler, str):
        return scheduler
    cls: Any = getattr(diffusers, scheduler, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"unknown scheduler {scheduler!r}")
    factory: Any = cls
    return factory.from_config(config)


def _step_callback(on_step: StepCallback | None, total: int) -> Any:
    if on_step is None:
        return None

    def callback(_pipe: Any, index: int, _timestep: Any, _kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(index + 1, total)
        return {}

    return callback


@dataclass(frozen=True)
class ImagineStats:
    path: str
    steps: int
    trunk_calls: int
    seconds: float
    bytes_sent: int
    bytes_received: int
    width: int
    height: int
    wire: str


def imagine(
    client_or_transport: DiffusionClient | Transport,
    prompt: str,
    steps: int,
    seed: int,
    out_path: str | Path,
    progress: StepCallback | None = None,
    *,
    model: str | None = None,
    wire: str = "fp32",
    guidance_scale: float = 5.0,
    transport_kind: TransportKind | None = None,
) -> ImagineStats:
    """Generate one image through the split and write it as a PNG; the body of ``lambda-split imagine``.

    Given a transport, the client is built (and the server verified) first; ``model``
    defaults to the server's model name. ``progress`` receives (steps done, steps in total).
    """
    out = Path(out_path)
    if out.suffix.lower() != ".png":
        raise ValueError("the output file must end in .png")
    if isinstance(client_or_transport, DiffusionClient):
        client = client_or_transport
    else:
        client = DiffusionClient.from_transport(
            client_or_transport, model, wire=wire, transport_kind=transport_kind
        )
    result = client.generate(prompt, steps=steps, seed=seed, guidance_scale=guidance_scale, on_step=progress)
    image = result.images[0]
    image.save(out, format="PNG")
    return ImagineStats(
        str(out),
        result.steps,
        result.trunk_calls,
        result.seconds,
        result.bytes_sent,
        result.bytes_received,
        image.width,
        image.height,
        client.wire.wire_name,
    )
