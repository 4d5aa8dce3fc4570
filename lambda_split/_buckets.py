"""Fixed-bound histograms that the trunk keeps for ``/metrics``: the service and the scheduler
count into them, and only the server turns them into Prometheus families (so the engine does not
depend on a metrics library)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class Buckets:
    """``count`` values summing to ``total``; ``counts[i]`` of them were at most ``bounds[i]`` and
    more than the bound before (not cumulative). A value past the last bound is in no bucket."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def record(self, value: float) -> None:
        self.count += 1
        self.total += value
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), None)
        if index is not None:
            self.counts[index] += 1

    def le(self) -> dict[float, int]:
        """Cumulative counts by upper bound: values at most each bound (Prometheus' ``le``)."""
        return dict(zip(self.bounds, itertools.accumulate(self.counts), strict=True))
