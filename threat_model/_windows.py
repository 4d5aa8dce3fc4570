"""Find any K-byte window of some needles in a haystack, in time linear in the haystack.

Every K-byte window of every needle is hashed (a polynomial hash mod 2**64 over a
random byte table, computed for all positions at once with numpy by prefix sums and
the modular inverse of the base), and so is every K-byte window of the haystack.
Hash hits are grouped into runs of consecutive positions and the first window of
each run is compared byte for byte, so a reported match is never a hash collision.

Windows that repeat with a period of at most 8 bytes (runs of zeros, of one fp16
value, of spaces) are left out of the index: they are padding, not content, and
would match every zero-filled buffer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

_BASE = 0x100000001B3  # odd, hence invertible mod 2**64
_INV = pow(_BASE, -1, 1 << 64)
_TABLE = np.random.default_rng(0x5EED).integers(1, 2**63, size=256, dtype=np.uint64)
_CHUNK = 1 << 22
_PERIODS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Hit:
    """Haystack bytes ``[offset, offset + length)`` match needle windows.

    ``label`` names every needle whose windows matched at the start or end of the run
    (``|``-separated); ``needle_offset`` is where the first window sits in its needle.
    """

    label: str
    offset: int
    length: int
    needle_offset: int


def _powers(n: int, base: int) -> np.ndarray:
    cached = _POWER_CACHE.get(base)
    if cached is None or len(cached) < n:
        out = np.full(max(n, _CHUNK + 4096), base, dtype=np.uint64)
        out[0] = 1
        with np.errstate(over="ignore"):
            cached = _POWER_CACHE[base] = np.cumprod(out, dtype=np.uint64)
    return cached[:n]


_POWER_CACHE: dict[int, np.ndarray] = {}


def window_hashes(data: np.ndarray, k: int) -> np.ndarray:
    """Hash of every ``k``-byte window of ``data`` (uint8), as uint64; empty if shorter than k."""
    n = len(data)
    if n < k:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        values = _TABLE[data]
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(values * _powers(n, _INV), dtype=np.uint64, out=prefix[1:])
        hashes: np.ndarray = (prefix[k:] - prefix[: n - k + 1]) * _powers(n, _BASE)[k - 1 :]
        return hashes


def _periodic(data: np.ndarray, k: int) -> np.ndarray:
    """True for each k-window of ``data`` that repeats with some period <= 8."""
    windows = len(data) - k + 1
    result = np.zeros(max(windows, 0), dtype=bool)
    for p in _PERIODS:
        if p >= k:
            break
        equal = np.concatenate(([0], np.cumsum(data[p:] == data[:-p], dtype=np.int64)))
        result |= (equal[k - p : k - p + windows] - equal[:windows]) == k - p
    return result


class WindowIndex:
    """All ``k``-byte windows of a set of labelled needles."""

    def __init__(
        self, needles: Iterable[tuple[str, bytes]], k: int, *, fold_ascii: bool = False, stride: int = 1
    ) -> None:
        """Index the ``k``-byte windows of each needle that start at a multiple of ``stride``.

        With ``stride`` s > 1 the index is s times smaller and any matching run of at least
        ``k + s - 1`` bytes is still found (it contains one indexed window).
        """
        if k < 4:
            raise ValueError("window must be at least 4 bytes")
        if stride < 1:
            raise ValueError("stride must be positive")
        self.k = k
        self.stride = stride
        self.fold_ascii = fold_ascii
        self._needles: list[tuple[str, np.ndarray]] = []
        hashes, owners, offsets = [], [], []
        for label, raw in needles:
            data = self._prepare(raw)
            if len(data) < k:
                continue
            keep = ~_periodic(data, k)
            keep[np.arange(len(keep)) % stride != 0] = False
            position = np.flatnonzero(keep)
            hashes.append(window_hashes(data, k)[keep])
            owners.append(np.full(len(position), len(self._needles), dtype=np.int64))
            offsets.append(position)
            self._needles.append((label, data))
        if hashes:
            all_hashes = np.concatenate(hashes)
            order = np.argsort(all_hashes, kind="stable")
            self._hashes = all_hashes[order]
            self._owners = np.concatenate(owners)[order]
            self._offsets = np.concatenate(offsets)[order]
        else:
            self._hashes = np.empty(0, dtype=np.uint64)
        # A direct-mapped filter on the top hash bits keeps searchsorted off the common path.
        self._shift = np.uint64(64 - min(27, max(16, (16 * len(self._hashes)).bit_length())))
        self._filter = np.zeros(1 << (64 - int(self._shift)), dtype=bool)
        self._filter[self._hashes >> self._shift] = True

    def __len__(self) -> int:
        return len(self._hashes)

    def _prepare(self, raw: bytes) -> np.ndarray:
        data = np.frombuffer(raw, dtype=np.uint8)
        if self.fold_ascii:
            data = data + ((data >= 65) & (data <= 90)).astype(np.uint8) * np.uint8(32)
        return data

    def scan(self, haystack: bytes, *, max_hits: int = 64) -> tuple[list[Hit], int]:
        """Return up to ``max_hits`` verified runs of matching bytes, and how many runs there were."""
        if not len(self._hashes) or len(haystack) < self.k:
            return [], 0
        data = self._prepare(haystack)
        positions: list[np.ndarray] = []
        for start in range(0, len(data) - self.k + 1, _CHUNK):
            piece = data[start : start + _CHUNK + self.k - 1]
            found = np.flatnonzero(self._contains(window_hashes(piece, self.k)))
            positions.append(found + start)
        hits_at = np.concatenate(positions) if positions else np.empty(0, dtype=np.int64)
        if not len(hits_at):
            return [], 0
        breaks = np.flatnonzero(np.diff(hits_at) > self.stride) + 1
        run_starts = np.concatenate(([0], breaks))
        run_ends = np.concatenate((breaks, [len(hits_at)]))
        hits: list[Hit] = []
        total = 0
        for first, last in zip(run_starts, run_ends, strict=True):
            hit = self._verify(data, int(hits_at[first]), int(hits_at[last - 1]))
            if hit is not None:
                total += 1
                if len(hits) < max_hits:
                    hits.append(hit)
        return hits, total

    def _contains(self, hashes: np.ndarray) -> np.ndarray:
        result: np.ndarray = self._filter[hashes >> self._shift]
        maybe = np.flatnonzero(result)
        index = np.searchsorted(self._hashes, hashes[maybe])
        np.minimum(index, len(self._hashes) - 1, out=index)
        result[maybe] = self._hashes[index] == hashes[maybe]
        return result

    def _labels_at(self, window: np.ndarray) -> dict[str, int]:
        """Labels (with needle offsets) of every needle window byte-equal to ``window``."""
        index = int(np.searchsorted(self._hashes, window_hashes(window, self.k))[0])
        found: dict[str, int] = {}
        while index < len(self._hashes) and self._hashes[index] == window_hashes(window, self.k)[0]:
            label, needle = self._needles[int(self._owners[index])]
            offset = int(self._offsets[index])
            if np.array_equal(needle[offset : offset + self.k], window):
                found.setdefault(label, offset)
            index += 1
        return found

    def _verify(self, data: np.ndarray, first: int, last: int) -> Hit | None:
        """Check the first and last window of a run; label it with every needle that matched."""
        head = self._labels_at(data[first : first + self.k])
        if not head:
            return None
        tail = self._labels_at(data[last : last + self.k]) if last != first else {}
        labels = "|".join(sorted(set(head) | set(tail)))
        return Hit(labels, first, last - first + self.k, min(head.values()))
