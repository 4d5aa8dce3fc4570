"""Why a connection failed, in the user's terms: which mode the server is in, which CA signed what.

Runs only after a failure. A client in the wrong mode sees the symptom of the layer that
broke first (``wrong version number``, a refused handshake, a dropped connection, a 403);
here we probe the server once more to name the cause and the fix.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from lambda_split._errors import ModeMismatch, ServerError
from lambda_split.protocol import INFO_PATH
from secure_channel import (
    AuthenticationError,
    PlainTransport,
    Request,
    ServerBusy,
    TLSTransport,
    Transport,
    TransportError,
    load_credentials,
)

_TLS_MODES = ("tls", "tls+aesgcm")
_CHAIN_CODES = frozenset({2, 19, 20, 21})  # OpenSSL: issuer unknown, self-signed in chain, ...


def explain(
    exc: BaseException, url: str, security: str, keys: str | os.PathLike[str] | None, timeout: float
) -> BaseException | None:
    """A clearer exception for ``exc`` (raised while connecting to ``url``), or None to keep ``exc``."""
    if isinstance(exc, AuthenticationError) and _foreign_ca(exc):
        ca = Path(keys).expanduser() / "ca.pem" if keys is not None else "ca.pem"
        return AuthenticationError(
            f"the server's certificate at {url} was not issued by the CA in {ca}; use the keys "
            "directory made with the server's CA (the server and this device must share one `keys init`)"
        )
    if not _may_be_mode(exc):
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    speaks_tls = _speaks_tls(host, port, timeout)
    if speaks_tls is None:
        return TransportError(f"nothing answers at {url} (connection refused); is the server running there?")
    mode = _mode(host, port, speaks_tls, keys, timeout)
    if mode is None or mode == security:
        return None
    scheme = "https" if speaks_tls else "http"
    fix = f"--security {mode}" + (
        f" and --server {scheme}://{parts.netloc}" if scheme != parts.scheme else ""
    )
    if mode == "tls or tls+aesgcm":
        return ModeMismatch(
            f"the server at {url} speaks TLS (mode tls or tls+aesgcm); pass {fix} with --keys DIR"
        )
    return ModeMismatch(f"the server at {url} is in mode {mode}, not {security}; pass {fix}")


def _foreign_ca(exc: AuthenticationError) -> bool:
    from cryptography.x509.verification import VerificationError

    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause.verify_code in _CHAIN_CODES
        if isinstance(cause, VerificationError):
            return "subjectAltName" not in str(cause)
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (httpcore re-raises, so the ssl error may be a context, not a cause)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _may_be_mode(exc: BaseException) -> bool:
    if isinstance(exc, ServerBusy):  # the server answered, in our mode: probing would only add load
        return False
    if isinstance(exc, ServerError):
        return exc.code == "sealed_channel_required"
    return isinstance(exc, (AuthenticationError, TransportError))


def _speaks_tls(host: str, port: int, timeout: float) -> bool | None:
    """True if a TLS handshake starts at host:port, False if something else answers, None if nothing."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            return tls.version() is not None
    except ssl.SSLError as exc:  # an alert is TLS speaking; garbage is plain HTTP answering
        return "ALERT" in str(exc.reason or "").upper()
    except OSError:
        return None


def _mode(host: str, port: int, tls: bool, keys: str | os.PathLike[str] | None, timeout: float) -> str | None:
    """The server's mode, read from /v1/info over the bare channel; a 403 means records are required."""
    transport: Transport
    if tls:
        if keys is None:
            return "tls or tls+aesgcm"
        try:
            transport = TLSTransport(
                f"https://{host}:{port}", load_credentials(keys, "client"), timeout=timeout
            )
        except Exception:
            return None
    else:
        transport = PlainTransport(f"http://{host}:{port}", timeout=timeout)
    try:
        response = transport.exchange(Request("GET", INFO_PATH))
        if response.status == 200:
            return str(response.json().get("security")) or None
        if response.status == 403 and response.json()["error"]["code"] == "sealed_channel_required":
            return "tls+aesgcm" if tls else "aesgcm"
        return None
    except Exception:  # the probe only refines a message; its own failure changes nothing
        return None
    finally:
        transport.close()
