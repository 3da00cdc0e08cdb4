"""Commissioning a DALI line: list the gear present (:func:`scan`) and give short addresses to
the gear that have none (:func:`commission`), over any :class:`~.interface.DaliInterface`.

Both run on a live line. ``scan`` only queries. ``commission`` INITIALISEs the *unaddressed*
gear only, so addressed gear never enter the addressing state and lamps keep their levels
(addressing commands do not touch arc power). It finds the unaddressed gear one at a time by
their 24-bit random addresses with COMPARE (a collision of several YES answers is a YES), from
the most significant bit down, so each step sends one SEARCHADDR byte and one COMPARE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from . import codec, memory
from .interface import DaliAnswer, DaliInterface, DaliInterfaceError, Outcome

__all__ = [
    "MAX_ROUNDS",
    "RANDOMISE_SETTLE_S",
    "CommissionReport",
    "GearInfo",
    "GroupChange",
    "commission",
    "present_addresses",
    "scan",
]

logger = logging.getLogger(__name__)

RANDOMISE_SETTLE_S: Final = 0.1
"""Gear need up to 100 ms after RANDOMISE to have their new random address."""
MAX_ROUNDS: Final = 4
"""INITIALISE … TERMINATE rounds at most: a round ends early when two gear drew the same random
address (they cannot be told apart; a new RANDOMISE separates them)."""
SEND_RETRIES: Final = 2
NO_DEVICE_TYPE: Final = 254
"""QUERY NEXT DEVICE TYPE's answer once every device type has been listed."""

Progress = Callable[[str], None]


async def _send(interface: DaliInterface, command: codec.Command) -> DaliAnswer:
    if command.device_type is not None:
        await _send(interface, codec.enable_device_type(command.device_type))
    attempt = 0
    while True:
        try:
            return await interface.send(
                command.frame, send_twice=command.send_twice, expect_answer=command.expects_answer
            )
        except DaliInterfaceError as exc:
            # A garbled interface report: the frame is worth sending again (every frame used
            # here is idempotent). Bus power errors and a lost port are not.
            attempt += 1
            if attempt > SEND_RETRIES:
                raise
            logger.info("%s: %s; sending again", command, exc)


async def _query(interface: DaliInterface, command: codec.Command) -> int | None:
    answer = await _send(interface, command)
    return answer.value if answer.outcome is Outcome.ANSWER else None


async def _yes(interface: DaliInterface, command: codec.Command) -> bool:
    answer = await _send(interface, command)
    return codec.yes_no(answer.value, collision=answer.outcome is Outcome.COLLISION)


# --------------------------------------------------------------------------------------------
# Scan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GearInfo:
    """What ``scan`` learnt about the gear at one short address."""

    address: int
    device_types: tuple[int, ...]
    groups: frozenset[int]
    level: int | None
    """Actual arc power level (None: MASK, e.g. lamp failure)."""
    gtin: int | None = None
    firmware: str | None = None
    identification: int | None = None
    luminaire: Mapping[str, memory.MemoryValue] = field(default_factory=dict)
    """Bank 1 (part 251) fields, when the gear has that bank."""

    @property
    def level_percent(self) -> float | None:
        return None if self.level is None else round(codec.arc_to_percent(self.level), 1)


async def present_addresses(interface: DaliInterface) -> list[int]:
    """The short addresses that answer QUERY CONTROL GEAR PRESENT (a broadcast first: an
    empty or fully unaddressed line costs one query)."""
    if not await _yes(
        interface, codec.command(codec.BROADCAST, codec.Opcode.QUERY_CONTROL_GEAR_PRESENT)
    ):
        return []
    found = []
    for address in range(64):
        query = codec.command(codec.Short(address), codec.Opcode.QUERY_CONTROL_GEAR_PRESENT)
        if await _yes(interface, query):
            found.append(address)
    return found


