"""Conversations kept between requests: a trunk session and the head's and tail's KV caches.

A request whose prompt tokens begin with exactly the tokens a kept conversation has fed
through the parts takes that conversation out of the cache and feeds only the rest. The
cache is bounded (``capacity`` conversations, least recently used dropped first) and drops
conversations idle for ``idle_s``; a dropped conversation's trunk session is closed by the
caller, outside the cache's lock, because closing it is a network call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lambda_split._client import RemoteTrunk
from lambda_split._defences import TrunkFn
from lambda_split._parts import Head, PartState


@dataclass
class Conversation:
    """What the head, the trunk session and the tail have seen: ``fed`` token ids, all in their caches.

    ``head`` stops at ``depth``, the layer the trunk session entered at (drawn once, when the session
    opened, under ``--head-depth random``): every turn of the conversation keeps that head and depth."""

    trunk: RemoteTrunk
    head: Head
    depth: int
    head_state: PartState
    tail_state: PartState
    fed: list[int] = field(default_factory=list)
    last_used: float = 0.0
    #: The trunk as the decoding loop calls it: through the client's uplink defence, if it has one
    #: (one draw of noise for the whole conversation, every turn included). None: ``trunk`` itself.
    send: TrunkFn | None = None

    def close(self) -> None:
        """Close the trunk session; a session the server already dropped is no error here."""
        with contextlib.suppress(Exception):
            self.trunk.close()


class ConversationCache:
    """At most ``capacity`` idle conversations (0: none are kept), each for at most ``idle_s`` seconds."""

    def __init__(self, capacity: int, idle_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if idle_s <= 0:
            raise ValueError("idle_s must be positive")
        self.capacity, self.idle_s, self._clock = capacity, idle_s, clock
        self._kept: list[Conversation] = []  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def take(self, ids: list[int]) -> tuple[Conversation | None, list[Conversation]]:
        """The kept conversation with the longest ``fed`` that is a proper prefix of ``ids`` (removed
        from the cache: the caller owns it now), and the expired conversations to close."""
        with self._lock:
            expired = self._expire()
            best: Conversation | None = None
            for conversation in self._kept:
                size = len(conversation.fed)
                longer = best is None or size >= len(best.fed)  # the most recent of equals
                if longer and size < len(ids) and ids[:size] == conversation.fed:
                    best = conversation
            if best is not None:
                self._kept.remove(best)
            return best, expired

    def put(self, conversation: Conversation) -> list[Conversation]:
        """Keep ``conversation``; return the ones dropped to make room (or it, if nothing is kept)."""
        conversation.last_used = self._clock()
        with self._lock:
            dropped = self._expire()
            self._kept.append(conversation)
            while len(self._kept) > self.capacity:
                dropped.append(self._kept.pop(0))
            return dropped

    def expire(self) -> list[Conversation]:
        with self._lock:
            return self._expire()

    def pop_oldest(self) -> Conversation | None:
        """Remove and return the least recently used conversation (the caller closes it), if any."""
        with self._lock:
            return self._kept.pop(0) if self._kept else None

    def drain(self) -> list[Conversation]:
        with self._lock:
            kept, self._kept = self._kept, []
            return kept

    def _expire(self) -> list[Conversation]:
        deadline = self._clock() - self.idle_s
        stale = [c for c in self._kept if c.last_used < deadline]
        self._kept = [c for c in self._kept if c.last_used >= deadline]
        return stale
