"""The keys the runner holds in place of the control post and the hub.

A gateway with the production settings seals its ``data`` and ``event`` payloads to the hub's
HPKE key and signs them, signs its acks, and accepts only commands signed by an enrolled
control-post key (``docs/hub-protocol.md``, "Security at a glance"). To watch and command it
the runner needs what the hub and the control post hold:

- the control post's private key (``lampyre keys post-init`` makes ``post-signing.key``): the
  commands are signed with it;
- the hub's private HPKE keys (``lampyre keys hub-init`` makes ``hub-<kid>.key``): the
  envelopes are opened with them;
- the gateway's public signing key (its ``gateway-signing.pub``, or an enrolment folder
  ``<dir>/<gateway id>/*.pub``): the envelopes and the acks are verified with it.

A gateway configured with ``[hub] seal = "none"`` and ``[commands] allow_unsigned = true`` (the
demo) needs none of them: everything is plain JSON. Loading is blocking (files): call
:func:`load_bench_keys` before the event loop starts or through ``asyncio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import GatewayConfig
from agent.envelope import HubPrivateKey
from agent.keys import (
    ed25519_key_id,
    load_enrolled_gateway_keys,
    load_hub_private_keys,
    read_ed25519_public_key,
)
from agent.post import PostKey
from agent.sdk import KeyFileError, LampyreError

__all__ = [
    "BenchKeyError",
    "BenchKeys",
    "command_problem",
    "describe_security",
    "key_problems",
    "load_bench_keys",
]

T = TypeVar("T")


class BenchKeyError(LampyreError):
    """A key given to the runner cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class BenchKeys:
    """What the runner holds. Empty (the default): plain JSON everywhere, a demo-style
    gateway."""

    post: PostKey | None = None
    """Signs the commands (compact JWS). None: commands are sent as plain JSON."""
    hub: Mapping[str, HubPrivateKey] = field(default_factory=dict)
    """Open the sealed ``data`` and ``event`` payloads, by key id."""
    gateway: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    """The gateway's public signing keys, by key id (several during a rotation): verify the
    envelopes and the acks."""


def load_bench_keys(
    gateway_id: str,
    *,
    post_key: Path | None = None,
    hub_keys: Path | None = None,
    gateway_key: Path | None = None,
    gateways: Path | None = None,
) -> BenchKeys:
    """Load the keys named (each optional). ``hub_keys``: a folder (its ``hub-*.key``) or one
    file; ``gateway_key``: the gateway's public key file; ``gateways``: an enrolment folder,
    of which ``gateway_id``'s keys are taken (both may be given: the keys are merged).

    Blocking. :class:`BenchKeyError` when a file is missing, refused (a private key readable by
    others, a folder others may write) or not the kind of key expected.
    """
    post: PostKey | None = None
    if post_key is not None:
        post = _load(f"control-post key {post_key}", lambda: PostKey.load(post_key))
    hub: dict[str, HubPrivateKey] = {}
    if hub_keys is not None:
        hub = _load(f"hub keys {hub_keys}", lambda: load_hub_private_keys(hub_keys))
        if not hub:
            raise BenchKeyError(
                f"hub keys {hub_keys}: no hub-*.key there (lampyre keys hub-init makes one)"
            )
    gateway: dict[str, Ed25519PublicKey] = {}
    if gateways is not None:
        enrolled = _load(f"enrolment {gateways}", lambda: load_enrolled_gateway_keys(gateways))
        if gateway_id not in enrolled:
            raise BenchKeyError(
                f"enrolment {gateways}: no key for gateway {gateway_id} (expected "
                f"{gateways / gateway_id}/*.pub, its gateway-signing.pub)"
            )
        gateway.update(enrolled[gateway_id])
    if gateway_key is not None:
        public = _load(f"gateway key {gateway_key}", lambda: read_ed25519_public_key(gateway_key))
        gateway[ed25519_key_id(public)] = public
    return BenchKeys(post=post, hub=hub, gateway=gateway)


def _load(what: str, load: Callable[[], T]) -> T:
    try:
        return load()
    except FileNotFoundError as exc:
        raise BenchKeyError(f"{what}: no such file ({exc.filename})") from None
    except KeyFileError as exc:
        raise BenchKeyError(f"{what}: {exc}") from None
    except OSError as exc:
        raise BenchKeyError(f"{what}: cannot read it: {exc.strerror or exc}") from None


def key_problems(config: GatewayConfig, keys: BenchKeys) -> list[str]:
    """What the runner lacks to read this gateway at all (every scenario reads its ``data`` and
    ``event`` messages): empty when nothing is missing."""
    problems: list[str] = []
    if config.hub.seal:
        if not keys.hub:
            problems.append(
                'the gateway seals its data and events ([hub] seal = "hpke"): give the hub\'s '
                "private keys with --hub-keys DIR"
            )
        if not keys.gateway:
            problems.append(
                "the gateway signs its envelopes and acks: give its public signing key with "
                "--gateway-key FILE or --gateways DIR"
            )
    return problems


def command_problem(config: GatewayConfig, keys: BenchKeys) -> str | None:
    """Why the runner cannot command this gateway, or None. A gateway that takes only signed
    commands needs the control post's key, and then signs its acks."""
    if config.allow_unsigned_commands:
        return None
    if keys.post is None:
        return (
            "the gateway accepts only signed commands ([commands] allow_unsigned is off): give "
            "the control post's key with --post-key FILE"
        )
    if not keys.gateway:
        return (
            "the gateway signs its acks: give its public signing key with --gateway-key FILE "
            "or --gateways DIR"
        )
    return None


def describe_security(config: GatewayConfig, keys: BenchKeys) -> str:
    """One line for the operator: how the runner reads and commands this gateway."""
    if config.hub.seal:
        readings = f"data and events sealed, opened with hub key {_ids(keys.hub)}"
    else:
        readings = 'data and events in plain JSON ([hub] seal = "none")'
    if keys.post is not None:
        commands = f"commands signed by post key {keys.post.kid}"
    else:
        commands = "commands in plain JSON"
    if keys.gateway:
        acks = f"signed acks and envelopes verified with gateway key {_ids(keys.gateway)}"
    else:
        acks = "acks in plain JSON"
    return f"{readings}; {commands}; {acks}"


def _ids(keys: Mapping[str, object]) -> str:
    return ", ".join(sorted(keys)) if keys else "(none)"
