from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from threat_model.capture import CaptureUnavailable, capture_loopback


def af_packet_available() -> bool:
    try:
        with capture_loopback({1}, method="af_packet"):
            pass
    except CaptureUnavailable:
        return False
    return True


METHODS = [
    pytest.param(
        "af_packet",
        marks=pytest.mark.skipif(not af_packet_available(), reason="needs CAP_NET_RAW for AF_PACKET"),
    ),
    "relay",
]


def aesgcm_seal(data: bytes) -> bytes:
    """Negative control: the same bytes as an AES-GCM channel would put on the wire."""
    nonce = os.urandom(12)
    return nonce + AESGCM(AESGCM.generate_key(bit_length=256)).encrypt(nonce, data, b"session")


class UpperServer:
    """A TCP server that sends back each connection's bytes upper-cased, then closes."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen()
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _handle(conn: socket.socket) -> None:
        # A client that closes without reading the reply (another process, in the ledger's test) resets
        # the connection: that ends it, as a close would.
        with conn, contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def talk(host: str, port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and read the reply to EOF (reading concurrently)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    received: list[bytes] = []
    with socket.socket(family) as sock:
        sock.connect((host, port))

        def read() -> None:
            while chunk := sock.recv(65536):
                received.append(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reader.join()
    return b"".join(received)


@pytest.fixture
def upper_server() -> Iterator[UpperServer]:
    server = UpperServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts around a throwaway self-signed certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    directory: Path = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert_path)
    return server, client
