"""``lampyre opcua cert``, ``trust`` and ``browse``: the OPC UA tools for technicians.

Registered through the ``lampyre.cli`` entry-point group (``opcua = "drivers.opcua.cli:register"``).

``cert`` creates the gateway's client certificate and key if they are missing and prints the
certificate's fingerprint and path, for the server's administrator to trust. It finds the files
either from an OPC UA bus of a gateway configuration (``--config FILE --bus ID``, keys
``certificate``, ``private_key`` and ``application_uri`` of the bus table, see
:data:`BUS_DEFAULTS`) or in a folder (``--out DIR``).

``trust`` shows a server certificate's subject and fingerprint and copies it into a trust-list
folder, after confirmation.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from agent.sdk import LampyreError

from . import browse
from .security import (
    TrustList,
    certificate_application_uri,
    ensure_client_certificate,
    fingerprint,
    load_certificate,
)
from .settings import BUS_DEFAULTS, CLIENT_CERT_NAME, CLIENT_KEY_NAME

__all__ = ["BUS_DEFAULTS", "CLIENT_CERT_NAME", "CLIENT_KEY_NAME", "main", "register"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


@dataclass(frozen=True, slots=True)
class CertTarget:
    cert_path: Path
    key_path: Path
    application_uri: str
    common_name: str


class UsageError(Exception):
    pass


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``opcua`` and its key-tool subcommands to the ``lampyre`` command line."""
    parser = commands.add_parser(
        "opcua",
        help="OPC UA tools: client certificate, server trust list, browse a server",
        description="OPC UA tools: the client certificate, the server trust list, and a "
        "browser of a server's address space that can write a device profile.",
    )
    build(parser)


