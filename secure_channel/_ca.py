"""The project's small certificate authority: issue device identities, revoke them, list them.

A keys directory made by :func:`generate_credentials` holds::

    ca.pem  ca.key            the CA (ca.key 0600, never needed by a server or a device)
    server.pem  server.key    the server identity
    client.pem  client.key    the first device
    crl.pem                   the CA-signed revocation list the server enforces
    issued/<serial>.pem       every certificate the CA issued, for ``keys list`` and ``keys revoke``

``ca.key`` is PKCS#8, encrypted when a passphrase is given. Every write is atomic.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secure_channel._exceptions import CredentialsError, KeysUsageError
from secure_channel._keys import (
    _CLIENT_NAME,
    _EKU,
    _MAX_DAYS,
    CA_FILE,
    CREDENTIAL_FILES,
    _issue,
    _key_pem,
    _load_cert,
    _name,
    _now,
    _pem,
    _san,
    _write_file,
    cert_identity,
    check_private_permissions,
)

CA_KEY_FILE = "ca.key"
CRL_FILE = "crl.pem"
ISSUED_DIR = "issued"
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
State = Literal["valid", "expired", "revoked"]


@dataclass(frozen=True)
class IssuedCertificate:
    """One certificate the CA issued, as ``keys list`` shows it."""

    role: str
    name: str
    serial: int
    identity: str
    not_after: dt.datetime
    state: State

    def as_dict(self) -> dict[str, str]:
        return {
            "role": self.role,
            "name": self.name,
            "serial": f"{self.serial:x}",
            "identity": self.identity,
            "not_after": self.not_after.isoformat(),
            "state": self.state,
        }


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise KeysUsageError(f"days must be an integer between 1 and {_MAX_DAYS}")


def _check_client_name(name: str) -> None:
    if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
        raise KeysUsageError(
            "a client name must be DNS-style: letters, digits, '-' and '.', at most 63 chars"
        )


def _encryption(passphrase: bytes | None) -> serialization.KeySerializationEncryption:
    return serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()


def _key_bytes(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    if not passphrase:
        return _key_pem(key)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _encryption(passphrase)
    )


def _role(cert: x509.Certificate) -> str:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "unknown"
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        return "server"
    return "client" if ExtendedKeyUsageOID.CLIENT_AUTH in eku else "unknown"


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def ca_key_is_encrypted(directory: str | os.PathLike[str]) -> bool:
    """True if ``ca.key`` in ``directory`` needs a passphrase."""
    try:
        return b"ENCRYPTED" in (Path(directory).expanduser() / CA_KEY_FILE).read_bytes()[:64]
    except OSError:
        return False


class CertificateAuthority:
    """The CA of one keys directory. Open it with :meth:`open`; create one with :func:`generate_credentials`."""

    def __init__(self, root: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.root, self.cert, self.key = root, cert, key

    @classmethod
    def open(cls, directory: str | os.PathLike[str], passphrase: bytes | None = None) -> CertificateAuthority:
        """Load the CA; CredentialsError if the directory has no CA key (made before the CA was kept)."""
        root = Path(directory).expanduser()
        key_path = root / CA_KEY_FILE
        if not key_path.is_file():
            raise CredentialsError(
                f"{root} has no {CA_KEY_FILE}: it was made by an older `keys init` that threw the CA key "
                "away. Its certificates still work for serve and generate, but it cannot issue or revoke; "
                f"create a new CA with `lambda-split keys init NEWDIR` and move devices to it"
            )
        check_private_permissions(root, key_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase or None)
        except TypeError as exc:
            raise CredentialsError(
                f"{key_path} is encrypted: set LAMBDA_SPLIT_CA_PASSPHRASE or run on a terminal"
                if passphrase is None
                else f"{key_path}: unexpected passphrase"
            ) from exc
        except ValueError as exc:
            raise CredentialsError(f"{key_path}: wrong passphrase or not a PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CredentialsError(f"{key_path} is not an ECDSA private key")
        cert = _load_cert(root / CA_FILE)
        if cert.public_key() != key.public_key():
            raise CredentialsError(f"{key_path} does not match {root / CA_FILE}")
        return cls(root, cert, key)

    def _record(self, cert: x509.Certificate) -> None:
        issued = self.root / ISSUED_DIR
        issued.mkdir(mode=0o700, exist_ok=True)
        _write_file(issued / f"{cert.serial_number:x}.pem", _pem(cert), 0o644, force=False)

    def issue(
        self, role: str, name: str, *, days: int, names: Iterable[str] = ()
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """Issue and record a ``role`` certificate for a fresh key; ``names`` are the server's SANs."""
        _check_days(days)
        key = ec.generate_private_key(ec.SECP256R1())
        days = min(days, max(1, (self.cert.not_valid_after_utc - _now()).days))
        san = _san(list(names) or [name])
        cert = _issue(_name(name), key, self.cert, self.key, days=days, eku=_EKU[role], san=san)
        self._record(cert)
        return cert, key

    def add_client(
        self, name: str, out: str | os.PathLike[str], *, days: int = 30, force: bool = False
    ) -> x509.Certificate:
        """Issue a device certificate; write ``ca.pem``, ``client.pem``, ``client.key`` (0600) into ``out``."""
        _check_client_name(name)
        _check_days(days)
        target = Path(out).expanduser()
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_permissions(target)
        existing = [f for f in (CA_FILE, "client.pem", "client.key") if (target / f).exists()]
        if existing and not force:
            raise KeysUsageError(f"refusing to overwrite {', '.join(existing)} in {target} (use --force)")
        cert, key = self.issue("client", name, days=days)
        _write_file(target / "client.key", _key_pem(key), 0o600, force)
        _write_file(target / "client.pem", _pem(cert), 0o644, force)
        _write_file(target / CA_FILE, _pem(self.cert), 0o644, force)
        return cert

    def renew_server(self, *, days: int = 30, server_names: Iterable[str] | None = None) -> x509.Certificate:
        """Issue a new server key and certificate (same names unless given) over server.pem/.key."""
        names = list(server_names or ())
        if not names:
            old = _load_cert(self.root / "server.pem")
            san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
            names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
        cert, key = self.issue("server", names[0], days=days, names=names)
        _write_file(self.root / "server.key", _key_pem(key), 0o600, force=True)
        _write_file(self.root / "server.pem", _pem(cert), 0o644, force=True)
        return cert

    def issued(self) -> list[x509.Certificate]:
        folder = self.root / ISSUED_DIR
        return [_load_cert(p) for p in sorted(folder.glob("*.pem"))] if folder.is_dir() else []

    def revoke(self, name_or_serial: str) -> list[x509.Certificate]:
        """Revoke the valid client certificates named ``name_or_serial`` (or with that hex serial).

        Rewrites ``crl.pem``; returns what was newly revoked. CredentialsError if nothing matches.
        """
        already = read_crl(self.root, self.cert)
        clients = [c for c in self.issued() if _role(c) == "client"]
        matches = [c for c in clients if _common_name(c) == name_or_serial]
        if not matches:
            try:
                serial = int(name_or_serial.removeprefix("0x"), 16)
            except ValueError:
                serial = -1
            matches = [c for c in clients if c.serial_number == serial]
        if not matches:
            raise KeysUsageError(f"no client certificate named or numbered {name_or_serial!r} in {self.root}")
        fresh = [c for c in matches if c.serial_number not in already]
        self.write_crl(already | {c.serial_number for c in fresh})
        return fresh

    def write_crl(self, serials: Iterable[int]) -> None:
        # backdated like certificates, so a server whose clock lags a little still accepts it
        now = _now().replace(microsecond=0) - dt.timedelta(minutes=5)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now)
            .next_update(self.cert.not_valid_after_utc)
        )
        for serial in sorted(serials):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        crl = builder.sign(self.key, hashes.SHA256())
        _write_file(self.root / CRL_FILE, crl.public_bytes(serialization.Encoding.PEM), 0o644, force=True)

    def list(self) -> list[IssuedCertificate]:
        return list_certificates(self.root)


