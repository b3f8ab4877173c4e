"""FRBC (fill-rate based control) -> StorageAsset, and a storage plan -> FRBC.Instruction.

Fill units to Wh. S2 gives a fill level in the device's own unit (% SoC, degC, litres) and per
operation mode a fill rate (unit/s) next to a power range. The planner wants Wh. We take the
charging mode with the highest power at the present fill level as the reference and set
`wh_per_unit = P / (fill_rate * 3600)` there: one fill unit is "the electrical Wh that mode
needs to raise the level by one unit". The level is kept relative to the bottom of the
storage's fill_level_range (so it is never negative, also for degC). With that reference
`charge_efficiency` is 1 and `discharge_efficiency` is what the best discharging mode gives
back per normalised Wh (the round-trip efficiency of a battery).

Power domain. Per actuator, each operation mode (except `abnormal_condition_only` ones, which
are never planned nor instructed) contributes its power range at the present fill level. A
charging range starting above 0 (an EV's 6 A minimum: [4140, 22080] W on 3 phases) next to an
idle mode gives the planner's {0} U [charge_min, charge_max] domain. Several actuators add up.

Instructions follow the actuator's transitions and wait for running blocking timers (a heat
pump's minimum run / off time), see `cem.flex.modes.legal_choice`.

Known simplifications (replanning every PTU corrects them): the power ranges and leakage at
the *present* fill level hold for the whole horizon; gaps between modes' ranges are planned
as if continuous and the instruction rounds towards zero; the planner sees timers only as a
later start of an idle actuator (a running minimum run time is kept by the instructions, not
by the plan).
"""

from __future__ import annotations

import functools
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from s2python.common import Commodity, RoleType
from s2python.frbc import (
    FRBCActuatorDescription,
    FRBCActuatorStatus,
    FRBCFillLevelTargetProfile,
    FRBCInstruction,
    FRBCLeakageBehaviour,
    FRBCOperationMode,
    FRBCOperationModeElement,
    FRBCStorageDescription,
    FRBCStorageStatus,
    FRBCSystemDescription,
    FRBCTimerStatus,
    FRBCUsageForecast,
)

from cem.flex.modes import ModeRange, TransitionRules, legal_choice, pick_mode
from cem.flex.ptu import (
    PtuGrid,
    as_uuid,
    is_electric,
    new_uuid,
    phase_share,
    sample_rate,
    sid,
)
from cem.planner.assets import (
    FixedLoad,
    PhaseShare,
    Plan,
    Problem,
    StorageAsset,
)

CONTROL_TYPE = "FILL_RATE_BASED_CONTROL"


def element_at(mode: FRBCOperationMode, fill_level: float) -> FRBCOperationModeElement:
    """The mode's element whose fill_level_range holds `fill_level` (nearest at the edges)."""
    best = mode.elements[0]
    best_distance = math.inf
    for element in mode.elements:
        lo, hi = element.fill_level_range.start_of_range, element.fill_level_range.end_of_range
        distance = 0.0 if lo <= fill_level <= hi else min(abs(fill_level - lo), abs(fill_level - hi))
        if distance < best_distance:
            best, best_distance = element, distance
    return best


def mode_range(mode: FRBCOperationMode, fill_level: float) -> ModeRange:
    """Electric power range (summed over phases) and fill rate of a mode at a fill level."""
    element = element_at(mode, fill_level)
    electric = [r for r in element.power_ranges if is_electric(r.commodity_quantity)]
    return ModeRange(
        mode_id=sid(mode.id),
        power_start=sum(r.start_of_range for r in electric),
        power_end=sum(r.end_of_range for r in electric),
        fill_rate_start=element.fill_rate.start_of_range,
        fill_rate_end=element.fill_rate.end_of_range,
    )


def normal_modes(actuator: FRBCActuatorDescription) -> list[FRBCOperationMode]:
    """Operation modes the CEM may use in normal operation."""
    return [m for m in actuator.operation_modes if not m.abnormal_condition_only]


