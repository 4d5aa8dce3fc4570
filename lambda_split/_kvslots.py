"""The trunk's KV cache: one pool of token slots per layer, shared by every session's rows.

A session's row owns a list of slots, one per token it has seen; a step writes only its new
tokens' keys and values into fresh slots. A forward over several sessions reads each row's
slots gathered right-aligned to the longest row, so that every row's newest token sits at the
same key index: the model's own mask builders (causal and sliding window) then hold for every
row, and a left-padding mask hides the gap of shorter rows. Nothing persistent is copied per
step; attention's read of the batch's keys and values is one gather per layer (the per-session
``DynamicCache`` concatenated its whole cache per layer per step instead). A layer's store is
laid out (H, capacity, D), so that a lone row whose slots are consecutive (a session running
alone: the pool hands out the lowest free ids, ascending) is read as a view, with no gather.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


class SlotPool:
    """Key and value storage for ``num_layers`` layers, ``capacity`` token slots each.

    The pool grows by doubling when a step needs more slots than are free (a rare copy,
    amortised over the steps that filled it) and never shrinks; freed slots are reused first.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each (H, capacity, D)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = 0
        #: bytes of keys and values one token slot holds over the layers created so far
        self.bytes_per_token = 0
        self._free = torch.empty(0, dtype=torch.long)  # a stack of free slot ids
        self._free_count = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self.capacity - self._free_count

    def allocate(self, count: int) -> torch.Tensor:
        """Take ``count`` free slots (growing the pool if needed); return their ids.

        The top of the free stack holds the lowest ids, so the ids come out ascending (flipped):
        a session that runs alone gets consecutive slots, which a forward reads without a gather.
        """
        with self._lock:
            if self._free_count < count:
                self._grow(count - self._free_count)
            ids = self._free[self._free_count - count : self._free_count].flip(0)
            self._free_count -= count
            return ids

    def free(self, ids: torch.Tensor) -> None:
        with self._lock:
            self._free_locked(ids)

    @torch.inference_mode()  # the pool's tensors are made in inference mode, by the forward
    def _free_locked(self, ids: torch.Tensor) -> None:
        self._free[self._free_count : self._free_count + ids.numel()] = ids.reshape(-1)
        self._free_count += ids.numel()

    def _grow(self, need: int) -> None:
        old, new = self.capacity, max(2 * self.capacity, self.capacity + need, 64)
        free = torch.empty(new, dtype=torch.long)
        free[: self._free_count] = self._free[: self._free_count]
        # New ids go on the stack so that the lowest is handed out first.
        free[self._free_count : self._free_count + new - old] = torch.arange(new - 1, old - 1, -1)
        self._free, self._free_count = free, self._free_count + new - old
        for store in (self.keys, self.values):
            for index, tensor in enumerate(store):
                if tensor is not None:
                    # Zeros, not garbage: padding reads of a gather must be finite under a mask.
                    heads, _, dim = tensor.shape
                    store[index] = torch.cat([tensor, tensor.new_zeros(heads, new - old, dim)], dim=1)
        self.capacity = new

    def layer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (H, capacity, D) keys and values of layer ``index``, created on first use like ``like`` (B, H, T, D)."""
        keys, values = self.keys[index], self.values[index]
        if keys is None or values is None:
            shape = (like.shape[1], self.capacity, like.shape[3])
            keys = self.keys[index] = like.new_zeros(shape)
            values = self.values[index] = like.new_zeros(shape)
            self.bytes_per_token += 2 * keys.element_size() * shape[0] * shape[2]
        return keys, values

    # -- sessions -------------------------------------------------------------------------------
    def hold(self, state: SlotState) -> None:
        """Mark ``state`` as used by a queued or running step: releasing it waits for :meth:`finish`."""
        with self._lock:
            state.in_flight += 1

    def finish(self, state: SlotState) -> None:
        with self._lock:
            state.in_flight -= 1
            if state.released and state.in_flight == 0:
                self._drop_locked(state)

    def release(self, state: SlotState) -> None:
        """Return a closed, expired or evicted session's slots, once no step uses them any more."""
        with self._lock:
            state.released = True
            if state.in_flight == 0:
                self._drop_locked(state)

    def _drop_locked(self, state: SlotState) -> None:
        if state.slots is not None and state.seen:
            self._free_locked(state.slots[:, : state.seen])
        state.slots, state.mask, state.seen = None, None, 0


