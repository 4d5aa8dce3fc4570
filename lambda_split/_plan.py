"""Placement of a trunk's layers over several span servers: which server runs which contiguous span.

The cost model, per decode token of one stream (the device relays, see lambda_split._chain):

* server ``s`` running layers ``[a, b)`` takes ``stage(s, a, b) = s.layer_s * sum(cost[a:b])``,
  where ``cost[l]`` is layer ``l``'s compute relative to a reference layer (its parameter count
  over the median layer's: decode is matrix-vector work, about two FLOPs per weight) and
  ``s.layer_s`` the server's measured (or given) seconds for one reference layer;
* it needs ``sum(memory[a:b]) <= s.memory_bytes`` (weights, plus the KV cache budget);
* a hop costs the device one round trip ``s.rtt_s`` per token.

:func:`optimal_plan` minimises the slowest stage (the bottleneck, which bounds the aggregate
tokens/s of many concurrent streams), then, among plans with that bottleneck, the per-token
latency of one stream (sum of stage times and round trips). It is exact: a dynamic programme over
(set of servers used, layers covered), so servers may be used in any order or not at all.
:func:`proportional_plan` is the naive placement it is compared with: layers in proportion to
memory, servers in the given order (as exo does).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PLAN_VERSION = 1
#: The exact programme is exponential in the number of servers.
MAX_SERVERS = 12


class PlanError(ValueError):
    """The planning input is malformed, or no placement satisfies the memory limits."""


class InfeasiblePlan(PlanError):
    """No placement of the trunk fits the servers' memory."""


@dataclass(frozen=True)
class ServerSpec:
    """One span server (and its replicas, which serve the same span): budget and speed."""

    name: str
    urls: tuple[str, ...]
    memory_bytes: int
    layer_s: float  # seconds per token for one reference layer (NaN: unknown, to be probed)
    rtt_s: float = 0.0  # device <-> server round trip

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise PlanError(f"server {self.name!r}: memory must be more than 0")
        if not (self.layer_s > 0 or math.isnan(self.layer_s)) or math.isinf(self.layer_s):
            raise PlanError(f"server {self.name!r}: layer time must be a positive number (NaN: to be probed)")
        if self.rtt_s < 0 or not math.isfinite(self.rtt_s):
            raise PlanError(f"server {self.name!r}: round trip must be 0 or more")


@dataclass(frozen=True)
class LayerCosts:
    """The trunk's layers ``[start, stop)`` of a model: memory and relative compute of each."""

    model: str
    num_layers: int
    start: int
    stop: int
    memory: tuple[int, ...]  # bytes, per trunk layer
    compute: tuple[float, ...]  # relative to a reference layer, per trunk layer

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop <= self.num_layers:
            raise PlanError(
                f"the trunk {self.start}:{self.stop} of {self.num_layers} layers is empty or out of range"
            )
        if len(self.memory) != self.stop - self.start or len(self.compute) != self.stop - self.start:
            raise PlanError("one memory and one compute figure per trunk layer")

    @classmethod
    def uniform(cls, layers: int, memory: int, *, start: int = 0, model: str = "") -> LayerCosts:
        return cls(model, start + layers, start, start + layers, (memory,) * layers, (1.0,) * layers)


@dataclass(frozen=True)
class PlanStage:
    server: str
    urls: tuple[str, ...]
    split: tuple[int, int]
    stage_s: float
    rtt_s: float
    memory_bytes: int


@dataclass(frozen=True)
class PlacementPlan:
    stages: tuple[PlanStage, ...]
    feasible: bool = True
    problems: tuple[str, ...] = field(default=())

    @property
    def bottleneck_s(self) -> float:
        return max(stage.stage_s for stage in self.stages)

    @property
    def latency_s(self) -> float:
        """Per token of one stream: every stage and every hop's round trip, in turn."""
        return sum(stage.stage_s + stage.rtt_s for stage in self.stages)

    def summary(self) -> dict[str, Any]:
        return {
            "hops": [
                {**asdict(stage), "urls": list(stage.urls), "split": list(stage.split)}
                for stage in self.stages
            ],
            "feasible": self.feasible,
            "problems": list(self.problems),
            "bottleneck_s": self.bottleneck_s,
            "latency_s": self.latency_s,
            "tokens_per_s_one_stream": 1.0 / self.latency_s if self.latency_s else math.inf,
            "tokens_per_s_pipelined": 1.0 / self.bottleneck_s if self.bottleneck_s else math.inf,
        }


