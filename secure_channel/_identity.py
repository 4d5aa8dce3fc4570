"""Where the authenticated peer identity lives in an ASGI scope, and how to read it."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from secure_channel._keys import cert_identity

#: Scope extension set by :class:`AESGCMMiddleware` on unsealed inner requests.
AESGCM_EXTENSION = "lambda_split.aesgcm"


def peer_identity(scope: Mapping[str, Any]) -> str | None:
    """The authenticated identity of the client behind ``scope``, or None.

    The AES-GCM handshake identity wins when present; otherwise the TLS client certificate
    (ASGI TLS extension, filled by the protocol of :func:`uvicorn_config`). Identities are
    ``"sha256:" + hex(SHA-256(client certificate DER))``, the same in both layers.
    """
    extensions = scope.get("extensions") or {}
    sealed = extensions.get(AESGCM_EXTENSION)
    if isinstance(sealed, Mapping) and isinstance(sealed.get("peer_identity"), str):
        return str(sealed["peer_identity"])
    tls = extensions.get("tls")
    if isinstance(tls, Mapping):
        identity = tls.get("lambda_split.peer_identity")
        if isinstance(identity, str):
            return identity
        chain = tls.get("client_cert_chain")
        if chain:
            return cert_identity(ssl.PEM_cert_to_DER_cert(chain[0]))
    return None
