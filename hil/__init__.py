"""Lampyre's hardware-in-the-loop bench runner: the same scenarios against the simulators (CI)
and against real equipment on a bench. ``python -m hil --help``; see ``hil/README.md``."""

from hil.hub import ControlPost, HubMessage, HubTimeout, Protection
from hil.keys import BenchKeyError, BenchKeys, load_bench_keys
from hil.runner import Report, SetupError, run_hil
from hil.scenarios import SCENARIOS, Scenario, ScenarioContext, ScenarioResult, Status
from hil.targets import (
    BenchTarget,
    Fault,
    FaultInjectionUnsupported,
    SimulatedTarget,
    Target,
    TargetError,
)

__all__ = [
    "SCENARIOS",
    "BenchKeyError",
    "BenchKeys",
    "BenchTarget",
    "ControlPost",
    "Fault",
    "FaultInjectionUnsupported",
    "HubMessage",
    "HubTimeout",
    "Protection",
    "Report",
    "Scenario",
    "ScenarioContext",
    "ScenarioResult",
    "SetupError",
    "SimulatedTarget",
    "Status",
    "Target",
    "TargetError",
    "load_bench_keys",
    "run_hil",
]
