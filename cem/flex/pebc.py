"""PEBC (power envelope based control) -> Curtailable PV or a FixedLoad; plan -> PEBC.Instruction.

The RM's expected power (PowerForecast, else the last measurement) is the baseline. A producer
(baseline <= 0, e.g. PV) becomes a `Curtailable` when its PowerConstraints allow a LOWER_LIMIT
the CEM may raise; the plan's curtailment is sent back as a lower limit of -(allowed
production) per PTU, clamped to the allowed ranges. A consumer becomes a `FixedLoad` (the planner
cannot move it), and its envelope is left wide open, except when the guard caps its UPPER_LIMIT.

Limits per commodity quantity: an envelope is sent for every electric quantity the constraints
name; a limit on the total is split over them by the asset's phase share. Energy constraints
(average power over a window) are not planned yet: they are passed over with a note.
`abnormal_condition_only` limit ranges are never used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from s2python.common import Duration, NumberRange
from s2python.pebc import (
    PEBCInstruction,
    PEBCPowerConstraints,
    PEBCPowerEnvelope,
    PEBCPowerEnvelopeElement,
    PEBCPowerEnvelopeLimitType,
)

from cem.flex.not_controlable import forecast_power_w
from cem.flex.ptu import PtuGrid, is_electric, new_id, sid
from cem.planner.assets import Curtailable, FixedLoad, PhaseShare, Plan, Problem

CONTROL_TYPE = "POWER_ENVELOPE_BASED_CONTROL"
MAX_ELEMENTS = 288


def _bounds(constraints: PEBCPowerConstraints, limit_type: PEBCPowerEnvelopeLimitType,
            quantity: str) -> NumberRange | None:
    """Union of the normal allowed ranges for one limit type and quantity (None: none)."""
    ranges = [r.range_boundary for r in constraints.allowed_limit_ranges
              if r.limit_type == limit_type and str(r.commodity_quantity.value) == quantity
              and not r.abnormal_condition_only]
    if not ranges:
        return None
    return NumberRange(start_of_range=min(r.start_of_range for r in ranges),
                       end_of_range=max(r.end_of_range for r in ranges))


def _clamp(value: float, bounds: NumberRange | None) -> float:
    if bounds is None:
        return value
    return min(max(value, bounds.start_of_range), bounds.end_of_range)


@dataclass
class PebcBinding:
    """Ties a PEBC RM's asset to its power constraints; builds PEBC.Instructions."""

    rm_id: str
    asset_id: str
    constraints: PEBCPowerConstraints
    producer: bool
    baseline_w: np.ndarray
    priority: int = 0
    phase_share: PhaseShare = (1 / 3, 1 / 3, 1 / 3)
    control_type: str = CONTROL_TYPE
    quantities: list[str] = field(default_factory=list)

    def _quantity_share(self, quantity: str) -> float:
        index = {"ELECTRIC.POWER.L1": 0, "ELECTRIC.POWER.L2": 1, "ELECTRIC.POWER.L3": 2}
        if len(self.quantities) == 1:
            return 1.0
        if quantity in index:
            return self.phase_share[index[quantity]]
        return 1.0 / len(self.quantities)

    def _envelopes(self, lower_total: list[float], upper_total: list[float],
                   durations_ms: list[int]) -> list[PEBCPowerEnvelope]:
        envelopes = []
        for quantity in self.quantities:
            share = self._quantity_share(quantity)
            lo_b = _bounds(self.constraints, PEBCPowerEnvelopeLimitType.LOWER_LIMIT, quantity)
            hi_b = _bounds(self.constraints, PEBCPowerEnvelopeLimitType.UPPER_LIMIT, quantity)
            elements: list[PEBCPowerEnvelopeElement] = []
            for lower, upper, duration in zip(lower_total, upper_total, durations_ms, strict=True):
                lo = _clamp(lower * share, lo_b)
                hi = _clamp(upper * share, hi_b)
                hi = max(hi, lo)
                if elements and elements[-1].lower_limit == lo and elements[-1].upper_limit == hi:
                    elements[-1].duration = Duration(root=elements[-1].duration.root + duration)
                    continue
                elements.append(PEBCPowerEnvelopeElement(duration=Duration(root=duration),
                                                         lower_limit=lo, upper_limit=hi))
            envelopes.append(PEBCPowerEnvelope(id=new_id(), commodity_quantity=quantity,
                                               power_envelope_elements=elements[:MAX_ELEMENTS]))
        return envelopes

    def _instruction(self, envelopes: list[PEBCPowerEnvelope], now: datetime) -> PEBCInstruction:
        return PEBCInstruction(message_id=new_id(), id=new_id(), execution_time=now,
                               abnormal_condition=False,
                               power_constraints_id=sid(self.constraints.id),
                               power_envelopes=envelopes)

    def instructions(self, plan: Plan, problem: Problem, now: datetime,
                     until_ptu: int) -> list[PEBCInstruction]:
        """One PEBC.Instruction whose envelope follows the plan for PTUs [0, until)."""
        n = max(1, min(until_ptu, problem.n_ptus))
        durations = []
        for t in range(n):
            begin = now if t == 0 else max(now, problem.ptu_start(t))
            end = problem.ptu_start(t + 1)
            durations.append(max(1, round((end - begin).total_seconds() * 1000)))
        wide = 1e9
        if self.producer:
            production = -np.minimum(self.baseline_w[:n], 0)
            curtailed = plan.curtailed_w.get(self.asset_id)
            if curtailed is not None:
                production = np.maximum(production - np.asarray(curtailed[:n]), 0)
            lower = [-float(p) if curtailed is not None else -wide for p in production]
        else:
            lower = [-wide] * n
        upper = [wide] * n
        return [self._instruction(self._envelopes(lower, upper, durations), now)]

    def capped_instructions(self, cap_w: float, now: datetime) -> list[PEBCInstruction] | None:
        """An envelope with UPPER_LIMIT at `cap_w` for the next hour (consumers only)."""
        if self.producer:
            return None
        duration = round(timedelta(hours=1).total_seconds() * 1000)
        return [self._instruction(self._envelopes([-1e9], [cap_w], [duration]), now)]

    def power_range_w(self) -> tuple[float, float]:
        now_w = float(self.baseline_w[0]) if len(self.baseline_w) else 0.0
        return (min(now_w, 0.0), max(now_w, 0.0))


