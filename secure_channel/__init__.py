"""Pluggable transports for Λ-Split: plain, TLS 1.3 with mutual auth, AES-GCM with mutual auth, and both."""

from __future__ import annotations

from secure_channel._base import (
    SECURITY_MODES,
    Request,
    Response,
    SecurityMode,
    Transport,
    WireStats,
    check_security_mode,
)
from secure_channel._exceptions import (
    AuthenticationError,
    ChannelError,
    ChannelTimeout,
    CredentialsError,
    InvalidRecord,
    TransportError,
)
from secure_channel._mock import MockTransport

__all__ = [
    "SECURITY_MODES",
    "AuthenticationError",
    "ChannelError",
    "ChannelTimeout",
    "CredentialsError",
    "InvalidRecord",
    "MockTransport",
    "Request",
    "Response",
    "SecurityMode",
    "Transport",
    "TransportError",
    "WireStats",
    "check_security_mode",
]
