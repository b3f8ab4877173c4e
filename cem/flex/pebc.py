"""PEBC (power envelope based control) -> PV, a fixed load, energy windows; plan -> PEBC.Instruction.

The RM's expected power (PowerForecast, else the last measurement) is the baseline. A producer
(baseline <= 0, e.g. PV) becomes a `Curtailable` when its PowerConstraints allow a LOWER_LIMIT
the CEM may raise; the plan's curtailment is sent back as a lower limit of -(allowed
production) per PTU, clamped to the allowed ranges. A consumer becomes a `FixedLoad` (the planner
cannot move it), and its envelope is left wide open, except when the guard caps its UPPER_LIMIT.

Energy constraints (PEBC.EnergyConstraint: the average power between `valid_from` and
`valid_until` lies in [lower, upper]) of a consumer are planned: each window becomes a
charge-only `StorageAsset` ("level" = energy consumed in the window, target = lower x duration,
level_max = upper x duration, power 0..the highest UPPER_LIMIT allowed) that replaces the
baseline inside the window, so the planner moves the energy to cheap PTUs within the site
limits. The instruction pins the envelope to the planned power in those PTUs (UPPER_LIMIT, and
LOWER_LIMIT where the allowed ranges let it rise), so the RM can, and need only, consume the
planned energy. Windows are taken in whole PTUs (ends rounded to the nearest PTU boundary; the
current PTU counts whole, as everywhere in the planner) and clipped to the horizon. S2 tells the
CEM nothing of what was consumed in a window so far, so the part of a window still ahead is held
to the same average. Energy constraints with a negative bound (production) are not planned:
they are passed over with a note.

Limits per commodity quantity: an envelope is sent for every electric quantity the constraints
name; a limit on the total is split over them by the asset's phase share.
`abnormal_condition_only` limit ranges are never used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from s2python.common import CommodityQuantity, Duration, NumberRange
from s2python.pebc import (
    PEBCEnergyConstraint,
    PEBCInstruction,
    PEBCPowerConstraints,
    PEBCPowerEnvelope,
    PEBCPowerEnvelopeElement,
    PEBCPowerEnvelopeLimitType,
)

from cem.flex.not_controlable import forecast_power_w
from cem.flex.ptu import PtuGrid, as_uuid, is_electric, new_schema_id, new_uuid
from cem.planner.assets import Curtailable, FixedLoad, PhaseShare, Plan, Problem, StorageAsset
from cem.planner.layout import STEP_FLOOR_W

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
    windows: list[tuple[str, int, int]] = field(default_factory=list)  # energy asset, PTUs [a, b)
    max_w: float = 0.0  # highest total power the UPPER_LIMIT ranges allow

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
            envelopes.append(PEBCPowerEnvelope(id=new_schema_id(),
                                               commodity_quantity=CommodityQuantity(quantity),
                                               power_envelope_elements=elements[:MAX_ELEMENTS]))
        return envelopes

    def _instruction(self, envelopes: list[PEBCPowerEnvelope], now: datetime) -> PEBCInstruction:
        return PEBCInstruction(message_id=new_uuid(), id=new_uuid(), execution_time=now,
                               abnormal_condition=False,
                               power_constraints_id=as_uuid(self.constraints.id),
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
        for asset_id, first, last in self.windows:  # energy windows: the planned power
            planned = plan.power_w.get(asset_id)
            if planned is None:
                continue
            for t in range(first, min(last, n)):
                lower[t] = upper[t] = float(planned[t])
        return [self._instruction(self._envelopes(lower, upper, durations), now)]

    def capped_instructions(self, cap_w: float, now: datetime) -> list[PEBCInstruction] | None:
        """An envelope with UPPER_LIMIT at `cap_w` for the next hour (consumers only)."""
        if self.producer:
            return None
        duration = round(timedelta(hours=1).total_seconds() * 1000)
        return [self._instruction(self._envelopes([-1e9], [cap_w], [duration]), now)]

    def can_cap(self) -> bool:
        """Consumers only: a producer's envelope is its curtailment."""
        return not self.producer

    def power_range_w(self) -> tuple[float, float]:
        now_w = float(self.baseline_w[0]) if len(self.baseline_w) else 0.0
        if self.windows:
            return (min(now_w, 0.0), max(now_w, self.max_w))
        return (min(now_w, 0.0), max(now_w, 0.0))

    def upper_max_w(self) -> float:
        """The highest total power the normal UPPER_LIMIT ranges allow (0: none allowed)."""
        totals = []
        for quantity in self.quantities:
            hi = _bounds(self.constraints, PEBCPowerEnvelopeLimitType.UPPER_LIMIT, quantity)
            share = self._quantity_share(quantity)
            if hi is not None and share > 0:
                totals.append(hi.end_of_range / share)
        return max(min(totals), 0.0) if totals else 0.0


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


