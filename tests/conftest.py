"""Shared fixtures: a real Mosquitto per test, and a guard against badly formatted log calls."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import MosquittoBroker

# The mock BlueZ on a private D-Bus system bus: fixtures `bluez` and `bluez_factory`.
pytest_plugins = ["tests.support.bluez"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A Mosquitto started on a free loopback port in this test's tmp_path, stopped afterwards."""
    instance = MosquittoBroker(tmp_path / "mosquitto")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


class _FormatCheckHandler(logging.Handler):
    """Formats every record: a log call whose arguments do not fit its format string would
    otherwise only surface as a stderr traceback when that level is enabled in the field."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.getMessage()
        except Exception as exc:
            self.failures.append(
                f"{record.pathname}:{record.lineno}: {record.msg!r} % {record.args!r}: "
                f"{type(exc).__name__}: {exc}"
            )

    def handleError(self, record: logging.LogRecord) -> None:
        # Failures are collected in emit(); nothing else here writes anywhere.
        return


@pytest.fixture(scope="session", autouse=True)
def _log_format_handler() -> Iterator[_FormatCheckHandler]:
    root = logging.getLogger()
    handler = _FormatCheckHandler()
    previous_level = root.level
    # DEBUG so that every call site, even debug ones, has its arguments checked.
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


@pytest.fixture(autouse=True)
def _fail_on_bad_log_format(_log_format_handler: _FormatCheckHandler) -> Iterator[None]:
    _log_format_handler.failures.clear()
    yield
    failures = list(_log_format_handler.failures)
    _log_format_handler.failures.clear()
    if failures:
        pytest.fail("badly formatted log call(s):\n" + "\n".join(failures), pytrace=False)