def pebc_asset(rm_id: str, grid: PtuGrid, now: datetime, *,
               constraints: PEBCPowerConstraints | None,
               forecast: Any = None, measurement: Any = None,
               priority: int = 0) -> tuple[Curtailable | FixedLoad, PebcBinding | None, list[str]]:
    """The planner's view of a PEBC RM, its binding (None without constraints) and notes."""
    baseline, share = forecast_power_w(grid, forecast, measurement)
    notes: list[str] = []
    producer = bool(baseline.sum() <= 0 and baseline.any())
    if constraints is None:
        notes.append(f"{rm_id}: PEBC without power constraints in force; planned as fixed")
        return (FixedLoad(id=rm_id, power_w=np.round(baseline).astype(np.int64),
                          phase_share=share), None, notes)
    quantities = sorted({str(r.commodity_quantity.value) for r in constraints.allowed_limit_ranges
                         if is_electric(r.commodity_quantity)})
    binding = PebcBinding(rm_id=rm_id, asset_id=rm_id, constraints=constraints,
                          producer=producer, baseline_w=baseline, priority=priority,
                          phase_share=share, quantities=quantities)
    can_curtail = any(r.limit_type == PEBCPowerEnvelopeLimitType.LOWER_LIMIT
                      and not r.abnormal_condition_only for r in constraints.allowed_limit_ranges)
    if producer:
        asset: Curtailable | FixedLoad = Curtailable(
            id=rm_id, production_w=np.round(-np.minimum(baseline, 0)).astype(np.int64),
            curtailable=can_curtail, phase_share=share)
    else:
        asset = FixedLoad(id=rm_id, power_w=np.round(baseline).astype(np.int64), phase_share=share)
    return asset, binding, notes
