"""Reconnection delays shared by the bus workers and the uplink."""

from __future__ import annotations

import random

_rng = random.Random()  # noqa: S311 - timing jitter, not cryptography


def backoff_delay_s(
    attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base·2^attempt)].

    Full jitter spreads the reconnections of a whole street's gateways after a power or network
    restoration instead of having them hit the hub (or a shared serial gateway) in waves.
    """
    ceiling = cap_s if attempt >= 64 else min(cap_s, base_s * (2**attempt))
    return (rng or _rng).uniform(0.0, ceiling)