async def _device_types(interface: DaliInterface, short: codec.Short) -> tuple[int, ...]:
    first = await _query(interface, codec.command(short, codec.Opcode.QUERY_DEVICE_TYPE))
    if first is None:
        return ()
    if first != codec.MASK:
        return (first,)
    types: list[int] = []
    for _ in range(NO_DEVICE_TYPE):
        nxt = await _query(interface, codec.command(short, codec.Opcode.QUERY_NEXT_DEVICE_TYPE))
        if nxt is None or nxt == NO_DEVICE_TYPE:
            break
        types.append(nxt)
    return tuple(types)


async def _groups(interface: DaliInterface, short: codec.Short) -> frozenset[int] | None:
    low = await _query(interface, codec.command(short, codec.Opcode.QUERY_GROUPS_0_7))
    high = await _query(interface, codec.command(short, codec.Opcode.QUERY_GROUPS_8_15))
    if low is None or high is None:
        return None
    return codec.groups_from_answers(low, high)


async def _read_bank(
    interface: DaliInterface, plan: memory.BankRead
) -> dict[str, memory.MemoryValue]:
    answers: list[int | None] = []
    for command in plan.commands():
        if command.expects_answer:
            answers.append(await _query(interface, command))
        else:
            await _send(interface, command)
            answers.append(None)
    return plan.decode(answers)


async def scan(
    interface: DaliInterface, *, banks: bool = True, progress: Progress | None = None
) -> list[GearInfo]:
    """Every gear with a short address: device types, groups, level and, with ``banks``,
    identification from bank 0 and luminaire data from bank 1 when present."""
    found: list[GearInfo] = []
    for address in await present_addresses(interface):
        short = codec.Short(address)
        if progress is not None:
            progress(f"reading short address {address}")
        level = await _query(interface, codec.command(short, codec.Opcode.QUERY_ACTUAL_LEVEL))
        info = GearInfo(
            address=address,
            device_types=await _device_types(interface, short),
            groups=await _groups(interface, short) or frozenset(),
            level=None if level is None or level == codec.MASK else level,
        )
        if banks:
            bank0 = await _read_bank(interface, memory.plan_read(address, memory.BANK_0))
            major, minor = bank0["firmware_version_major"], bank0["firmware_version_minor"]
            luminaire: dict[str, memory.MemoryValue] = {}
            last_bank = bank0["last_memory_bank"]
            if isinstance(last_bank, int) and last_bank >= 1:
                bank1 = await _read_bank(interface, memory.plan_read(address, memory.BANK_1))
                luminaire = {k: v for k, v in bank1.items() if v is not None}
            gtin, ident = bank0["gtin"], bank0["identification_number"]
            info = GearInfo(
                address=info.address,
                device_types=info.device_types,
                groups=info.groups,
                level=info.level,
                gtin=gtin if isinstance(gtin, int) else None,
                firmware=f"{major}.{minor}" if major is not None and minor is not None else None,
                identification=ident if isinstance(ident, int) else None,
                luminaire=luminaire,
            )
        found.append(info)
    return found


# --------------------------------------------------------------------------------------------
# Commission
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupChange:
    address: int
    added: tuple[int, ...]
    removed: tuple[int, ...]
    verified: bool


@dataclass(slots=True)
class CommissionReport:
    already_addressed: list[int] = field(default_factory=list)
    """Short addresses present before commissioning (left untouched)."""
    programmed: list[tuple[int, int]] = field(default_factory=list)
    """(random address, new short address) of each gear addressed, in order."""
    groups: list[GroupChange] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unaddressed_left: bool = False
    """Some gear still answers QUERY MISSING SHORT ADDRESS after the last round."""


class _Search:
    """The search address the gear hold, so only the bytes that change are sent."""

    def __init__(self, interface: DaliInterface) -> None:
        self._interface = interface
        self._held: list[int | None] = [None, None, None]

    async def set(self, value: int) -> None:
        makers = (codec.searchaddr_h, codec.searchaddr_m, codec.searchaddr_l)
        for index, (make, byte) in enumerate(
            zip(makers, (value >> 16, (value >> 8) & 0xFF, value & 0xFF), strict=True)
        ):
            if self._held[index] != byte:
                await _send(self._interface, make(byte))
                self._held[index] = byte

    async def compare(self, value: int) -> bool:
        await self.set(value)
        return await _yes(self._interface, codec.compare())