class SlotPools:
    """One :class:`SlotPool` per layer a session may enter the trunk at (its head depth): a session
    entering at layer ``d`` keeps keys and values of layers ``[d, stop)`` only, so no cache is held
    for layers it does not run, and its bytes per token are those of its own layers."""

    def __init__(self, starts: Iterable[int], stop: int) -> None:
        self.pools = {start: SlotPool(stop - start) for start in starts}
        if not self.pools or min(self.pools) > stop:
            raise ValueError("a trunk needs at least one entry layer at or before its end")

    def __getitem__(self, start: int) -> SlotPool:
        return self.pools[start]

    def of(self, state: SlotState) -> SlotPool:
        return self.pools[state.start]

    @property
    def used(self) -> int:
        return sum(pool.used for pool in self.pools.values())

    @property
    def capacity(self) -> int:
        return sum(pool.capacity for pool in self.pools.values())

    @property
    def bytes_used(self) -> int:
        return sum(pool.used * pool.bytes_per_token for pool in self.pools.values())

    @property
    def bytes_total(self) -> int:
        return sum(pool.capacity * pool.bytes_per_token for pool in self.pools.values())

    def state_bytes(self, state: SlotState) -> int:
        return state.seen * (state.rows or 0) * self.of(state).bytes_per_token


@dataclass(eq=False)
class SlotState:
    """One session's rows: their slots, and the 0/1 mask of every position seen (padding is 0).
    ``start`` is the trunk layer the session enters at (its head depth), which names its pool."""

    start: int = 0
    rows: int | None = None
    seen: int = 0
    slots: torch.Tensor | None = None  # (B, capacity) slot ids, the first ``seen`` in use
    mask: torch.Tensor | None = None  # (B, capacity) of 0/1, the first ``seen`` in use
    ones: torch.Tensor | None = None  # (B,) tokens that are not padding, for position ids
    in_flight: int = 0
    released: bool = False
    #: a lone row's first slot when its ``seen`` slots are consecutive ascending ids (else None)
    run: int | None = None

    def _append(self, ids: torch.Tensor, new_mask: torch.Tensor) -> None:
        rows, length = new_mask.shape
        need = self.seen + length
        first = int(ids[0, 0]) if rows == 1 else None
        follows = first is not None and (self.seen == 0 or self.run == first - self.seen)
        self.run = first - self.seen if first is not None and follows and _ascending(ids[0]) else None
        if self.slots is None or self.mask is None or self.slots.shape[1] < need:
            size = max(need, 2 * self.seen, 16)
            slots, mask = ids.new_zeros(rows, size), new_mask.new_zeros(rows, size)
            if self.slots is not None and self.mask is not None:
                slots[:, : self.seen] = self.slots[:, : self.seen]
                mask[:, : self.seen] = self.mask[:, : self.seen]
            self.slots, self.mask = slots, mask
        self.slots[:, self.seen : need] = ids
        self.mask[:, self.seen : need] = new_mask
        self.ones = new_mask.sum(-1) + (self.ones if self.ones is not None else 0)
        self.seen = need


