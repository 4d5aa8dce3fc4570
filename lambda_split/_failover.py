"""Failover: when the trunk server goes away mid-generation, rebuild the session elsewhere.

The client keeps the history its trunk session holds: every uplink ``hidden`` (B, T, C) and
``mask`` (B, T) the server has answered, exactly as the trunk saw them. When a step fails in a
way that means "this server or session is gone" (:func:`failover_worthy`), the client opens a new
transport (a new TLS and AES-GCM handshake, a new routing key) to the same URL or the next one,
checks that the new server runs the same trunk, opens a session, replays the history as one
prefill (in chunks the server's limits allow) and re-runs the step that failed. With the fp32 wire
and greedy decoding, the tokens are those of an undisturbed run.

Why the hidden states and not the token ids: re-running the head over the token ids as one
prefill gives hidden states that differ from the step-by-step ones in the last bits, and with a
lossy wire they may round differently; the replay would then not be what the lost trunk saw.
Keeping the hidden states costs memory on the device (tokens x hidden size x 4 bytes for the fp32
and int8 wires, x 2 for fp16 and bf16: 2.3 KB a token for SmolLM2-135M, 16 KB for Llama-2-7B) and
no compute at failover time. A replay discloses this whole history to the new server (SECURITY.md).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import torch

from lambda_split._codec import Encoding
from lambda_split._errors import ServerError, TrunkUnavailable
from secure_channel import (
    AuthenticationError,
    StreamClosed,
    StreamUnsupported,
    Transport,
    TransportError,
)

logger = logging.getLogger("lambda_split.failover")
T = TypeVar("T")

#: Server statuses that mean "not this server, not now": a proxy without a live upstream (502, 504),
#: a server at capacity or draining (503), and a session the server does not know (404 after a
#: restart or an idle expiry, 410).
_RETRY_STATUSES = frozenset({502, 503, 504})
_LOST_SESSION_STATUSES = frozenset({404, 410})
#: WebSocket close codes after which a new stream may work: normal or going away (shutdown, drain),
#: abnormal, internal error, service restart, try again later, bad gateway.
_RETRY_CLOSE_CODES = frozenset({1000, 1001, 1006, 1011, 1012, 1013, 1014})


def failover_worthy(exc: BaseException) -> bool:
    """True if ``exc`` means the trunk server or its session is gone, so another may take over.

    Refusals of the request itself (4xx validation, limits), authentication failures and
    mismatched servers are not: another try would fail the same way, or should not be made.
    """
    if isinstance(exc, ServerError):
        return exc.status in _RETRY_STATUSES or exc.status in _LOST_SESSION_STATUSES
    if isinstance(exc, StreamClosed):
        return exc.code in _RETRY_CLOSE_CODES
    if isinstance(exc, (StreamUnsupported, TrunkUnavailable, AuthenticationError)):
        return False
    return isinstance(exc, TransportError)


def _answered(exc: BaseException) -> bool:
    """True if the server answered the failed step (a 5xx other than a lost session), so a close reaches it."""
    return isinstance(exc, ServerError) and exc.status not in _LOST_SESSION_STATUSES


@dataclass(frozen=True)
class FailoverPolicy:
    """How hard the client tries to rebuild a lost trunk session.

    One recovery makes up to ``attempts`` passes over the server list (each pass tries every URL
    once, starting after the one that failed), waits ``backoff_s`` before the second pass and twice
    as long before each next one (at most ``max_backoff_s``, each wait shortened by a random
    fraction up to ``jitter``), and gives up after ``deadline_s`` seconds: no attempt starts after
    the deadline, and one attempt is bounded by the client's request timeout.
    """

    attempts: int = 4
    deadline_s: float = 30.0
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1 (pass failover=None to turn failover off)")
        if not self.deadline_s > 0:
            raise ValueError("deadline_s must be more than 0")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("need 0 <= backoff_s <= max_backoff_s")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be in [0, 1]")

    def wait_before(self, attempt: int) -> float:
        """Seconds to wait before pass ``attempt`` (1-based): none before the first."""
        if attempt <= 1:
            return 0.0
        base: float = min(self.max_backoff_s, self.backoff_s * 2.0 ** (attempt - 2))
        return base * (1 - self.jitter * random.random())


@dataclass(frozen=True)
class FailoverEvent:
    """What happened, for logs and callers; never a payload.

    ``stage`` is ``lost`` (a step failed with ``reason``; recovery starts), ``recovered`` (the
    session was rebuilt on ``url`` by replaying ``replayed_tokens`` positions) or ``failed``
    (every attempt failed; :class:`TrunkUnavailable` follows). ``elapsed_s`` runs from the loss.
    """

    stage: Literal["lost", "recovered", "failed"]
    url: str
    reason: str
    attempts: int = 0
    replayed_tokens: int = 0
    elapsed_s: float = 0.0

    def describe(self) -> str:
        if self.stage == "lost":
            return f"trunk server {self.url} lost ({self.reason}); failing over"
        if self.stage == "recovered":
            return (
                f"failed over to {self.url} after {self.attempts} attempt(s) in {self.elapsed_s:.2f} s, "
                f"replaying {self.replayed_tokens} positions"
            )
        return f"no trunk server took over after {self.attempts} attempt(s) in {self.elapsed_s:.2f} s ({self.reason})"


FailoverCallback = Callable[[FailoverEvent], None]


def _reason(exc: BaseException) -> str:
    """A short, payload-free description of ``exc`` for events and errors."""
    if isinstance(exc, ServerError):
        return f"{exc.status} {exc.code}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


class _History:
    """The uplink of one trunk session: what the server holds in its KV cache, step by step.

    Kept as the trunk saw it: fp16 and bf16 wires store the rounded values (re-encoding them is
    exact); fp32 and int8 store the fp32 values the head produced (int8 re-encodes them to the
    same bytes, since a 64-value block never straddles two token rows).
    """

    def __init__(self, wire: Encoding) -> None:
        self._dtype = {Encoding.FP16: torch.float16, Encoding.BF16: torch.bfloat16}.get(wire, torch.float32)
        self._hidden: list[torch.Tensor] = []  # each (B, T, C)
        self._mask: list[torch.Tensor] = []  # each (B, T)

    @property
    def tokens(self) -> int:
        return sum(mask.shape[1] for mask in self._mask)

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() + m.numel() * m.element_size() for h, m in self.steps())

    def steps(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return zip(self._hidden, self._mask, strict=True)

    def add(self, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        self._hidden.append(hidden.detach().to(self._dtype))
        self._mask.append(mask.detach().to(torch.uint8))

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole history as one prefill, cut into steps of at most ``size`` positions."""
        if not self._hidden:
            return
        hidden = torch.cat(self._hidden, dim=1)  # (B, T_total, C)
        mask = torch.cat(self._mask, dim=1)  # (B, T_total)
        for start in range(0, hidden.shape[1], size):
            yield hidden[:, start : start + size], mask[:, start : start + size]


