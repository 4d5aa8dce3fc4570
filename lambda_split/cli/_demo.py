"""``lambda-split demo``: a trunk server on loopback and a client, in one process, in any mode."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable

from lambda_split._client import SplitClient
from lambda_split._generate import GenerationConfig
from lambda_split._models import preload, resolve
from lambda_split._service import load_llm_service


def run_demo(
    security: str,
    *,
    model: str,
    split: str,
    prompt: str,
    max_new_tokens: int,
    as_json: bool,
    progress: Callable[[str], None],
) -> int:
    from secure_channel import generate_credentials
    from server import BackgroundServer, ServerConfig

    with tempfile.TemporaryDirectory(prefix="lambda-split-demo-") as keys:
        if security != "plain":
            progress("creating fresh credentials (CA, server and client certificates)")
            generate_credentials(keys, days=1)
        progress(f"loading {model} (the GGUF takes about 20 s to dequantise)")
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
                progress=progress,
            )
            with client:
                if not as_json:
                    print(f"> {prompt}\n", flush=True)
                on_text = None if as_json else (lambda _row, text: print(text, end="", flush=True))
                started = time.perf_counter()
                result = client.generate(
                    prompt, GenerationConfig(max_new_tokens=max_new_tokens), on_text=on_text
                )
                elapsed = time.perf_counter() - started
                stats = client.transport.stats
    per_token = (stats.bytes_sent + stats.bytes_received) / max(result.new_tokens, 1)
    tokens_per_s = result.new_tokens / elapsed
    if as_json:
        print(
            json.dumps(
                {
                    "text": result.texts[0],
                    "security": security,
                    "split": service[1]["split"],
                    "model": model,
                    "stats": {
                        "new_tokens": result.new_tokens,
                        "tokens_per_s": round(tokens_per_s, 3),
                        "wire_bytes_per_token": round(per_token, 1),
                        "bytes_sent": stats.bytes_sent,
                        "bytes_received": stats.bytes_received,
                    },
                }
            )
        )
    else:
        start, stop = service[1]["split"]
        print(
            f"\n\n{result.new_tokens} tokens at {tokens_per_s:.1f} tokens/s | {per_token:,.0f} wire bytes per "
            f"token | split {start}:{stop} (head 0-{start - 1} and tail {stop}- on this device, trunk "
            f"{start}-{stop - 1} on the server) | security {security}",
            file=sys.stdout,
        )
    return 0