@dataclass(eq=False)
class PoolBatch:
    """The rows of some sessions for one forward, seen by the decoder layers as their KV cache.

    ``parts`` pairs each session's state with its new tokens' mask (B_s, T); T is the same
    for all. The layers call :meth:`update`; the mask builders call :meth:`get_mask_sizes`
    and :meth:`get_query_offset`. Nothing changes in a state until :meth:`commit`.
    """

    pool: SlotPool
    first_layer: int
    parts: list[tuple[SlotState, torch.Tensor]]
    is_compileable: bool = False
    length: int = field(init=False)  # L: key positions every row is aligned to
    tokens: int = field(init=False)  # T
    write: torch.Tensor = field(init=False)  # (R * T,) slots of the new tokens, row-major
    gather: torch.Tensor = field(init=False)  # (R, L) slot of each key position (empty with a span)
    mask: torch.Tensor = field(init=False)  # (R, L) 0/1, left padding where a row is shorter
    positions: torch.Tensor = field(init=False)  # (R, T) position ids of the new tokens
    span: tuple[int, int] | None = field(
        init=False
    )  # [first, last + 1) slot of a lone row in consecutive slots

    def __post_init__(self) -> None:
        self.tokens = self.parts[0][1].shape[1]
        self.length = max(state.seen for state, _ in self.parts) + self.tokens
        rows = sum(new_mask.shape[0] for _, new_mask in self.parts)
        self.write = self.pool.allocate(rows * self.tokens)
        self.span = self._lone_span() if rows == 1 else None
        # a lone row read in place needs no gather (the commonest step: a session running alone)
        self.gather = torch.zeros(rows if self.span is None else 0, self.length, dtype=torch.long)
        self.mask = torch.zeros(rows, self.length, dtype=torch.long)
        self.positions = torch.zeros(rows, self.tokens, dtype=torch.long)
        row = 0
        for state, new_mask in self.parts:
            count, seen = new_mask.shape[0], state.seen
            start, rows_here = self.length - seen - self.tokens, slice(row, row + count)
            self.mask[rows_here, self.length - self.tokens :] = new_mask
            if seen and state.mask is not None:
                self.mask[rows_here, start : start + seen] = state.mask[:, :seen]
            if self.span is None:
                new_ids = self.write[row * self.tokens : (row + count) * self.tokens].view(count, self.tokens)
                self.gather[rows_here, self.length - self.tokens :] = new_ids
                if seen and state.slots is not None:
                    self.gather[rows_here, start : start + seen] = state.slots[:, :seen]
            # As positions_from_mask() over the whole row: padding skipped, padded positions 0.
            before = state.ones[:, None] if state.ones is not None else 0
            self.positions[rows_here] = (before + new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
            row += count

    def _lone_span(self) -> tuple[int, int] | None:
        """``[first, last + 1)`` of a lone row's slots, old and new, when they are consecutive."""
        state = self.parts[0][0]
        first = int(self.write[0])
        follows = state.seen == 0 or (state.run is not None and state.run + state.seen == first)
        if not (follows and _ascending(self.write)):
            return None
        return first - state.seen, first + self.tokens

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (R, H, T, D) keys and values; return every row's (R, H, L, D)."""
        keys, values = self.pool.layer(layer_idx - self.first_layer, key)
        if self.span is not None:  # one row in consecutive slots: write and read in place
            start, end = self.span
            keys[:, end - self.tokens : end] = key[0]
            values[:, end - self.tokens : end] = value[0]
            return keys[:, start:end].unsqueeze(0), values[:, start:end].unsqueeze(0)
        rows, heads, length, dim = key.shape
        keys.index_copy_(1, self.write, key.transpose(0, 1).reshape(heads, rows * length, dim))
        values.index_copy_(1, self.write, value.transpose(0, 1).reshape(heads, rows * length, dim))
        return self._read(keys), self._read(values)

    def _read(self, store: torch.Tensor) -> torch.Tensor:
        rows, length = self.gather.shape
        picked = store.index_select(1, self.gather.view(-1))  # (H, R * L, D)
        return picked.view(store.shape[0], rows, length, -1).transpose(0, 1).contiguous()  # (R, H, L, D)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.length - self.tokens

    def commit(self) -> None:
        """Make the new tokens part of their sessions (after a successful forward)."""
        row = 0
        for state, new_mask in self.parts:
            count = new_mask.shape[0]
            state._append(
                self.write[row * self.tokens : (row + count) * self.tokens].view(count, -1), new_mask
            )
            state.rows = count
            row += count

    def abort(self) -> None:
        """Give the new tokens' slots back (after a failed forward)."""
        self.pool.free(self.write)


def _ascending(ids: torch.Tensor) -> bool:
    """True when the 1-D ``ids`` are consecutive ascending numbers."""
    if ids.numel() == 1:
        return True
    return int(ids[-1]) - int(ids[0]) == ids.numel() - 1 and bool((ids.diff() == 1).all())
