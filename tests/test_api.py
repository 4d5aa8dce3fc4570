"""The public API of lambda_split is exactly its __all__, and every name resolves."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import lambda_split
import lambda_split.protocol

#: Helpers shared between the private modules; deliberately not part of the API.
INTERNAL = {
    "meta_model",
    "config_fingerprint_json",
    "tiny_llama_config",
    "byte_tokenizer",
    "positions_from_mask",
    "check_reply",
    "json_request",
    "connect_verified",
    "explain",
    # receipts and audits: the chain's definition and the replay, reached through audit() and
    # enable_verification()
    "deviation",
    "judge",
    "Replayer",
    "verify_receipts",
    "load_trunk",
    "load_ca",
    "context",
    "chain_start",
    "chain_step",
    "chain_link",
    "attach_receipt",
    "split_receipt",
    "verify_signature",
    "at_depth",
    "check_server_cert",
    "ServerChain",
    "ClientChain",
    "StepRecord",
    "StepEntry",
    "SessionEntry",
    "Transcript",
    # the wire's blockwise quantiser and tensor records, reached through the codec (frame version 2)
    "tensor_record",
    "scales_fp16",
    "quantise",
    "blocks_payload_size",
    "encode_blocks",
    "decode_blocks",
    # the thread that runs a server (BackgroundServer, BackgroundLocal) in tests and notebooks
    "ServerThread",
    # the trunk's batching machinery, reached through LLMExecutor
    "SlotPool",
    "SlotPools",
    "SlotState",
    "PoolBatch",
    "StepScheduler",
    "Step",
    "SchedulerStats",
    "QueueTimeout",
    # the counters behind the /metrics histograms, read by server.observability
    "Buckets",
}


def test_every_exported_name_resolves() -> None:
    for name in lambda_split.__all__:
        assert getattr(lambda_split, name) is not None


def test_all_is_complete() -> None:
    """Every public class and function of the private modules is exported (or is CLI-only)."""
    exported = set(lambda_split.__all__) | set(lambda_split.protocol.__all__) | INTERNAL
    missing = []
    for info in pkgutil.iter_modules(lambda_split.__path__):
        if not info.name.startswith("_") or info.name == "__main__":
            continue
        module = importlib.import_module(f"lambda_split.{info.name}")
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if (inspect.isclass(value) or inspect.isfunction(value)) and name not in exported:
                missing.append(f"{info.name}.{name}")
    assert not missing, f"public but not exported: {missing}"
