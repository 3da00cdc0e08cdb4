"""``lampyre hub listen``: the reference hub consumer on the command line (``agent/hub.py``).

Exit status: 0 after a clean stop (``--count``, ``--seconds``, SIGINT or SIGTERM), 1 when a key,
a file or the broker refuses (the message says which), 2 for options that do not fit together.
The summary line and the logs go to standard error: standard output may be the data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli import EXIT_INVALID, EXIT_OK, EXIT_UNREADABLE, _add_log_level, _setup_logging

if TYPE_CHECKING:
    from agent.hub import HubConsumer, HubSettings

EXIT_USAGE = EXIT_UNREADABLE
"""Options that do not fit together: argparse's status for a malformed command line."""
MAX_SESSION_EXPIRY_S = 0xFFFF_FFFF
"""MQTT 5: a four-byte interval, where the largest value means "never expires"."""
MAX_GROUP_FILE_BYTES = 4096


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lampyre hub …`` to the command line."""
    # The broker options come from the module every operator tool shares; it imports the MQTT
    # layer (paho), which only costs when the parser is built, not when a command runs.
    from agent.toolmqtt import add_broker_options

    hub = commands.add_parser(
        "hub",
        help="the reference hub consumer (tests, benchmarks, integrators)",
        description="Hub-side tools: a reference consumer of the gateways' sealed readings.",
    )
    actions = hub.add_subparsers(dest="hub_command", metavar="ACTION", required=True)
    listen = actions.add_parser(
        "listen",
        help="store the gateways' readings and events as JSON lines, with receipts",
        description="Read {prefix}/+/data and {prefix}/+/event through an MQTT 5 shared "
        "subscription, verify and open each envelope, append one JSON line per reading or "
        "event (fsynced), drop duplicates and, with --receipts, publish signed receipts. "
        "See docs/hub-listen.md.",
    )
    add_broker_options(listen, default_prefix="lampyre/v1")  # agent.hub.DEFAULT_PREFIX
    keys = listen.add_argument_group("keys")
    keys.add_argument(
        "--hub-keys",
        required=True,
        type=Path,
        metavar="DIR",
        help="the hub's key folder: hub-*.key (and receipt-signing.key for --receipts), as "
        "lampyre keys hub-init --out DIR makes them",
    )
    keys.add_argument(
        "--gateways",
        required=True,
        type=Path,
        metavar="DIR",
        help="enrolment: DIR/<gateway id>/*.pub, each gateway's gateway-signing.pub",
    )
    sharing = listen.add_argument_group("sharing the load")
    group = sharing.add_mutually_exclusive_group()
    group.add_argument(
        "--group",
        metavar="NAME",
        default=None,
        help="shared-subscription group, a secret (visible in the process list: prefer "
        "--group-file). Default: a random one, shared with nobody",
    )
    group.add_argument(
        "--group-file",
        type=Path,
        metavar="FILE",
        default=None,
        help="file holding the group name (mode 0600)",
    )
    sharing.add_argument(
        "--session-expiry",
        type=_non_negative_int,
        default=0,
        metavar="SECONDS",
        help="keep a persistent MQTT session this long after a disconnection, so the broker "
        "queues messages meanwhile (needs --client-id and a group; default 0: none)",
    )
    output = listen.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON lines are appended here (created 0600; default: standard output)",
    )
    output.add_argument(
        "--state",
        type=Path,
        default=None,
        metavar="FILE",
        help="SQLite file keeping the stored sequence ranges across restarts (created 0600; "
        "default: in memory)",
    )
    output.add_argument(
        "--receipts",
        action="store_true",
        help="publish signed receipts on {prefix}/<gateway>/receipt for what was stored",
    )
    output.add_argument(
        "--accept-plaintext",
        action="store_true",
        help='also store plaintext JSON payloads (gateways with seal = "none")',
    )
    stop = listen.add_argument_group("stopping")
    stop.add_argument(
        "--count", type=_positive_int, default=None, metavar="N", help="stop after N readings"
    )
    stop.add_argument(
        "--seconds", type=_positive_float, default=None, metavar="S", help="stop after S seconds"
    )
    _add_log_level(listen)
    listen.set_defaults(handler=_listen)


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError("expected a whole number of at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if not 0 <= value <= MAX_SESSION_EXPIRY_S:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 0 to {MAX_SESSION_EXPIRY_S}"
        )
    return value


def _positive_float(text: str) -> float:
    value = float(_number(text, float))
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("expected a number above 0")
    return value


def _fail(message: object, status: int) -> int:
    print(f"lampyre hub listen: {message}", file=sys.stderr)
    return status


def _listen(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses

    from agent.hub import HubSettings
    from agent.toolmqtt import ToolOptionError, broker_settings

    # Everything is checked before logging is set up: a refusal is one line on stderr.
    try:
        mqtt = broker_settings(args, "hub")
        if args.session_expiry > 0:
            if args.client_id is None:
                raise ToolOptionError(
                    "--session-expiry needs --client-id: the broker finds the session by client "
                    "id (with the shipped broker configuration, the certificate's CN)"
                )
            if args.group is None and args.group_file is None:
                raise ToolOptionError("--session-expiry needs --group or --group-file")
            mqtt = dataclasses.replace(mqtt, session_expiry_s=args.session_expiry)
    except ToolOptionError as exc:
        return _fail(exc, EXIT_USAGE)

    group = args.group
    if args.group_file is not None:
        read = _read_group_file(args.group_file)
        if isinstance(read, int):
            return read
        group = read
    try:
        settings = HubSettings(
            mqtt=mqtt,
            prefix=args.prefix,
            group=group,
            out=args.out,
            state=args.state,
            accept_plaintext=args.accept_plaintext,
        )
    except ValueError as exc:
        return _fail(exc, EXIT_USAGE)

    consumer = _consumer(args, settings)
    if isinstance(consumer, int):
        return consumer
    return asyncio.run(_run(consumer, args.count, args.seconds))


def _read_group_file(path: Path) -> str | int:
    """The group name in ``path``, or the exit status after saying why not."""
    from agent.sdk import KeyFileError, read_private_file

    try:
        data = read_private_file(path, limit=MAX_GROUP_FILE_BYTES)
    except FileNotFoundError:
        return _fail(f"--group-file {path}: no such file", EXIT_INVALID)
    except KeyFileError as exc:
        return _fail(f"--group-file: {exc}", EXIT_INVALID)
    except OSError as exc:
        return _fail(f"--group-file {path}: {exc.strerror or exc}", EXIT_INVALID)
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        return _fail(f"--group-file {path} is not ASCII text", EXIT_INVALID)


def _consumer(args: argparse.Namespace, settings: HubSettings) -> HubConsumer | int:
    """The consumer with its keys loaded, or the exit status after saying what is missing."""
    from agent.hub import HubConsumer
    from agent.keys import (
        HUB_PRIVATE_GLOB,
        RECEIPT_SIGNING_KEY_FILE,
        load_ed25519_private_key,
        load_enrolled_gateway_keys,
        load_hub_private_keys,
    )
    from agent.sdk import LampyreError

    hub_dir: Path = args.hub_keys
    if not hub_dir.is_dir():
        return _fail(f"--hub-keys {hub_dir}: not a folder", EXIT_INVALID)
    try:
        hub_keys = load_hub_private_keys(hub_dir)
    except (LampyreError, OSError) as exc:
        return _fail(f"--hub-keys: {exc}", EXIT_INVALID)
    if not hub_keys:
        return _fail(
            f"--hub-keys {hub_dir}: no hub private key ({HUB_PRIVATE_GLOB}); make one with "
            f"lampyre keys hub-init --out {hub_dir}",
            EXIT_INVALID,
        )
    receipt_key = None
    if args.receipts:
        path = hub_dir / RECEIPT_SIGNING_KEY_FILE
        try:
            receipt_key = load_ed25519_private_key(path)
        except FileNotFoundError:
            return _fail(
                f"--receipts: no {path}; lampyre keys hub-init --out {hub_dir} makes it",
                EXIT_INVALID,
            )
        except (LampyreError, OSError) as exc:
            return _fail(f"--receipts: {exc}", EXIT_INVALID)
    gateways_dir: Path = args.gateways
    if not gateways_dir.is_dir():
        return _fail(f"--gateways {gateways_dir}: not a folder", EXIT_INVALID)
    try:
        gateway_keys = load_enrolled_gateway_keys(gateways_dir)
    except (LampyreError, OSError) as exc:
        return _fail(f"--gateways: {exc}", EXIT_INVALID)

    import logging

    _setup_logging(args.log_level)
    logger = logging.getLogger("agent.hub")
    logger.info(
        "hub keys %s; %d gateways enrolled (%s)",
        ", ".join(sorted(hub_keys)),
        len(gateway_keys),
        ", ".join(sorted(gateway_keys)) or "none",
    )
    if not gateway_keys and not settings.accept_plaintext:
        logger.warning("no gateway enrolled in %s: every envelope will be refused", gateways_dir)
    return HubConsumer(
        settings, hub_keys=hub_keys, gateway_keys=gateway_keys, receipt_key=receipt_key
    )


async def _run(consumer: HubConsumer, count: int | None, seconds: float | None) -> int:
    import asyncio
    import signal

    from agent.hub import HubError

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, consumer.stop)
    status = EXIT_OK
    try:
        await consumer.run(count=count, seconds=seconds)
    except HubError as exc:
        status = _fail(exc, EXIT_INVALID)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        print(f"lampyre hub listen: {consumer.counters.summary()}", file=sys.stderr)
    return status
