"""``python -m hil --config FILE [--target sim|bench] [--broker HOST:PORT] [--scenario NAME ...]
[--json REPORT.json] [--allow-commands] [--post-key FILE] [--hub-keys DIR]
[--gateway-key FILE | --gateways DIR]``

Exit status: 0 when nothing failed (scenarios that do not apply to the target are not
failures), 1 when a scenario failed or the bench could not be brought up, 2 for a bad command
line, an invalid or unreadable configuration or a key that cannot be used, 130 when interrupted
(Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import textwrap
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from agent.config import ConfigErrors, load_config
from hil.keys import BenchKeyError, key_problems, load_bench_keys
from hil.runner import Report, parse_broker, run_hil
from hil.scenarios import SCENARIOS
from hil.targets import BenchTarget, SimulatedTarget, Target

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    epilog = "scenarios, in the order they run:\n" + "\n".join(
        textwrap.fill(s.checks, 78, initial_indent=f"  {name:<22} ", subsequent_indent=" " * 25)
        for name, s in SCENARIOS.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m hil",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run Lampyre's bench scenarios against simulated equipment (--target sim, "
        "the default) or real equipment (--target bench). The agent runs in this process "
        "with a fresh, temporary buffer; the scenarios watch the gateway's MQTT topics and "
        "send commands like the control post. Exit status 0 only when nothing failed.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="gateway configuration")
    parser.add_argument(
        "--target",
        choices=("sim", "bench"),
        default="sim",
        help="sim: simulators in this process, the buses redirected to them; bench: the "
        "configured buses and their real equipment (default: sim)",
    )
    parser.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="plain MQTT broker to use instead of the configured hub (its TLS and credentials "
        "are not used); default: a private Mosquitto on loopback for sim, the configured hub "
        "for bench",
    )
    parser.add_argument(
        "--scenario",
        dest="scenarios",
        action="extend",
        nargs="+",
        choices=list(SCENARIOS),
        metavar="NAME",
        help="scenarios to run (default: all); they always run in the order listed below",
    )
    parser.add_argument("--json", metavar="REPORT.json", help="write the report as JSON here")
    parser.add_argument(
        "--allow-commands",
        action="store_true",
        help="bench target: allow scenarios that send commands, which MOVE REAL LAMPS "
        "(dim_round_trip, rejects_bad_commands, rejects_bad_tokens); the sim target always "
        "allows them",
    )
    keys = parser.add_argument_group(
        "keys",
        textwrap.fill(
            "A gateway with the production settings seals its data and events, signs its acks "
            "and takes only commands signed by an enrolled control-post key: the runner then "
            "needs the keys the hub and the control post hold. A gateway with [hub] seal = "
            '"none" and [commands] allow_unsigned = true (the demo) needs none.',
            78,
        ),
    )
    keys.add_argument(
        "--post-key",
        type=Path,
        metavar="FILE",
        help="the control post's private key (post-signing.key, from lampyre keys post-init), "
        "enrolled on the gateway: commands are signed with it (without it: plain JSON)",
    )
    keys.add_argument(
        "--hub-keys",
        type=Path,
        metavar="DIR",
        help="the hub's key folder (lampyre keys hub-init): its hub-*.key open the sealed data "
        "and events",
    )
    gateway = keys.add_mutually_exclusive_group()
    gateway.add_argument(
        "--gateway-key",
        type=Path,
        metavar="FILE",
        help="the gateway's public signing key (its gateway-signing.pub): verifies the "
        "envelopes and the signed acks",
    )
    gateway.add_argument(
        "--gateways",
        type=Path,
        metavar="DIR",
        help="an enrolment folder, DIR/<gateway id>/*.pub, as lampyre hub listen and lampyre "
        "post read it (instead of --gateway-key)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold on stderr (default warning)",
    )
    return parser


async def _until_signalled(work: Coroutine[Any, Any, Report]) -> Report | None:
    """Run ``work``; SIGINT or SIGTERM cancel it, so everything it started is stopped (a
    killed runner would leave its private broker behind). None when interrupted."""
    task = asyncio.create_task(work, name="hil")
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return None
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    broker = None
    if args.broker is not None:
        try:
            broker = parse_broker(args.broker)
        except ValueError as exc:
            parser.error(f"--broker: {exc}")

    try:
        config = load_config(args.config)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(error if error.where is not None else f"{args.config}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"{args.config}: cannot read the file: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        keys = load_bench_keys(
            config.gateway_id,
            post_key=args.post_key,
            hub_keys=args.hub_keys,
            gateway_key=args.gateway_key,
            gateways=args.gateways,
        )
    except BenchKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problems = key_problems(config, keys)
    if problems:
        for problem in problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pymodbus logs every skipped frame with a hex dump; the scenarios report what matters.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    target: Target = (
        SimulatedTarget()
        if args.target == "sim"
        else BenchTarget(allow_commands=args.allow_commands)
    )
    report = asyncio.run(
        _until_signalled(
            run_hil(
                config,
                target,
                scenarios=args.scenarios,
                broker=broker,
                private_broker=args.target == "sim" and broker is None,
                out=sys.stdout,
                keys=keys,
            )
        )
    )
    if report is None:
        # The agent, simulators and broker were stopped on the way out; a lamp being dimmed at
        # that moment may have been left at its test level.
        print("interrupted: no report", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json is not None:
        path = Path(args.json)
        path.write_text(json.dumps(report.as_json(), indent=2, ensure_ascii=False) + "\n")
        logging.getLogger(__name__).info("report written to %s", path)
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
