"""Errors raised by the Λ-Split client.

The tree::

    SplitError                    base of the client's own errors
    ├── ServerError               the server refused a request; carries its status and error code
    ├── ProtocolMismatch          the server speaks another protocol version, or sent an unexpected reply
    │   └── ModeMismatch          the server runs another security mode (also secure_channel's AuthenticationError)
    ├── FingerprintMismatch       the server's trunk is not the trunk of the local model and split
    ├── LimitExceeded             the request would break a limit the server advertises; nothing was sent
    └── TrunkUnavailable          no trunk server answered (failover gave up); also a TransportError

    ModelNotFoundError            (a FileNotFoundError) the model name or path names no model

Transport failures are secure_channel's: ``TransportError``, ``ChannelTimeout`` and
``AuthenticationError`` reach the caller unchanged, except that with failover on (see
lambda_split._failover) a lost server is retried and, when none takes over, ``TrunkUnavailable``.
"""

from __future__ import annotations

from secure_channel import AuthenticationError, TransportError


class SplitError(Exception):
    """Base class of the client's errors."""


class ServerError(SplitError):
    """The trunk server answered with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"server refused the request ({status} {code}): {message}")
        self.status = status
        self.code = code
        self.message = message


class ProtocolMismatch(SplitError):
    """The peer does not speak our protocol version, or broke it."""


class ModeMismatch(ProtocolMismatch, AuthenticationError):
    """The server is in another security mode; the message names it and the option that fixes it.

    Also an AuthenticationError: the secure channel could not be set up (exit 3), and callers that
    caught the transport's symptom before keep catching it.
    """


class FingerprintMismatch(SplitError):
    """The server's model or split differs from the local one; no hidden state was sent."""


class LimitExceeded(SplitError, ValueError):
    """The request exceeds a limit from the server's /v1/info (tokens per session, steps, batch).

    Found on the client, before any hidden state is sent; the message is in tokens or steps.
    """


class TrunkUnavailable(SplitError, TransportError):
    """No trunk server could be reached, or none took over a lost session within the failover
    policy's attempts and deadline. ``attempts`` counts the servers tried.

    Also a TransportError, so callers that caught the transport's symptom before keep catching it.
    """

    def __init__(self, message: str, *, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts


class ModelNotFoundError(FileNotFoundError):
    """The model name is not built in and the path does not exist or is not a model."""
