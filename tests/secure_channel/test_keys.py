from __future__ import annotations

import datetime as dt
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509

from secure_channel import CredentialsError, generate_credentials, load_credentials
from secure_channel._keys import CREDENTIAL_FILES

from .conftest import PKI


def test_generate_writes_the_five_files_and_the_ca_with_private_keys_0600(tmp_path: Path) -> None:
    generate_credentials(tmp_path, days=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([*CREDENTIAL_FILES, "ca.key", "crl.pem", "issued"])
    assert len(list((tmp_path / "issued").iterdir())) == 2  # the server and the first device
    for name in ("server.key", "client.key", "ca.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    server = load_credentials(tmp_path, "server")
    client = load_credentials(tmp_path, "client")
    assert server.cert.not_valid_after_utc - server.cert.not_valid_before_utc <= dt.timedelta(days=3)
    ca_bc = server.ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_bc.ca and server.ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    sans = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert client.identity.startswith("sha256:") and client.identity != server.identity


def test_generate_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    generate_credentials(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(CredentialsError, match="refusing to overwrite"):
        generate_credentials(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    generate_credentials(tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "client.key").stat().st_mode) == 0o600


def test_a_single_existing_file_is_enough_to_refuse(tmp_path: Path) -> None:
    (tmp_path / "client.key").write_text("mine")
    with pytest.raises(CredentialsError):
        generate_credentials(tmp_path)
    assert (tmp_path / "client.key").read_text() == "mine"
    assert not (tmp_path / "ca.pem").exists()


@pytest.mark.parametrize(
    "kwargs", [{"days": 0}, {"days": 10_000}, {"server_names": []}, {"client_name": "a b"}]
)
def test_generate_validates_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        generate_credentials(tmp_path, **kwargs)  # type: ignore[arg-type]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_file(tmp_path: Path, pki: PKI) -> None:
    d = _copy(pki.root, tmp_path / "k")
    (d / "client.key").unlink()
    with pytest.raises(CredentialsError, match=r"missing credentials file .*client\.key"):
        load_credentials(d, "client")


def test_expired_and_not_yet_valid(tmp_path: Path, pki: PKI) -> None:
    now = dt.datetime.now(dt.UTC)
    d = pki.issue(
        "client", "client", ["c"], not_before=now - dt.timedelta(days=10), days=2, directory=tmp_path / "a"
    )
    with pytest.raises(CredentialsError, match="expired"):
        load_credentials(d, "client")
    d = pki.issue("client", "client", ["c"], not_before=now + dt.timedelta(days=1), directory=tmp_path / "b")
    with pytest.raises(CredentialsError, match="not valid before"):
        load_credentials(d, "client")


def test_cert_from_another_ca(tmp_path: Path, pki: PKI, other_keys: Path) -> None:
    d = _copy(pki.root, tmp_path / "k")
    shutil.copy(other_keys / "ca.pem", d / "ca.pem")
    with pytest.raises(CredentialsError, match="not signed by the pinned CA"):
        load_credentials(d, "server")


def test_wrong_eku_for_role(pki: PKI) -> None:
    d = pki.root
    (d / "wrong").mkdir(exist_ok=True)
    shutil.copy(d / "ca.pem", d / "wrong" / "ca.pem")
    shutil.copy(d / "server.pem", d / "wrong" / "client.pem")
    shutil.copy(d / "server.key", d / "wrong" / "client.key")
    with pytest.raises(CredentialsError, match="not a client certificate"):
        load_credentials(d / "wrong", "client")


def test_key_not_matching_cert(tmp_path: Path, pki: PKI) -> None:
    d = _copy(pki.root, tmp_path / "k")
    shutil.copy(d / "server.key", d / "client.key")
    with pytest.raises(CredentialsError, match="does not match"):
        load_credentials(d, "client")


def test_garbage_files(tmp_path: Path, pki: PKI) -> None:
    d = _copy(pki.root, tmp_path / "k")
    (d / "client.pem").write_text("not a cert")
    with pytest.raises(CredentialsError, match="not a PEM certificate"):
        load_credentials(d, "client")
