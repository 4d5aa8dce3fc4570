"""Drain: how a replica leaves a pool without losing a conversation.

On SIGTERM (see :class:`server.run.ReadyServer`) the drain begins: from then on ``/healthz``
answers ``503 {"status": "draining"}`` so health checks take the replica out, and opening a
session (``POST /v1/sessions``, a new stream, a stream ``OPEN``) answers ``503 draining``, so a
client opens it on another replica. Sessions already open keep stepping. The drain is over when
no session is open, or when ``timeout_s`` has passed; then the server shuts down as usual.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from lambda_split import ServiceError, TrunkService

DRAINING = "draining"
DRAINING_MESSAGE = "this replica is shutting down and takes no new sessions; open one on another replica"


class Drain:
    """The drain state of one replica: begun at most once, read by the routes that open sessions."""

    def __init__(
        self, service: TrunkService, timeout_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(timeout_s) and timeout_s >= 0):
            raise ValueError("drain_timeout_s must be a finite number of seconds, 0 or more")
        self.service = service
        self.timeout_s = timeout_s
        self.draining = False
        self._clock = clock
        self._deadline = 0.0

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self._deadline = self._clock() + self.timeout_s

    def check(self) -> None:
        """Raise ServiceError 503 ``draining`` if new sessions are no longer taken."""
        if self.draining:
            raise ServiceError(503, DRAINING, DRAINING_MESSAGE, retry_after=1)

    @property
    def done(self) -> bool:
        return self.draining and (self.service.open_sessions == 0 or self._clock() >= self._deadline)

    async def wait(self, poll_s: float = 0.05) -> bool:
        """Wait until the drain is done; True if every session ended, False if the deadline passed."""
        while not self.done:
            await asyncio.sleep(poll_s)
        return self.service.open_sessions == 0