async def _lowest_random_address(search: _Search) -> int | None:
    """The lowest random address among the gear still taking part, or None when none is."""
    if not await search.compare(0xFFFFFF):
        return None
    address = 0
    for bit in range(23, -1, -1):
        # Is some gear at or below this prefix with the remaining bits all ones?
        if not await search.compare(address | ((1 << bit) - 1)):
            address |= 1 << bit
    return address


async def commission(
    interface: DaliInterface,
    *,
    start_address: int = 0,
    used: Collection[int] = (),
    groups: Mapping[int, Sequence[int]] | None = None,
    progress: Progress | None = None,
) -> CommissionReport:
    """Give every gear without a short address the lowest free one (from ``start_address``,
    skipping addresses present on the line and ``used``), verify it, then (with ``groups``:
    short address → wanted groups) make the group membership of those gear exactly that."""
    if not 0 <= start_address <= 63:
        raise ValueError(f"start address must be 0..63, got {start_address}")
    report = CommissionReport()
    say = progress or (lambda _text: None)
    report.already_addressed = await present_addresses(interface)
    taken = set(report.already_addressed) | set(used)
    free = [a for a in range(start_address, 64) if a not in taken]
    say(f"{len(report.already_addressed)} gear already addressed; {len(free)} addresses free")

    for round_number in range(1, MAX_ROUNDS + 1):
        missing = codec.command(codec.BROADCAST, codec.Opcode.QUERY_MISSING_SHORT_ADDRESS)
        if not await _yes(interface, missing):
            break
        await _send(interface, codec.terminate())
        await _send(interface, codec.initialise("unaddressed"))
        await _send(interface, codec.randomise())
        await asyncio.sleep(RANDOMISE_SETTLE_S)
        search = _Search(interface)
        try:
            while True:
                random_address = await _lowest_random_address(search)
                if random_address is None:
                    break
                # Every gear below is withdrawn: a collision here means several gear drew
                # this same random address. A new round separates them.
                await search.set(random_address)
                answer = await _send(interface, codec.compare())
                if answer.outcome is Outcome.COLLISION:
                    report.problems.append(
                        f"round {round_number}: several gear share random address "
                        f"{random_address:06X}; randomising again"
                    )
                    break
                if not free:
                    report.problems.append("no free short address left")
                    break
                short = free[0]
                await _send(interface, codec.program_short_address(short))
                if not await _yes(interface, codec.verify_short_address(short)):
                    report.problems.append(
                        f"gear {random_address:06X} did not verify short address {short}"
                    )
                    await _send(interface, codec.withdraw())
                    continue
                free.pop(0)
                await _send(interface, codec.withdraw())
                report.programmed.append((random_address, short))
                say(f"gear {random_address:06X} -> short address {short}")
        finally:
            await _send(interface, codec.terminate())
        if not free:
            break
    missing = codec.command(codec.BROADCAST, codec.Opcode.QUERY_MISSING_SHORT_ADDRESS)
    report.unaddressed_left = await _yes(interface, missing)
    if report.unaddressed_left:
        report.problems.append("some gear still have no short address")

    for address, wanted in sorted((groups or {}).items()):
        change = await _apply_groups(interface, address, frozenset(wanted))
        if change is None:
            report.problems.append(f"short address {address}: no answer, groups not applied")
            continue
        report.groups.append(change)
        if not change.verified:
            report.problems.append(f"short address {address}: groups did not verify")
    return report


async def _apply_groups(
    interface: DaliInterface, address: int, wanted: frozenset[int]
) -> GroupChange | None:
    short = codec.Short(address)
    current = await _groups(interface, short)
    if current is None:
        return None
    added = tuple(sorted(wanted - current))
    removed = tuple(sorted(current - wanted))
    for group in added:
        await _send(interface, codec.command(short, codec.Opcode.ADD_TO_GROUP, group))
    for group in removed:
        await _send(interface, codec.command(short, codec.Opcode.REMOVE_FROM_GROUP, group))
    after = await _groups(interface, short)
    return GroupChange(address, added, removed, verified=after == wanted)