class Reconnector:
    """Finds a server that can take over: the URL list, how to reach one, and the policy.

    ``connect(url)`` returns a new transport (the client then checks the server behind it);
    which errors are worth another try is :func:`failover_worthy`'s call, the rest are raised.
    """

    def __init__(
        self,
        urls: Sequence[str],
        connect: Callable[[str], Transport],
        policy: FailoverPolicy,
        on_event: FailoverCallback | None = None,
    ) -> None:
        if not urls:
            raise ValueError("failover needs at least one server URL")
        self.urls = tuple(urls)
        self.connect = connect
        self.policy = policy
        self.on_event = on_event

    def report(self, event: FailoverEvent) -> None:
        logger.info("%s", event.describe())
        if self.on_event is not None:
            self.on_event(event)

    def schedule(self, failed_url: str, started: float) -> Iterator[tuple[int, str]]:
        """(attempt, url) to try, in order, with the waits between passes; stops at the deadline."""
        index = self.urls.index(failed_url) if failed_url in self.urls else -1
        order = [self.urls[(index + 1 + i) % len(self.urls)] for i in range(len(self.urls))]
        deadline = started + self.policy.deadline_s
        for attempt in range(1, self.policy.attempts + 1):
            wait = self.policy.wait_before(attempt)
            if wait:
                time.sleep(max(0.0, min(wait, deadline - time.monotonic())))
            for url in order:
                if time.monotonic() >= deadline:
                    return
                yield attempt, url


def _unavailable(attempts: int, elapsed: float, last: BaseException) -> TrunkUnavailable:
    return TrunkUnavailable(
        f"no trunk server could take over the session after {attempts} attempt(s) in {elapsed:.1f} s "
        f"(last: {_reason(last)})",
        attempts=attempts,
    )


