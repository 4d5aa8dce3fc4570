"""Λ-Split: run a generative model's head and tail on your device and its trunk on a server.

Names are imported on first use (PEP 562), so that ``lambda-split keys init`` and
``--help`` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "lambda_split._client": ("RemoteTrunk", "ServerInfo", "SplitClient", "fetch_info"),
    "lambda_split._codec": ("Encoding", "FrameError", "FrameKind", "FrameLimits"),
    "lambda_split._errors": (
        "FingerprintMismatch",
        "ModelNotFoundError",
        "ProtocolMismatch",
        "ServerError",
        "SplitError",
    ),
    "lambda_split._generate": ("GenerationConfig", "GenerationResult", "encode_prompts", "generate_tokens"),
    "lambda_split._local": ("LocalTransport",),
    "lambda_split._models": ("BUILTIN_MODELS", "Checkpoint", "fingerprint", "preload", "resolve"),
    "lambda_split._parts": ("Head", "PartState", "SplitModel", "SplitSpec", "Tail", "Trunk", "load_parts"),
    "lambda_split._service": (
        "Executor",
        "LLMExecutor",
        "ServiceError",
        "ServiceLimits",
        "TrunkService",
        "load_llm_service",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_WHERE, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lambda_split' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from lambda_split._client import (
        RemoteTrunk as RemoteTrunk,
        ServerInfo as ServerInfo,
        SplitClient as SplitClient,
        fetch_info as fetch_info,
    )
    from lambda_split._codec import (
        Encoding as Encoding,
        FrameError as FrameError,
        FrameKind as FrameKind,
        FrameLimits as FrameLimits,
    )
    from lambda_split._errors import (
        FingerprintMismatch as FingerprintMismatch,
        ModelNotFoundError as ModelNotFoundError,
        ProtocolMismatch as ProtocolMismatch,
        ServerError as ServerError,
        SplitError as SplitError,
    )
    from lambda_split._generate import (
        GenerationConfig as GenerationConfig,
        GenerationResult as GenerationResult,
        encode_prompts as encode_prompts,
        generate_tokens as generate_tokens,
    )
    from lambda_split._local import (
        LocalTransport as LocalTransport,
    )
    from lambda_split._models import (
        BUILTIN_MODELS as BUILTIN_MODELS,
        Checkpoint as Checkpoint,
        fingerprint as fingerprint,
        preload as preload,
        resolve as resolve,
    )
    from lambda_split._parts import (
        Head as Head,
        PartState as PartState,
        SplitModel as SplitModel,
        SplitSpec as SplitSpec,
        Tail as Tail,
        Trunk as Trunk,
        load_parts as load_parts,
    )
    from lambda_split._service import (
        Executor as Executor,
        LLMExecutor as LLMExecutor,
        ServiceError as ServiceError,
        ServiceLimits as ServiceLimits,
        TrunkService as TrunkService,
        load_llm_service as load_llm_service,
    )
