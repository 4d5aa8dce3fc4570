"""Λ-Split: run a generative model's head and tail on your device and its trunk on a server.

Names are imported on first use (PEP 562), so that ``lambda-split keys init`` and
``--help`` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "lambda_split._audit": ("AuditFailed", "audit"),
    "lambda_split._receipts": ("ChainObserver", "ReceiptError", "ReceiptPolicy", "ReceiptSigner"),
    "lambda_split._transcript": ("TranscriptError", "TranscriptWriter", "read_transcript"),
    "lambda_split._verify": ("SpotChecker", "Verification", "enable_verification"),
    "lambda_split._client": ("RemoteTrunk", "ServerInfo", "ServerLimits", "SplitClient", "fetch_info"),
    "lambda_split._codec": ("Encoding", "FrameError", "FrameKind", "FrameLimits"),
    "lambda_split._defences": ("Defence", "add_noise", "defended", "quantise_blockwise"),
    "lambda_split._head_depth": ("HeadDepths", "choose_depth", "parse_head_depth"),
    "lambda_split._replica": ("RemoteReplayer", "ReplicaMismatch", "connect_replica"),
    "lambda_split._errors": (
        "FingerprintMismatch",
        "LimitExceeded",
        "ModeMismatch",
        "ModelNotFoundError",
        "ProtocolMismatch",
        "ServerError",
        "SplitError",
        "TrunkUnavailable",
    ),
    "lambda_split._failover": (
        "FailoverEvent",
        "FailoverPolicy",
        "Reconnector",
        "ResilientTrunk",
        "failover_worthy",
    ),
    "lambda_split._generate": ("GenerationConfig", "GenerationResult", "encode_prompts", "generate_tokens"),
    "lambda_split._families": ("Family", "UnsupportedArchitecture", "family_of"),
    "lambda_split._local": ("LocalTransport",),
    "lambda_split._names": ("BUILTIN_MODELS",),
    "lambda_split._models": ("Checkpoint", "fingerprint", "preload", "resolve"),
    "lambda_split._parts": ("Head", "PartState", "SplitModel", "SplitSpec", "Tail", "Trunk", "load_parts"),
    "lambda_split._session": ("RemoteSession",),
    "lambda_split._scheduler": ("SchedulerConfig",),
    "lambda_split._stream": ("HTTPLink", "Link", "StreamLink", "make_link"),
    "lambda_split._service": (
        "BatchingExecutor",
        "Executor",
        "ServiceError",
        "ServiceLimits",
        "TrunkService",
    ),
    "lambda_split._llm_trunk": ("LLMExecutor", "load_llm_service"),
    "lambda_split._chain": ("ChainClient", "ChainMismatch", "ChainTrunk", "SpanHop", "check_chain"),
    "lambda_split._plan": (
        "InfeasiblePlan",
        "LayerCosts",
        "PlacementPlan",
        "PlanError",
        "PlanStage",
        "ServerSpec",
        "layer_costs",
        "optimal_plan",
        "plan_document",
        "proportional_plan",
        "read_plan",
        "read_servers",
    ),
    "lambda_split._plan_probe": ("SpeedProbe", "probe_speed"),
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
    from lambda_split._audit import AuditFailed as AuditFailed
    from lambda_split._audit import audit as audit
    from lambda_split._chain import (
        ChainClient as ChainClient,
    )
    from lambda_split._chain import (
        ChainMismatch as ChainMismatch,
    )
    from lambda_split._chain import (
        ChainTrunk as ChainTrunk,
    )
    from lambda_split._chain import (
        SpanHop as SpanHop,
    )
    from lambda_split._chain import (
        check_chain as check_chain,
    )
    from lambda_split._client import (
        RemoteTrunk as RemoteTrunk,
    )
    from lambda_split._client import (
        ServerInfo as ServerInfo,
    )
    from lambda_split._client import (
        ServerLimits as ServerLimits,
    )
    from lambda_split._client import (
        SplitClient as SplitClient,
    )
    from lambda_split._client import (
        fetch_info as fetch_info,
    )
    from lambda_split._codec import (
        Encoding as Encoding,
    )
    from lambda_split._codec import (
        FrameError as FrameError,
    )
    from lambda_split._codec import (
        FrameKind as FrameKind,
    )
    from lambda_split._codec import (
        FrameLimits as FrameLimits,
    )
    from lambda_split._defences import Defence as Defence
    from lambda_split._defences import add_noise as add_noise
    from lambda_split._defences import defended as defended
    from lambda_split._defences import quantise_blockwise as quantise_blockwise
    from lambda_split._errors import (
        FingerprintMismatch as FingerprintMismatch,
    )
    from lambda_split._errors import (
        LimitExceeded as LimitExceeded,
    )
    from lambda_split._errors import (
        ModelNotFoundError as ModelNotFoundError,
    )
    from lambda_split._errors import (
        ModeMismatch as ModeMismatch,
    )
    from lambda_split._errors import (
        ProtocolMismatch as ProtocolMismatch,
    )
    from lambda_split._errors import (
        ServerError as ServerError,
    )
    from lambda_split._errors import (
        SplitError as SplitError,
    )
    from lambda_split._errors import (
        TrunkUnavailable as TrunkUnavailable,
    )
    from lambda_split._failover import (
        FailoverEvent as FailoverEvent,
    )
    from lambda_split._failover import (
        FailoverPolicy as FailoverPolicy,
    )
    from lambda_split._failover import (
        Reconnector as Reconnector,
    )
    from lambda_split._failover import (
        ResilientTrunk as ResilientTrunk,
    )
    from lambda_split._failover import (
        failover_worthy as failover_worthy,
    )
    from lambda_split._families import (
        Family as Family,
    )
    from lambda_split._families import (
        UnsupportedArchitecture as UnsupportedArchitecture,
    )
    from lambda_split._families import (
        family_of as family_of,
    )
    from lambda_split._generate import (
        GenerationConfig as GenerationConfig,
    )
    from lambda_split._generate import (
        GenerationResult as GenerationResult,
    )
    from lambda_split._generate import (
        encode_prompts as encode_prompts,
    )
    from lambda_split._generate import (
        generate_tokens as generate_tokens,
    )
    from lambda_split._head_depth import HeadDepths as HeadDepths
    from lambda_split._head_depth import choose_depth as choose_depth
    from lambda_split._head_depth import parse_head_depth as parse_head_depth
    from lambda_split._llm_trunk import LLMExecutor as LLMExecutor
    from lambda_split._llm_trunk import load_llm_service as load_llm_service
    from lambda_split._local import (
        LocalTransport as LocalTransport,
    )
    from lambda_split._models import (
        Checkpoint as Checkpoint,
    )
    from lambda_split._models import (
        fingerprint as fingerprint,
    )
    from lambda_split._models import (
        preload as preload,
    )
    from lambda_split._models import (
        resolve as resolve,
    )
    from lambda_split._names import (
        BUILTIN_MODELS as BUILTIN_MODELS,
    )
    from lambda_split._parts import (
        Head as Head,
    )
    from lambda_split._parts import (
        PartState as PartState,
    )
    from lambda_split._parts import (
        SplitModel as SplitModel,
    )
    from lambda_split._parts import (
        SplitSpec as SplitSpec,
    )
    from lambda_split._parts import (
        Tail as Tail,
    )
    from lambda_split._parts import (
        Trunk as Trunk,
    )
    from lambda_split._parts import (
        load_parts as load_parts,
    )
    from lambda_split._plan import (
        InfeasiblePlan as InfeasiblePlan,
    )
    from lambda_split._plan import (
        LayerCosts as LayerCosts,
    )
    from lambda_split._plan import (
        PlacementPlan as PlacementPlan,
    )
    from lambda_split._plan import (
        PlanError as PlanError,
    )
    from lambda_split._plan import (
        PlanStage as PlanStage,
    )
    from lambda_split._plan import (
        ServerSpec as ServerSpec,
    )
    from lambda_split._plan import (
        layer_costs as layer_costs,
    )
    from lambda_split._plan import (
        optimal_plan as optimal_plan,
    )
    from lambda_split._plan import (
        plan_document as plan_document,
    )
    from lambda_split._plan import (
        proportional_plan as proportional_plan,
    )
    from lambda_split._plan import (
        read_plan as read_plan,
    )
    from lambda_split._plan import (
        read_servers as read_servers,
    )
    from lambda_split._plan_probe import (
        SpeedProbe as SpeedProbe,
    )
    from lambda_split._plan_probe import (
        probe_speed as probe_speed,
    )
    from lambda_split._receipts import ChainObserver as ChainObserver
    from lambda_split._receipts import ReceiptError as ReceiptError
    from lambda_split._receipts import ReceiptPolicy as ReceiptPolicy
    from lambda_split._receipts import ReceiptSigner as ReceiptSigner
    from lambda_split._replica import RemoteReplayer as RemoteReplayer
    from lambda_split._replica import ReplicaMismatch as ReplicaMismatch
    from lambda_split._replica import connect_replica as connect_replica
    from lambda_split._scheduler import SchedulerConfig as SchedulerConfig
    from lambda_split._service import BatchingExecutor as BatchingExecutor
    from lambda_split._service import (
        Executor as Executor,
    )
    from lambda_split._service import (
        ServiceError as ServiceError,
    )
    from lambda_split._service import (
        ServiceLimits as ServiceLimits,
    )
    from lambda_split._service import (
        TrunkService as TrunkService,
    )
    from lambda_split._session import (
        RemoteSession as RemoteSession,
    )
    from lambda_split._stream import (
        HTTPLink as HTTPLink,
    )
    from lambda_split._stream import (
        Link as Link,
    )
    from lambda_split._stream import (
        StreamLink as StreamLink,
    )
    from lambda_split._stream import (
        make_link as make_link,
    )
    from lambda_split._transcript import TranscriptError as TranscriptError
    from lambda_split._transcript import TranscriptWriter as TranscriptWriter
    from lambda_split._transcript import read_transcript as read_transcript
    from lambda_split._verify import SpotChecker as SpotChecker
    from lambda_split._verify import Verification as Verification
    from lambda_split._verify import enable_verification as enable_verification