def _stage(server: ServerSpec, costs: LayerCosts, a: int, b: int) -> PlanStage:
    """Server running trunk-relative layers ``[a, b)``."""
    return PlanStage(
        server.name,
        server.urls,
        (costs.start + a, costs.start + b),
        server.layer_s * sum(costs.compute[a:b]),
        server.rtt_s,
        sum(costs.memory[a:b]),
    )


def optimal_plan(costs: LayerCosts, servers: Sequence[ServerSpec]) -> PlacementPlan:
    """The exact optimum (see the module docstring); InfeasiblePlan if nothing fits."""
    _check_servers(servers)
    count, layers = len(servers), costs.stop - costs.start
    prefix_mem = [0, *itertools.accumulate(costs.memory)]
    prefix_cost = [0.0, *itertools.accumulate(costs.compute)]

    def fits(s: int, a: int, b: int) -> bool:
        return prefix_mem[b] - prefix_mem[a] <= servers[s].memory_bytes

    def time(s: int, a: int, b: int) -> float:
        return servers[s].layer_s * (prefix_cost[b] - prefix_cost[a])

    full = 1 << count
    # best[mask][i]: the smallest bottleneck covering layers [0, i) with exactly the servers in mask.
    best = [[math.inf] * (layers + 1) for _ in range(full)]
    best[0][0] = 0.0
    for mask in range(full):
        for i in range(layers):
            here = best[mask][i]
            if here == math.inf:
                continue
            for s in range(count):
                if mask >> s & 1:
                    continue
                for j in range(i + 1, layers + 1):
                    if not fits(s, i, j):
                        break
                    value = max(here, time(s, i, j))
                    if value < best[mask | 1 << s][j]:
                        best[mask | 1 << s][j] = value
    bottleneck = min(best[mask][layers] for mask in range(full))
    if bottleneck == math.inf:
        total = prefix_mem[-1]
        raise InfeasiblePlan(
            f"the trunk {costs.start}:{costs.stop} needs {total / 2**20:,.1f} MiB with no single layer split; "
            f"the servers' memory ({', '.join(f'{s.name} {s.memory_bytes / 2**20:,.1f} MiB' for s in servers)}) "
            "cannot hold it in contiguous spans"
        )
    limit = bottleneck * (1 + 1e-9) + 1e-15
    # Second pass: among placements whose every stage is within the bottleneck, the lowest latency.
    latency = [[math.inf] * (layers + 1) for _ in range(full)]
    choice: list[list[tuple[int, int, int] | None]] = [[None] * (layers + 1) for _ in range(full)]
    latency[0][0] = 0.0
    for mask in range(full):
        for i in range(layers):
            here = latency[mask][i]
            if here == math.inf:
                continue
            for s in range(count):
                if mask >> s & 1:
                    continue
                for j in range(i + 1, layers + 1):
                    if not fits(s, i, j):
                        break
                    spent = time(s, i, j)
                    if spent > limit:
                        break
                    value = here + spent + servers[s].rtt_s
                    if value < latency[mask | 1 << s][j]:
                        latency[mask | 1 << s][j] = value
                        choice[mask | 1 << s][j] = (mask, i, s)
    mask = min(range(full), key=lambda m: latency[m][layers])
    stages: list[PlanStage] = []
    j = layers
    while j:
        step = choice[mask][j]
        if step is None:  # pragma: no cover - the first pass proved a path exists
            raise InfeasiblePlan("no placement found")
        mask, i, s = step
        stages.append(_stage(servers[s], costs, i, j))
        j = i
    return PlacementPlan(tuple(reversed(stages)))


def proportional_plan(costs: LayerCosts, servers: Sequence[ServerSpec]) -> PlacementPlan:
    """Layers in proportion to each server's memory, in the given order (largest remainders get
    the leftover layers); the plan says whether it fits."""
    _check_servers(servers)
    layers = costs.stop - costs.start
    total = sum(s.memory_bytes for s in servers)
    shares = [layers * s.memory_bytes / total for s in servers]
    counts = [int(share) for share in shares]
    order = sorted(range(len(servers)), key=lambda k: shares[k] - counts[k], reverse=True)
    for k in order[: layers - sum(counts)]:
        counts[k] += 1
    stages, problems, start = [], [], 0
    for server, count in zip(servers, counts, strict=True):
        if count == 0:
            continue
        stage = _stage(server, costs, start, start + count)
        if stage.memory_bytes > server.memory_bytes:
            problems.append(
                f"{server.name} would need {stage.memory_bytes:,} bytes, has {server.memory_bytes:,}"
            )
        stages.append(stage)
        start += count
    return PlacementPlan(tuple(stages), feasible=not problems, problems=tuple(problems))


