"""Section 8: diffusion, U-Net on the server: time and bytes per denoising step, split vs monolithic.

Per-step figures are marginal: (run of 2S steps - run of S steps) / S, which removes the
text encoders, the VAE, the session set-up and the one-off prompt-embedding frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from lambda_split._codec import WIRE_ENCODINGS
from lambda_split._service import TrunkService
from lambda_split.cli.bench._harness import Bench, ProgressFn
from lambda_split.cli.bench._stats import ratios, rotated, summarize

PROMPT = "a lighthouse on a cliff at dusk"
MODE = "tls+aesgcm"


@dataclass
class _Served:
    name: str
    service: TrunkService
    info: dict[str, Any]


def gap(reason: str) -> dict[str, Any]:
    return {"status": "not measured", "reason": reason}


def diffusion(bench: Bench, model: str, *, steps: int, reps: int, progress: ProgressFn) -> dict[str, Any]:
    try:
        from lambda_split.diffusion import (
            DiffusionClient,
            fetch_diffusion_info,
            load_diffusion_service,
            psnr,
            resolve_diffusion,
        )
    except ImportError as exc:
        return gap(f"lambda_split.diffusion is not available: {exc}")
    progress(f"diffusion: loading {model}")
    source = resolve_diffusion(model)
    served = _Served(model, *load_diffusion_service(model, security="plain"))
    transport = bench.servers.connect(served, MODE)
    info = fetch_diffusion_info(transport)
    clients = {wire: DiffusionClient(transport, source, info, wire=wire) for wire in WIRE_ENCODINGS}
    mono: Any = source.monolithic()

    def split(wire: str, count: int) -> tuple[float, int, Any]:
        result = clients[wire].generate(PROMPT, steps=count, seed=3, output_type="np")
        return result.seconds, result.bytes_sent + result.bytes_received, result.images[0]

    def monolithic(count: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            mono(
                PROMPT,
                num_inference_steps=count,
                guidance_scale=5.0,
                output_type="np",
                generator=torch.Generator().manual_seed(3),
            )
        return time.perf_counter() - start

    monolithic(1), split("fp32", 1)  # warm-up
    per_step: dict[str, list[float]] = {"monolithic": [], "split": []}
    for rep in range(reps):
        for name in rotated(list(per_step), rep):
            if name == "monolithic":
                per_step[name].append((monolithic(2 * steps) - monolithic(steps)) / steps)
            else:
                per_step[name].append((split("fp32", 2 * steps)[0] - split("fp32", steps)[0]) / steps)
    encodings: dict[str, Any] = {}
    reference: Any = None
    for wire in WIRE_ENCODINGS:
        _, short_bytes, _ = split(wire, steps)
        _, long_bytes, image = split(wire, 2 * steps)
        reference = image if wire == "fp32" else reference
        encodings[wire] = {
            "bytes_per_step": (long_bytes - short_bytes) // steps,
            "psnr_vs_fp32_db": None if wire == "fp32" else round(float(psnr(image, reference)), 2),
        }
    per_image = _per_image(transport, source, info, 2 * steps)
    transport.close()
    ms = {name: [1000 * v for v in values] for name, values in per_step.items()}
    progress(f"diffusion: {ms['split'][-1]:.1f} ms/step split, {ms['monolithic'][-1]:.1f} ms/step monolithic")
    return {
        "status": "measured",
        "model": model,
        "pipeline": info.pipeline,
        "security": MODE,
        "steps": [steps, 2 * steps],
        "reps": reps,
        "ms_per_step": {name: summarize(values, 3) for name, values in ms.items()},
        "slowdown_split_vs_monolithic": summarize(ratios(ms["split"], ms["monolithic"])),
        "by_encoding": encodings,
        "per_image": per_image,
        "notes": [
            "marginal per-step figures: (2S-step run - S-step run) / S, guidance 5.0 (two U-Net rows per "
            "call), one U-Net call per step; PSNR of the 2S-step image vs the fp32-wire image"
        ],
    }


# --- bytes and round trips per image: latents per step vs latents on the server (helper `diffusion`) ---


def _per_image(transport: Any, source: Any, info: Any, steps: int) -> dict[str, Any]:
    """Whole-image bytes and HTTP round trips per wire, both loops: what latents going up every step cost."""
    from lambda_split.diffusion import DiffusionClient, RecordingTransport

    tap = RecordingTransport(transport)  # counts every request of the HTTP link
    figures: dict[str, Any] = {"steps": steps, "link": "http"}
    for wire in WIRE_ENCODINGS:
        client = DiffusionClient(tap, source, info, wire=wire)
        row: dict[str, Any] = {}
        for name, on_server in (("latents_per_step", False), ("latents_on_server", True)):
            tap.records.clear()
            result = client.generate(
                PROMPT, steps=steps, seed=3, output_type="np", latents_on_server=on_server
            )
            row[name] = {"bytes": result.bytes_sent + result.bytes_received, "round_trips": len(tap.records)}
        row["bytes_ratio"] = round(row["latents_on_server"]["bytes"] / row["latents_per_step"]["bytes"], 3)
        figures[wire] = row
    tap.records.clear()
    return figures
