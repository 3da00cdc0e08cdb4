"""Commissioning and scanning a simulated DALI line over a real pty: 64 gear with random long
addresses all found and addressed, a partly addressed line left as it was, groups applied,
gear that cannot be told apart reported, and the ``lampyre dali`` commands."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from drivers.dali import cli, codec, commissioning, interface
from drivers.dali.interface import DaliInterface, load_interface
from drivers.dali.interfaces import foxtron, sci2
from firmware_sim.dali import ControlGear, DaliLine
from firmware_sim.dali.interfaces import EMULATORS

TEST_BOUND_S = 40.0
TIME_SCALE = 0.01
"""Fast enough, and the 15-minute INITIALISE window still lasts 9 s."""


@pytest.fixture(autouse=True)
def _short_timings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(commissioning, "RANDOMISE_SETTLE_S", 0.001)
    monkeypatch.setattr(foxtron, "RESPONSE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(sci2, "RESPONSE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(interface, "AFTER_FAILURE_QUIET_S", 0.1)
    yield


@asynccontextmanager
async def connected(kind: str, line: DaliLine) -> AsyncIterator[DaliInterface]:
    emulator = EMULATORS[kind](line)
    path = await emulator.start()
    try:
        async with load_interface(kind)(path) as iface:
            yield iface
    finally:
        await emulator.stop()


def test_sixty_four_new_gear_are_all_found_and_addressed() -> None:
    async def body() -> None:
        line = DaliLine.random(64, addressed=0, seed=64, time_scale=TIME_SCALE)
        async with connected("foxtron", line) as iface:
            report = await commissioning.commission(iface)
            assert report.problems == []
            assert report.already_addressed == []
            assert len(report.programmed) == 64
            shorts = sorted(g.short_address for g in line.gear if g.short_address is not None)
            assert shorts == list(range(64))
            # Each programmed random address is the gear that got that short address.
            for random_address, short in report.programmed:
                gear = line.by_short_address(short)
                assert gear is not None and gear.random_address == random_address
            assert [g.address for g in await commissioning.scan(iface, banks=False)] == shorts
            assert line.frames_by_command["VerifyShortAddress"] == 64

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


@pytest.mark.parametrize("kind", ["foxtron", "sci2"])
def test_addressed_gear_keep_their_addresses_and_levels(kind: str) -> None:
    async def body() -> None:
        line = DaliLine.random(16, addressed=6, seed=16, time_scale=TIME_SCALE)
        async with connected(kind, line) as iface:
            # A live line: lamps at various levels, one of them fading.
            await iface.send(codec.dapc(codec.Short(2), 100).frame)
            await iface.send(codec.dapc(codec.Short(4), 0).frame)
            await iface.send(codec.dapc(codec.BROADCAST_UNADDRESSED, 180).frame)
            await iface.send(codec.command(codec.BROADCAST, codec.Opcode.QUERY_STATUS).frame)
            before = {id(g): (g.short_address, g.target_level) for g in line.gear}
            addressed_before = {id(g) for g in line.gear if g.short_address is not None}

            report = await commissioning.commission(iface, start_address=3, used={8})
            assert report.problems == []
            assert report.already_addressed == [0, 1, 2, 3, 4, 5]
            new = [short for _, short in report.programmed]
            assert new == [6, 7, 9, 10, 11, 12, 13, 14, 15, 16]  # 8 is reserved by the config
            for gear in line.gear:
                old_short, old_level = before[id(gear)]
                assert gear.target_level == old_level  # nobody's lamp moved
                if id(gear) in addressed_before:
                    assert gear.short_address == old_short
            assert len({g.short_address for g in line.gear}) == 16

            # Nothing left to do: a second run programs nothing and disturbs no one.
            again = await commissioning.commission(iface)
            assert again.programmed == [] and again.problems == []

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


def test_groups_are_applied_and_verified() -> None:
    async def body() -> None:
        line = DaliLine.random(4, addressed=2, seed=4, time_scale=TIME_SCALE, groups={0: [7]})
        async with connected("sci2", line) as iface:
            report = await commissioning.commission(
                iface, groups={0: [1, 2], 1: [3], 2: [1], 40: [1]}
            )
            changes = {c.address: c for c in report.groups}
            assert changes[0].added == (1, 2) and changes[0].removed == (7,)
            assert all(c.verified for c in changes.values())
            assert line.by_short_address(0).groups == {1, 2}  # type: ignore[union-attr]
            assert line.by_short_address(1).groups == {3}  # type: ignore[union-attr]
            # Short address 2 was given by this very run, so its groups were applied too.
            assert line.by_short_address(2).groups == {1}  # type: ignore[union-attr]
            assert report.problems == ["short address 40: no answer, groups not applied"]
            assert line.frames_by_command["AddToGroup"] == 2 * 4  # send twice

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


def test_gear_that_cannot_be_told_apart_are_reported_not_given_one_address() -> None:
    async def body() -> None:
        # Same seed: they draw the same random address on every RANDOMISE.
        twins = [ControlGear(seed=99), ControlGear(seed=99), ControlGear(seed=1)]
        line = DaliLine(twins, time_scale=TIME_SCALE)
        async with connected("foxtron", line) as iface:
            report = await commissioning.commission(iface)
            assert len(report.programmed) == 1
            assert twins[2].short_address == 0
            assert twins[0].short_address is None and twins[1].short_address is None
            assert report.unaddressed_left
            assert any("share random address" in p for p in report.problems)

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


def test_scan_reports_identity_groups_and_level() -> None:
    async def body() -> None:
        line = DaliLine.random(3, seed=3, time_scale=TIME_SCALE, groups={1: [0, 9]})
        line.gear[2].fail_lamp()
        async with connected("foxtron", line) as iface:
            found = await commissioning.scan(iface)
        assert [g.address for g in found] == [0, 1, 2]
        first = found[1]
        assert first.device_types == (codec.DEVICE_TYPE_LED,)
        assert first.groups == {0, 9}
        assert first.level_percent == 100.0
        assert first.gtin == line.gear[1].gtin
        assert first.firmware == "1.4"
        assert first.identification == line.gear[1].identification
        assert first.luminaire["luminaire_gtin"] == line.gear[1].gtin + 1
        assert found[2].level is None  # MASK: the lamp has failed
        table = cli.format_scan(found)
        assert "3 gear with a short address" in table and "0,9" in table

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


# --------------------------------------------------------------------------------------------
# The command line, in a thread (it runs its own event loop) against the emulator on ours
# --------------------------------------------------------------------------------------------


def test_cli_scan_and_commission(capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> None:
        line = DaliLine.random(5, addressed=2, seed=5, time_scale=TIME_SCALE)
        emulator = EMULATORS["sci2"](line)
        path = await emulator.start()
        try:
            target = ["--interface", "sci2", "--device", path]
            assert await asyncio.to_thread(cli.main, ["scan", *target]) == 0
            declined = io.StringIO("n\n")
            assert await asyncio.to_thread(cli.main, ["commission", *target], stdin=declined) == 1
            assert sum(g.short_address is None for g in line.gear) == 3
            agreed = io.StringIO("y\n")
            assert (
                await asyncio.to_thread(
                    cli.main, ["commission", "--start-address", "10", *target], stdin=agreed
                )
                == 0
            )
            assert sorted(g.short_address or 0 for g in line.gear) == [0, 1, 10, 11, 12]
        finally:
            await emulator.stop()

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))
    out = capsys.readouterr().out
    assert "2 gear with a short address" in out
    assert "Nothing done." in out
    assert "-> short address 12" in out


def test_cli_commission_from_config_applies_its_groups(tmp_path: Path) -> None:
    async def body() -> None:
        line = DaliLine.random(3, addressed=0, seed=8, time_scale=TIME_SCALE)
        emulator = EMULATORS["foxtron"](line)
        path = await emulator.start()
        config = write_config(tmp_path, path)
        try:
            code = await asyncio.to_thread(
                cli.main,
                [
                    "commission",
                    "--config",
                    str(config),
                    "--bus",
                    "dali-1",
                    "--apply-groups",
                    "--yes",
                ],
            )
            assert code == 0
            # The new gear take the configured addresses, then get their configured groups.
            assert sorted(g.short_address or 0 for g in line.gear) == [0, 1, 2]
            assert line.by_short_address(0).groups == {1}  # type: ignore[union-attr]
            assert line.by_short_address(1).groups == set()  # type: ignore[union-attr]
            assert line.by_short_address(2).groups == {5}  # type: ignore[union-attr]
        finally:
            await emulator.stop()

    asyncio.run(asyncio.wait_for(body(), TEST_BOUND_S))


def test_cli_refuses_a_bus_of_another_driver(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "/dev/null")
    assert cli.main(["scan", "--config", str(config), "--bus", "rs485"]) == 2
    assert "uses the 'modbus' driver, not DALI" in capsys.readouterr().err
    assert cli.main(["scan", "--interface", "acme", "--device", "/dev/x"]) == 2
    assert "no DALI interface named 'acme'" in capsys.readouterr().err
    assert cli.main(["commission", "--interface", "sci2", "--device", "x", "--apply-groups"]) == 2
    assert "--apply-groups needs --config" in capsys.readouterr().err


def write_config(directory: Path, device: str) -> Path:
    profiles = Path(__file__).resolve().parent.parent / "config" / "profiles"
    path = directory / "gateway.toml"
    path.write_text(
        f"""
[gateway]
id = "cab-1"
profile_dirs = ["{profiles}"]

[hub]
host = "127.0.0.1"

[buffer]
path = "buffer.db"

[buses.dali-1]
driver = "dali"
interface = "foxtron"
device = "{device}"

[buses.rs485]
driver = "modbus"
transport = "rtu"
device = "/dev/null"

[devices.lamp-a]
bus = "dali-1"
profile = "dali-d4i-led"
address = 0
groups = [1]

[devices.lamp-b]
bus = "dali-1"
profile = "dali-d4i-led"
address = 1

[devices.lamp-c]
bus = "dali-1"
profile = "dali-d4i-led"
address = 2
groups = [5]
"""
    )
    return path
