"""The certificate authority: issuing, revoking, listing, renewing, and what the server makes of it."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from lambda_split.cli import main
from secure_channel import (
    CertificateAuthority,
    CredentialsError,
    ServerTrust,
    client_ssl_context,
    generate_credentials,
    list_certificates,
    load_credentials,
    read_crl,
    server_ssl_context,
)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    generate_credentials(tmp_path / "ca", days=2)
    return tmp_path / "ca"


def _tls_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    """A TLS handshake in memory; raises ssl.SSLError when either side refuses."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            client.write(b"x")  # TLS 1.3: the server checks the client certificate after the client finishes
            s_in.write(c_out.read())
            server.read(1)
            return
    raise AssertionError("handshake did not finish")


def test_init_keeps_the_ca_key_and_an_empty_crl(ca_dir: Path) -> None:
    ca = CertificateAuthority.open(ca_dir)
    assert read_crl(ca_dir, ca.cert) == frozenset()
    assert {(e.role, e.state) for e in list_certificates(ca_dir)} == {
        ("server", "valid"),
        ("client", "valid"),
    }


def test_add_client_writes_a_device_directory_that_works_as_keys(ca_dir: Path, tmp_path: Path) -> None:
    cert = CertificateAuthority.open(ca_dir).add_client("phone", tmp_path / "phone", days=1)
    assert sorted(p.name for p in (tmp_path / "phone").iterdir()) == ["ca.pem", "client.key", "client.pem"]
    assert ((tmp_path / "phone" / "client.key").stat().st_mode & 0o777) == 0o600
    device = load_credentials(tmp_path / "phone", "client")
    assert device.cert.serial_number == cert.serial_number
    assert device.identity != load_credentials(ca_dir, "client").identity


def test_revoke_by_name_or_serial_and_list_shows_it(ca_dir: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority.open(ca_dir)
    a = ca.add_client("a", tmp_path / "a")
    b = ca.add_client("b", tmp_path / "b")
    assert [c.serial_number for c in ca.revoke("a")] == [a.serial_number]
    assert [c.serial_number for c in ca.revoke(f"{b.serial_number:x}")] == [b.serial_number]
    assert ca.revoke("a") == []  # already revoked
    with pytest.raises(CredentialsError, match="no client certificate"):
        ca.revoke("nobody")
    states = {e.name: e.state for e in list_certificates(ca_dir)}
    assert states["a"] == states["b"] == "revoked" and states["lambda-split-client"] == "valid"


def test_tls_refuses_a_revoked_client_in_the_handshake(ca_dir: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority.open(ca_dir)
    ca.add_client("a", tmp_path / "a")
    server = load_credentials(ca_dir, "server")
    client = client_ssl_context(load_credentials(tmp_path / "a", "client"))
    _tls_handshake(server_ssl_context(server, ca_dir / "crl.pem"), client)
    ca.revoke("a")
    with pytest.raises(ssl.SSLError, match="revoked"):
        _tls_handshake(server_ssl_context(server, ca_dir / "crl.pem"), client)


def test_the_trust_reloads_when_the_crl_changes_at_most_once_a_second(ca_dir: Path, tmp_path: Path) -> None:
    now = [0.0]
    trust = ServerTrust(load_credentials(ca_dir, "server"), clock=lambda: now[0])
    heard: list[frozenset[str]] = []
    trust.subscribe(heard.append)
    ca = CertificateAuthority.open(ca_dir)
    ca.add_client("a", tmp_path / "a")
    device = load_credentials(tmp_path / "a", "client")
    assert trust.check(device.cert)
    ca.revoke("a")
    now[0] = 0.5
    assert trust.check(device.cert)  # not looked at yet
    now[0] = 1.5
    assert not trust.check(device.cert)  # the file changed: reloaded
    assert heard == [frozenset({device.identity})]


def test_renew_server_issues_a_new_key_with_the_same_names(ca_dir: Path) -> None:
    old = load_credentials(ca_dir, "server")
    CertificateAuthority.open(ca_dir).renew_server(days=1)
    new = load_credentials(ca_dir, "server")
    assert new.identity != old.identity and new.cert.subject == old.cert.subject
    assert sum(e.role == "server" for e in list_certificates(ca_dir)) == 2


def test_an_old_keys_directory_still_serves_but_cannot_issue(ca_dir: Path, tmp_path: Path) -> None:
    for name in ("ca.key", "crl.pem"):
        (ca_dir / name).unlink()
    ServerTrust(load_credentials(ca_dir, "server"))  # serve and generate keep working
    load_credentials(ca_dir, "client")
    with pytest.raises(CredentialsError, match=r"no ca\.key.*cannot issue or revoke"):
        CertificateAuthority.open(ca_dir)


def test_an_encrypted_ca_key_needs_its_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generate_credentials(tmp_path / "ca", passphrase=b"correct horse")
    assert b"ENCRYPTED" in (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(CredentialsError, match="LAMBDA_SPLIT_CA_PASSPHRASE"):
        CertificateAuthority.open(tmp_path / "ca")
    with pytest.raises(CredentialsError, match="wrong passphrase"):
        CertificateAuthority.open(tmp_path / "ca", b"wrong")
    CertificateAuthority.open(tmp_path / "ca", b"correct horse")


# --- the command line ---------------------------------------------------------------------------------


def test_keys_init_server_name_adds_to_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "init", str(tmp_path / "k"), "--server-name", "trunk.example"]) == 0
    assert "localhost, 127.0.0.1, ::1, trunk.example" in capsys.readouterr().out
    from cryptography import x509

    san = load_credentials(tmp_path / "k", "server").cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "trunk.example"]


