"""A split depth per session: the server allows a range, each session says where its head stops.

A server started with ``--split A:B --head-depths LO:HI`` (``1 <= LO <= A <= HI < B``) holds trunk
layers ``[LO, B)``; a session opened with ``{"head_depth": d}`` (``LO <= d <= HI``; absent means A)
runs layers ``[d, B)`` there, exactly the trunk of split ``d:B``. The device holds head layers
``[0, HI)`` and runs ``[0, d)`` for that session.

Who knows d: the server always (the session starts there), and so does anyone who reads the
session open, which crosses in the clear in plain mode and under TLS only in the other modes. The
depth hides nothing from the server or from anyone who knows the weights and the range
(``lambda-split frontier``, setting ``depth:LO-HI``: SECURITY.md).
"""

from __future__ import annotations

import random
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["RANDOM", "HeadDepthChoice", "HeadDepths", "choose_depth", "parse_head_depth"]

RANDOM: Literal["random"] = "random"
#: What a client asks for: a fixed depth, or ``"random"`` (drawn per session within the server's range).
HeadDepthChoice = int | Literal["random"]
_RANGE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


@dataclass(frozen=True)
class HeadDepths:
    """The head depths ``[lo, hi]`` (both included) a server lets sessions choose."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(
                f"head depths {self.lo}:{self.hi} need 1 <= LO <= HI (the head keeps at least one layer)"
            )

    @classmethod
    def parse(cls, text: str) -> HeadDepths:
        """``LO:HI``, e.g. ``1:4``."""
        match = _RANGE.fullmatch(text)
        if not match:
            raise ValueError(f"head depths must look like LO:HI (for example 1:4), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def check_split(self, start: int, stop: int) -> None:
        """The range must hold the split's own depth A, and leave the trunk a layer: LO <= A <= HI < B."""
        if not self.lo <= start <= self.hi:
            raise ValueError(f"head depths {self} must include the split's depth {start} (LO <= A <= HI)")
        if not self.hi < stop:
            raise ValueError(f"head depths {self} must stay below the trunk's end {stop} (HI < B)")

    def __contains__(self, depth: object) -> bool:
        return isinstance(depth, int) and not isinstance(depth, bool) and self.lo <= depth <= self.hi

    def __iter__(self) -> Any:
        return iter(range(self.lo, self.hi + 1))

    def __str__(self) -> str:
        return f"{self.lo}:{self.hi}"


def choose_depth(depths: HeadDepths, rng: random.Random | None = None) -> int:
    """A depth drawn uniformly from ``depths`` with ``secrets`` (``rng`` only for reproducible sweeps)."""
    span = depths.hi - depths.lo + 1
    return depths.lo + (secrets.randbelow(span) if rng is None else rng.randrange(span))


def parse_head_depth(text: str) -> HeadDepthChoice:
    """``random`` or a whole number >= 1 (the ``generate --head-depth`` argument)."""
    if text.strip() == "random":
        return "random"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"head depth must be 'random' or a layer number, got {text!r}") from None
    if value < 1:
        raise ValueError(f"head depth must be at least 1, got {value}")
    return value
