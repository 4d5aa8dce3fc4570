from __future__ import annotations

from secure_channel._http import DEFAULT_TIMEOUT, _HTTPCoreTransport


class PlainTransport(_HTTPCoreTransport):
    """Cleartext HTTP/1.1. Only ever built when the user names the ``plain`` mode."""

    _scheme = "http"

    def __init__(self, base_url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """``base_url`` must be ``http://host[:port]``; an ``https`` URL is refused with ValueError."""
        super().__init__(base_url, security="plain", ssl_context=None, timeout=timeout)