def list_certificates(directory: str | os.PathLike[str]) -> list[IssuedCertificate]:
    """Every certificate the CA of ``directory`` issued, with its state; needs no private key."""
    root = Path(directory).expanduser()
    if not (root / CA_KEY_FILE).is_file() and not (root / ISSUED_DIR).is_dir():
        CertificateAuthority.open(root)  # raises the message for directories without a CA
    ca = _load_cert(root / CA_FILE)
    folder = root / ISSUED_DIR
    revoked, now = read_crl(root, ca), _now()
    out = []
    for path in sorted(folder.glob("*.pem")) if folder.is_dir() else []:
        cert = _load_cert(path)
        state: State = "valid"
        if cert.serial_number in revoked:
            state = "revoked"
        elif now > cert.not_valid_after_utc:
            state = "expired"
        identity, not_after = cert_identity(cert), cert.not_valid_after_utc
        out.append(
            IssuedCertificate(_role(cert), _common_name(cert), cert.serial_number, identity, not_after, state)
        )
    return out


def read_crl(directory: Path, ca: x509.Certificate) -> frozenset[int]:
    """The serials revoked by ``crl.pem`` in ``directory`` (empty if there is none).

    CredentialsError if the file is malformed or not signed by ``ca``: a server must not run
    on a revocation list it cannot trust.
    """
    path = directory / CRL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return frozenset()
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise CredentialsError(f"{path} is not a PEM CRL") from exc
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public):
        raise CredentialsError(f"{path} is not signed by {directory / CA_FILE}")
    return frozenset(r.serial_number for r in crl)