def _window_ptus(grid: PtuGrid, now: datetime, constraint: PEBCEnergyConstraint) -> tuple[int, int]:
    """PTUs [a, b) of the part of an energy window still ahead, ends at the nearest boundary."""
    def nearest(moment: datetime) -> int:
        return round((moment - grid.start).total_seconds() / grid.ptu_s)

    first = 0 if constraint.valid_from <= now else nearest(constraint.valid_from)
    return max(first, 0), min(nearest(constraint.valid_until), grid.n_ptus)


def pebc_assets(rm_id: str, grid: PtuGrid, now: datetime, *,
                constraints: PEBCPowerConstraints | None,
                energy_constraints: list[PEBCEnergyConstraint] | None = None,
                forecast: Any = None, measurement: Any = None, priority: int = 0
                ) -> tuple[list[Curtailable | FixedLoad | StorageAsset], PebcBinding | None,
                           list[str]]:
    """`pebc_asset`, plus one StorageAsset per energy window of a consumer (see the module
    docstring); the binding then pins the envelope to the plan in those windows."""
    asset, binding, notes = pebc_asset(rm_id, grid, now, constraints=constraints,
                                       forecast=forecast, measurement=measurement,
                                       priority=priority)
    pending = [c for c in energy_constraints or [] if c.valid_until > now
               and c.valid_from < grid.end and is_electric(c.commodity_quantity)]
    if not pending:
        return [asset], binding, notes
    if binding is None or binding.producer or not isinstance(asset, FixedLoad):
        notes.append(f"{rm_id}: PEBC energy constraints of a producer or without power "
                     "constraints in force are not planned")
        return [asset], binding, notes
    binding.max_w = binding.upper_max_w()
    baseline = asset.power_w.copy()
    windows: list[StorageAsset] = []
    dt_h = grid.ptu_minutes / 60
    end = 0
    for constraint in sorted(pending, key=lambda c: c.valid_from):
        lower, upper = constraint.lower_average_power, constraint.upper_average_power
        if lower < 0 or upper < lower:
            notes.append(f"{rm_id}: PEBC energy constraint {constraint.id} "
                         f"({lower:.0f}..{upper:.0f} W) is not planned (production or no range)")
            continue
        first, last = _window_ptus(grid, now, constraint)
        if first < end:
            notes.append(f"{rm_id}: PEBC energy constraint {constraint.id} overlaps an earlier "
                         "one; not planned")
            continue
        if last <= first:
            continue
        hours = (last - first) * dt_h
        top = math.floor(upper * hours)
        # aim one planner power step (10 W for a PTU) above the lower energy: the plan's powers
        # are rounded to that step and must not land below it
        need = math.ceil(lower * hours)
        target = min(need + math.ceil(STEP_FLOOR_W * dt_h), top) if need > 0 else None
        window = StorageAsset(
            id=f"{rm_id}/energy-{len(windows)}", kind="storage",
            charge_max_w=math.floor(binding.max_w), level_wh=0, level_max_wh=top,
            target_wh=target,
            available_from=first, available_until=last, priority=max(priority, 1),
            phase_share=binding.phase_share)
        windows.append(window)
        binding.windows.append((window.id, first, last))
        baseline[first:last] = 0
        end = last
    if not windows:
        return [asset], binding, notes
    asset.power_w = baseline
    return [asset, *windows], binding, notes