def build(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add the subcommands to ``parser``; returns the subparsers so a later tool (``browse``)
    can add itself next to them."""
    sub = parser.add_subparsers(dest="opcua_command", metavar="ACTION", required=True)
    cert = sub.add_parser(
        "cert",
        help="create the client certificate if missing and print its fingerprint",
        description="Create this gateway's OPC UA client certificate and private key (mode "
        "0600) if they are missing; print the certificate's fingerprint and path for the "
        "server's administrator.",
    )
    cert.add_argument("--config", metavar="FILE", help="gateway configuration")
    cert.add_argument("--bus", metavar="ID", help="OPC UA bus id in the configuration")
    cert.add_argument(
        "--out",
        metavar="DIR",
        help=f"folder for {CLIENT_CERT_NAME} and {CLIENT_KEY_NAME} (instead of --config)",
    )
    cert.add_argument(
        "--application-uri",
        metavar="URI",
        help="application URI written into a new certificate "
        "(default: the bus's application_uri, else urn:lampyre:HOST:opcua)",
    )
    cert.set_defaults(handler=_cert_handler)
    trust = sub.add_parser(
        "trust",
        help="add a server certificate to a trust list",
        description="Show a server certificate's subject and SHA-256 fingerprint and copy it "
        "into the trust-list folder. Compare the fingerprint with the one the server's "
        "administrator gives you before saying yes.",
    )
    trust.add_argument("--dir", required=True, metavar="DIR", help="trust-list folder")
    trust.add_argument("certfile", metavar="CERTFILE", help="server certificate, DER or PEM")
    trust.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    trust.set_defaults(handler=_trust_handler)
    browse.add_parser(sub)
    return sub


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None) -> int:
    """``lampyre opcua …`` on its own (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="lampyre opcua")
    build(parser)
    args = parser.parse_args(argv)
    handler: Callable[..., int] = args.handler
    return handler(args, stdin=stdin)


def _default_application_uri() -> str:
    return f"urn:lampyre:{socket.gethostname()}:opcua"


def _cert_target(args: argparse.Namespace) -> CertTarget:
    if args.out:
        if args.config or args.bus:
            raise UsageError("give either --out DIR or --config FILE --bus ID, not both")
        folder = Path(args.out).expanduser()
        uri = args.application_uri or _default_application_uri()
        return CertTarget(
            folder / CLIENT_CERT_NAME, folder / CLIENT_KEY_NAME, uri, "Lampyre OPC UA client"
        )
    if not args.config or not args.bus:
        raise UsageError("name the files: --config FILE --bus ID, or --out DIR")
    return _target_from_config(Path(args.config), args.bus, args.application_uri)


def _target_from_config(path: Path, bus_id: str, uri_override: str | None) -> CertTarget:
    # Read the bus table directly rather than through agent.config.load_config: this tool
    # must work before the rest of the configuration (devices, profiles) is complete.
    try:
        with path.open("rb") as file:
            root: dict[str, Any] = tomllib.load(file)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: {exc}") from None
    buses = root.get("buses")
    bus = buses.get(bus_id) if isinstance(buses, dict) else None
    if not isinstance(bus, dict):
        names = ", ".join(buses) if isinstance(buses, dict) else "none"
        raise UsageError(f"{path}: no bus {bus_id!r} (buses: {names})")
    if bus.get("driver") != "opcua":
        raise UsageError(f"bus {bus_id!r} uses the {bus.get('driver')!r} driver, not opcua")
    base = path.parent

    def resolve(key: str) -> Path:
        value = bus.get(key, BUS_DEFAULTS[key].format(bus=bus_id))
        if not isinstance(value, str):
            raise UsageError(f"{path}: buses.{bus_id}.{key} must be a string path")
        return Path(os.path.normpath(base / Path(value).expanduser()))

    gateway = root.get("gateway")
    gateway_id = gateway.get("id") if isinstance(gateway, dict) else None
    uri = uri_override or bus.get("application_uri") or _default_application_uri()
    if not isinstance(uri, str):
        raise UsageError(f"{path}: buses.{bus_id}.application_uri must be a string")
    name = f"Lampyre {gateway_id or socket.gethostname()} {bus_id}"
    return CertTarget(resolve("certificate"), resolve("private_key"), uri, name)


def _cert_handler(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    try:
        target = _cert_target(args)
    except UsageError as exc:
        print(f"lampyre opcua cert: {exc}", file=sys.stderr)
        return EXIT_USAGE
    existed = target.cert_path.exists()
    try:
        cert_path, key_path = ensure_client_certificate(
            target.cert_path,
            target.key_path,
            application_uri=target.application_uri,
            common_name=target.common_name,
        )
        cert = load_certificate(cert_path)
    except LampyreError as exc:
        print(f"lampyre opcua cert: {exc}", file=sys.stderr)
        return EXIT_FAILED
    uri = certificate_application_uri(cert)
    print(f"{'Existing' if existed else 'New'} client certificate: {cert_path}")
    print(f"  private key:      {key_path} (mode 0600, keep it on this gateway)")
    print(f"  subject:          {cert.subject.rfc4514_string()}")
    print(f"  application URI:  {uri or '(none)'}")
    print(f"  valid until:      {cert.not_valid_after_utc:%Y-%m-%d} UTC")
    print(f"  SHA-256:          {fingerprint(cert)}")
    print(
        f"Give {cert_path} to the OPC UA server's administrator to trust; "
        "they should check the fingerprint above."
    )
    if args.application_uri and uri != args.application_uri:
        print(
            f"Note: the existing certificate's URI is {uri}, not {args.application_uri}; "
            "move the certificate away to make a new one.",
            file=sys.stderr,
        )
    return EXIT_OK


def _trust_handler(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    try:
        cert = load_certificate(Path(args.certfile))
    except LampyreError as exc:
        print(f"lampyre opcua trust: {exc}", file=sys.stderr)
        return EXIT_FAILED
    trust_list = TrustList(Path(args.dir))
    print(f"Server certificate {args.certfile}")
    print(f"  subject:          {cert.subject.rfc4514_string()}")
    print(f"  application URI:  {certificate_application_uri(cert) or '(none)'}")
    print(
        f"  valid:            {cert.not_valid_before_utc:%Y-%m-%d} to "
        f"{cert.not_valid_after_utc:%Y-%m-%d} UTC"
    )
    print(f"  SHA-256:          {fingerprint(cert)}")
    if not args.yes:
        print(
            f"Trust it for connections from this gateway (add it to {args.dir})? [y/N] ",
            end="",
            flush=True,
        )
        answer = (stdin or sys.stdin).readline().strip().lower()
        if answer not in ("y", "yes"):
            print("Nothing done.")
            return EXIT_FAILED
    try:
        path = trust_list.add(cert)
    except OSError as exc:
        print(f"lampyre opcua trust: cannot write to {args.dir}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Trusted: {path}")
    return EXIT_OK
