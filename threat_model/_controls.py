"""Positive controls: deliberately leaky baselines the detectors must flag, captured like the real runs.

If a control does not fire, the detectors (or the capture) are broken and a clean result
for the real system would mean nothing; the suite then fails.
"""

from __future__ import annotations

import io
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from threat_model.baselines import CloudBaselineServer, cloud_complete, cloud_upload, echo_responder
from threat_model.capture import Capture, Method, capture_loopback
from threat_model.detectors import (
    Detector,
    ImageSignatureDetector,
    PixelDetector,
    TextLeakDetector,
    TokenIdDetector,
    scan_streams,
)
from threat_model.traffic import length_leak, tls_records


def _control(
    name: str,
    detector: Detector,
    send: Callable[[int], Any],
    *,
    method: Method,
    pcap_dir: Path | None,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[dict[str, Any], Any]:
    with (
        CloudBaselineServer(ssl_context=ssl_context) as server,
        capture_loopback({server.port}, method=method) as cap,
    ):
        reply = send(cap.client_port(server.port))
    findings = scan_streams([detector], cap.streams())
    return {
        "control": name,
        "detector": detector.name,
        "fired": bool(findings),
        "findings": len(findings),
        "pcap": _write(cap, pcap_dir, name),
    }, reply


def _write(cap: Capture, pcap_dir: Path | None, name: str) -> str | None:
    if pcap_dir is None:
        return None
    path = pcap_dir / f"control-{name}.pcap"
    cap.write_pcap(path)
    return str(path)


def llm_controls(
    prompt: str, prompt_ids: Sequence[int], *, method: Method, pcap_dir: Path | None
) -> list[dict[str, Any]]:
    """The cloud-only baseline (the seed paper's Figure (a)): prompt and token ids travel in the clear."""
    answer_ids = [token for token, _ in echo_responder(prompt)]
    results = []
    for name, detector, send in (
        ("cloud-prompt", TextLeakDetector([prompt]), lambda port: cloud_complete(port, prompt)),
        ("cloud-token-ids-json", TokenIdDetector([answer_ids]), lambda port: cloud_complete(port, prompt)),
        (
            "upload-token-ids-int32",
            TokenIdDetector([list(prompt_ids)]),
            lambda port: cloud_upload(port, np.asarray(prompt_ids, dtype="<i4").tobytes()),
        ),
    ):
        results.append(_control(name, detector, send, method=method, pcap_dir=pcap_dir)[0])
    return results


def diffusion_controls(
    prompt: str, image: Any, *, method: Method, pcap_dir: Path | None
) -> list[dict[str, Any]]:
    """Baselines that upload the prompt or the image (PNG, raw RGB) to a server."""
    from PIL import Image

    pixels = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    results = []
    for name, detector, send in (
        ("cloud-diffusion-prompt", TextLeakDetector([prompt]), lambda port: cloud_complete(port, prompt)),
        ("upload-image-png", ImageSignatureDetector(), lambda port: cloud_upload(port, png.getvalue())),
        ("upload-image-rgb", PixelDetector([pixels]), lambda port: cloud_upload(port, pixels.tobytes())),
    ):
        results.append(_control(name, detector, send, method=method, pcap_dir=pcap_dir)[0])
    return results


def streaming_token_lengths(
    keys: str, prompt: str, *, method: Method, pcap_dir: Path | None
) -> dict[str, Any]:
    """Weiss et al. 2024: a streaming completion API over TLS; record sizes spell the token lengths."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(Path(keys) / "server.pem", Path(keys) / "server.key")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(Path(keys) / "ca.pem")
    tokens = echo_responder(prompt)
    with (
        CloudBaselineServer(ssl_context=server_ctx) as server,
        capture_loopback({server.port}, method=method) as cap,
    ):
        cloud_complete(cap.client_port(server.port), prompt, stream=True, ssl_context=client_ctx)
    records = [
        m
        for s in cap.streams()
        for m in tls_records(s)
        if m.direction == "s2c" and m.detail == "application_data"
    ]
    while records and records[-1].payload <= 22:  # close_notify, the terminating chunk
        records.pop()
    per_token = records[-len(tokens) :]
    fired = len(per_token) == len(tokens) >= 3
    leak = (
        length_leak([m.payload for m in per_token], [len(t.encode()) for _, t in tokens]) if fired else None
    )
    return {
        "control": "weiss-streaming-tls",
        "detector": "token_length_from_record_size",
        "fired": bool(leak and leak.inferable and leak.exact_rate == 1.0),
        "findings": len(tokens),
        "r2": round(leak.r2, 4) if leak else None,
        "exact_rate": leak.exact_rate if leak else None,
        "pcap": _write(cap, pcap_dir, "weiss-streaming-tls"),
    }
