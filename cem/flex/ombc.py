"""OMBC (operation mode based control) -> ModeAsset; the plan's modes -> OMBC.Instruction.

Each normal operation mode (never `abnormal_condition_only` ones) becomes a PowerMode with its
electric power range summed over the phases. A minimum on-time comes from the timers: a timer
started by a transition into a mode and blocking the transitions out of it keeps the device
in that mode at least that long. The plan gives a mode (and power) per PTU; an instruction is
sent for every change of mode or factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from s2python.ombc import (
    OMBCInstruction,
    OMBCOperationMode,
    OMBCStatus,
    OMBCSystemDescription,
    OMBCTimerStatus,
)

from cem.flex.modes import ModeRange, TransitionRules, legal_choice, pick_mode
from cem.flex.ptu import PtuGrid, as_uuid, is_electric, new_uuid, phase_share, sid
from cem.planner.assets import ModeAsset, PhaseShare, Plan, PowerMode, Problem

CONTROL_TYPE = "OPERATION_MODE_BASED_CONTROL"


def power_mode_range(mode_id: str, power_ranges: list) -> ModeRange:
    electric = [r for r in power_ranges if is_electric(r.commodity_quantity)]
    return ModeRange(mode_id=mode_id,
                     power_start=sum(r.start_of_range for r in electric),
                     power_end=sum(r.end_of_range for r in electric),
                     fill_rate_start=0.0, fill_rate_end=0.0)


def min_on_ptus(transitions: list, timers: list, grid: PtuGrid) -> int:
    """Longest timer that a transition into a mode starts and the way out of it waits for."""
    durations = {sid(t.id): t.duration.root for t in timers}
    longest_ms = 0
    for into in transitions:
        for timer in into.start_timers:
            out_blocked = any(sid(out.from_) == sid(into.to) and sid(timer) in
                              {sid(b) for b in out.blocking_timers} for out in transitions)
            if out_blocked:
                longest_ms = max(longest_ms, durations.get(sid(timer), 0))
    return math.ceil(longest_ms / 1000 / grid.ptu_s) if longest_ms else 0


@dataclass
class ModeBinding:
    """Ties a ModeAsset to its RM's modes; shared by OMBC (one per RM) and DDBC (per actuator)."""

    rm_id: str
    asset_id: str
    ranges: list[ModeRange]
    active_mode: str | None
    priority: int = 1
    phase_share: PhaseShare = (1 / 3, 1 / 3, 1 / 3)
    control_type: str = CONTROL_TYPE
    actuator_id: str | None = None
    rules: TransitionRules | None = None

    def choose(self, mode_id: str | None, power_w: float) -> tuple[ModeRange, float]:
        by_id = {r.mode_id: r for r in self.ranges}
        if mode_id is not None and mode_id in by_id:
            chosen = by_id[mode_id]
            return chosen, chosen.factor_for(min(max(power_w, chosen.lo), chosen.hi))
        return pick_mode(self.ranges, power_w, self.active_mode)

    def make(self, mode_id: str, factor: float, when: datetime) -> object:
        return OMBCInstruction(message_id=new_uuid(), id=new_uuid(), execution_time=when,
                               operation_mode_id=as_uuid(mode_id),
                               operation_mode_factor=round(factor, 4), abnormal_condition=False)

    def _legal(self, mode_id: str | None, power_w: float, last_mode: str | None,
               rules: TransitionRules | None, when: datetime,
               next_change: datetime | None) -> tuple[ModeRange, float, datetime] | None:
        """The planned mode if the RM allows the move (else the best reachable one), and when."""
        chosen, factor = self.choose(mode_id, power_w)
        if rules is None or rules.allowed(last_mode, chosen.mode_id):
            moment = when if rules is None else rules.free_at(last_mode, chosen.mode_id, when)
            if next_change is not None and moment >= next_change:
                return None
            if rules is not None:
                rules.make(last_mode, chosen.mode_id, moment)
            return chosen, factor, moment
        return legal_choice(self.ranges, power_w, last_mode, rules, when, next_change)

    def instructions(self, plan: Plan, problem: Problem, now: datetime,
                     until_ptu: int) -> list:
        """One instruction per change of mode or factor in PTUs [0, until), following the
        RM's transitions and waiting for its blocking timers."""
        power = plan.power_w.get(self.asset_id)
        modes = plan.mode.get(self.asset_id)
        if power is None and modes is None:
            return []
        n = min(until_ptu, len(power) if power is not None else len(modes or []))
        rules = self.rules.copy() if self.rules is not None else None
        last_mode = self.active_mode
        out, last = [], None
        for t in range(n):
            mode_id = modes[t] if modes is not None and t < len(modes) else None
            choice = self._legal(mode_id, float(power[t]) if power is not None else 0.0,
                                 last_mode, rules, now if t == 0 else max(now, problem.ptu_start(t)),
                                 problem.ptu_start(t + 1))
            if choice is None:
                continue
            chosen, factor, moment = choice
            key = (chosen.mode_id, round(factor, 4))
            if key == last:
                continue
            last, last_mode = key, chosen.mode_id
            out.append(self.make(chosen.mode_id, factor, moment))
        return out

    def capped_instructions(self, cap_w: float, now: datetime) -> list:
        rules = self.rules.copy() if self.rules is not None else None
        choice = legal_choice(self.ranges, cap_w, self.active_mode, rules, now, None)
        if choice is None:
            return []
        chosen, factor, moment = choice
        return [self.make(chosen.mode_id, factor, moment)]

    def can_cap(self) -> bool:
        return True

    def power_range_w(self) -> tuple[float, float]:
        if not self.ranges:
            return 0.0, 0.0
        return min(r.lo for r in self.ranges), max(r.hi for r in self.ranges)


def normal_modes(modes: list[OMBCOperationMode]) -> list[OMBCOperationMode]:
    return [m for m in modes if not m.abnormal_condition_only]


def ombc_mode_asset(rm_id: str, system_description: OMBCSystemDescription, grid: PtuGrid, *,
                    status: OMBCStatus | None = None,
                    timer_statuses: list[OMBCTimerStatus] | None = None,
                    priority: int = 1) -> tuple[ModeAsset, ModeBinding]:
    """The planner's view of an OMBC device, and its binding back to OMBC.Instructions."""
    modes = normal_modes(list(system_description.operation_modes))
    ranges = [power_mode_range(sid(m.id), list(m.power_ranges)) for m in modes]
    share = phase_share((r.commodity_quantity, max(abs(r.start_of_range), abs(r.end_of_range)))
                        for m in modes for r in m.power_ranges)
    active = sid(status.active_operation_mode_id) if status is not None else None
    asset = ModeAsset(
        id=rm_id,
        modes=[PowerMode(id=r.mode_id, min_w=math.ceil(r.lo), max_w=math.floor(r.hi))
               for r in ranges],
        current_mode=active if active in {r.mode_id for r in ranges} else None,
        min_on_ptus=min_on_ptus(list(system_description.transitions),
                                list(system_description.timers), grid),
        phase_share=share,
    )
    finished = {sid(t.timer_id): t.finished_at for t in timer_statuses or []}
    rules = TransitionRules.of(list(system_description.transitions),
                               list(system_description.timers), finished)
    binding = ModeBinding(rm_id=rm_id, asset_id=rm_id, ranges=ranges, active_mode=active,
                          priority=priority, phase_share=share, rules=rules)
    return asset, binding
