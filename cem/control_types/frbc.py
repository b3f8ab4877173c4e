"""FRBC (fill-rate based control) as a plug-in: its session rules, its state, its flex binding.

Session rules: fill-level ranges of every operation mode and of the leakage behaviour must be
ordered and cover one interval without gaps or overlaps (checked in the RM's own words, before
s2-python's checks); actuator ids unique; statuses and timers may name only actuators, modes
and timers of a kept system description (the one in force or an upcoming one); at most
`MAX_UPCOMING_VERSIONS` future system descriptions and leakage behaviours are kept; a storage
status's fill level may not lie far outside the storage range the RM declared (`far_outside`).
What the RM reports as STARTED or SUCCEEDED of an FRBC.Instruction is its actuator's mode
until its next ActuatorStatus.

Flex binding: the system description in force becomes one `StorageAsset` (`cem.flex.frbc`),
of the kind the RM's S2 description says (`cem.flex.kinds.storage_kind`); an EV aims at its
target `ev_finish_margin_minutes` before its departure; a storage held on by a minimum run
time is a fixed load until the timer ends.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import uuid
from datetime import datetime
from typing import Any

from s2python.common import ControlType, InstructionStatus, InstructionStatusUpdate, NumberRange
from s2python.frbc import (
    FRBCActuatorStatus,
    FRBCFillLevelTargetProfile,
    FRBCLeakageBehaviour,
    FRBCStorageStatus,
    FRBCSystemDescription,
    FRBCTimerStatus,
    FRBCUsageForecast,
)

from cem.control_types.base import (
    PluginBase,
    SessionView,
    ValidFromHistory,
    actuators,
    check_actuator_modes,
    check_actuator_timer,
    content,
    dump,
    room_for_upcoming,
    unique,
)
from cem.flex.frbc import (
    FrbcBinding,
    description_phase_share,
    frbc_storage_asset,
    in_fill_range,
    mode_range,
    normal_modes,
    storage_kind,
)
from cem.flex.ptu import sid, uuid_int
from cem.flex.site_problem import SiteBuild
from cem.planner.assets import StorageAsset
from cem.ports import RmStateView

SYSTEM_DESCRIPTION = "FRBC.SystemDescription"


class FrbcState:
    """What an FRBC RM told the CEM (read-only for all but the FRBC rules)."""

    def __init__(self) -> None:
        self._sd: ValidFromHistory[FRBCSystemDescription] = ValidFromHistory()
        self._actuator_status: dict[str, FRBCActuatorStatus] = {}
        self._storage_status: FRBCStorageStatus | None = None
        self._leakage: ValidFromHistory[FRBCLeakageBehaviour] = ValidFromHistory()
        self._usage: FRBCUsageForecast | None = None
        self._target: FRBCFillLevelTargetProfile | None = None
        self._timers: dict[tuple[str, str], FRBCTimerStatus] = {}
        # bumped by every change the plan reads (`FrbcPlugin.receive`, `revoke`): a system
        # description, storage status, leakage, usage forecast, target or timer; an
        # actuator's status (its active mode) bumps `actuators_version` instead
        self.version = 0
        self.actuators_version = 0
        self.levels_version = 0  # the storage statuses among `version`'s changes
        # the last asset and binding made from this state (`FrbcPlugin.add_assets`), kept
        # while the versions, the PTU grid and the RM's details are the same
        self._assets_made: AssetsMade | None = None
        # the description in force with its modes by (actuator id, mode id): instruction_power_w
        self._modes_by_id: tuple[FRBCSystemDescription,
                                 dict[tuple[int, int], tuple[Any, Any]]] | None = None
        # (description, details, grid, kind, priority, phase share) read from them: _make_asset
        self._described: tuple[Any, ...] | None = None

    def system_description(self, now: datetime) -> FRBCSystemDescription | None:
        """The FRBC.SystemDescription in force at ``now``."""
        return self._sd.in_force(now)

    def upcoming_system_descriptions(self, now: datetime) -> list[FRBCSystemDescription]:
        return self._sd.upcoming(now)

    def actuator_status(self, actuator_id: Any) -> FRBCActuatorStatus | None:
        return self._actuator_status.get(sid(actuator_id))

    def actuator_statuses(self) -> dict[str, FRBCActuatorStatus]:
        return dict(self._actuator_status)

    @property
    def storage_status(self) -> FRBCStorageStatus | None:
        return self._storage_status

    def leakage_behaviour(self, now: datetime) -> FRBCLeakageBehaviour | None:
        return self._leakage.in_force(now)

    @property
    def usage_forecast(self) -> FRBCUsageForecast | None:
        return self._usage

    @property
    def fill_level_target_profile(self) -> FRBCFillLevelTargetProfile | None:
        return self._target

    def timer_statuses(self) -> dict[tuple[str, str], FRBCTimerStatus]:
        """(actuator_id, timer_id) -> latest FRBC.TimerStatus."""
        return dict(self._timers)

    def snapshot(self) -> dict[str, Any]:
        return {
            "system_descriptions": [dump(s) for s in self._sd.all()],
            "actuator_status": {k: dump(v) for k, v in self._actuator_status.items()},
            "storage_status": dump(self._storage_status),
            "leakage_behaviour": [dump(s) for s in self._leakage.all()],
            "usage_forecast": dump(self._usage),
            "fill_level_target_profile": dump(self._target),
            "timer_status": [dump(v) for v in self._timers.values()],
        }


def check_contiguous(ranges: list[NumberRange], what: str) -> None:
    """Fill-level ranges must be ordered, and together cover one interval without gaps/overlaps."""
    for r in ranges:
        if r.start_of_range > r.end_of_range:
            raise content(f"{what}: fill level range {r.start_of_range}..{r.end_of_range} "
                          "starts after it ends")
    ordered = sorted(ranges, key=lambda r: (r.start_of_range, r.end_of_range))
    for a, b in itertools.pairwise(ordered):
        if b.start_of_range < a.end_of_range or (
                b.start_of_range == a.start_of_range and b.end_of_range == a.end_of_range):
            raise content(f"{what}: fill level ranges {a.start_of_range}..{a.end_of_range} and "
                          f"{b.start_of_range}..{b.end_of_range} overlap")
        if b.start_of_range > a.end_of_range:
            raise content(f"{what}: gap in fill level ranges between {a.end_of_range} and "
                          f"{b.start_of_range}")


def far_outside(value: float, declared: NumberRange) -> bool:
    """Whether `value` lies beyond the declared range by more than the range's own width.

    A storage really is outside its declared range at times (a buffer below its comfort band
    after a cold night, a battery below its SoC band, an EV's level moving while its
    description says it stays), and the flexibility layer clamps the level to the range; a
    level that far out (a SoC of 1000 %) is the RM's mistake, not the storage's state.
    """
    lo, hi = declared.start_of_range, declared.end_of_range
    width = max(hi - lo, abs(lo), abs(hi), 1.0)
    return value < lo - width or value > hi + width


def check_fill_level(state: FrbcState, level: float, now: datetime) -> None:
    """INVALID_CONTENT for a fill level far outside every kept description's storage range
    (no check before the first description)."""
    versions = state._sd.versions(now)
    if not versions or any(not far_outside(level, d.storage.fill_level_range)
                           for d in versions):
        return
    r = versions[0].storage.fill_level_range
    raise content(f"present_fill_level {level:g} is far outside the storage's fill_level_range "
                  f"{r.start_of_range:g}..{r.end_of_range:g} the RM declared")


_PRIORITY_LABEL = re.compile(r"\bpriority[ =:]*(\d{1,2})\b", re.IGNORECASE)


def label_priority(system_description: Any) -> int | None:
    """Priority an RM states in its storage's diagnostic label ("..., priority 3").

    S2 has no priority field; the OCPP RM carries the charge card's priority this way
    (docs/adr/0002-ev-priority-in-s2.md). None when the label says nothing.
    """
    storage = getattr(system_description, "storage", None)
    label = getattr(storage, "diagnostic_label", None) or ""
    match = _PRIORITY_LABEL.search(label)
    return int(match.group(1)) if match else None


def finish_early(asset: StorageAsset, margin_minutes: int, ptu_minutes: int) -> None:
    """Aim to reach an EV's target `margin_minutes` before its departure.

    Live, the last PTUs of a plan meet reality (a slow taper, an instruction that lands late,
    a replan that comes a little after the PTU starts): a plan that finishes exactly at the
    departure leaves drivers a few hundred Wh short. The EV may still charge until it leaves.
    Close to the departure the margin shrinks to the end of the first PTU the EV can use, but
    never to nothing: the last plans before a departure are the ones reality upsets most.
    """
    if margin_minutes <= 0 or asset.target_wh is None or asset.available_until is None:
        return
    early = max(asset.available_until - -(-margin_minutes // ptu_minutes),
                asset.available_from + 1)
    if early >= asset.available_until or asset.target_wh <= asset.level_wh:
        return
    asset.target_profile.append((early, asset.target_wh, asset.level_max_wh))


class FrbcPlugin(PluginBase[FrbcState]):
    control_type = ControlType.FILL_RATE_BASED_CONTROL
    name = "FRBC"
    snapshot_key = "frbc"
    message_types = frozenset({
        SYSTEM_DESCRIPTION, "FRBC.ActuatorStatus", "FRBC.StorageStatus", "FRBC.LeakageBehaviour",
        "FRBC.UsageForecast", "FRBC.FillLevelTargetProfile", "FRBC.TimerStatus"})
    instruction_types = frozenset({"FRBC.Instruction"})
    referable_types = frozenset({SYSTEM_DESCRIPTION})
    state_class = FrbcState
    # the last site build's PTU grid and config values (`add_assets`)
    _grid: tuple[Any, ...] | None = None

    # --- session rules ------------------------------------------------------------------------

    def check_schema_message(self, message_type: str, message: Any) -> None:
        """Fill-level ranges, in the RM's own words, before s2-python's checks."""
        if message_type == SYSTEM_DESCRIPTION:
            for actuator in message.actuators:
                for mode in actuator.operation_modes:
                    check_contiguous([e.fill_level_range for e in mode.elements],
                                     f"operation mode {sid(mode.id)} of actuator "
                                     f"{sid(actuator.id)}")
        elif message_type == "FRBC.LeakageBehaviour":
            check_contiguous([e.fill_level_range for e in message.elements], "leakage behaviour")

    def receive(self, state: FrbcState, message: Any, now: datetime,
                session: SessionView) -> str:
        changed = self._receive(state, message, now, session)
        if changed == "status" and message.message_type == "FRBC.ActuatorStatus":
            state.actuators_version += 1
        else:
            state.version += 1
            if message.message_type == "FRBC.StorageStatus":
                state.levels_version += 1
        return changed

    def _receive(self, state: FrbcState, message: Any, now: datetime,
                 session: SessionView) -> str:
        kind = message.message_type
        if kind == SYSTEM_DESCRIPTION:
            return self._system_description(state, message, now, session)
        if kind == "FRBC.ActuatorStatus":
            found = actuators(state._sd, message.actuator_id, now, "FRBC", session)
            check_actuator_modes(found, message, session)
            state._actuator_status[sid(message.actuator_id)] = message
            return "status"
        if kind == "FRBC.StorageStatus":
            check_fill_level(state, message.present_fill_level, now)
            state._storage_status = message
            return "status"
        if kind == "FRBC.LeakageBehaviour":
            check_contiguous([e.fill_level_range for e in message.elements], "leakage behaviour")
            room_for_upcoming(len(state._leakage.upcoming(now)), "leakage behaviours")
            state._leakage.add(message, now)
            return "leakage"
        if kind == "FRBC.UsageForecast":
            state._usage = message
            return "forecast"
        if kind == "FRBC.FillLevelTargetProfile":
            for element in message.elements:
                r = element.fill_level_range
                if r.start_of_range > r.end_of_range:
                    raise content(f"target fill level range {r.start_of_range}.."
                                  f"{r.end_of_range} starts after it ends")
            state._target = message
            return "target"
        if kind == "FRBC.TimerStatus":
            found = actuators(state._sd, message.actuator_id, now, "FRBC", session)
            check_actuator_timer(found, message, session)
            state._timers[(sid(message.actuator_id), sid(message.timer_id))] = message
            return "timer"
        return super().receive(state, message, now, session)

    @staticmethod
    def _system_description(state: FrbcState, message: FRBCSystemDescription, now: datetime,
                            session: SessionView) -> str:
        unique([a.id for a in message.actuators], "actuator")
        storage = message.storage.fill_level_range
        if storage.start_of_range > storage.end_of_range:
            raise content("storage fill_level_range starts after it ends")
        for actuator in message.actuators:
            for mode in actuator.operation_modes:
                check_contiguous([e.fill_level_range for e in mode.elements],
                                 f"operation mode {session.external_of(mode.id)}")
        room_for_upcoming(len(state._sd.upcoming(now)), "FRBC system descriptions")
        state._sd.add(message, now)
        when = "now" if message.valid_from <= now else f"from {message.valid_from.isoformat()}"
        session.log.info("FRBC system description with %d actuator(s), valid %s",
                         len(message.actuators), when)
        return "system_description"

    def check_instruction(self, state: FrbcState, message: Any, now: datetime,
                          session: SessionView) -> None:
        found = actuators(state._sd, message.actuator_id, now, "FRBC", session)
        modes = {sid(m.id) for a in found for m in a.operation_modes}
        if sid(message.operation_mode) not in modes:
            raise content(f"unknown operation mode {session.external_of(message.operation_mode)}")

    def revoke(self, state: FrbcState, object_type: str, object_id: Any) -> bool:
        dropped = object_type == SYSTEM_DESCRIPTION and state._sd.drop(object_id)
        if dropped:
            state.version += 1
        return dropped

    def instruction_status(self, state: FrbcState, instruction: Any,
                           update: InstructionStatusUpdate) -> None:
        # what the RM says it carried out is the actuator's mode until its next
        # ActuatorStatus: a plan made in between must not take it for the old mode (a
        # heat pump just switched on, whose minimum run time then holds it on)
        if update.status_type not in (InstructionStatus.STARTED, InstructionStatus.SUCCEEDED):
            return
        key = sid(instruction.actuator_id)
        old = state._actuator_status.get(key)
        if old is None or old.active_operation_mode_id != instruction.operation_mode or \
                old.operation_mode_factor != instruction.operation_mode_factor:
            state._actuator_status[key] = FRBCActuatorStatus(
                message_id=uuid.uuid4(), actuator_id=instruction.actuator_id,
                active_operation_mode_id=instruction.operation_mode,
                operation_mode_factor=instruction.operation_mode_factor,
                previous_operation_mode_id=old.active_operation_mode_id if old else None,
                transition_timestamp=update.timestamp)
            state.actuators_version += 1

    # --- flex binding -------------------------------------------------------------------------

    def add_assets(self, site: SiteBuild, rm_id: str, rm: RmStateView) -> bool:
        state: FrbcState = rm.of(self.control_type)
        grid = site.memo.get(GRID_MEMO)
        if grid is None:  # (once per site build: 5000 RMs ask)
            grid = (site.grid.start, site.grid.ptu_minutes, site.grid.n_ptus,
                    site.config.ev_defaults.priority, site.config.planner.ev_finish_margin_minutes)
            # the same object as the last build's when equal: the kept assets' grid is then
            # told by identity, not compared field by field 5000 times
            last = self._grid
            if last is not None and last == grid:
                grid = last
            site.memo[GRID_MEMO] = self._grid = grid
        made = state._assets_made
        details = rm.details
        # nothing the asset is made of changed since it was made (the state's version, the PTU
        # grid, the RM's details, no description or leakage come into force meanwhile): it is
        # taken as it was, a copy (the EV modes and the departures change it in place). 5000
        # RMs' assets took 0.2-0.3 s of CPU a replan, and between two replans most RMs say
        # nothing new
        if made is not None and (made.grid is grid or made.grid == grid) \
                and made.details is details and (made.until is None or site.now < made.until):
            if made.version != state.version and made.level_free is not None \
                    and state.version - made.version \
                    == state.levels_version - made.levels_version:
                new_level(made, state, site.config.planner.ev_finish_margin_minutes,
                          site.problem.ptu_minutes)  # only the fill level is new
            if made.version != state.version:
                made = None
        else:
            made = None
        if made is not None:
            asset = fresh_copy(made.asset)
            if made.actuators_version != state.actuators_version:
                # only the actuators' statuses are new (an instruction was taken): without
                # timers they change the binding's active modes, not the asset
                kept = made.binding
                made.binding = dataclasses.replace(kept, active_modes={
                    k: sid(v.active_operation_mode_id)
                    for k, v in state.actuator_statuses().items()})
                made.binding._ranges_at = kept._ranges_at  # the same modes and fill level
                made.actuators_version = state.actuators_version
            binding = made.binding
        else:
            built = self._make_asset(site, rm_id, rm, state, grid)
            if built is None:
                return False
            asset, binding = built
        site.problem.storage.append(asset)
        site.mapping.add(rm_id, asset.id, binding, asset.kind)
        if binding.held_load is not None:  # kept on by a minimum run time: not to plan
            name = details.name if details is not None and details.name else ""
            site.problem.fixed.append(binding.held_load)
            site.mapping.rm_assets[rm_id].append(binding.held_load.id)
            site.mapping.notes.append(f"{name or rm_id}: kept on until PTU "
                                      f"{int(asset.available_from)} by a running timer")
        return True

    @staticmethod
    def _make_asset(site: SiteBuild, rm_id: str, rm: RmStateView, state: FrbcState,
                    grid: tuple[Any, ...]) -> tuple[StorageAsset, FrbcBinding] | None:
        """The RM's asset and binding from its state, kept on the state unless a timer runs
        (timers read the clock itself); None without a system description in force."""
        sd = state.system_description(site.now)
        if sd is None:
            state._assets_made = None
            return None
        timers = list(state.timer_statuses().values())
        leakage = state.leakage_behaviour(site.now)
        details = rm.details
        described = state._described
        if described is None or described[0] is not sd or described[1] is not details \
                or described[2] != grid:
            # what the description and details say (kind, priority, phases) is read once per
            # description: an EV's new level remakes its asset, its description stays
            kind = storage_kind(sd, details)
            priority = label_priority(sd) or (site.config.ev_defaults.priority
                                              if kind == "ev" else 1)
            described = state._described = (sd, details, grid, kind, priority,
                                             description_phase_share(sd))
        _, _, _, kind, priority, share = described
        asset, binding = frbc_storage_asset(
            rm_id, sd, site.grid, site.now,
            storage_status=state.storage_status, actuator_statuses=state.actuator_statuses(),
            leakage=leakage, usage_forecast=state.usage_forecast,
            target_profile=state.fill_level_target_profile, timer_statuses=timers,
            kind=kind, priority=priority, share=share)
        # nothing but the level reads the fill level (one element per mode, no leakage by
        # level, no timer): a new level alone is taken into the kept asset (`new_level`)
        level_free = fresh_copy(asset) if binding.held_load is None \
            and (leakage is None or not leakage.elements) \
            and all(len(m.elements) == 1 for a in sd.actuators for m in normal_modes(a)) \
            else None
        if asset.kind == "ev":
            finish_early(asset, site.config.planner.ev_finish_margin_minutes,
                         site.problem.ptu_minutes)
        changes = [c for c in (state._sd.next_change(site.now),
                               state._leakage.next_change(site.now)) if c is not None]
        state._assets_made = None if timers else AssetsMade(
            state.version, state.actuators_version, grid, rm.details,
            min(changes) if changes else None, fresh_copy(asset), binding,
            state.levels_version, level_free)
        return asset, binding

    def instruction_power_w(self, state: FrbcState, message: Any, now: datetime) -> float | None:
        """From the system description in force, at the present fill level."""
        description = state.system_description(now)
        if description is None:
            return None
        index = getattr(state, "_modes_by_id", None)  # (a stand-in state may lack it)
        if index is None or index[0] is not description:
            # (actuator id, mode id) as integers -> the mode, and its range when it has one
            # element (the fill level does not matter then), per description: the dispatcher
            # asks per instruction, twice (~50k UUID-to-text conversions a 1000-RM dispatch)
            index = state._modes_by_id = (description, {
                (uuid_int(actuator.id), uuid_int(mode.id)):
                    (mode, mode_range(mode, 0.0) if len(mode.elements) == 1 else None)
                for actuator in description.actuators for mode in actuator.operation_modes})
        found = index[1].get((uuid_int(message.actuator_id), uuid_int(message.operation_mode)))
        if found is None:
            return None
        mode, r = found
        if r is None:
            status = state.storage_status
            r = mode_range(mode, float(getattr(status, "present_fill_level", 0.0) or 0.0))
        factor = float(message.operation_mode_factor)
        return r.power_start + factor * (r.power_end - r.power_start)


# SiteBuild.memo: the PTU grid and the config values an FRBC asset is made of
GRID_MEMO = "frbc: grid"


@dataclasses.dataclass
class AssetsMade:
    """An FRBC RM's asset and binding as last made, with what they were made of."""

    version: int
    actuators_version: int
    grid: tuple[Any, ...]  # the PTU grid and the config's values the asset reads
    details: Any  # the RM's details (the same object)
    until: datetime | None  # a kept system description or leakage comes into force then
    asset: StorageAsset
    binding: FrbcBinding
    levels_version: int = 0
    # the asset before `finish_early`, when nothing but its level reads the fill level (else
    # None: a new level makes it again)
    level_free: StorageAsset | None = None


