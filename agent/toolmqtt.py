"""Broker options shared by the operator tools (``lampyre post``, ``lampyre hub listen``).

The tools connect like the agent does (``agent.mqtt.MqttSession``: MQTT 5, TLS >= 1.2 with the
host name checked, mutual TLS when a client certificate is given) and follow the same rule: no
plaintext to a broker that is not on this machine unless ``--allow-plaintext`` says so.
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

from agent.mqtt import MqttSettings, TlsSettings, is_loopback_host
from agent.sdk import LampyreError

__all__ = ["ToolOptionError", "add_broker_options", "broker_settings"]


class ToolOptionError(LampyreError):
    """A command-line choice the tool refuses (the message says which option to change)."""


def add_broker_options(parser: argparse.ArgumentParser, *, default_prefix: str) -> None:
    """The options that say where the broker is and how to authenticate to it."""
    group = parser.add_argument_group("broker")
    group.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    group.add_argument(
        "--port", type=int, default=None, help="broker port (1883, or 8883 with TLS)"
    )
    group.add_argument(
        "--prefix", default=default_prefix, help=f"topic prefix (default {default_prefix})"
    )
    group.add_argument("--ca-file", type=Path, default=None, help="CA to trust for the broker")
    group.add_argument("--cert-file", type=Path, default=None, help="client certificate (PEM)")
    group.add_argument("--key-file", type=Path, default=None, help="client private key (0600)")
    group.add_argument("--tls", action="store_true", help="TLS with the system CAs")
    group.add_argument("--username", default=None, help="MQTT user name")
    group.add_argument(
        "--password-file", type=Path, default=None, help="file holding the MQTT password (0600)"
    )
    group.add_argument(
        "--client-id", default=None, help="MQTT client id (default: the tool's name and a nonce)"
    )
    group.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="allow a connection without TLS to a broker that is not on this machine",
    )


def broker_settings(args: argparse.Namespace, tool: str) -> MqttSettings:
    """The :class:`MqttSettings` the options describe; :class:`ToolOptionError` when they are
    inconsistent or ask for plaintext to another machine without ``--allow-plaintext``."""
    if (args.cert_file is None) != (args.key_file is None):
        raise ToolOptionError("--cert-file and --key-file go together (mutual TLS)")
    if args.password_file is not None and args.username is None:
        raise ToolOptionError("--password-file needs --username")
    uses_tls = args.tls or args.ca_file is not None or args.cert_file is not None
    tls = (
        TlsSettings(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
        if uses_tls
        else None
    )
    if tls is None and not is_loopback_host(args.host) and not args.allow_plaintext:
        raise ToolOptionError(
            f"{args.host} is not on this machine and TLS is off: give --ca-file (and "
            "--cert-file/--key-file for mutual TLS), or --allow-plaintext for a test bench"
        )
    port = args.port if args.port is not None else (8883 if tls is not None else 1883)
    return MqttSettings(
        host=args.host,
        port=port,
        client_id=args.client_id or f"lampyre-{tool}-{secrets.token_hex(4)}",
        username=args.username,
        password_file=args.password_file,
        tls=tls,
    )