class _TrunkSession(Protocol):
    """A remote trunk session: ``hidden (B, T, C), mask (B, T) -> hidden``, then ``close``."""

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...
    def close(self) -> None: ...


class _FailoverHost(Protocol):
    """What :class:`ResilientTrunk` needs of the client it runs for."""

    url: str

    def open_trunk(self) -> _TrunkSession: ...
    def switch_to(self, url: str) -> None: ...
    def replay_chunk(self, request: tuple[int, int, int]) -> int: ...


class ResilientTrunk:
    """A trunk session that survives its server: see the module docstring.

    Called like the local trunk. Each answered step joins the history; a step that fails in a
    failover-worthy way is re-run on a rebuilt session, after the replay.
    """

    def __init__(
        self, host: _FailoverHost, reconnector: Reconnector, wire: Encoding, request: tuple[int, int, int]
    ) -> None:
        """``request`` is the generation's (batch, prompt tokens, max new tokens), for the replay's
        chunks on the new server."""
        self.host = host
        self.request = request
        self.reconnector = reconnector
        self.history = _History(wire)
        self.failovers = 0
        self.failover_s = 0.0
        self.trunk: _TrunkSession | None = None  # opened on the first step

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        try:
            if self.trunk is None:
                if self.history.tokens:  # never continue a history on a session that lacks it
                    raise TransportError("the trunk session was lost")
                self.trunk = self.host.open_trunk()
            out = self.trunk(hidden, mask)
        except Exception as exc:
            if not failover_worthy(exc):
                raise
            out = self._recover(exc, hidden, mask)
        self.history.add(hidden, mask)
        return out

    def _recover(self, lost: BaseException, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        started = time.monotonic()
        failed_url = self.host.url
        if self.trunk is not None and _answered(lost):
            # The server is up and still holds the session: close it now, not at its idle expiry.
            with contextlib.suppress(Exception):
                self.trunk.close()
        self.trunk = None  # otherwise abandoned: its server is gone or forgot it
        self.reconnector.report(FailoverEvent("lost", failed_url, _reason(lost)))
        last, tries = lost, 0
        for _attempt, url in self.reconnector.schedule(failed_url, started):
            tries += 1
            try:
                self.host.switch_to(url)
                trunk = self.host.open_trunk()
                self.trunk = trunk
                for past_hidden, past_mask in self.history.chunks(self.host.replay_chunk(self.request)):
                    trunk(past_hidden, past_mask)
                out = trunk(hidden, mask)
            except Exception as exc:
                if not failover_worthy(exc):
                    raise
                last, self.trunk = exc, None
                continue
            elapsed = time.monotonic() - started
            self.failovers += 1
            self.failover_s += elapsed
            event = FailoverEvent("recovered", url, _reason(lost), tries, self.history.tokens, elapsed)
            self.reconnector.report(event)
            return out
        elapsed = time.monotonic() - started
        self.failover_s += elapsed
        self.reconnector.report(FailoverEvent("failed", failed_url, _reason(last), tries, 0, elapsed))
        raise _unavailable(tries, elapsed, last) from last

    def close(self) -> None:
        """Close the current session; one whose server is gone needs no closing."""
        trunk, self.trunk = self.trunk, None
        if trunk is None:
            return
        try:
            trunk.close()
        except Exception as exc:
            if not failover_worthy(exc):
                raise


def _connect_first(
    urls: Sequence[str], connect: Callable[[str], T], progress: Callable[[str], None] | None = None
) -> T:
    """``connect(url)`` for each URL in turn until one succeeds. A failure that is not
    failover-worthy is raised at once, and so is any failure when there is a single URL
    (its own error says most); when every URL fails, TrunkUnavailable."""
    lost: list[BaseException] = []
    for url in urls:
        try:
            return connect(url)
        except Exception as exc:
            if len(urls) == 1 or not failover_worthy(exc):
                raise
            if progress is not None:
                progress(f"trunk server {url} unavailable ({_reason(exc)})")
            lost.append(exc)
    raise TrunkUnavailable(
        f"none of the {len(urls)} trunk servers answered (last: {_reason(lost[-1])})", attempts=len(urls)
    ) from lost[-1]
