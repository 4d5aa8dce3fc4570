"""The handshake rate limit of the AES-GCM middleware."""

from __future__ import annotations

import math
from collections import OrderedDict


class _HandshakeLimiter:
    """A token bucket per source address (identities are unknown before the handshake ends)."""

    def __init__(self, rate_per_s: float, burst: int, max_sources: int = 10_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("handshake_rate must be (positive rate, burst >= 1)")
        self.rate, self.burst, self.max_sources = rate_per_s, burst, max_sources
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, source: str, now: float) -> int | None:
        """Spend one token; return None, or the seconds to wait when the bucket is empty."""
        tokens, last = self.buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[source] = (tokens, now)
            return math.ceil((1.0 - tokens) / self.rate)
        self.buckets[source] = (tokens - 1.0, now)
        while len(self.buckets) > self.max_sources:
            self.buckets.popitem(last=False)
        return None
