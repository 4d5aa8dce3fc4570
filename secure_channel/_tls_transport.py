from __future__ import annotations

from secure_channel._http import DEFAULT_TIMEOUT, _HTTPCoreTransport
from secure_channel._keys import Credentials
from secure_channel._tls import client_ssl_context


class TLSTransport(_HTTPCoreTransport):
    """HTTP/1.1 over TLS 1.3 with mutual authentication, trusting only the project CA."""

    _scheme = "https"

    def __init__(self, base_url: str, credentials: Credentials, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """``base_url`` must be ``https://host[:port]`` and ``credentials`` the client credentials.

        A server certificate not issued by ``ca.pem`` or not naming ``host`` raises
        AuthenticationError on the first exchange.
        """
        ctx = client_ssl_context(credentials)
        super().__init__(base_url, security="tls", ssl_context=ctx, timeout=timeout)
        self.credentials = credentials
