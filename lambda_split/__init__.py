"""Λ-Split: run a generative model's head and tail on your device and its trunk on a server."""

from __future__ import annotations

from lambda_split._client import RemoteTrunk, ServerInfo, SplitClient, fetch_info
from lambda_split._codec import Encoding, FrameError, FrameKind, FrameLimits
from lambda_split._errors import FingerprintMismatch, ProtocolMismatch, ServerError, SplitError
from lambda_split._generate import GenerationConfig, GenerationResult, encode_prompts, generate_tokens
from lambda_split._local import LocalTransport
from lambda_split._models import BUILTIN_MODELS, Checkpoint, ModelNotFoundError, fingerprint, resolve
from lambda_split._parts import Head, PartState, SplitModel, SplitSpec, Tail, Trunk, load_parts
from lambda_split._service import (
    LLMExecutor,
    ServiceError,
    ServiceLimits,
    TrunkService,
    load_llm_service,
)

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODELS",
    "Checkpoint",
    "Encoding",
    "FingerprintMismatch",
    "FrameError",
    "FrameKind",
    "FrameLimits",
    "GenerationConfig",
    "GenerationResult",
    "Head",
    "LLMExecutor",
    "LocalTransport",
    "ModelNotFoundError",
    "PartState",
    "ProtocolMismatch",
    "RemoteTrunk",
    "ServerError",
    "ServerInfo",
    "ServiceError",
    "ServiceLimits",
    "SplitClient",
    "SplitError",
    "SplitModel",
    "SplitSpec",
    "Tail",
    "Trunk",
    "TrunkService",
    "__version__",
    "encode_prompts",
    "fetch_info",
    "fingerprint",
    "generate_tokens",
    "load_llm_service",
    "load_parts",
    "resolve",
]
