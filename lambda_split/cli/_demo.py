"""``lambda-split demo``: a trunk server on loopback and a client, in one process, in any mode."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from lambda_split._client import SplitClient
from lambda_split._generate import GenerationConfig, GenerationResult, TextCallback
from lambda_split._llm_trunk import load_llm_service
from lambda_split._models import preload, resolve
from lambda_split._names import SMOLLM2
from lambda_split._stream import TransportKind
from secure_channel import WireStats


def run_demo(
    security: str,
    *,
    model: str,
    split: str,
    prompt: str,
    max_new_tokens: int,
    as_json: bool,
    progress: Callable[[str], None],
    stream: TextCallback,
    wire: str = "fp32",
    transport_kind: TransportKind = "stream",
) -> int:
    from secure_channel import generate_credentials
    from server import BackgroundServer, ServerConfig

    with tempfile.TemporaryDirectory(prefix="lambda-split-demo-") as keys:
        if security != "plain":
            progress("creating fresh credentials (CA, server and client certificates)")
            generate_credentials(keys, days=1)
        slow = " (the GGUF takes about 20 s to dequantise)" if model == SMOLLM2 else ""
        progress(f"loading {model}{slow}")
        checkpoint = preload(resolve(model))
        service = load_llm_service(checkpoint, split, security=security, progress=progress)
        config = ServerConfig(model=model, split=split, security=security, keys=keys, port=0)
        with BackgroundServer(config, service) as server:
            progress(f"trunk server listening on {server.url} ({security})")
            client = SplitClient.connect(
                server.url,
                security=security,  # type: ignore[arg-type]
                keys=keys if security != "plain" else None,
                model=checkpoint,
                wire=wire,
                progress=progress,
                transport_kind=transport_kind,
            )
            with client:
                if not as_json:
                    print(f"> {prompt}\n", flush=True)
                stats = client.transport.stats
                before = (stats.bytes_sent, stats.bytes_received)
                prefill: list[tuple[int, int]] = []

                def on_text(row: int, text: str) -> None:
                    if not prefill:  # the first text arrives right after the prompt's step
                        prefill.append((stats.bytes_sent, stats.bytes_received))
                    if not as_json:
                        stream(row, text)

                result = client.generate(
                    prompt, GenerationConfig(max_new_tokens=max_new_tokens), on_text=on_text
                )
                figures = demo_stats(result, before, prefill[0] if prefill else None, stats)
                report: dict[str, Any] = {
                    "text": result.texts[0],
                    "token_ids": result.token_ids[0],
                    "security": client.transport.security,
                    "split": list(client.info.split),
                    "wire": client.wire.wire_name,
                    "stats": figures,
                    "model": model,
                }
    if as_json:
        print(json.dumps(report))
    else:
        start, stop = report["split"]
        print(
            f"\n\n{figures['new_tokens']} tokens | decode {figures['tokens_per_s']:.1f} tokens/s | first token "
            f"after {figures['time_to_first_token_s']:.2f} s | prompt upload "
            f"{figures['prompt_bytes']:,} bytes, then {figures['bytes_per_decode_token']:,.0f} wire bytes per "
            f"token | split {start}:{stop} (head 0-{start - 1} and tail {stop}- on this device, trunk "
            f"{start}-{stop - 1} on the server) | security {security} | wire {report['wire']}",
            file=sys.stdout,
        )
    return 0


def demo_stats(
    result: GenerationResult,
    before: tuple[int, int],
    after_prefill: tuple[int, int] | None,
    stats: WireStats,
) -> dict[str, Any]:
    """generate --json's stats, plus the prompt's step and the decode steps apart.

    ``tokens_per_s`` counts decode steps only (the first token's wait is ``time_to_first_token_s``);
    the prompt's bytes are ``prompt_bytes``, and ``bytes_per_decode_token`` covers the rest.
    """
    new = result.new_tokens
    decode_s = max(result.elapsed_s - result.time_to_first_token_s, 1e-9)
    sent, received = stats.bytes_sent - before[0], stats.bytes_received - before[1]
    first = after_prefill or (stats.bytes_sent, stats.bytes_received)
    prompt_bytes = (first[0] - before[0]) + (first[1] - before[1])
    return {
        "new_tokens": new,
        "tokens_per_s": round((new - 1) / decode_s if new > 1 else 0.0, 3),
        "time_to_first_token_s": round(result.time_to_first_token_s, 4),
        "bytes_sent": stats.bytes_sent,
        "bytes_received": stats.bytes_received,
        "prompt_bytes": prompt_bytes,
        "bytes_per_decode_token": round((sent + received - prompt_bytes) / max(new - 1, 1), 1),
    }