def new_level(made: AssetsMade, state: FrbcState, margin_minutes: int, ptu_minutes: int) -> None:
    """Take the RM's new fill level into the kept asset and binding (`made.level_free`): the
    level and the binding's fill level are what `frbc_storage_asset` would make of it, the
    rest is as made, and `finish_early` is asked again (it reads the level). Most EVs report a
    new level between two replans: remade, each took ~100 us."""
    base = made.level_free
    status = state.storage_status
    if base is None or status is None:
        return
    kept = made.binding
    fill = in_fill_range(kept.system_description.storage, status.present_fill_level)
    base = fresh_copy(base)
    base.level_wh = kept.wh_from_units(fill)
    asset = fresh_copy(base)
    if asset.kind == "ev":
        finish_early(asset, margin_minutes, ptu_minutes)
    made.binding = dataclasses.replace(kept, fill_level=fill)
    made.binding._ranges_at = kept._ranges_at  # (one element per mode: the same at any level)
    made.asset, made.level_free = asset, base
    made.version, made.levels_version = state.version, state.levels_version


def fresh_copy(asset: StorageAsset) -> StorageAsset:
    """A copy of `asset` whose milestones and their prices can be changed without changing
    `asset` (the arrays are shared: nothing changes them in place)."""
    fields = asset.__dict__.copy()  # (copy.copy: 8 us; filling an empty __dict__: 2-6 us)
    fields["target_profile"] = list(asset.target_profile)
    fields["milestone_eur_per_wh"] = dict(asset.milestone_eur_per_wh)
    out = object.__new__(StorageAsset)
    out.__dict__ = fields
    return out


PLUGIN = FrbcPlugin()


def state_of(rm: RmStateView) -> FrbcState:
    """The FRBC part of an RM's state (empty when FRBC is not its active control type)."""
    state: FrbcState = rm.of(ControlType.FILL_RATE_BASED_CONTROL)
    return state
