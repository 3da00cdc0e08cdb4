"""``lampyre keys``: create, show and crypto-erase the gateway's keys; make a hub key pair.

Import-light like the rest of the command line: the key and envelope modules are imported when
a subcommand runs. Nothing here prints or logs a private key; public keys, fingerprints and key
ids are what an operator copies to the hub for enrolment.
"""

from __future__ import annotations

import argparse
import contextlib
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli import EXIT_INVALID, EXIT_OK, _load

if TYPE_CHECKING:
    from agent.config import GatewayConfig

EXIT_PROBLEM = EXIT_INVALID
"""A key is refused, missing or mismatched, or a wipe was not confirmed."""

CONFIRMATION = "yes"
"""What ``keys wipe`` wants typed before it erases anything."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lampyre keys …`` to the command line."""
    keys = commands.add_parser(
        "keys",
        help="create, show and erase the gateway's keys",
        description="The gateway's signing key, its buffer key and the public keys it trusts "
        "(the hub's and the control posts'), in the [keys] folder of the configuration.",
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init",
        help="create the missing gateway keys and print the public ones",
        description="Create the gateway's Ed25519 signing key (mode 0600) and the buffer key "
        "when they are missing; an existing key is never replaced. Prints the public key, its "
        "fingerprint and key id for enrolment at the hub.",
    )
    init.add_argument("--config", required=True, metavar="FILE", help="gateway configuration")
    init.set_defaults(handler=_init)

    show = actions.add_parser(
        "show",
        help="print public keys, fingerprints, key ids and file modes",
        description="Print the gateway's public key, the hub keys (which one is current) and the "
        "control-post keys with their fingerprints and key ids, and check every file's mode. "
        "Exit status 1 when something would stop the agent.",
    )
    show.add_argument("--config", required=True, metavar="FILE", help="gateway configuration")
    show.set_defaults(handler=_show)

    wipe = actions.add_parser(
        "wipe",
        help="crypto-erase the private keys and the buffer",
        description="Overwrite and delete the gateway's signing key and buffer key, and delete "
        "the buffer database: nothing buffered can be read afterwards, and records not yet "
        "sent are lost. Stop the agent first. Asks for confirmation unless --yes.",
    )
    wipe.add_argument("--config", required=True, metavar="FILE", help="gateway configuration")
    wipe.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    wipe.set_defaults(handler=_wipe)

    hub_init = actions.add_parser(
        "hub-init",
        help="create a hub key pair (for a test or reference hub)",
        description="Write a new hub HPKE key pair into DIR: hub-<key id>.key (mode 0600, stays "
        "on the hub) and hub-<key id>.pub (copied into each gateway's key folder).",
    )
    hub_init.add_argument("--out", required=True, metavar="DIR", help="folder for the key pair")
    hub_init.add_argument(
        "--suite",
        default=None,
        metavar="NAME",
        help="suite the key is for; only its KEM matters (default "
        "x25519-hkdf256-chacha20poly1305; mlkem768x25519-… for the post-quantum hybrid)",
    )
    hub_init.set_defaults(handler=_hub_init)

    post_init = actions.add_parser(
        "post-init",
        help="create a control post's signing key",
        description="Write a new control-post Ed25519 key pair into DIR: post-signing.key "
        "(mode 0600, stays at the control post; lampyre post --key) and post-<key id>.pub "
        "(0644, copied into the key folder of each gateway the post commands). An existing "
        "key is never overwritten. See docs/control-post.md.",
    )
    post_init.add_argument("--out", required=True, metavar="DIR", help="folder for the key pair")
    post_init.set_defaults(handler=_post_init)


def _fail(message: object) -> int:
    print(f"lampyre keys: {message}", file=sys.stderr)
    return EXIT_PROBLEM


def _mode(path: Path) -> str:
    return f"{stat.S_IMODE(path.lstat().st_mode):04o}"


def _signing_key_lines(kid: str, fingerprint: str, public_pem: bytes) -> list[str]:
    return [
        f"  key id:      {kid}",
        f"  fingerprint: sha256:{fingerprint}",
        "  public key:",
        *(f"    {line}" for line in public_pem.decode().splitlines()),
    ]


