"""Key management: one small private CA, a server and a client identity (ECDSA P-256).

The same files serve mutual TLS and the mutual authentication of the AES-GCM channel.
Loading fails closed: anything unexpected raises :class:`CredentialsError` with a message
that names the file and the problem.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secure_channel._exceptions import CredentialsError

Role = Literal["server", "client"]

CA_FILE = "ca.pem"
CREDENTIAL_FILES = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
_MAX_DAYS = 825
_CLIENT_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Credentials:
    """Verified key material for one role. Build it with :func:`load_credentials`."""

    role: Role
    directory: Path
    ca_path: Path
    cert_path: Path
    key_path: Path
    ca_cert: x509.Certificate
    cert: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def identity(self) -> str:
        """This role's identity string, as the peer will see it (see :func:`cert_identity`)."""
        return cert_identity(self.cert_der)


def cert_identity(cert_der: bytes) -> str:
    """The stable identity of a peer: ``"sha256:"`` + hex SHA-256 of its certificate (DER)."""
    return "sha256:" + hashlib.sha256(cert_der).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lambda-Split"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    days: int,
    eku: x509.ObjectIdentifier | None,
    san: x509.SubjectAlternativeName | None,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    start = (not_before or _now()) - dt.timedelta(minutes=5)
    public = key.public_key()
    issuer_public = issuer_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=eku is None, path_length=0 if eku is None else None), True)
        .add_extension(_key_usage(ca=eku is None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write atomically: a 0600/0644 temp file in the same directory, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError instead of clobbering a racing writer
            os.unlink(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_credentials(
    directory: str | os.PathLike[str],
    *,
    days: int = 30,
    server_names: Iterable[str] = ("localhost", "127.0.0.1", "::1"),
    client_name: str = "lambda-split-client",
    force: bool = False,
) -> None:
    """Create ``ca.pem``, ``server.pem``, ``server.key``, ``client.pem`` and ``client.key`` in ``directory``.

    All keys are ECDSA P-256. The CA is marked ``CA:true`` with ``keyCertSign``; the server
    certificate carries ``serverAuth`` and a SAN for each of ``server_names`` (IP addresses
    become IP SANs); the client certificate carries ``clientAuth`` and ``client_name`` as its
    common name and DNS SAN. Private keys are created
    with mode 0600. The CA key is not kept: re-run with ``force=True`` to rotate everything.

    Raises CredentialsError if any of the files exists and ``force`` is false, and
    ValueError for a bad ``days`` or an empty name.
    """
    names = list(server_names)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise ValueError(f"days must be an integer between 1 and {_MAX_DAYS}")
    if not names or any(not n or not isinstance(n, str) for n in names):
        raise ValueError("server_names must be a non-empty list of non-empty names")
    if not isinstance(client_name, str) or not _CLIENT_NAME.fullmatch(client_name):
        raise ValueError(
            "client_name must be a DNS-style name: letters, digits, '-' and '.', at most 63 chars"
        )
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = [name for name in CREDENTIAL_FILES if (root / name).exists()]
    if existing and not force:
        raise CredentialsError(
            f"refusing to overwrite existing credentials in {root}: {', '.join(existing)} (use --force)"
        )
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(_name("Lambda-Split CA"), ca_key, None, ca_key, days=days, eku=None, san=None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(_name(names[0]), server_key, ca, ca_key, days=days, eku=_EKU["server"], san=_san(names))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_san = x509.SubjectAlternativeName([x509.DNSName(client_name)])
    client = _issue(_name(client_name), client_key, ca, ca_key, days=days, eku=_EKU["client"], san=client_san)
    _write(root / "server.key", _key_pem(server_key), 0o600, force)
    _write(root / "client.key", _key_pem(client_key), 0o600, force)
    _write(root / "server.pem", _pem(server), 0o644, force)
    _write(root / "client.pem", _pem(client), 0o644, force)
    _write(root / "ca.pem", _pem(ca), 0o644, force)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CredentialsError(f"missing credentials file {path} (run `lambda-split keys init`)") from exc
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from exc


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise CredentialsError(f"{path} is not a PEM certificate") from exc


def check_certificate(
    cert: x509.Certificate, ca: x509.Certificate, role: Role, *, what: str, now: dt.datetime | None = None
) -> None:
    """Raise CredentialsError unless ``cert`` is currently valid, issued by ``ca`` and fit for ``role``."""
    now = now or _now()
    if now < cert.not_valid_before_utc:
        raise CredentialsError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise CredentialsError(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CredentialsError(f"{what} is not signed by the pinned CA") from exc
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CredentialsError(f"{what} has no extended key usage; expected {role}Auth") from exc
    if _EKU[role] not in eku:
        raise CredentialsError(f"{what} is not a {role} certificate (extended key usage lacks {role}Auth)")
    if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
        raise CredentialsError(f"{what} does not hold an ECDSA key")


def load_credentials(directory: str | os.PathLike[str], role: Role) -> Credentials:
    """Load and check the ``role`` credentials (``server`` or ``client``) from ``directory``.

    Fails closed with CredentialsError when a file is missing or malformed, the CA is not a
    CA, the certificate is expired or not yet valid, not signed by ``ca.pem``, lacks the
    extended key usage of ``role``, or does not match its private key.
    """
    if role not in _EKU:
        raise ValueError("role must be 'server' or 'client'")
    root = Path(directory).expanduser()  # README writes keys="~/.lambda-split/keys"
    ca_path, cert_path, key_path = root / CA_FILE, root / f"{role}.pem", root / f"{role}.key"
    ca = _load_cert(ca_path)
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CredentialsError(f"{ca_path} is not a CA certificate")
    now = _now()
    if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        raise CredentialsError(f"{ca_path} is expired or not yet valid")
    cert = _load_cert(cert_path)
    check_certificate(cert, ca, role, what=str(cert_path), now=now)
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(f"{key_path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{key_path} is not an ECDSA private key")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CredentialsError(f"{key_path} does not match {cert_path}")
    return Credentials(role, root, ca_path, cert_path, key_path, ca, cert, key)
