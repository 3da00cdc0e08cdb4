"""Command parsing: every malformed command is rejected with a reason, never an exception."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.commands import MAX_COMMAND_BYTES, Rejected, Target, parse_command

NOW = 1_800_000_000_000


def command(**overrides: Any) -> bytes:
    document: dict[str, Any] = {
        "id": "c-1",
        "action": "dim",
        "target": {"device": "lamp-1"},
        "level": 40,
        "expires": NOW + 60_000,
    }
    document.update(overrides)
    document = {k: v for k, v in document.items() if v is not ...}
    return json.dumps(document).encode()


def test_valid_dim_command() -> None:
    parsed = parse_command(command(), NOW)
    assert parsed.id == "c-1"
    assert parsed.action == "dim"
    assert parsed.target == Target(device="lamp-1")
    assert parsed.level == 40.0


def test_switch_maps_to_full_and_zero() -> None:
    on = parse_command(command(action="switch", level=..., state="on"), NOW)
    off = parse_command(command(action="switch", level=..., state="off"), NOW)
    assert (on.level, off.level) == (100.0, 0.0)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (b"\xff\xfe", "malformed"),
        (command(id=...), "invalid_id"),
        (command(id=""), "invalid_id"),
        (command(id="a b"), "invalid_id"),
        (command(action="explode"), "unknown_action"),
        (command(level=101), "invalid_level"),
        (command(level=-1), "invalid_level"),
        (command(level="40"), "invalid_level"),
        (command(level=True), "invalid_level"),
        (command(expires=NOW - 1), "expired"),
        (command(expires=...), "malformed"),
        (command(expires=NOW + 10**12), "malformed"),
        (command(target={"device": "a", "group": "b"}), "invalid_target"),
        (command(target={"all": False}), "invalid_target"),
        (command(target="lamp-1"), "invalid_target"),
        (command(extra=1), "malformed"),
        (command(action="switch", level=..., state="dim"), "invalid_state"),
        (b"{" + b" " * MAX_COMMAND_BYTES + b"}", "too_large"),
    ],
)
def test_rejections_name_their_reason(payload: bytes, code: str) -> None:
    with pytest.raises(Rejected) as caught:
        parse_command(payload, NOW)
    assert caught.value.code == code
    assert caught.value.reason


def test_rejection_keeps_the_id_when_it_was_readable() -> None:
    with pytest.raises(Rejected) as caught:
        parse_command(command(id="keep-me", level=500), NOW)
    assert caught.value.command_id == "keep-me"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_rejected_or_parsed(payload: bytes) -> None:
    try:
        parse_command(payload, NOW)
    except Rejected as rejection:
        assert rejection.reason


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "action", "target", "level", "state", "expires", "x"]),
        json_values,
    )
)
def test_arbitrary_documents_are_rejected_or_valid(document: dict[str, Any]) -> None:
    try:
        parsed = parse_command(json.dumps(document).encode(), NOW)
    except Rejected as rejection:
        assert rejection.code
        return
    # Whatever got through satisfies every rule.
    assert 0 <= parsed.level <= 100
    assert parsed.expires_ms > NOW
    assert parsed.action in ("dim", "switch")


def test_fade_is_optional_bounded_and_only_for_dim() -> None:
    assert parse_command(command(fade_s=2.5), NOW).fade_s == 2.5
    assert parse_command(command(), NOW).fade_s is None
    for bad in (-1, 91, "2", True):
        with pytest.raises(Rejected) as caught:
            parse_command(command(fade_s=bad), NOW)
        assert caught.value.code == "invalid_level"
    with pytest.raises(Rejected) as caught:
        parse_command(command(action="switch", level=..., state="on", fade_s=1), NOW)
    assert caught.value.code == "malformed"
