from __future__ import annotations

import os

from secure_channel._aesgcm import AESGCMTransport
from secure_channel._base import Transport, check_security_mode
from secure_channel._exceptions import CredentialsError
from secure_channel._hop_tls import HopTLSTransport
from secure_channel._http import DEFAULT_TIMEOUT
from secure_channel._keys import load_credentials
from secure_channel._plain import PlainTransport
from secure_channel._tls_transport import TLSTransport


def connect_transport(
    base_url: str,
    security: str,
    *,
    keys_dir: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    proxy_ca: str | os.PathLike[str] | None = None,
) -> Transport:
    """Build the transport stack for ``security``; there is no default and no fallback.

    ``plain`` -> PlainTransport (``http://`` only); ``tls`` -> TLSTransport (``https://``);
    ``aesgcm`` -> AESGCMTransport over PlainTransport; ``tls+aesgcm`` -> AESGCMTransport over
    TLSTransport. Modes other than ``plain`` need ``keys_dir`` (CredentialsError otherwise).
    ``aesgcm`` with an ``https://`` URL reaches a TLS-terminating reverse proxy: AESGCMTransport over
    :class:`HopTLSTransport`, which checks the proxy's certificate against the system trust store
    (``SSL_CERT_FILE``) or ``proxy_ca``. Any other URL whose scheme does not fit the mode raises ValueError.
    """
    mode = check_security_mode(security)
    if mode == "plain":
        return PlainTransport(base_url, timeout=timeout)
    if keys_dir is None:
        raise CredentialsError(f"security mode {mode} needs client credentials (--keys DIR)")
    creds = load_credentials(keys_dir, "client")
    if mode == "tls":
        return TLSTransport(base_url, creds, timeout=timeout)
    if mode == "aesgcm":
        if base_url.startswith("https://"):
            return AESGCMTransport(HopTLSTransport(base_url, cafile=proxy_ca, timeout=timeout), creds)
        return AESGCMTransport(PlainTransport(base_url, timeout=timeout), creds)
    return AESGCMTransport(TLSTransport(base_url, creds, timeout=timeout), creds)
