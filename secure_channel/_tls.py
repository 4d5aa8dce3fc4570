"""TLS 1.3 contexts with mutual authentication, pinned to the project CA only."""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509

from secure_channel._exceptions import CredentialsError
from secure_channel._keys import Credentials, Role


def _base(creds: Credentials, role: Role, protocol: int) -> ssl.SSLContext:
    if creds.role != role:
        raise CredentialsError(f"a TLS {role} needs {role} credentials, got {creds.role} credentials")
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # X509_STRICT: reject malformed chains; no partial chains; the pinned CA is the only trust anchor.
    ctx.verify_flags = ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_TRUSTED_FIRST
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    if protocol == ssl.PROTOCOL_TLS_SERVER:
        # No TLS 1.3 resumption: OP_NO_TICKET alone only makes OpenSSL issue stateful tickets, and a
        # resumed connection keeps its identity without presenting a (possibly expired) certificate.
        ctx.num_tickets = 0
    try:
        ctx.load_verify_locations(cafile=str(creds.ca_path))
        ctx.load_cert_chain(str(creds.cert_path), str(creds.key_path))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"cannot load TLS credentials from {creds.directory}: {exc}") from exc
    return ctx


def server_ssl_context(creds: Credentials, crl: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.3-only server context that requires a client certificate issued by ``ca.pem``.

    OpenSSL verifies the client chain with the ``sslclient`` purpose, so an expired client
    certificate or one whose extended key usage lacks ``clientAuth`` fails the handshake;
    the uvicorn protocol from :func:`uvicorn_config` re-checks the EKU after the handshake.
    With ``crl`` (a PEM CRL from the same CA), a revoked client certificate fails it too.
    Session tickets are off, so every connection is a full handshake with a certificate.
    """
    ctx = _base(creds, "server", ssl.PROTOCOL_TLS_SERVER)
    if crl is not None:
        try:
            ctx.load_verify_locations(cafile=str(crl))
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"cannot load the revocation list {crl}: {exc}") from exc
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_ssl_context(creds: Credentials) -> ssl.SSLContext:
    """A TLS 1.3-only client context: pins ``ca.pem`` (no system CAs), checks the host name,
    and presents the client certificate."""
    ctx = _base(creds, "client", ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    return ctx


def _has_client_auth_eku(cert_der: bytes) -> bool:
    """True if the DER certificate's extended key usage includes ``clientAuth``."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