# --------------------------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if isinstance(config, int):
        return config
    from agent.crypto import load_or_create_key
    from agent.keys import (
        KeyFileError,
        KeySetupError,
        create_gateway_signing_key,
        ed25519_public_pem,
    )

    folder = config.keys.dir
    try:
        signer, created = create_gateway_signing_key(folder)
    except (KeyFileError, KeySetupError) as exc:
        return _fail(exc)
    except OSError as exc:
        return _fail(f"cannot create keys in {folder}: {exc.strerror or exc}")
    state = "created" if created else "kept (already there)"
    print(f"gateway signing key (Ed25519): {folder / 'gateway-signing.key'}: {state}")
    print(
        "\n".join(
            _signing_key_lines(
                signer.skid, signer.fingerprint, ed25519_public_pem(signer.public_key)
            )
        )
    )

    buffer_key = config.buffer.key_file
    existed = buffer_key.exists()
    try:
        load_or_create_key(buffer_key)
    except KeyFileError as exc:
        return _fail(exc)
    except OSError as exc:
        return _fail(f"cannot create the buffer key {buffer_key}: {exc.strerror or exc}")
    print(f"buffer key: {buffer_key}: {'kept (already there)' if existed else 'created'}")
    # The hub's key usually arrives after the gateway's keys exist: a note here, not a failure
    # (`keys show` and the agent's start-up refuse what is still missing).
    notes: list[str] = []
    _print_trusted_keys(config, notes)
    for note in notes:
        print(f"note: {note}")
    print(
        "Enrol the gateway at the hub with its id "
        f"{config.gateway_id!r} and the public key above (check the fingerprint)."
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# show
# --------------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if isinstance(config, int):
        return config
    from agent.keys import (
        KeyFileError,
        KeySetupError,
        check_key_folder,
        ed25519_public_pem,
        load_gateway_signer,
    )

    problems: list[str] = []
    folder = config.keys.dir
    if folder.is_dir():
        print(f"key folder: {folder} (mode {_mode(folder)})")
        try:
            check_key_folder(folder)
        except KeyFileError as exc:
            problems.append(str(exc))
    else:
        print(f"key folder: {folder} (missing)")

    signing = folder / "gateway-signing.key"
    try:
        signer = load_gateway_signer(folder)
    except (KeyFileError, KeySetupError) as exc:
        print(f"gateway signing key: {signing}: not usable")
        problems.append(str(exc))
    else:
        print(f"gateway signing key (Ed25519): {signing} (mode {_mode(signing)})")
        print(
            "\n".join(
                _signing_key_lines(
                    signer.skid, signer.fingerprint, ed25519_public_pem(signer.public_key)
                )
            )
        )

    problems.extend(_buffer_key_problems(config))
    _print_trusted_keys(config, problems)
    if problems:
        print("problems:")
        for problem in problems:
            print(f"  - {problem}")
        return EXIT_PROBLEM
    return EXIT_OK


def _buffer_key_problems(config: GatewayConfig) -> list[str]:
    from agent.keys import KeyFileError
    from agent.sdk import read_private_file

    path = config.buffer.key_file
    try:
        read_private_file(path, limit=64)
    except FileNotFoundError:
        print(f"buffer key: {path}: missing (created by lampyre keys init or at first run)")
        return []
    except KeyFileError as exc:
        print(f"buffer key: {path}: not usable")
        return [str(exc)]
    print(f"buffer key: {path} (mode {_mode(path)})")
    return []


def _print_trusted_keys(config: GatewayConfig, problems: list[str]) -> int:
    """Print the hub keys (which is current, which suite) and the control-post keys; add what
    would stop the agent to ``problems``. EXIT_PROBLEM when there is something."""
    from agent.envelope import HubPublicKey
    from agent.keys import (
        POST_PUBLIC_GLOB,
        RECEIPT_PUBLIC_GLOB,
        KeyFileError,
        KeySetupError,
        hub_key_files,
        read_hub_public_key,
        select_hub_key,
    )

    before = len(problems)
    hub_keys: dict[str, tuple[HubPublicKey, Path]] = {}
    for path in hub_key_files(config.keys):
        try:
            key = read_hub_public_key(path)
        except (KeyFileError, OSError) as exc:
            problems.append(str(exc))
            continue
        hub_keys.setdefault(key.kid, (key, path))
    current_kid: str | None = None
    suite_name = ""
    try:
        current, suite = select_hub_key(
            {kid: key for kid, (key, _) in hub_keys.items()},
            config.keys.current_hub_key,
            config.keys.suite,
        )
        current_kid, suite_name = current.kid, suite.name
    except KeySetupError as exc:
        # Only a problem when readings are sealed: with seal = "none" no hub key is used.
        if config.hub.seal:
            problems.append(str(exc))
    print(f"hub keys ({len(hub_keys)}):")
    for kid, (key, path) in sorted(hub_keys.items()):
        mark = f"  <- current, suite {suite_name}" if kid == current_kid else ""
        print(
            f"  {kid}  {key.kem.value}  {path} (mode {_mode(path)})  sha256:{key.fingerprint}{mark}"
        )

    posts = _ed25519_key_lines(config.keys.dir, POST_PUBLIC_GLOB, problems)
    print(f"control-post keys ({len(posts)}):")
    for line in posts:
        print(line)
    if not posts:
        print("  (none: every signed command will be refused)")
    receipts = _ed25519_key_lines(config.keys.dir, RECEIPT_PUBLIC_GLOB, problems)
    print(f"hub receipt keys ({len(receipts)}):")
    for line in receipts:
        print(line)
    if config.hub.receipts and not receipts:
        problems.append("hub.receipts is on and the key folder holds no receipt-*.pub")
    return EXIT_PROBLEM if len(problems) > before else EXIT_OK


def _ed25519_key_lines(folder: Path, pattern: str, problems: list[str]) -> list[str]:
    """One line per Ed25519 public key file of ``folder`` matching ``pattern``: key id, file,
    mode, fingerprint. Unreadable or refused files go to ``problems``."""
    from agent.envelope import fingerprint as make_fingerprint
    from agent.envelope import key_id as make_key_id
    from agent.keys import KeyFileError, read_ed25519_public_key

    lines: list[str] = []
    if not folder.is_dir():
        return lines
    for path in sorted(folder.glob(pattern)):
        try:
            raw = read_ed25519_public_key(path).public_bytes_raw()
        except (KeyFileError, OSError) as exc:
            problems.append(str(exc))
            continue
        lines.append(
            f"  {make_key_id(raw)}  ed25519  {path} (mode {_mode(path)})  "
            f"sha256:{make_fingerprint(raw)}"
        )
    return lines


# --------------------------------------------------------------------------------------------
# wipe
# --------------------------------------------------------------------------------------------


def _wipe(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if isinstance(config, int):
        return config
    from agent.keys import (
        KeyFileError,
        KeySetupError,
        crypto_erase,
        erase_targets,
        load_gateway_signer,
    )

    folder, buffer = config.keys.dir, config.buffer
    targets = erase_targets(folder, buffer.path, buffer.key_file)
    if not targets:
        print("nothing to erase: no gateway key, buffer key or buffer database found")
        return EXIT_OK
    revoke = None
    # No key, or one refused: nothing to name for revocation, and the file goes anyway.
    with contextlib.suppress(KeyFileError, KeySetupError):
        revoke = load_gateway_signer(folder)
    print("This erases, for good:")
    for path, secret in targets:
        print(f"  {path}{'  (overwritten, then deleted)' if secret else ''}")
    print("Records in the buffer that the hub has not received yet are lost.")
    if not args.yes:
        print(f"Type '{CONFIRMATION}' to erase: ", end="", flush=True)
        answer = sys.stdin.readline().strip()
        if answer != CONFIRMATION:
            print("nothing erased")
            return EXIT_PROBLEM
    try:
        wiped = crypto_erase(folder, buffer.path, buffer.key_file)
    except OSError as exc:
        return _fail(f"erase stopped: {exc.strerror or exc} ({exc.filename}); run it again")
    print(f"erased {len(wiped)} file(s).")
    if revoke is not None:
        print(
            f"Revoke signing key {revoke.skid} (sha256:{revoke.fingerprint}) of gateway "
            f"{config.gateway_id!r} at the hub; lampyre keys init makes new keys."
        )
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# hub-init
# --------------------------------------------------------------------------------------------


def _hub_init(args: argparse.Namespace) -> int:
    from agent.envelope import DEFAULT_SUITE, SUITE_NAMES
    from agent.keys import (
        RECEIPT_PUBLIC_GLOB,
        RECEIPT_SIGNING_KEY_FILE,
        ed25519_key_id,
        encode_hub_public_key,
        load_ed25519_private_key,
        write_ed25519_keypair,
        write_hub_keypair,
    )
    from agent.sdk import LampyreError

    suite = args.suite or DEFAULT_SUITE
    if suite not in SUITE_NAMES:
        return _fail(f"unknown suite {suite!r}; expected one of: {', '.join(SUITE_NAMES)}")
    try:
        public, private_path, public_path = write_hub_keypair(Path(args.out), suite)
    except OSError as exc:
        return _fail(f"cannot write the key pair in {args.out}: {exc.strerror or exc}")
    print(f"hub key {public.kid} ({public.kem.value})")
    print(f"  private key: {private_path} (mode 0600; keep it on the hub, never on a gateway)")
    print(f"  public key:  {public_path} (copy it into each gateway's key folder)")
    print(f"  fingerprint: sha256:{public.fingerprint}")
    print(f'  set keys.current_hub_key = "{public.kid}" on the gateways to seal to it')
    # The receipt-signing key is one per hub (not per HPKE key): made once, kept afterwards.
    out = Path(args.out)
    receipt_key = out / RECEIPT_SIGNING_KEY_FILE
    try:
        if receipt_key.exists():
            kid = ed25519_key_id(load_ed25519_private_key(receipt_key).public_key())
            receipt_public = out / RECEIPT_PUBLIC_GLOB.replace("*", kid)
            state = "kept"
        else:
            kid, receipt_public = write_ed25519_keypair(receipt_key, out, "receipt")
            state = "created"
    except (OSError, LampyreError) as exc:
        return _fail(f"hub receipt key in {out}: {exc}")
    print(f"hub receipt-signing key {kid} (Ed25519): {receipt_key} ({state}, mode 0600)")
    print(f"  public key:  {receipt_public} (copy it into the key folder of gateways that use")
    print("  hub receipts)")
    if public.kem.value == "x25519":
        print(f"  {encode_hub_public_key(public).decode().strip()}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# post-init
# --------------------------------------------------------------------------------------------


def _post_init(args: argparse.Namespace) -> int:
    from agent.envelope import fingerprint
    from agent.keys import (
        check_key_folder,
        ed25519_public_pem,
        load_ed25519_private_key,
        write_ed25519_keypair,
    )
    from agent.post import POST_SIGNING_KEY_FILE
    from agent.sdk import LampyreError

    out = Path(args.out)
    private_path = out / POST_SIGNING_KEY_FILE
    if private_path.exists() or private_path.is_symlink():
        return _fail(
            f"{private_path} already exists; a post key is never overwritten (to rotate, make "
            "the new key in another folder: docs/control-post.md#rotating-the-post-key)"
        )
    try:
        check_key_folder(out)
        kid, public_path = write_ed25519_keypair(private_path, out, "post")
        public_key = load_ed25519_private_key(private_path).public_key()
    except FileExistsError as exc:
        return _fail(f"{exc.filename or private_path} already exists; nothing was overwritten")
    except LampyreError as exc:
        return _fail(exc)
    except OSError as exc:
        return _fail(f"cannot write the post key in {out}: {exc.strerror or exc}")
    print(f"control-post signing key (Ed25519): {private_path}: created (mode 0600)")
    print(
        "\n".join(
            _signing_key_lines(
                kid, fingerprint(public_key.public_bytes_raw()), ed25519_public_pem(public_key)
            )
        )
    )
    print(f"  public key file: {public_path} (mode 0644)")
    print(f"Copy {public_path.name} into the key folder of each gateway this post commands")
    print("(check the fingerprint there with lampyre keys show); sign commands with")
    print(f"lampyre post ... --key {private_path}. The private key never leaves the post.")
    return EXIT_OK
