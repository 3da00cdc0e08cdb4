"""The ``lampyre`` command line.

Kept import-light: each subcommand imports what it needs when it runs, so ``lampyre --help``
and shell completion stay fast on a small gateway.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent import __version__

if TYPE_CHECKING:
    from agent.config import GatewayConfig

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2
"""Also argparse's exit status for a malformed command line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lampyre",
        description="Lampyre edge agent for connected street equipment.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file and the profiles it uses",
        description="Validate a gateway configuration file, its profiles and the driver-specific "
        "keys, and report every error as FILE:LINE: what was expected. Exit status: 0 valid, "
        "1 invalid, 2 unreadable.",
    )
    check.add_argument("file", metavar="FILE", help="gateway configuration file (TOML)")
    check.set_defaults(handler=_check_config)

    schema = commands.add_parser(
        "config-schema",
        help="print the JSON Schema of the configuration file (or of a profile)",
        description="Print the JSON Schema (draft 2020-12) of the core configuration tables. "
        "Driver-specific keys are allowed by the schema and checked by check-config.",
    )
    schema.add_argument(
        "--profile", action="store_true", help="print the schema of a device profile instead"
    )
    schema.set_defaults(handler=_config_schema)

    run = commands.add_parser(
        "run",
        help="run the agent",
        description="Run the agent with a gateway configuration until SIGTERM or SIGINT. "
        "An invalid configuration is refused with the same messages as check-config.",
    )
    run.add_argument("--config", required=True, metavar="FILE", help="gateway configuration")
    _add_log_level(run)
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo",
        help="run simulated cabinet equipment and the agent",
        description="Start simulated lamp controllers and an energy meter, and the agent with "
        "the demo configuration: readings are buffered encrypted and forwarded to the MQTT "
        "broker on 127.0.0.1:1883, or to a private Mosquitto when none answers there.",
    )
    demo.add_argument(
        "--config", metavar="FILE", default=None, help="demo configuration (config/demo.toml)"
    )
    demo.add_argument(
        "--seconds", type=float, default=None, help="stop after this long (default: Ctrl-C)"
    )
    _add_log_level(demo, default="warning")
    demo.set_defaults(handler=_demo)

    from agent.keys_cli import register as register_keys

    register_keys(commands)
    from agent.post_cli import register as register_post

    register_post(commands)
    from agent.hub_cli import register as register_hub

    register_hub(commands)
    _register_plugins(commands)
    return parser


CLI_ENTRY_POINT_GROUP = "lampyre.cli"


def _register_plugins(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Subcommands contributed by drivers (``lampyre dali scan``...), through the entry-point
    group ``lampyre.cli``: each entry is a ``register(subparsers)`` callable that adds its
    parser and sets ``handler`` (``args -> exit status``) as its default. The core knows no
    protocol; a driver's tools come with the driver."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=CLI_ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
            register(commands)
        except Exception as exc:
            print(f"lampyre: command {ep.name!r} unavailable: {exc}", file=sys.stderr)


def _add_log_level(parser: argparse.ArgumentParser, default: str = "info") -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help=f"logging threshold (default {default})",
    )


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pymodbus logs every skipped frame as an error with a hex dump; the driver already reports
    # what matters as readings, events and health counters.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # asyncua logs every lost connection as errors with tracebacks, and warns about details of
    # certificates; the OPC UA driver reports losses, gaps and refusals itself.
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_UNREADABLE
    status: int = handler(args)
    return status


def _load(file: str) -> GatewayConfig | int:
    """The configuration, or the exit status after printing why it cannot be used."""
    from agent.config import ConfigErrors, load_config

    try:
        return load_config(file)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(error if error.where is not None else f"{file}: {error}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"{file}: cannot read the file: {reason}", file=sys.stderr)
        return EXIT_UNREADABLE


def _check_config(args: argparse.Namespace) -> int:
    file: str = args.file
    config = _load(file)
    if isinstance(config, int):
        return config
    print(
        f"OK: {file} — gateway {config.gateway_id}, {len(config.buses)} buses, "
        f"{len(config.devices)} devices, {len(config.groups)} groups"
    )
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    import asyncio

    config = _load(args.config)
    if isinstance(config, int):
        return config
    _setup_logging(args.log_level)
    return asyncio.run(_run_agent(config))


async def _run_agent(config: GatewayConfig) -> int:
    import asyncio
    import signal

    from agent.runtime import Agent
    from agent.sdk import LampyreError

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(Agent(config).run(), name="agent")
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        return EXIT_OK
    except LampyreError as exc:
        # Refusals at start-up (a key file readable by others, say): a reason, not a traceback.
        print(f"lampyre: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ExceptionGroup as group:
        import logging

        for failure in group.exceptions:
            logging.getLogger("agent").error(  # noqa: TRY400 - one traceback per sub-exception
                "agent failed: %s", failure, exc_info=failure
            )
        return EXIT_INVALID
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.demo import main_demo

    file = args.config or str(Path(__file__).resolve().parent.parent / "config" / "demo.toml")
    config = _load(file)
    if isinstance(config, int):
        return config
    _setup_logging(args.log_level)
    return main_demo(config, args.seconds)


def _config_schema(args: argparse.Namespace) -> int:
    from agent.config import schema_json

    sys.stdout.write(schema_json(profile=args.profile))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
