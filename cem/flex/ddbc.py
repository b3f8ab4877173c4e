"""DDBC (demand driven based control) -> one ModeAsset per actuator; plan -> DDBC.Instruction.

A DDBC device must supply a demand (e.g. heat demand, air flow) chosen by its environment; the
CEM chooses which operation mode supplies it. For each actuator each normal operation mode
becomes a PowerMode whose minimum is the power needed to meet the demand (supply and power
both map linearly from operation_mode_factor 0..1) and whose maximum is the mode's full power.
Modes that cannot meet the demand are left out (all are kept when none can). The demand is the
forecast's expected rate for PTU 0, else the middle of `present_demand_rate`; with several
actuators each takes an equal share. The demand then stays fixed over the horizon (replanning
every PTU updates it); `abnormal_condition_only` modes are never used.
"""

from __future__ import annotations

import math
from datetime import datetime

from s2python.ddbc import (
    DDBCActuatorStatus,
    DDBCAverageDemandRateForecast,
    DDBCInstruction,
    DDBCSystemDescription,
    DDBCTimerStatus,
)

from cem.flex.modes import ModeRange, TransitionRules
from cem.flex.ombc import ModeBinding, power_mode_range
from cem.flex.ptu import PtuGrid, as_uuid, new_schema_id, new_uuid, phase_share, sid
from cem.planner.assets import ModeAsset, PowerMode

CONTROL_TYPE = "DEMAND_DRIVEN_BASED_CONTROL"


def _supply(mode: object) -> tuple[float, float]:
    supply = mode.supply_range  # type: ignore[attr-defined]
    ranges = supply if isinstance(supply, list) else [supply]
    return min(r.start_of_range for r in ranges), max(r.end_of_range for r in ranges)


def _mode_id(mode: object) -> str:
    return sid(getattr(mode, "id", None) or getattr(mode, "Id", ""))


class DdbcBinding(ModeBinding):
    """A ModeBinding that sends DDBC.Instructions for one actuator."""

    def make(self, mode_id: str, factor: float, when: datetime) -> object:
        return DDBCInstruction(message_id=new_uuid(), id=new_schema_id(), execution_time=when,
                               actuator_id=as_uuid(self.actuator_id),
                               operation_mode_id=as_uuid(mode_id),
                               operation_mode_factor=round(factor, 4), abnormal_condition=False)


def demand_rate(system_description: DDBCSystemDescription,
                forecast: DDBCAverageDemandRateForecast | None, now: datetime) -> float:
    """The demand the device must supply now."""
    if forecast is not None and forecast.elements:
        moment = forecast.start_time
        for element in forecast.elements:
            end = moment + element.duration.to_timedelta()
            if moment <= now < end:
                return float(element.demand_rate_expected)
            moment = end
    present = system_description.present_demand_rate
    return (present.start_of_range + present.end_of_range) / 2


def ddbc_mode_assets(rm_id: str, system_description: DDBCSystemDescription, grid: PtuGrid,
                     now: datetime, *, forecast: DDBCAverageDemandRateForecast | None = None,
                     statuses: dict[str, DDBCActuatorStatus] | None = None,
                     timer_statuses: list[DDBCTimerStatus] | None = None,
                     priority: int = 1) -> list[tuple[ModeAsset, DdbcBinding]]:
    """One (ModeAsset, binding) per actuator; asset ids are `<rm_id>/<actuator_id>`."""
    actuators = list(system_description.actuators)
    demand = demand_rate(system_description, forecast, now) / max(1, len(actuators))
    out = []
    for actuator in actuators:
        modes = [m for m in actuator.operation_modes if not m.abnormal_condition_only]
        ranges: list[ModeRange] = []
        meeting: list[ModeRange] = []
        for mode in modes:
            full = power_mode_range(_mode_id(mode), list(mode.power_ranges))
            s0, s1 = _supply(mode)
            ranges.append(full)
            if s1 + 1e-9 >= demand:
                factor = 0.0 if s1 == s0 else min(1.0, max(0.0, (demand - s0) / (s1 - s0)))
                meeting.append(ModeRange(full.mode_id, full.power_start, full.power_end,
                                         0.0, 0.0, floor_w=full.power_at(factor)))
        usable = meeting or ranges
        asset_id = f"{rm_id}/{sid(actuator.id)}"
        share = phase_share((r.commodity_quantity, abs(r.end_of_range))
                            for m in modes for r in m.power_ranges)
        status = (statuses or {}).get(sid(actuator.id))
        active = sid(status.active_operation_mode_id) if status is not None else None
        asset = ModeAsset(
            id=asset_id,
            modes=[PowerMode(id=r.mode_id, min_w=math.ceil(r.lo), max_w=math.floor(r.hi))
                   for r in usable],
            current_mode=active if active in {r.mode_id for r in usable} else None,
            phase_share=share,
        )
        finished = {sid(t.timer_id): t.finished_at for t in timer_statuses or []
                    if sid(t.actuator_id) == sid(actuator.id)}
        rules = TransitionRules.of(list(actuator.transitions), list(actuator.timers), finished)
        binding = DdbcBinding(rm_id=rm_id, asset_id=asset_id, ranges=usable, active_mode=active,
                              priority=priority, phase_share=share, control_type=CONTROL_TYPE,
                              actuator_id=sid(actuator.id), rules=rules)
        out.append((asset, binding))
    return out
