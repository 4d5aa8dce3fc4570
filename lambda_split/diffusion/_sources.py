"""Where diffusion pipelines come from: tiny seeded random pipelines built in code, or a local directory.

A :class:`DiffusionSource` hands out the U-Net alone (for the server) and every other
component alone (for the device), so that neither side loads what the other runs.
Both tiny pipelines are rebuilt from a seed on every call, so a client and a server in
different processes hold bit-identical weights.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lambda_split.diffusion import _quiet  # noqa: F401 (must run before diffusers imports its pipelines)

# isort: split
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from lambda_split._errors import ModelNotFoundError
from lambda_split._names import BUILTIN_DIFFUSION_MODELS as BUILTIN_DIFFUSION_MODELS
from lambda_split._names import TINY_SD as TINY_SD
from lambda_split._names import TINY_SDXL as TINY_SDXL

PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}
TINY_SEED = 0
_UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
#: (name, safetensors dtype, shape, chunks of raw little-endian bytes)
TensorBytes = tuple[str, str, tuple[int, ...], Iterable[bytes]]


@dataclass(frozen=True)
class DiffusionSource:
    """A diffusion pipeline split in two: the U-Net, and everything else.

    ``unet_config`` is the U-Net config as stored (what the fingerprint covers);
    ``load_unet`` builds the server's part; ``load_components`` builds the device's
    part, a dict of constructor arguments of the pipeline class without ``unet``;
    ``unet_tensors`` yields the stored U-Net weights for the fingerprint.
    """

    name: str
    pipeline: str
    unet_config: Mapping[str, Any]
    load_unet: Callable[[], UNet2DConditionModel]
    load_components: Callable[[], dict[str, Any]]
    unet_tensors: Callable[[], Iterator[TensorBytes]]

    @property
    def pipeline_class(self) -> type[DiffusionPipeline]:
        return PIPELINE_CLASSES[self.pipeline]

    @functools.cached_property
    def fingerprint(self) -> str:
        return unet_fingerprint(self.unet_config, self.unet_tensors())

    def assemble(self, unet: torch.nn.Module) -> DiffusionPipeline:
        """Build the pipeline from this source's device components and the given U-Net (or stand-in)."""
        pipe = self.pipeline_class(**self.load_components(), unet=unet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def monolithic(self) -> DiffusionPipeline:
        """The whole pipeline in this process, as diffusers would run it: the reference for the split."""
        return self.assemble(self.load_unet())


def resolve_diffusion(model: str) -> DiffusionSource:
    """Open ``model``: ``tiny-random-sd``, ``tiny-random-sdxl`` or a local diffusers pipeline directory."""
    if model in BUILTIN_DIFFUSION_MODELS:
        return _tiny_source(model)
    path = Path(model).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file() and (path / "unet" / "config.json").is_file():
        return _directory_source(path)
    raise ModelNotFoundError(
        f"unknown diffusion model {model!r}: expected {', '.join(BUILTIN_DIFFUSION_MODELS)} "
        "or a diffusers pipeline directory (model_index.json and unet/)"
    )


def unet_fingerprint(config: Mapping[str, Any], tensors: Iterable[TensorBytes]) -> str:
    """A stable hash of the U-Net config (as stored, private keys dropped) and its stored weights."""
    digest = hashlib.sha256()
    digest.update(b"lambda-split unet fingerprint v1\0")
    public = {key: value for key, value in config.items() if not key.startswith("_")}
    digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, dtype, shape, chunks in sorted(tensors, key=lambda item: item[0]):
        digest.update(f"\0{name}\0{dtype}\0{list(shape)}\0".encode())
        for chunk in chunks:
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def meta_unet(config: Mapping[str, Any]) -> UNet2DConditionModel:
    """The U-Net's module tree on the meta device: full config with defaults, no memory."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _module_tensors(module: torch.nn.Module) -> Iterator[TensorBytes]:
    for name, tensor in module.state_dict().items():
        data = tensor.detach().contiguous().cpu()
        raw = data.view(torch.int16) if data.dtype is torch.bfloat16 else data
        yield name, _DTYPE_NAMES.get(data.dtype, str(data.dtype)), tuple(data.shape), [raw.numpy().tobytes()]


# --- local directory ------------------------------------------------------------------------------


def _directory_source(path: Path) -> DiffusionSource:
    index = json.loads((path / "model_index.json").read_text())
    class_name = str(index.get("_class_name"))
    kinds = {cls.__name__: kind for kind, cls in PIPELINE_CLASSES.items()}
    if class_name not in kinds:
        raise ModelNotFoundError(
            f"{path}: pipeline {class_name!r} is not supported; expected {' or '.join(kinds)}"
        )
    kind = kinds[class_name]
    unet_dir = path / "unet"
    config = json.loads((unet_dir / "config.json").read_text())
    files, variant = _unet_weight_files(unet_dir)

    def load_unet() -> UNet2DConditionModel:
        # use_safetensors: the server never unpickles a checkpoint.
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", variant=variant, use_safetensors=True
        )
        return unet.eval()

    def load_components() -> dict[str, Any]:
        cls = PIPELINE_CLASSES[kind]
        loaded = cls.from_pretrained(path, unet=None)
        modules = {name: module for name, module in loaded.components.items() if name != "unet"}
        accepted = set(inspect.signature(cls.__init__).parameters)
        settings = {
            key: value for key, value in loaded.config.items() if key in accepted and key not in modules
        }
        settings.pop("unet", None)
        return modules | settings

    return DiffusionSource(
        path.name, kind, config, load_unet, load_components, lambda: _safetensors_tensors(files)
    )


def _unet_weight_files(unet_dir: Path) -> tuple[list[Path], str | None]:
    """The safetensors files diffusers would load, single or sharded; the fp16 variant if it is all there is."""
    for variant in (None, "fp16"):
        single = unet_dir / (
            _UNET_WEIGHTS if variant is None else f"diffusion_pytorch_model.{variant}.safetensors"
        )
        index = unet_dir / (_UNET_WEIGHTS + (".index.json" if variant is None else f".index.{variant}.json"))
        if single.is_file():
            return [single], variant
        if index.is_file():
            shards = json.loads(index.read_text())["weight_map"].values()
            return sorted({unet_dir / shard for shard in shards}), variant
    raise ModelNotFoundError(f"{unet_dir}: the U-Net must be stored as {_UNET_WEIGHTS} (single or sharded)")


def _safetensors_tensors(files: list[Path]) -> Iterator[TensorBytes]:
    """Stored U-Net tensors straight from the safetensors files: no torch, no dequantisation."""
    for file in files:
        yield from _read_safetensors(file)


def _read_safetensors(file: Path, chunk: int = 16 * 1024 * 1024) -> Iterator[TensorBytes]:
    with file.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    base = 8 + header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, stop = entry["data_offsets"]

        def chunks(start: int = base + start, stop: int = base + stop) -> Iterator[bytes]:
            with file.open("rb") as handle:
                handle.seek(start)
                remaining = stop - start
                while remaining > 0:
                    data = handle.read(min(chunk, remaining))
                    if not data:
                        raise ModelNotFoundError(f"{file} is truncated")
                    remaining -= len(data)
                    yield data

        yield name, str(entry["dtype"]), tuple(entry["shape"]), chunks()


# --- tiny random pipelines ------------------------------------------------------------------------


#: Stable Diffusion 1.5's scheduler config. Keys Euler ignores (clip_sample, set_alpha_to_one) stay in the
#: config, so a DDIM or PNDM scheduler built from it behaves as it would for the real model.
TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


def _tiny_unet_config(kind: str) -> dict[str, Any]:
    common: dict[str, Any] = {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
    }
    if kind == "sd":
        return common | {"layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 4}
    return common | {
        "layers_per_block": 2,
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": [1, 2],
        "projection_class_embeddings_input_dim": 6 * 8 + 32,  # six time ids, then the pooled text embedding
        "cross_attention_dim": 64,  # both text encoders' hidden states, concatenated
    }


def _seeded(offset: int, build: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + offset)
        return build()


def _tiny_text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def _tiny_source(name: str) -> DiffusionSource:
    kind = "sd" if name == TINY_SD else "sdxl"
    config = _tiny_unet_config(kind)

    def load_unet() -> UNet2DConditionModel:
        return _seeded(1, lambda: UNet2DConditionModel(**config)).eval()

    def load_components() -> dict[str, Any]:
        vae = _seeded(
            2,
            lambda: AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=4,
                block_out_channels=[32, 64],
                norm_num_groups=8,
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2,
                sample_size=64,
            ),
        )
        scheduler = EulerDiscreteScheduler.from_config(TINY_SCHEDULER_CONFIG)
        components: dict[str, Any] = {
            "vae": vae.eval(),
            "scheduler": scheduler,
            "tokenizer": tiny_tokenizer(),
            "text_encoder": _seeded(3, lambda: CLIPTextModel(_tiny_text_config())),
        }
        if kind == "sd":
            return components | {
                "safety_checker": None,
                "feature_extractor": None,
                "requires_safety_checker": False,
            }
        encoder_2 = _seeded(4, lambda: CLIPTextModelWithProjection(_tiny_text_config()))
        return components | {
            "text_encoder_2": encoder_2,
            "tokenizer_2": tiny_tokenizer(),
            "add_watermarker": False,
        }

    def tensors() -> Iterator[TensorBytes]:
        return _module_tensors(load_unet())

    return DiffusionSource(name, kind, config, load_unet, load_components, tensors)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A CLIP-shaped byte-level tokenizer built in code: start, end (also padding), then 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update(
        {symbol: 2 + index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    )
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fast: Any = PreTrainedTokenizerFast  # transformers leaves this constructor untyped
    tokenizer: PreTrainedTokenizerBase = fast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=77,
    )
    return tokenizer
