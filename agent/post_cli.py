"""``lampyre post``: the control post on the command line (``agent/post.py``).

Signs one command with the post's key, publishes it on ``{prefix}/{gateway}/cmd``, waits for the
gateway's signed ack on ``{prefix}/{gateway}/ack`` and verifies it with the gateway's enrolled
key. The answer goes to standard output (a readable summary, or the ack as one JSON line with
``--json``); problems go to standard error, one line each, never a traceback.

Exit status:

* 0: the gateway acknowledged ``ok`` (every device did what was asked, as read back);
* 1: the gateway answered ``error`` (a device failed or reads back something else) or
  ``rejected`` (nothing ran: the code and reason say why);
* 2: the command was not sent: a wrong option, a key refused, the broker unreachable or
  refusing;
* 3: sent, but no trustworthy ack before the timeout: the command may still have run, and its
  id is spent;
* 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli import EXIT_OK, EXIT_UNREADABLE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.mqtt import MqttSettings
    from agent.post import AckOutcome, OutcomeUnknown, PostKey, RefusedAck

EXIT_ANSWERED_NOT_OK = 1
"""The gateway answered ``error`` or ``rejected``."""
EXIT_NOT_SENT = EXIT_UNREADABLE
"""Usage, option, key or broker errors: nothing was sent (argparse's status too)."""
EXIT_NO_ACK = 3
"""Sent, and no trustworthy ack came back in time: the outcome is unknown."""
EXIT_INTERRUPTED = 130

DEFAULT_PREFIX = "lampyre/v1"  # agent.post.DEFAULT_PREFIX (not imported: the parser stays light)
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_TTL_S = 60  # agent.jws.DEFAULT_LIFETIME_S
MAX_TTL_S = 300  # agent.jws.MAX_LIFETIME_S
MAX_FADE_S = 90.5

PROG = "lampyre post"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lampyre post …`` to the command line."""
    post = commands.add_parser(
        "post",
        help="send a signed command to a gateway and wait for its signed ack",
        description="The control post: sign a command with the post's key, publish it on "
        "{prefix}/<gateway>/cmd, wait for the gateway's ack and verify its signature. Exit "
        "status: 0 ok; 1 the gateway answered error or rejected; 2 not sent (options, keys, "
        "broker); 3 no verified ack in time (the command may have run). See "
        "docs/control-post.md.",
    )
    actions = post.add_subparsers(dest="post_command", metavar="ACTION", required=True)

    dim = actions.add_parser(
        "dim",
        help="dim a device, a group or every lamp to a level",
        description="Dim to --level percent; the ack gives the level each lamp reads back.",
    )
    _add_target(dim)
    dim.add_argument("--level", required=True, type=_level, metavar="PERCENT", help="0 to 100")
    dim.add_argument(
        "--fade",
        type=_fade,
        default=None,
        metavar="SECONDS",
        help=f"transition time, 0 to {MAX_FADE_S} s (the ack comes once the fade is over)",
    )
    _add_common(dim)
    dim.set_defaults(handler=_post)

    switch = actions.add_parser(
        "switch",
        help="switch a device, a group or every device on or off",
        description="Switch on or off: a contactor where the device has a switch point, else "
        "the lamp dimmed to 100 or 0 %.",
    )
    _add_target(switch)
    state = switch.add_mutually_exclusive_group(required=True)
    state.add_argument("--on", dest="on", action="store_true", default=None, help="switch on")
    state.add_argument("--off", dest="on", action="store_false", help="switch off")
    _add_common(switch)
    switch.set_defaults(handler=_post)

    write = actions.add_parser(
        "write",
        help="write a value to a point of one device",
        description="Write --value (JSON: true, false or a number; a negative number as "
        "--value=-5) to the writable point --point of --device; the ack gives the value read "
        "back.",
    )
    write.add_argument("--device", required=True, metavar="ID", help="the device")
    write.add_argument(
        "--point", required=True, type=_point, metavar="NAME", help="a writable point"
    )
    write.add_argument(
        "--value", required=True, type=_value, metavar="JSON", help="true, false or a number"
    )
    _add_common(write)
    write.set_defaults(handler=_post)


def _add_target(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID", help="one device")
    target.add_argument("--group", metavar="NAME", help="a group of the gateway's [groups]")
    target.add_argument(
        "--all", dest="all_devices", action="store_true", help="every device that can do it"
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    # Shared with the other operator tools; it imports the MQTT layer (paho), which only costs
    # when the parser is built.
    from agent.toolmqtt import add_broker_options

    command = parser.add_argument_group("command")
    command.add_argument(
        "--gateway", required=True, type=_gateway_id, metavar="ID", help="the gateway's id"
    )
    command.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="FILE",
        help="the post's Ed25519 private key (mode 0600), as lampyre keys post-init makes it",
    )
    command.add_argument(
        "--gateways",
        type=Path,
        default=None,
        metavar="DIR",
        help="enrolled gateways: DIR/<gateway id>/*.pub (each gateway's gateway-signing.pub), "
        "to verify the ack",
    )
    command.add_argument(
        "--ttl",
        type=_ttl,
        default=DEFAULT_TTL_S,
        metavar="SECONDS",
        help=f"token lifetime, 1 to {MAX_TTL_S} s (default {DEFAULT_TTL_S}; a gateway whose "
        "clock is not synchronised takes at most 60)",
    )
    command.add_argument(
        "--timeout",
        type=_timeout,
        default=None,
        metavar="SECONDS",
        help=f"how long to wait for the ack (default {DEFAULT_TIMEOUT_S:g} s, plus the fade)",
    )
    command.add_argument(
        "--id",
        dest="command_id",
        type=_command_id,
        default=None,
        metavar="ID",
        help="the command id (default: a random one; never reuse one)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json", action="store_true", help="print the verified ack as one JSON line"
    )
    output.add_argument(
        "--accept-unsigned-ack",
        action="store_true",
        help="take a plain JSON ack from a gateway without a signing key (demo benches only); "
        "it is reported as unverified",
    )
    add_broker_options(parser, default_prefix=DEFAULT_PREFIX)


# ---------------------------------------------------------------------------- argument types


def _checked(parse: Any, text: str) -> Any:
    from agent.post import CommandError

    try:
        return parse(text)
    except CommandError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _level(text: str) -> int | float:
    from agent.post import parse_level

    value: int | float = _checked(parse_level, text)
    return value


def _value(text: str) -> bool | int | float:
    from agent.post import parse_value

    value: bool | int | float = _checked(parse_value, text)
    return value


def _fade(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:24]!r} is not a number") from None
    if not 0 <= value <= MAX_FADE_S:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to {MAX_FADE_S}")
    return value


def _ttl(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:24]!r} is not a whole number") from None
    if not 1 <= value <= MAX_TTL_S:
        raise argparse.ArgumentTypeError(f"expected whole seconds from 1 to {MAX_TTL_S}")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:24]!r} is not a number") from None
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError("expected seconds above 0 (at most a day)")
    return value


def _point(text: str) -> str:
    import re

    if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", text):
        raise argparse.ArgumentTypeError(
            "expected a point name (a lowercase letter, then lowercase letters, digits or '_')"
        )
    return text


def _gateway_id(text: str) -> str:
    import re

    from agent.envelope import GATEWAY_ID_PATTERN

    if not re.fullmatch(GATEWAY_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            "expected a gateway id (1-64 letters, digits, '_' or '-', starting with a letter "
            "or digit)"
        )
    return text


def _command_id(text: str) -> str:
    from agent.jws import JTI_PATTERN

    if not JTI_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            "expected 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
        )
    return text


# ------------------------------------------------------------------------------------ running


def _fail(message: object, status: int = EXIT_NOT_SENT) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


def _post(args: argparse.Namespace) -> int:
    import asyncio

    from agent.post import CommandError, prefix_problem
    from agent.toolmqtt import ToolOptionError, broker_settings

    # Everything is checked before anything is sent: a refusal is one line, and exit status 2.
    try:
        mqtt = broker_settings(args, "post")
    except ToolOptionError as exc:
        return _fail(exc)
    problem = prefix_problem(args.prefix)
    if problem is not None:
        return _fail(f"--prefix {args.prefix!r}: {problem}")
    key = _load_key(args.key)
    if isinstance(key, int):
        return key
    gateway_keys = _load_enrolment(args)
    if isinstance(gateway_keys, int):
        return gateway_keys
    try:
        body = _body(args)
    except CommandError as exc:
        return _fail(exc)
    timeout_s = args.timeout
    if timeout_s is None:
        timeout_s = DEFAULT_TIMEOUT_S + (body.get("fade_s") or 0)
    try:
        return asyncio.run(_send(args, mqtt, key, gateway_keys, body, timeout_s))
    except KeyboardInterrupt:
        return _fail(
            "interrupted: if the command was already published it may still run",
            EXIT_INTERRUPTED,
        )


def _load_key(path: Path) -> PostKey | int:
    from agent.post import PostKey
    from agent.sdk import LampyreError

    try:
        return PostKey.load(path)
    except FileNotFoundError:
        return _fail(f"--key {path}: no such file (lampyre keys post-init --out DIR makes one)")
    except IsADirectoryError:
        return _fail(f"--key {path}: a folder; give the key file (post-signing.key)")
    except LampyreError as exc:
        return _fail(f"--key: {exc}")
    except OSError as exc:
        return _fail(f"--key {path}: {exc.strerror or exc}")


def _load_enrolment(args: argparse.Namespace) -> dict[str, dict[str, Ed25519PublicKey]] | int:
    from agent.keys import load_enrolled_gateway_keys
    from agent.sdk import LampyreError

    folder: Path | None = args.gateways
    gateway: str = args.gateway
    if folder is None:
        if args.accept_unsigned_ack:
            return {}
        return _fail(
            "give --gateways DIR, the enrolled gateways' public keys "
            f"(DIR/{gateway}/gateway-signing.pub), to verify the ack"
        )
    if not folder.is_dir():
        return _fail(f"--gateways {folder}: not a folder")
    try:
        enrolled = load_enrolled_gateway_keys(folder)
    except (LampyreError, OSError) as exc:
        return _fail(f"--gateways: {exc}")
    if gateway not in enrolled and not args.accept_unsigned_ack:
        return _fail(
            f"gateway {gateway} is not enrolled in {folder}: put its gateway-signing.pub "
            f"in {folder / gateway}/ (check the fingerprint lampyre keys show prints on it)"
        )
    return enrolled


def _body(args: argparse.Namespace) -> dict[str, Any]:
    from agent.post import dim_command, switch_command, target_json, write_command

    if args.post_command == "write":
        target = target_json(device=args.device)
        return write_command(target, args.point, args.value, command_id=args.command_id)
    target = target_json(device=args.device, group=args.group, all_devices=args.all_devices)
    if args.post_command == "dim":
        return dim_command(target, args.level, fade_s=args.fade, command_id=args.command_id)
    return switch_command(target, bool(args.on), command_id=args.command_id)


async def _send(
    args: argparse.Namespace,
    mqtt: MqttSettings,
    key: PostKey,
    gateway_keys: Mapping[str, Mapping[str, Ed25519PublicKey]],
    body: dict[str, Any],
    timeout_s: float,
) -> int:
    from agent.post import (
        CommandError,
        NotSent,
        OutcomeUnknown,
        PostSession,
        issued_at_file_for,
    )

    issued_at = issued_at_file_for(args.key, key.kid)
    session = PostSession(
        mqtt,
        key=key,
        gateway_keys=gateway_keys,
        prefix=args.prefix,
        accept_unsigned_ack=args.accept_unsigned_ack,
        issued_at=issued_at,
    )
    try:
        await session.connect()
    except NotSent as exc:
        return _fail(f"not sent: {exc}")
    try:
        signed = await session.sign(args.gateway, body, lifetime_s=args.ttl)
        if issued_at.problem is not None:
            print(f"{PROG}: note: {issued_at.problem}", file=sys.stderr)
        outcome = await session.send(signed, timeout_s=timeout_s, on_refused=_report_refused)
    except CommandError as exc:
        return _fail(exc)
    except NotSent as exc:
        return _fail(f"not sent: {exc}")
    except OutcomeUnknown as exc:
        return _no_ack(exc)
    finally:
        await session.close()
    return _answer(outcome, as_json=args.json)


def _report_refused(refused: RefusedAck) -> None:
    what = "an ack for this command" if refused.named else "an ack naming no command"
    if refused.code == "unsigned":
        print(
            f"{PROG}: ignored {what}: plain JSON, not signed by the gateway (a demo gateway "
            "without a signing key? then add --accept-unsigned-ack)",
            file=sys.stderr,
        )
        return
    print(
        f"{PROG}: ignored {what} that does not verify ({refused.code}: {refused.reason}); "
        "still waiting for the gateway's signed ack",
        file=sys.stderr,
    )


def _no_ack(exc: OutcomeUnknown) -> int:
    lines = [
        f"{exc}. The command may still have run; its id {exc.command_id} is spent: to try "
        "again, send a new command."
    ]
    codes = sorted({r.code for r in exc.refused})
    if codes:
        lines.append(
            f"{len(exc.refused)} untrusted ack(s) were ignored ({', '.join(codes)}); check the "
            "gateway's enrolled key (--gateways) or look for forged messages on the broker"
        )
    if exc.unattributed:
        reasons = "; ".join(f"{a.get('code')}: {a.get('reason')}" for a in exc.unattributed[:3])
        lines.append(
            f"the gateway rejected {len(exc.unattributed)} command(s) without naming them "
            f"meanwhile (possibly this one): {reasons}"
        )
    status = exc.gateway_status
    if status is None:
        lines.append(f"no status seen from {exc.gateway} (never connected to this broker?)")
    else:
        state = status.get("state")
        reason = status.get("reason")
        lines.append(f"the gateway's last status: {state}" + (f" ({reason})" if reason else ""))
    print(f"{PROG}: " + "\n  ".join(lines), file=sys.stderr)
    return EXIT_NO_ACK


def _answer(outcome: AckOutcome, *, as_json: bool) -> int:
    ack = outcome.ack
    if not outcome.verified:
        print(
            f"{PROG}: UNVERIFIED ack: plain JSON, not signed by the gateway (taken because of "
            "--accept-unsigned-ack); anyone able to publish on the ack topic could have sent it",
            file=sys.stderr,
        )
    if not outcome.named:
        print(
            f"{PROG}: the gateway's rejection names no command: it does not echo the id of a "
            "token it could not authenticate; it came while only this command was waiting",
            file=sys.stderr,
        )
    if as_json:
        print(json.dumps(ack, separators=(",", ":"), ensure_ascii=True))
    else:
        print("\n".join(_summary(outcome)))
    status = outcome.status
    if status == "ok":
        return EXIT_OK
    if status == "invalid":
        print(f"{PROG}: the ack has no valid status (ok, error or rejected)", file=sys.stderr)
    return EXIT_ANSWERED_NOT_OK


def _summary(outcome: AckOutcome) -> list[str]:
    ack = outcome.ack
    who = f"signed by gateway key {outcome.signed_by}" if outcome.verified else "UNVERIFIED"
    head = f"{outcome.status}: gateway {outcome.gateway}, command {outcome.command_id} ({who})"
    lines = [head]
    if outcome.status == "rejected":
        lines.append(f"  {_text(ack.get('code'))}: {_text(ack.get('reason'))}")
        original = ack.get("original")
        if isinstance(original, dict):
            lines.append(f"  first answer to that id: {_text(original.get('status'))}")
    else:
        lines.append(f"  {_what(ack)}")
        results = ack.get("results")
        for result in results if isinstance(results, list) else []:
            if isinstance(result, dict):
                lines.append(f"  {_result_line(result)}")
    warning = ack.get("clock_warning")
    if warning:
        lines.append(f"  gateway clock: {_text(warning)}")
    return lines


def _what(ack: Mapping[str, Any]) -> str:
    action = _text(ack.get("action"))
    target = ack.get("target")
    if isinstance(target, dict) and "device" in target:
        where = f"device {_text(target['device'])}"
    elif isinstance(target, dict) and "group" in target:
        where = f"group {_text(target['group'])}"
    else:
        where = "every device"
    requested = ack.get("requested")
    if action == "write":
        return f"write {_text(ack.get('point'))} = {json.dumps(requested)} on {where}"
    if action == "switch":
        return f"switch {where} {'on' if requested else 'off'}"
    fade = ack.get("fade_s")
    fading = f" over {fade:g} s" if isinstance(fade, int | float) else ""
    return f"dim {where} to {_number(requested)} %{fading}"


def _result_line(result: Mapping[str, Any]) -> str:
    device = _text(result.get("device"))
    status = _text(result.get("status"))
    if "level" in result:
        got = (
            "no level read back"
            if result["level"] is None
            else (f"level {_number(result['level'])} %")
        )
    elif "state" in result:
        got = "no state read back" if result["state"] is None else f"state {_text(result['state'])}"
    elif "value" in result:
        got = f"value {json.dumps(result['value'])}"
    else:
        got = "nothing read back"
    error = result.get("error")
    return f"{device}: {status}, {got}" + (f" ({_text(error)})" if error else "")


def _number(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:g}"
    return _text(value)


def _text(value: Any) -> str:
    """A value from the ack, shown on one line whatever it holds."""
    text = value if isinstance(value, str) else json.dumps(value)
    # Printable characters only: no terminal escape sequence gets through, whoever sent it.
    return "".join(char if char.isprintable() else "?" for char in text[:500])