def generate_credentials(
    directory: str | os.PathLike[str],
    *,
    days: int = 30,
    server_names: Iterable[str] = DEFAULT_SERVER_NAMES,
    client_name: str = "lambda-split-client",
    force: bool = False,
    passphrase: bytes | None = None,
) -> None:
    """Create a CA and its first identities in ``directory`` (see the module docstring for the files).

    All keys are ECDSA P-256. The CA is ``CA:true`` with ``keyCertSign`` and ``cRLSign`` and
    lives twice as long as ``days`` so the identities can be renewed under it; the server
    certificate carries ``serverAuth`` and a SAN per entry of ``server_names`` (IP addresses
    become IP SANs); the client certificate carries ``clientAuth`` and ``client_name``. Private
    keys are created with mode 0600; ``ca.key`` is encrypted under ``passphrase`` when given.

    Raises CredentialsError if any of the files exists and ``force`` is false or the directory
    is writable by others, and ValueError for a bad ``days`` or name.
    """
    names = list(server_names)
    _check_days(days)
    if not names or any(not n or not isinstance(n, str) for n in names):
        raise ValueError("server_names must be a non-empty list of non-empty names")
    _check_client_name(client_name)
    root = Path(directory).expanduser()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_permissions(root)
    all_files = (*CREDENTIAL_FILES, CA_KEY_FILE, CRL_FILE)
    existing = [name for name in all_files if (root / name).exists()]
    if existing and not force:
        raise KeysUsageError(
            f"refusing to overwrite existing credentials in {root}: {', '.join(existing)} (use --force)"
        )
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue(_name("Lambda-Split CA"), ca_key, None, ca_key, days=2 * days, eku=None, san=None)
    issued = root / ISSUED_DIR
    if force and issued.is_dir():
        for old in issued.glob("*.pem"):
            old.unlink()
    ca = CertificateAuthority(root, ca_cert, ca_key)
    server, server_key = ca.issue("server", names[0], days=days, names=names)
    client, client_key = ca.issue("client", client_name, days=days)
    _write_file(root / CA_KEY_FILE, _key_bytes(ca_key, passphrase), 0o600, force)
    _write_file(root / "server.key", _key_pem(server_key), 0o600, force)
    _write_file(root / "client.key", _key_pem(client_key), 0o600, force)
    _write_file(root / "server.pem", _pem(server), 0o644, force)
    _write_file(root / "client.pem", _pem(client), 0o644, force)
    _write_file(root / CA_FILE, _pem(ca_cert), 0o644, force)
    ca.write_crl(())