@pytest.mark.parametrize("days", ["0", "-1", "826", "x"])
def test_keys_days_out_of_range_is_a_usage_error(tmp_path: Path, days: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["keys", "init", str(tmp_path / "k"), "--days", days])
    assert exited.value.code == 2
    assert not (tmp_path / "k").exists()


def test_keys_requests_that_cannot_be_done_as_asked_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LAMBDA_SPLIT_CA_PASSPHRASE", raising=False)
    ca = str(tmp_path / "ca")
    assert main(["keys", "init", ca]) == 0
    for argv in (
        ["keys", "init", ca],  # existing files without --force
        ["keys", "add-client", ca, "bad name!", "--out", str(tmp_path / "dev")],
        ["keys", "revoke", ca, "nosuch"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, argv


def test_keys_commands_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LAMBDA_SPLIT_CA_PASSPHRASE", "s3cret")
    ca = str(tmp_path / "ca")
    assert main(["keys", "init", ca]) == 0
    assert "(encrypted)" in capsys.readouterr().out
    assert main(["keys", "add-client", ca, "tablet", "--out", str(tmp_path / "tablet"), "--days", "3"]) == 0
    assert main(["keys", "revoke", ca, "tablet"]) == 0
    assert main(["keys", "renew-server", ca]) == 0
    monkeypatch.delenv("LAMBDA_SPLIT_CA_PASSPHRASE")
    assert main(["keys", "add-client", ca, "x", "--out", str(tmp_path / "x")]) == 3  # no passphrase
    assert "LAMBDA_SPLIT_CA_PASSPHRASE" in capsys.readouterr().err
    assert main(["keys", "list", ca]) == 0  # listing needs no passphrase
    assert "revoked" in capsys.readouterr().out


def test_a_bad_crl_keeps_the_old_revocations(ca_dir: Path, tmp_path: Path) -> None:
    now = [0.0]
    trust = ServerTrust(load_credentials(ca_dir, "server"), clock=lambda: now[0])
    ca = CertificateAuthority.open(ca_dir)
    ca.add_client("a", tmp_path / "a")
    ca.revoke("a")
    trust.reload()
    device = load_credentials(tmp_path / "a", "client")
    assert not trust.check(device.cert)
    (ca_dir / "crl.pem").write_bytes(b"garbage")
    with pytest.raises(CredentialsError, match="not a PEM CRL"):
        trust.reload()
    now[0] = 5.0
    assert not trust.check(device.cert)  # the change is noticed, refused, and the old list stays


def test_init_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(CredentialsError, match="chmod go-w"):
        generate_credentials(shared)
    assert list(shared.iterdir()) == []
