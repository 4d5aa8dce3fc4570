"""Pluggable transports for Λ-Split: plain, TLS 1.3 with mutual auth, AES-GCM with mutual auth, and both.

Client side: :func:`connect_transport` builds the stack for a security mode. Server side:
:func:`uvicorn_config` installs TLS, the peer-certificate protocol and :class:`AESGCMMiddleware`;
the app reads the authenticated client with :func:`peer_identity`. Keys: :func:`generate_credentials`,
:class:`CertificateAuthority` (issue, revoke, list) and :func:`load_credentials`; a server
reloads its certificate and revocation list through :class:`ServerTrust`. See SECURITY.md for the protocol.
"""

from __future__ import annotations

from secure_channel._aesgcm import AESGCMTransport
from secure_channel._base import (
    SECURITY_MODES,
    Request,
    Response,
    SecurityMode,
    Stream,
    Transport,
    WireStats,
    check_security_mode,
    new_route,
)
from secure_channel._ca import (
    CertificateAuthority,
    IssuedCertificate,
    ca_key_is_encrypted,
    generate_credentials,
    list_certificates,
    read_crl,
)
from secure_channel._exceptions import (
    AuthenticationError,
    ChannelError,
    ChannelTimeout,
    CredentialsError,
    InvalidRecord,
    KeysUsageError,
    ServerBusy,
    SessionLost,
    StreamClosed,
    StreamUnsupported,
    TransportError,
)
from secure_channel._factory import connect_transport
from secure_channel._handshake import ClientHandshake, ServerHandshake
from secure_channel._hop_tls import HopTLSTransport
from secure_channel._identity import peer_identity
from secure_channel._keys import (
    Credentials,
    cert_identity,
    check_certificate,
    check_private_permissions,
    load_credentials,
)
from secure_channel._middleware import AESGCMMiddleware
from secure_channel._mock import MockTransport
from secure_channel._net import CountingBackend
from secure_channel._plain import PlainTransport
from secure_channel._records import ClientChannel, RecordOpener, RecordSealer, ReplayWindow, ServerChannel
from secure_channel._sealed_stream import SealedStream
from secure_channel._tls import client_ssl_context, server_ssl_context
from secure_channel._tls_transport import TLSTransport
from secure_channel._trust import ServerTrust
from secure_channel._uvicorn import PeerCertH11Protocol, PeerCertWebSocketProtocol, uvicorn_config
from secure_channel._ws import WebSocketStream

__all__ = [
    "SECURITY_MODES",
    "AESGCMMiddleware",
    "AESGCMTransport",
    "AuthenticationError",
    "CertificateAuthority",
    "ChannelError",
    "ChannelTimeout",
    "ClientChannel",
    "ClientHandshake",
    "CountingBackend",
    "Credentials",
    "CredentialsError",
    "HopTLSTransport",
    "InvalidRecord",
    "IssuedCertificate",
    "KeysUsageError",
    "MockTransport",
    "PeerCertH11Protocol",
    "PeerCertWebSocketProtocol",
    "PlainTransport",
    "RecordOpener",
    "RecordSealer",
    "ReplayWindow",
    "Request",
    "Response",
    "SealedStream",
    "SecurityMode",
    "ServerBusy",
    "ServerChannel",
    "ServerHandshake",
    "ServerTrust",
    "SessionLost",
    "Stream",
    "StreamClosed",
    "StreamUnsupported",
    "TLSTransport",
    "Transport",
    "TransportError",
    "WebSocketStream",
    "WireStats",
    "ca_key_is_encrypted",
    "cert_identity",
    "check_certificate",
    "check_private_permissions",
    "check_security_mode",
    "client_ssl_context",
    "connect_transport",
    "generate_credentials",
    "list_certificates",
    "load_credentials",
    "new_route",
    "peer_identity",
    "read_crl",
    "server_ssl_context",
    "uvicorn_config",
]
