"""Section 7: tokens/s on phone-to-cloud links, modelled on paper from the measured figures.

Nothing here is timed. The model, per generated token (batch 1, one round trip per token)::

    t = t_device + t_trunk + RTT + 8 * (bytes_up + bytes_down) / bandwidth + t_aead

``t_device`` (embeddings, head layers, tail layers, norm, LM head) scales linearly with the
device part's parameter count from the rate measured here; ``t_trunk`` is measured for the
benchmark model and, for the Llama-2 sizes, a weight-streaming estimate on data-centre GPUs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from lambda_split._codec import WIRE_ENCODINGS
from lambda_split.cli.bench._wire import payload_bytes

LINKS = {"50ms_20Mbit": (50.0, 20.0), "100ms_5Mbit": (100.0, 5.0)}  # RTT ms, Mbit/s each way
GPU_EFFICIENCY = 0.6
PHONE_BYTES_PER_S = 30e9  # effective LPDDR5X bandwidth of a recent flagship phone (about half of peak)
PHONE_BYTES_PER_WEIGHT = 0.5  # int4 weights
MODE = "tls+aesgcm"


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-family decoder that set its compute and its hidden-state size."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @property
    def layer_params(self) -> int:
        attention = (
            2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        )
        return attention + 3 * self.hidden * self.ffn

    def device_params(self, head_layers: int, tail_layers: int) -> int:
        """Matmul weights the device streams per token: its layers and the LM head (embedding is a lookup)."""
        return (head_layers + tail_layers) * self.layer_params + self.vocab * self.hidden

    @classmethod
    def of(cls, name: str, config: Any) -> Shape:
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(
            name,
            int(config.hidden_size),
            int(config.num_hidden_layers),
            heads,
            int(config.num_key_value_heads or heads),
            head_dim,
            int(config.intermediate_size),
            int(config.vocab_size),
        )


LLAMA2_7B = Shape("Llama-2-7B", 4096, 32, 32, 32, 128, 11008, 32000)
LLAMA2_70B = Shape("Llama-2-70B", 8192, 80, 64, 8, 128, 28672, 32000)
GPUS = {
    "Llama-2-7B": ("1x A100-80GB, 2.0 TB/s HBM", 2.0e12),
    "Llama-2-70B": ("2x A100-80GB tensor-parallel, 4.0 TB/s HBM in aggregate", 4.0e12),
}


def network_model(
    *, shape: Shape, split: tuple[int, int], parts: dict[str, Any], wire: dict[str, Any], aead: dict[str, Any]
) -> dict[str, Any]:
    """Tokens/s per link, model and encoding, with the per-token breakdown in milliseconds."""
    head_layers, tail_layers = split[0], shape.layers - split[1]
    ms = parts["ms_per_token"]
    device_ms = ms["head"]["median"] + ms["tail"]["median"]
    rate = device_ms / shape.device_params(head_layers, tail_layers)  # ms per matmul weight, this CPU, fp32
    aead_ms = 2 * (aead["decode"]["seal"]["median"] + aead["decode"]["open"]["median"]) / 1000
    frame = aead["decode"]["frame_bytes"]
    overhead = {}
    for enc in WIRE_ENCODINGS:
        step = wire["by_mode"][MODE][enc]["decode_step_bytes"]
        payload = payload_bytes(wire["hidden_size"], enc)
        overhead[enc] = (step["sent"] - payload, step["received"] - payload)
    models: dict[str, Any] = {}
    for big in (shape, LLAMA2_7B, LLAMA2_70B):
        measured = big is shape
        big_split = split if measured else (head_layers, big.layers - tail_layers)
        trunk_weights = (big_split[1] - big_split[0]) * big.layer_params
        if measured:
            trunk_ms, trunk_where = ms["trunk"]["median"], "this CPU, fp32, measured"
        else:
            gpu, bandwidth = GPUS[big.name]
            trunk_ms = 1000 * 2 * trunk_weights / (GPU_EFFICIENCY * bandwidth)
            trunk_where = f"{gpu}, fp16 weights, {GPU_EFFICIENCY:.0%} of peak bandwidth, batch 1"
        device_weights = big.device_params(head_layers, tail_layers)
        devices = {
            "this_cpu": device_ms if measured else rate * device_weights,
            "phone_int4": 1000 * device_weights * PHONE_BYTES_PER_WEIGHT / PHONE_BYTES_PER_S,
        }
        all_weights = big.layers * big.layer_params + big.vocab * big.hidden
        links: dict[str, Any] = {}
        for (link, (rtt, mbit)), (device, dev_ms) in itertools.product(LINKS.items(), devices.items()):
            per_enc: dict[str, Any] = {}
            for enc in WIRE_ENCODINGS:
                up = overhead[enc][0] + payload_bytes(big.hidden, enc)
                down = overhead[enc][1] + payload_bytes(big.hidden, enc)
                transfer = 8 * (up + down) / (mbit * 1e6) * 1000
                crypto = aead_ms * max(
                    1.0,
                    (frame - payload_bytes(wire["hidden_size"], "fp32") + payload_bytes(big.hidden, "fp32"))
                    / frame,
                )
                total = dev_ms + trunk_ms + rtt + transfer + crypto
                per_enc[enc] = {
                    "tokens_per_s": round(1000 / total, 3),
                    "ms_per_token": round(total, 2),
                    "bytes_up": up,
                    "bytes_down": down,
                    "transfer_ms": round(transfer, 3),
                }
            links.setdefault(link, {})[device] = per_enc
        models[big.name] = {
            "hidden_size": big.hidden,
            "layers": big.layers,
            "split": list(big_split),
            "device_params_m": round(big.device_params(head_layers, tail_layers) / 1e6, 1),
            "trunk_params_m": round(trunk_weights / 1e6, 1),
            "device_ms": {device: round(value, 2) for device, value in devices.items()},
            "trunk_ms": round(trunk_ms, 2),
            "trunk": trunk_where,
            "device_only_tokens_per_s": {
                "this_cpu": round(1000 / (rate * all_weights), 3),
                "phone_int4": round(PHONE_BYTES_PER_S / (all_weights * PHONE_BYTES_PER_WEIGHT), 3),
            },
            "links": links,
        }
    return {
        "security": MODE,
        "formula": "ms/token = device_ms + trunk_ms + RTT + 8*(bytes_up+bytes_down)/bandwidth + aead_ms",
        "links": {name: {"rtt_ms": rtt, "mbit_s_each_way": mbit} for name, (rtt, mbit) in LINKS.items()},
        "measured_inputs": {
            "model": shape.name,
            "device_ms_per_token": round(device_ms, 3),
            "device_ms_per_million_weights": round(rate * 1e6, 4),
            "trunk_ms_per_token": ms["trunk"]["median"],
            "aead_ms_per_token": round(aead_ms, 4),
            "overhead_bytes_per_step_up_down": {enc: list(value) for enc, value in overhead.items()},
        },
        "models": models,
        "assumptions": [
            "batch 1 decoding, one request/response round trip per token, no pipelining, no packet loss, "
            "TCP already open and in steady state (no slow start); the link has the stated bandwidth both ways",
            "bytes per token = the measured tls+aesgcm decode-step overhead (HTTP, TLS, AES-GCM, frame header) plus "
            "the hidden-state payload for the model's hidden size in each encoding",
            "device time scales linearly with the device part's matmul weights (its layers and the LM head) at "
            "the rate measured here (fp32 on this CPU): device 'this_cpu'",
            "device 'phone_int4': decode is memory-bound, so device ms = device weights x 0.5 byte (int4) / 30 GB/s "
            "(about half the peak LPDDR5X bandwidth of a recent flagship phone); compute and activations ignored",
            "Llama-2 splits keep the same head/tail layer counts as the benchmark split; trunk time on GPUs = fp16 "
            "trunk weights / (60% of peak HBM bandwidth), inter-GPU communication ignored",
            "aead_ms: two seals and two opens of a decode frame (both ends), measured, scaled by frame size",
            "device_only_tokens_per_s: the whole model on the device under the same assumption, for scale "
            "(a 70B model would not fit in a phone's memory, even in int4)",
            "the Llama-2 hidden states cross at the model's own width; the device part and the split are "
            "assumptions, not measurements",
        ],
    }
