"""The fast guard: between plans, keep the fuse and the import limit safe on every measurement.

`decide_caps` is the whole decision, as a pure function: given the grid power per phase now,
the limits now and the flexible loads (with priority and present power), it acts when a phase
reaches the fuse or the import reaches its limit (GTV or congestion window), and returns the
new power caps that bring every phase below `guard_margin` x fuse and the total import below
`guard_margin` x the import limit, so the site has headroom until the replan. It does not act
between the margin and the limit: plans use the limits to the full on purpose, and a guard that
fought them would churn instructions on every measurement. Loads are shed lowest priority
first; within one priority those that can best wait first (no deadline, then the most slack
to their target), then the largest; a load that would end below its minimum power
(an EV's 6 A) is switched off instead.
The control loop sends the caps as instructions at once and asks for a replan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from s2python.common import CommodityQuantity

from cem.planner.assets import PhaseShare

PHASE_INDEX = {
    CommodityQuantity.ELECTRIC_POWER_L1: 0,
    CommodityQuantity.ELECTRIC_POWER_L2: 1,
    CommodityQuantity.ELECTRIC_POWER_L3: 2,
}


@dataclass(frozen=True)
class GuardLimits:
    """The limits the guard protects right now."""

    fuse_w_per_phase: float  # fuse A x voltage
    import_limit_w: float  # GTV or the congestion window in force
    margin: float = 0.95  # shed down to this share of the limits
    trigger: float = 1.0  # act when a limit reaches this share


@dataclass
class FlexibleLoad:
    """A load the guard may turn down: its present power and how low it may go."""

    asset_id: str
    rm_id: str
    power_w: float  # consumption now (>= 0 to be of use)
    priority: int = 1
    min_w: float = 0.0  # below this it must be off (e.g. 6 A)
    phase_share: PhaseShare = (1 / 3, 1 / 3, 1 / 3)
    # hours it could still wait and reach its target at full power (inf: no deadline)
    slack_h: float = math.inf


@dataclass
class GuardDecision:
    """New caps per asset (W) and the plain-words reason; empty caps: nothing to do."""

    caps: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    excess_w: float = 0.0  # what could not be shed (the site is over its limit regardless)

    @property
    def acts(self) -> bool:
        return bool(self.caps)


def decide_caps(phase_w: tuple[float, float, float], limits: GuardLimits,
                loads: Iterable[FlexibleLoad]) -> GuardDecision:
    """Caps that bring the grid power within margin x limits, shedding by priority."""
    phase_limit = limits.fuse_w_per_phase * limits.margin
    total_limit = limits.import_limit_w * limits.margin
    fuse_trigger = limits.fuse_w_per_phase * limits.trigger
    import_trigger = limits.import_limit_w * limits.trigger
    if all(w <= fuse_trigger for w in phase_w) and sum(phase_w) <= import_trigger:
        return GuardDecision()
    over_phase = [max(0.0, w - phase_limit) for w in phase_w]
    over_total = max(0.0, sum(phase_w) - total_limit)
    reasons = []
    for p, excess in enumerate(over_phase):
        if excess > 0:
            reasons.append(f"L{p + 1} at {phase_w[p] / (phase_limit / limits.margin) * 100:.0f}% "
                           f"of the fuse")
    if over_total > 0:
        reasons.append(f"import {sum(phase_w) / 1000:.1f} kW above {limits.margin:.0%} of the "
                       f"{limits.import_limit_w / 1000:.1f} kW limit")
    candidates = sorted((x for x in loads if x.power_w > 0),
                        key=lambda x: (x.priority, -x.slack_h, -x.power_w))
    caps: dict[str, float] = {}
    for load in candidates:
        if not any(e > 1e-6 for e in over_phase) and over_total <= 1e-6:
            break
        # how much of this load must go to clear the total and every phase it sits on
        need = over_total
        for p in range(3):
            if over_phase[p] > 1e-6 and load.phase_share[p] > 0:
                need = max(need, over_phase[p] / load.phase_share[p])
        if need <= 0:
            continue
        new_w = load.power_w - need
        if new_w < load.min_w:
            new_w = 0.0
        new_w = max(0.0, new_w)
        shed = load.power_w - new_w
        caps[load.asset_id] = new_w
        over_total = max(0.0, over_total - shed)
        for p in range(3):
            over_phase[p] = max(0.0, over_phase[p] - shed * load.phase_share[p])
    remaining = max([over_total, *over_phase])
    return GuardDecision(caps=caps, reason="; ".join(reasons), excess_w=remaining)


def phase_power_w(measured: Mapping[Any, Any]) -> tuple[float, float, float] | None:
    """Per-phase power from an RM's latest measurements (L1/L2/L3, or 3-phase symmetric / 3)."""
    phases = [0.0, 0.0, 0.0]
    found = False
    for quantity, value in measured.items():
        watts = float(getattr(value, "value_w", value))
        key = quantity if type(quantity) is CommodityQuantity \
            else CommodityQuantity(getattr(quantity, "value", quantity))   # (a value, a name)
        index = PHASE_INDEX.get(key)
        if index is not None:
            phases[index] += watts
            found = True
        elif key is CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC:
            for p in range(3):
                phases[p] += watts / 3
            found = True
    return (phases[0], phases[1], phases[2]) if found else None