def actuator_phase_share(actuator: FRBCActuatorDescription) -> list[tuple[str, float]]:
    pairs: list[tuple[str, float]] = []
    for mode in normal_modes(actuator):
        for element in mode.elements:
            for r in element.power_ranges:
                if is_electric(r.commodity_quantity):
                    pairs.append((r.commodity_quantity, max(abs(r.start_of_range),
                                                            abs(r.end_of_range))))
    return pairs


@dataclass
class FrbcBinding:
    """Ties a StorageAsset back to its FRBC RM; builds FRBC.Instructions from the plan."""

    rm_id: str
    asset_id: str
    system_description: FRBCSystemDescription
    fill_level: float
    wh_per_unit: float
    fill_offset: float
    active_modes: dict[str, str] = field(default_factory=dict)  # actuator id -> mode id
    rules: dict[str, TransitionRules] = field(default_factory=dict)  # actuator id -> rules
    priority: int = 1
    phase_share: PhaseShare = (1 / 3, 1 / 3, 1 / 3)
    control_type: str = CONTROL_TYPE
    # what a running timer keeps it drawing in the first PTUs (minimum run time): planned as
    # a fixed load, the storage itself from the PTU after (see frbc_storage_asset)
    held_load: FixedLoad | None = None
    # per fill level (None: the modes do not depend on it), each actuator's normal mode ranges
    # and what it can take each way: made once, a binding lives as long as its RM says nothing
    # new, and its instructions ask for them per PTU (mode_range ~10 us each)
    _ranges_at: dict[float | None, tuple[dict[str, list[ModeRange]], dict[str, float],
                                         dict[str, float]]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    # `instruction_key`, made once: a binding is not changed once made (a
    # new active mode makes a new one), and every replan asks each RM's for it
    _key: Any = field(default=None, init=False, repr=False, compare=False)
    _key_made: bool = field(default=False, init=False, repr=False, compare=False)

    # -- plan -> instructions -------------------------------------------------------------

    def units_from_wh(self, level_wh: float) -> float:
        return self.fill_offset + level_wh / self.wh_per_unit

    def wh_from_units(self, fill_level: float) -> int:
        """The planner's level (Wh above the range's bottom) of a fill level in the range."""
        return round((fill_level - self.fill_offset) * self.wh_per_unit)

    def split(self, power_w: float, fill_level: float) -> list[tuple[str, list[ModeRange], float]]:
        """(actuator id, its normal mode ranges, its share of `power_w`) per actuator.

        Power is split over actuators in proportion to what each can take.
        """
        ranges, up, down = self._ranges(fill_level)
        capacity = up if power_w >= 0 else down
        total = sum(capacity.values())
        return [(a, rs, power_w * capacity[a] / total if total > 0 else 0.0)
                for a, rs in ranges.items() if rs]

    def _ranges(self, fill_level: float) -> tuple[dict[str, list[ModeRange]], dict[str, float],
                                                  dict[str, float]]:
        key = fill_level if self.instructions_read_levels else None
        made = self._ranges_at.get(key)
        if made is None:
            ranges = {sid(a.id): [mode_range(m, fill_level) for m in normal_modes(a)]
                      for a in self.system_description.actuators}
            made = (ranges, {a: max([r.hi for r in rs] + [0.0]) for a, rs in ranges.items()},
                    {a: -min([r.lo for r in rs] + [0.0]) for a, rs in ranges.items()})
            if len(self._ranges_at) < 64:  # a level-dependent one sees a few levels a replan
                self._ranges_at[key] = made
        return made

    def choose_modes(self, power_w: float, fill_level: float) -> list[tuple[str, str, float]]:
        """(actuator id, mode id, factor) per actuator realising `power_w` at most.

        Per actuator the mode that covers its share is chosen (the active mode first, to avoid
        transitions); when no mode covers it, the nearest reachable power towards zero is used,
        so an instruction never asks for more than the plan (3 kW for an EV with a 4.1 kW
        minimum becomes idle). Transitions and timers are not looked at here.
        """
        chosen = []
        for actuator_id, ranges, share in self.split(power_w, fill_level):
            mode, factor = pick_mode(ranges, share, self.active_modes.get(actuator_id))
            chosen.append((actuator_id, mode.mode_id, factor))
        return chosen

    def _legal(self, power_w: float, fill_level: float, when: datetime,
               next_change: datetime | None, rules: dict[str, TransitionRules],
               last_mode: dict[str, str]) -> list[tuple[str, ModeRange, float, datetime]]:
        out = []
        for actuator_id, ranges, share in self.split(power_w, fill_level):
            choice = legal_choice(ranges, share, last_mode.get(actuator_id),
                                  rules.get(actuator_id), when, next_change)
            if choice is not None:
                out.append((actuator_id, *choice))
        return out

    def instructions(self, plan: Plan, problem: Problem, now: datetime,
                     until_ptu: int) -> list[FRBCInstruction]:
        """One FRBC.Instruction per actuator per change of mode/factor in PTUs [0, until).

        Moves follow the actuator's transitions and wait for blocking timers (a heat pump's
        minimum run or off time): a move that cannot happen within its PTU is skipped.
        """
        power = plan.power_w.get(self.asset_id)
        if power is None:
            return []
        levels = plan.level_wh.get(self.asset_id)
        rules = {a: r.copy() for a, r in self.rules.items()}
        last_mode = dict(self.active_modes)
        last: dict[str, tuple[str, float]] = {}
        out: list[FRBCInstruction] = []
        n = min(until_ptu, len(power))
        starts = ptu_starts(problem.start, problem.ptu_minutes, n + 1)
        if levels is not None and not self.instructions_read_levels:
            levels = None  # one range per mode: the level does not change what they can do
        previous: float | None = None  # the power of the PTU before, while it settled
        for t, power_t in enumerate(np.asarray(power[:n], dtype=float).tolist()):
            if power_t == previous:
                # the same power, and every actuator is in a mode that covers its share: the
                # active mode comes first, the move is to itself (no transition, no timer),
                # so the choice is the one just made and nothing would be sent
                continue
            # plan.level_wh[t] is the level at the end of PTU t: PTU t starts at [t - 1]
            fill = self.fill_level if levels is None or t == 0 else self.units_from_wh(
                float(levels[min(t - 1, len(levels) - 1)]))
            execution = now if t == 0 else max(now, starts[t])
            settled = levels is None
            for actuator_id, ranges, share in self.split(power_t, fill):
                choice = legal_choice(ranges, share, last_mode.get(actuator_id),
                                      rules.get(actuator_id), execution, starts[t + 1])
                if choice is None:  # the move waits for a timer past this PTU
                    settled = False
                    continue
                mode, factor, moment = choice
                settled = settled and mode.lo - 1e-6 <= share <= mode.hi + 1e-6
                key = (mode.mode_id, round(factor, 4))
                if last.get(actuator_id) == key:
                    continue
                last[actuator_id] = key
                last_mode[actuator_id] = mode.mode_id
                out.append(frbc_instruction(actuator_id, mode.mode_id, factor, moment))
            previous = power_t if settled else None
        return out

    @functools.cached_property
    def instructions_read_levels(self) -> bool:
        """Whether the fill level changes what a mode can do (a mode with several elements):
        then the instructions depend on the level at each PTU, else only on the power."""
        return any(len(mode.elements) > 1 for a in self.system_description.actuators
                   for mode in normal_modes(a))

    def instruction_key(self) -> tuple[Any, ...] | None:
        """What `instructions` reads besides the plan rows and the time: the system
        description, the active modes and (`instructions_read_levels`) the fill level. Equal
        keys and equal plan rows give equal instructions within a PTU; None while a timer
        runs (then the time itself matters)."""
        if not self._key_made:
            self._key = None if any(rule.running for rule in self.rules.values()) else (
                sid(self.system_description.message_id), tuple(sorted(self.active_modes.items())),
                self.fill_level if self.instructions_read_levels else None)
            self._key_made = True
        return self._key

    def settled_key(self, messages: list[Any], now: datetime) -> tuple[Any, ...] | None:
        """`instruction_key` as it will be once the RM carries out `messages` due by `now`
        (this binding's instructions): each actuator in the mode its last one asks for.

        The RM reports that (STARTED, or an actuator status), and the next binding has those
        modes active; with the same plan rows its instructions are then the same as these (the
        mode chosen now is preferred as the active one), so nothing need be built again. None
        for an RM with timers (the move now would have started one)."""
        own = self.instruction_key()
        if own is None or any(rule.durations for rule in self.rules.values()):
            return None  # (a move that starts a timer: the instructions after it read the timer)
        modes = dict(self.active_modes)
        for message in sorted(messages, key=lambda m: m.execution_time):
            if message.execution_time <= now and getattr(message, "actuator_id", None) is not None:
                modes[sid(message.actuator_id)] = sid(message.operation_mode)
        if modes == self.active_modes:
            return own
        return (own[0], tuple(sorted(modes.items())), *own[2:])

    def capped_instructions(self, cap_w: float, now: datetime) -> list[FRBCInstruction]:
        """Instructions that hold this storage at or below `cap_w` from now (or as soon as a
        running timer allows)."""
        rules = {a: r.copy() for a, r in self.rules.items()}
        return [frbc_instruction(a, mode.mode_id, factor, moment)
                for a, mode, factor, moment in self._legal(cap_w, self.fill_level, now, None,
                                                           rules, dict(self.active_modes))]

    def can_cap(self) -> bool:
        return True

    def power_range_w(self) -> tuple[float, float]:
        lo = hi = 0.0
        for a in self.system_description.actuators:
            ranges = [mode_range(m, self.fill_level) for m in normal_modes(a)]
            if ranges:
                lo += min(0.0, min(r.lo for r in ranges))
                hi += max(0.0, max(r.hi for r in ranges))
        return lo, hi


@functools.lru_cache(maxsize=64)
def ptu_starts(start: datetime, ptu_minutes: int, n: int) -> tuple[datetime, ...]:
    """The start of PTUs 0..n-1 of a plan from `start` (as `Problem.ptu_start`), made once
    per plan: every binding's instructions ask for them."""
    step = timedelta(minutes=ptu_minutes)
    return tuple(start + step * t for t in range(n))


def frbc_instruction(actuator_id: str, mode_id: str, factor: float,
                     execution_time: datetime) -> FRBCInstruction:
    return FRBCInstruction(
        message_id=new_uuid(),
        id=new_uuid(),
        actuator_id=_uuid_of(actuator_id),
        operation_mode=_uuid_of(mode_id),
        operation_mode_factor=round(factor, 4),
        execution_time=execution_time,
        abnormal_condition=False,
    )


@functools.lru_cache(maxsize=1 << 16)
def _uuid_of(value: Any) -> uuid.UUID:
    """`as_uuid`, once per id: an instruction names its actuator and mode (2 us a parse)."""
    return as_uuid(value)


# -- S2 -> asset ------------------------------------------------------------------------------


_TEMPERATURE = re.compile(r"°\s*[cfk]\b|\bdeg\s*[cf]\b|\b(celsius|fahrenheit|kelvin)\b|^\s*k\s*$",
                          re.IGNORECASE)


def is_temperature(unit: str | None) -> bool:
    """True when a fill_level_label names a temperature unit (°C, degC, K, °F, Celsius...)."""
    return unit is not None and _TEMPERATURE.search(unit) is not None


def storage_kind(system_description: FRBCSystemDescription, details: Any = None) -> str:
    """heat_pump, battery, ev or storage, from what the RM says in S2 (`cem.flex.kinds`).

    heat_pump: an actuator supplies HEAT, a role of the RM's `details` has commodity HEAT,
    or the fill level is a temperature; battery: a normal operation mode discharges; ev:
    charge-only and it offers a fill-level target profile (a departure target), or the RM
    says it is a consumer of electricity and nothing else (an EV charger, also while no EV is
    plugged in); else storage.
    """
    storage = system_description.storage
    commodities = {c for a in system_description.actuators for c in a.supported_commodities}
    heat_role = any(r.commodity == Commodity.HEAT for r in getattr(details, "roles", None) or [])
    if Commodity.HEAT in commodities or heat_role or is_temperature(storage.fill_level_label):
        return "heat_pump"
    bottom = storage.fill_level_range.start_of_range
    if any(mode_range(m, bottom).lo < 0
           for a in system_description.actuators for m in normal_modes(a)):
        return "battery"
    roles = {(r.role, r.commodity) for r in getattr(details, "roles", None) or []}
    if storage.provides_fill_level_target_profile or \
            roles == {(RoleType.ENERGY_CONSUMER, Commodity.ELECTRICITY)}:
        return "ev"
    return "storage"


def reference_wh_per_unit(ranges: list[ModeRange]) -> float:
    """Electrical Wh per fill unit of the strongest charging (else discharging) mode."""
    charging = [r for r in ranges if r.power_end > 0 and r.fill_rate_end > 0]
    if charging:
        best = max(charging, key=lambda r: r.power_end)
        return best.power_end / (best.fill_rate_end * 3600.0)
    discharging = [r for r in ranges if r.power_start < 0 and r.fill_rate_start < 0]
    if discharging:
        best = min(discharging, key=lambda r: r.power_start)
        return best.power_start / (best.fill_rate_start * 3600.0)
    return 1.0


def _rate_at(elements: list[Any], fill_level: float) -> float:
    best, best_distance = 0.0, math.inf
    for element in elements:
        lo, hi = element.fill_level_range.start_of_range, element.fill_level_range.end_of_range
        distance = 0.0 if lo <= fill_level <= hi else min(abs(fill_level - lo), abs(fill_level - hi))
        if distance < best_distance:
            best, best_distance = element.leakage_rate, distance
    return float(best)


def frbc_storage_asset(
    rm_id: str,
    system_description: FRBCSystemDescription,
    grid: PtuGrid,
    now: datetime,
    *,
    storage_status: FRBCStorageStatus | None = None,
    actuator_statuses: dict[str, FRBCActuatorStatus] | None = None,
    leakage: FRBCLeakageBehaviour | None = None,
    usage_forecast: FRBCUsageForecast | None = None,
    target_profile: FRBCFillLevelTargetProfile | None = None,
    timer_statuses: list[FRBCTimerStatus] | None = None,
    kind: str | None = None,
    priority: int = 1,
    share: PhaseShare | None = None,
) -> tuple[StorageAsset, FrbcBinding]:
    """The planner's view of an FRBC storage, and the binding that turns plans back into S2.

    `share`: the description's phase share when the caller has it (`description_phase_share`)."""
    storage = system_description.storage
    bottom = storage.fill_level_range.start_of_range
    top = storage.fill_level_range.end_of_range
    fill = in_fill_range(storage, storage_status.present_fill_level
                         if storage_status is not None else bottom)
    actuator_statuses = actuator_statuses or {}
    active = {k: sid(v.active_operation_mode_id) for k, v in actuator_statuses.items()}

    all_ranges: list[ModeRange] = []
    charge_min, charge_max, discharge_min, discharge_max = math.inf, 0.0, math.inf, 0.0
    blocked_until: datetime | None = None
    held: list[tuple[datetime, ModeRange, float]] = []  # kept on until, mode, factor
    for actuator in system_description.actuators:
        ranges = [mode_range(m, fill) for m in normal_modes(actuator)]
        all_ranges += ranges
        charging = [r for r in ranges if r.hi > 0]
        discharging = [r for r in ranges if r.lo < 0]
        if charging:
            charge_max += max(r.hi for r in charging)
            charge_min = min(charge_min, min(max(r.lo, 0.0) for r in charging))
        if discharging:
            discharge_max += -min(r.lo for r in discharging)
            discharge_min = min(discharge_min, min(max(-r.hi, 0.0) for r in discharging))
        until = _switch_on_blocked_until(actuator, active.get(sid(actuator.id)), ranges,
                                         timer_statuses or [], now)
        if until is not None:
            blocked_until = until if blocked_until is None else min(blocked_until, until)
        status = actuator_statuses.get(sid(actuator.id))
        kept = _switch_off_blocked_until(actuator, active.get(sid(actuator.id)), ranges,
                                         timer_statuses or [], now)
        if kept is not None and status is not None:
            held.append((kept[0], kept[1], float(status.operation_mode_factor or 0.0)))
    charge_min = 0.0 if math.isinf(charge_min) else charge_min
    discharge_min = 0.0 if math.isinf(discharge_min) else discharge_min

    wh_per_unit = reference_wh_per_unit(all_ranges)
    discharge_efficiency = 1.0
    discharging = [r for r in all_ranges if r.power_start < 0 and r.fill_rate_start < 0]
    if discharging:
        best = min(discharging, key=lambda r: r.power_start)
        discharge_efficiency = min(1.0, max(0.01, abs(best.power_start) / (
            abs(best.fill_rate_start) * 3600.0 * wh_per_unit)))

    def to_wh(units: float) -> int:
        return round((units - bottom) * wh_per_unit)

    usage = np.zeros(grid.n_ptus)
    if leakage is not None and leakage.elements:
        usage += _rate_at(list(leakage.elements), fill) * grid.ptu_s * wh_per_unit
    if usage_forecast is not None and usage_forecast.elements:
        rate, _ = sample_rate(grid, usage_forecast.start_time,
                              [e.duration.root for e in usage_forecast.elements],
                              [e.usage_rate_expected for e in usage_forecast.elements])
        usage += rate * grid.ptu_s * wh_per_unit

    kind = kind or storage_kind(system_description)
    targets: list[tuple[int, int, int]] = []
    target_wh: int | None = None
    available_until: int | None = None
    if target_profile is not None:
        moment = target_profile.start_time
        for element in target_profile.elements:
            moment = moment + element.duration.to_timedelta()
            ptu = grid.index_ceil(moment)
            if ptu <= 0:
                continue
            ptu = min(ptu, grid.n_ptus)
            lo = max(element.fill_level_range.start_of_range, bottom)
            hi = min(element.fill_level_range.end_of_range, top)
            targets.append((ptu, to_wh(lo), to_wh(hi)))
        if targets and kind == "ev":
            available_until = targets[-1][0]
            target_wh = targets[-1][1]

    available_from = 0
    if blocked_until is not None and blocked_until > now:
        available_from = max(0, min(grid.n_ptus, grid.index_ceil(blocked_until)))

    if share is None:
        share = description_phase_share(system_description)
    held_load: FixedLoad | None = None
    level_at_start = float(to_wh(fill))
    if held:
        # a minimum run time keeps it on: what it draws until the PTU after the timer ends is
        # not the planner's to choose. That part is a fixed load, and the storage enters the
        # plan from then on, at the level the held run brings it to (usage included)
        until = max(t for t, _, _ in held)
        k = max(0, min(grid.n_ptus, grid.index_ceil(until)))
        draw_w = sum(r.power_start + f * (r.power_end - r.power_start) for _, r, f in held)
        held_rate = sum(r.fill_rate_start + f * (r.fill_rate_end - r.fill_rate_start)
                        for _, r, f in held)
        seconds = np.full(k, grid.ptu_s)
        if k:
            seconds[0] *= grid.share_ahead(now)
        used = float(usage[:k] @ (seconds / grid.ptu_s)) if k else 0.0
        level_at_start = min(max(level_at_start + held_rate * wh_per_unit
                                 * float(seconds.sum()) - used, 0.0), float(to_wh(top)))
        available_from = max(available_from, k)
        power = np.zeros(grid.n_ptus, dtype=np.int64)
        power[:k] = round(draw_w)
        held_load = FixedLoad(id=f"{rm_id}:held-on", power_w=power, phase_share=share)
    asset = StorageAsset(
        id=rm_id,
        kind=kind,
        charge_max_w=math.floor(charge_max),
        charge_min_w=math.ceil(charge_min),
        discharge_max_w=math.floor(discharge_max),
        discharge_min_w=math.ceil(discharge_min),
        charge_efficiency=1.0,
        discharge_efficiency=discharge_efficiency,
        level_wh=round(level_at_start),  # at the start of available_from
        level_min_wh=0,
        level_max_wh=to_wh(top),
        usage_wh=np.round(usage).astype(np.int64) if usage.any() else None,
        available_from=available_from,
        available_until=available_until,
        target_wh=target_wh,
        target_profile=targets,
        priority=priority,
        phase_share=share,
    )
    finished: dict[str, dict[str, datetime]] = {}
    for timer in timer_statuses or []:
        finished.setdefault(sid(timer.actuator_id), {})[sid(timer.timer_id)] = timer.finished_at
    rules = {sid(a.id): TransitionRules.of(list(a.transitions), list(a.timers),
                                           finished.get(sid(a.id)))
             for a in system_description.actuators}
    binding = FrbcBinding(
        rm_id=rm_id,
        rules=rules,
        asset_id=rm_id,
        system_description=system_description,
        fill_level=fill,
        wh_per_unit=wh_per_unit,
        fill_offset=bottom,
        active_modes=active,
        priority=priority,
        phase_share=share,
        held_load=held_load,
    )
    return asset, binding


def in_fill_range(storage: FRBCStorageDescription, fill_level: float) -> float:
    """A reported fill level within the storage's fill level range (storages stray outside
    their band: the planner takes the nearest end)."""
    return min(max(fill_level, storage.fill_level_range.start_of_range),
               storage.fill_level_range.end_of_range)


def description_phase_share(system_description: FRBCSystemDescription) -> PhaseShare:
    """How the storage's power falls on the phases, from its actuators' commodities."""
    return phase_share(p for a in system_description.actuators for p in actuator_phase_share(a))


def _moves_blocked_until(actuator: FRBCActuatorDescription, current: ModeRange,
                         ranges: list[ModeRange], timers: list[FRBCTimerStatus], now: datetime,
                         wanted: Callable[[ModeRange], bool]) -> datetime | None:
    """The earliest moment any normal transition from `current` to a `wanted` mode is free of
    running blocking timers; None when one is free now (or there is none)."""
    by_id = {r.mode_id: r for r in ranges}
    running = {sid(t.timer_id): t.finished_at for t in timers
               if sid(t.actuator_id) == sid(actuator.id) and t.finished_at > now}
    earliest: datetime | None = None
    for transition in actuator.transitions:
        if transition.abnormal_condition_only or sid(transition.from_) != current.mode_id:
            continue
        target = by_id.get(sid(transition.to))
        if target is None or not wanted(target):
            continue
        blocks = [running[sid(b)] for b in transition.blocking_timers if sid(b) in running]
        free_at = max(blocks) if blocks else now
        earliest = free_at if earliest is None else min(earliest, free_at)
    if earliest is None or earliest <= now:
        return None
    return earliest


def _active_range(actuator: FRBCActuatorDescription, active_mode: str | None,
                  ranges: list[ModeRange]) -> ModeRange | None:
    if active_mode is None or not actuator.transitions:
        return None
    return next((r for r in ranges if r.mode_id == active_mode), None)


def _switch_off_blocked_until(actuator: FRBCActuatorDescription, active_mode: str | None,
                              ranges: list[ModeRange], timers: list[FRBCTimerStatus],
                              now: datetime) -> tuple[datetime, ModeRange] | None:
    """Until when a running timer (a minimum run time) keeps a consuming actuator in its mode,
    and that mode; None when it may go down now."""
    current = _active_range(actuator, active_mode, ranges)
    if current is None or current.lo <= 0:
        return None
    until = _moves_blocked_until(actuator, current, ranges, timers, now,
                                 lambda target: target.lo < current.lo)
    return None if until is None else (until, current)


def _switch_on_blocked_until(actuator: FRBCActuatorDescription, active_mode: str | None,
                             ranges: list[ModeRange], timers: list[FRBCTimerStatus],
                             now: datetime) -> datetime | None:
    """When an idle actuator may switch to a consuming mode no sooner than a running timer
    (a minimum off time); None when nothing blocks."""
    current = _active_range(actuator, active_mode, ranges)
    if current is None or current.hi > 0:
        return None
    return _moves_blocked_until(actuator, current, ranges, timers, now,
                                lambda target: target.hi > 0)
