from __future__ import annotations

import os
import ssl

from secure_channel._exceptions import CredentialsError
from secure_channel._http import DEFAULT_TIMEOUT, _HTTPCoreTransport


class HopTLSTransport(_HTTPCoreTransport):
    """HTTPS to a TLS-terminating reverse proxy, as the hop under :class:`AESGCMTransport`.

    The proxy holds its own certificate, checked against the system trust store (which honours
    ``SSL_CERT_FILE``) or against ``cafile``; no client certificate is sent. The proxy decrypts
    this hop, so it adds nothing end to end: its ``security`` is ``plain`` and only the AES-GCM
    channel inside it protects the hidden states (the stack's mode is ``aesgcm``).
    """

    _scheme = "https"

    def __init__(
        self,
        base_url: str,
        *,
        cafile: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """``base_url`` must be ``https://host[:port]``; the proxy certificate must name ``host``."""
        try:
            ctx = ssl.create_default_context(cafile=None if cafile is None else os.fspath(cafile))
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"cannot load the proxy CA file {cafile}: {exc}") from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION
        super().__init__(base_url, security="plain", ssl_context=ctx, timeout=timeout)