def _check_servers(servers: Sequence[ServerSpec]) -> None:
    if not servers:
        raise PlanError("no servers to place the trunk on")
    if len(servers) > MAX_SERVERS:
        raise PlanError(f"{len(servers)} servers; the exact planner takes at most {MAX_SERVERS}")
    unknown = [s.name for s in servers if math.isnan(s.layer_s)]
    if unknown:
        raise PlanError(f"no layer time for {', '.join(unknown)}: give it, or probe the server")
    names = [s.name for s in servers]
    if len(set(names)) != len(names):
        raise PlanError("two servers have the same name")


# --- the model's side ----------------------------------------------------------------------------


def layer_costs(
    checkpoint: Any, start: int, stop: int, *, bytes_per_param: int = 4, kv_tokens: int = 2048
) -> LayerCosts:
    """Per trunk layer of ``checkpoint``: weights (``bytes_per_param``: the server holds fp32) plus a
    KV cache of ``kv_tokens`` positions in fp32, and compute relative to the median layer."""
    from lambda_split._families import family_of
    from lambda_split._models import meta_model

    config = checkpoint.config
    family = family_of(config)
    params = [0] * int(config.num_hidden_layers)
    for name, tensor in meta_model(config).state_dict().items():
        index = family.layer_index(name)
        if index is not None:
            params[index] += tensor.numel()
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    kv = 2 * heads * head_dim * 4 * kv_tokens
    reference = statistics.median(params) or 1
    return LayerCosts(
        str(checkpoint.name),
        len(params),
        start,
        stop,
        tuple(p * bytes_per_param + kv for p in params[start:stop]),
        tuple(p / reference for p in params[start:stop]),
    )


# --- files ---------------------------------------------------------------------------------------


def read_servers(path: str | Path) -> list[ServerSpec]:
    """``{"servers": [{"name", "urls" (or "url"), "memory_mb" (or "memory_bytes"), "layer_ms", "rtt_ms"}]}``;
    ``layer_ms`` may be missing when the planner probes the server."""
    try:
        data = json.loads(Path(path).read_text())
        entries = data["servers"]
        if not isinstance(entries, list):
            raise TypeError("servers must be a list")
        return [_server(entry) for entry in entries]
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"{path}: not a servers file ({type(exc).__name__}: {exc})") from None


def _server(entry: dict[str, Any]) -> ServerSpec:
    urls = entry.get("urls") or ([entry["url"]] if "url" in entry else [])
    memory = entry["memory_bytes"] if "memory_bytes" in entry else float(entry["memory_mb"]) * 2**20
    return ServerSpec(
        str(entry["name"]),
        tuple(str(u) for u in urls),
        int(memory),
        float(entry.get("layer_ms", math.nan)) / 1000,
        float(entry.get("rtt_ms", 0.0)) / 1000,
    )


def plan_document(costs: LayerCosts, best: PlacementPlan, naive: PlacementPlan) -> dict[str, Any]:
    """The plan file that ``generate --plan`` reads: the optimum's hops, and the naive one for comparison."""
    return {
        "plan_version": PLAN_VERSION,
        "model": costs.model,
        "num_layers": costs.num_layers,
        "trunk": [costs.start, costs.stop],
        **best.summary(),
        "memory_proportional": naive.summary(),
    }


def read_plan(path: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """The hops of a plan file in order: (span ``A:B``, replica URLs)."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("plan_version") != PLAN_VERSION:
            raise ValueError(f"plan_version {data.get('plan_version')!r}, expected {PLAN_VERSION}")
        hops = [
            (f"{int(h['split'][0])}:{int(h['split'][1])}", tuple(str(u) for u in h["urls"]))
            for h in data["hops"]
        ]
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PlanError(f"{path}: not a plan file ({type(exc).__name__}: {exc})") from None
    if not hops or any(not urls for _, urls in hops):
        raise PlanError(f"{path}: every hop needs at least one server URL")
    return hops
