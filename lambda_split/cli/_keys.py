"""``lambda-split keys``: the certificate authority from the command line.

``init`` creates a CA and its first identities, ``add-client`` issues one more device,
``revoke`` puts a device on the revocation list the server enforces, ``list`` shows every
certificate with its state, ``renew-server`` rotates the server's key and certificate.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from secure_channel import CertificateAuthority, ca_key_is_encrypted, generate_credentials, list_certificates
from secure_channel._ca import CA_KEY_FILE, DEFAULT_SERVER_NAMES

PASSPHRASE_ENV = "LAMBDA_SPLIT_CA_PASSPHRASE"
MAX_DAYS = 825


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if not 1 <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"days must be between 1 and {MAX_DAYS}, got {days}")
    return days


def _passphrase(*, creating: bool, needed: bool = True) -> bytes | None:
    """The CA passphrase from the environment, else a prompt on a terminal, else none."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value.encode()
    if not needed or not sys.stdin.isatty():
        return None
    prompt = "CA key passphrase (empty: store unencrypted): " if creating else "CA key passphrase: "
    return getpass.getpass(prompt).encode() or None


def _open(directory: str) -> CertificateAuthority:
    return CertificateAuthority.open(
        directory, _passphrase(creating=False, needed=ca_key_is_encrypted(directory))
    )


def cmd_init(args: argparse.Namespace) -> int:
    names = list(dict.fromkeys([*DEFAULT_SERVER_NAMES, *(args.server_name or [])]))
    kwargs: dict[str, Any] = {"days": args.days, "force": args.force, "server_names": names}
    if args.client_name:
        kwargs["client_name"] = args.client_name
    passphrase = _passphrase(creating=True, needed=args.encrypt)
    if args.encrypt and passphrase is None:
        from lambda_split.cli import UsageError

        raise UsageError(f"--encrypt needs a passphrase: set {PASSPHRASE_ENV} or run on a terminal")
    generate_credentials(args.dir, passphrase=passphrase, **kwargs)
    print(f"wrote ca.pem, server.pem, server.key, client.pem, client.key, crl.pem to {args.dir}")
    print(f"the server certificate names: {', '.join(names)}")
    state = "encrypted" if passphrase else "unencrypted"
    print(f"the CA key is {args.dir}/{CA_KEY_FILE} ({state}); keep it off servers and devices")
    return 0


def cmd_add_client(args: argparse.Namespace) -> int:
    cert = _open(args.dir).add_client(args.name, args.out, days=args.days, force=args.force)
    print(f"issued {args.name} (serial {cert.serial_number:x}) into {args.out}; use it as --keys {args.out}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    revoked = _open(args.dir).revoke(args.name)
    if not revoked:
        print(f"{args.name} was already revoked")
    for cert in revoked:
        print(f"revoked serial {cert.serial_number:x}")
    print(
        f"copy {args.dir}/crl.pem to the server's keys directory if it is elsewhere, then send the server "
        "SIGHUP (it also rereads a changed crl.pem within a second of the next connection)"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    entries = list_certificates(args.dir)
    if args.json:
        print(json.dumps({"certificates": [e.as_dict() for e in entries]}))
        return 0
    for e in entries:
        row = e.as_dict()
        print(f"{row['role']:7} {row['name']:24} {row['serial']:40} {row['state']:8} {row['not_after']}")
        print(f"        {row['identity']}")
    return 0


def cmd_renew_server(args: argparse.Namespace) -> int:
    cert = _open(args.dir).renew_server(days=args.days, server_names=args.server_name)
    print(f"renewed the server certificate (serial {cert.serial_number:x}); send the server SIGHUP")
    return 0


def add_keys_parser(commands: Any) -> None:
    """Register ``keys`` and its subcommands on the top-level subparsers ``commands``."""
    keys = commands.add_parser("keys", help="manage the certificate authority and identities")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    init = sub.add_parser("init", help="create a CA, a server certificate and a first device")
    init.add_argument("dir")
    init.add_argument("--days", type=_days, default=30, help="validity of the identities (default 30)")
    init.add_argument(
        "--server-name",
        action="append",
        help="an extra DNS name or IP for the server, added to localhost, 127.0.0.1 and ::1 (repeatable)",
    )
    init.add_argument("--client-name", help="name of the first device's certificate")
    init.add_argument(
        "--encrypt", action="store_true", help=f"prompt for a CA key passphrase ({PASSPHRASE_ENV} also works)"
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(run=cmd_init)

    add = sub.add_parser("add-client", help="issue a certificate for one more device")
    add.add_argument("dir")
    add.add_argument("name", help="the device's name (letters, digits, '-', '.')")
    add.add_argument("--out", required=True, help="directory the device will pass as --keys")
    add.add_argument("--days", type=_days, default=30)
    add.add_argument("--force", action="store_true", help="overwrite the device's files")
    add.set_defaults(run=cmd_add_client)

    revoke = sub.add_parser("revoke", help="revoke a device by name or serial (hex)")
    revoke.add_argument("dir")
    revoke.add_argument("name", metavar="NAME|SERIAL")
    revoke.set_defaults(run=cmd_revoke)

    listing = sub.add_parser("list", help="every issued certificate with its state and expiry")
    listing.add_argument("dir")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(run=cmd_list)

    renew = sub.add_parser("renew-server", help="issue a new server key and certificate")
    renew.add_argument("dir")
    renew.add_argument("--days", type=_days, default=30)
    renew.add_argument(
        "--server-name", action="append", help="names for the new certificate (default: the old ones)"
    )
    renew.set_defaults(run=cmd_renew_server)
