"""A short speed probe of a span server, for the planner: how long one decode step of its span takes.

The probe opens a trunk session on the server (whatever span it serves now), sends ``steps`` one-token
steps of a random hidden state (it carries nothing of anyone's prompt) and takes the median time, after
``warmup`` steps. The round trip is the median of ``GET /healthz`` on the same transport. Seconds per
layer are ``(step - round trip) / layers``: the server's compute for one token of one layer, with the
HTTP request's round trip standing in for the step's own framing (an approximation, stated in README).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from lambda_split._chain import _fetch_hop_info
from lambda_split._client import RemoteTrunk
from lambda_split._codec import Encoding
from lambda_split._stream import StreamLink, make_link
from lambda_split.protocol import HEALTH_PATH
from secure_channel import Request, Transport


@dataclass(frozen=True)
class SpeedProbe:
    url: str
    split: tuple[int, int]
    step_s: float
    rtt_s: float

    @property
    def layer_s(self) -> float:
        layers = self.split[1] - self.split[0]
        return max(self.step_s - self.rtt_s, 1e-6) / max(layers, 1)


def probe_speed(transport: Transport, url: str, *, steps: int = 16, warmup: int = 4) -> SpeedProbe:
    """Probe the server behind ``transport`` (which the caller closes)."""
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be at least 1 and warmup at least 0")
    info = _fetch_hop_info(transport).info
    trips = []
    for _ in range(max(steps // 2, 3)):
        started = time.perf_counter()
        transport.exchange(Request("GET", HEALTH_PATH))
        trips.append(time.perf_counter() - started)
    link = make_link(transport, None)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 1, info.hidden_size, generator=generator) * 0.1  # (1, 1, C)
    mask = torch.ones(1, 1, dtype=torch.long)  # (1, 1)
    times = []
    try:
        trunk = RemoteTrunk(link, Encoding.FP32)
        try:
            for _ in range(warmup + steps):
                started = time.perf_counter()
                trunk(hidden, mask)
                times.append(time.perf_counter() - started)
        finally:
            trunk.close()
    finally:
        if isinstance(link, StreamLink):
            link.shutdown()
    return SpeedProbe(url, info.split, statistics.median(times[warmup:]), statistics.median(trips))
