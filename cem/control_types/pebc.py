"""PEBC (power envelope based control) as a plug-in: its session rules, its state, its flex binding.

Session rules: an energy constraint's window must end after it starts and its upper average
power may not be below the lower; power constraints and energy constraints whose window has
ended are forgotten; at most `MAX_UPCOMING_VERSIONS` future ones of each are kept. A limit
range may be written high-to-low (the S2 documentation's PV example says ``0 .. -4000``).

Flex binding: the RM becomes PV, a fixed load and energy windows (`cem.flex.pebc`), always:
without power constraints in force it is planned as fixed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from s2python.common import ControlType
from s2python.pebc import PEBCEnergyConstraint, PEBCPowerConstraints

from cem.control_types.base import PluginBase, SessionView, content, dump, room_for_upcoming
from cem.flex.pebc import pebc_assets
from cem.flex.ptu import sid
from cem.flex.site_problem import SiteBuild
from cem.planner.assets import FixedLoad, StorageAsset
from cem.ports import RmStateView

POWER_CONSTRAINTS = "PEBC.PowerConstraints"
ENERGY_CONSTRAINT = "PEBC.EnergyConstraint"


class PebcState:
    """What a PEBC RM told the CEM (read-only for all but the PEBC rules)."""

    def __init__(self) -> None:
        self._power: dict[str, PEBCPowerConstraints] = {}
        self._energy: dict[str, PEBCEnergyConstraint] = {}

    def power_constraints(self, now: datetime | None = None) -> list[PEBCPowerConstraints]:
        """Known power constraints; with ``now``: only those valid at now (valid_until open or
        later)."""
        items = sorted(self._power.values(), key=lambda c: c.valid_from)
        if now is None:
            return items
        return [c for c in items
                if c.valid_from <= now and (c.valid_until is None or c.valid_until > now)]

    def energy_constraints(self) -> list[PEBCEnergyConstraint]:
        return sorted(self._energy.values(), key=lambda c: c.valid_from)

    def snapshot(self) -> dict[str, Any]:
        return {
            "power_constraints": [dump(v) for v in self._power.values()],
            "energy_constraints": [dump(v) for v in self._energy.values()],
        }


def normalise_limit_ranges(data: dict[str, Any]) -> dict[str, Any]:
    """Write each PEBC allowed limit range low-to-high.

    The official S2 PV example describes a production limit as ``0 .. -4000``; s2-python rejects
    a range whose start is above its end. For a limit range only the interval matters, so the
    CEM accepts both orders.
    """
    out = dict(data)
    ranges = []
    for limit_range in out.get("allowed_limit_ranges", []):
        boundary = limit_range.get("range_boundary") if isinstance(limit_range, dict) else None
        if isinstance(boundary, dict):
            start, end = boundary.get("start_of_range"), boundary.get("end_of_range")
            if isinstance(start, int | float) and isinstance(end, int | float) and start > end:
                limit_range = {**limit_range,
                               "range_boundary": {**boundary, "start_of_range": end,
                                                  "end_of_range": start}}
        ranges.append(limit_range)
    out["allowed_limit_ranges"] = ranges
    return out


class PebcPlugin(PluginBase[PebcState]):
    control_type = ControlType.POWER_ENVELOPE_BASED_CONTROL
    name = "PEBC"
    snapshot_key = "pebc"
    message_types = frozenset({POWER_CONSTRAINTS, ENERGY_CONSTRAINT})
    instruction_types = frozenset({"PEBC.Instruction"})
    state_class = PebcState

    # --- session rules ------------------------------------------------------------------------

    def adapt(self, message_type: str, data: dict[str, Any]) -> dict[str, Any]:
        return normalise_limit_ranges(data) if message_type == POWER_CONSTRAINTS else data

    def receive(self, state: PebcState, message: Any, now: datetime,
                session: SessionView) -> str:
        if message.message_type == POWER_CONSTRAINTS:
            upcoming = sum(1 for c in state._power.values() if c.valid_from > now)
            room_for_upcoming(upcoming, "PEBC power constraints")
            state._power = {k: c for k, c in state._power.items()
                            if c.valid_until is None or c.valid_until > now}
            state._power[sid(message.id)] = message
            return "power_constraints"
        if message.message_type == ENERGY_CONSTRAINT:
            if message.valid_until <= message.valid_from:
                raise content("energy constraint valid_until is not after valid_from")
            if message.upper_average_power < message.lower_average_power:
                raise content("upper_average_power is below lower_average_power")
            upcoming = sum(1 for c in state._energy.values() if c.valid_from > now)
            room_for_upcoming(upcoming, "PEBC energy constraints")
            state._energy = {k: c for k, c in state._energy.items() if c.valid_until > now}
            state._energy[sid(message.id)] = message
            return "energy_constraint"
        return super().receive(state, message, now, session)

    def check_instruction(self, state: PebcState, message: Any, now: datetime,
                          session: SessionView) -> None:
        if sid(message.power_constraints_id) not in state._power:
            raise content(f"unknown power constraints "
                          f"{session.external_of(message.power_constraints_id)}")

    def revoke(self, state: PebcState, object_type: str, object_id: Any) -> bool:
        if object_type == POWER_CONSTRAINTS:
            return state._power.pop(str(object_id), None) is not None
        if object_type == ENERGY_CONSTRAINT:
            return state._energy.pop(str(object_id), None) is not None
        return False

    # --- flex binding -------------------------------------------------------------------------

    def add_assets(self, site: SiteBuild, rm_id: str, rm: RmStateView) -> bool:
        state: PebcState = rm.of(self.control_type)
        constraints = state.power_constraints(site.now)
        assets, pebc_binding, notes = pebc_assets(
            rm_id, site.grid, site.now, constraints=constraints[-1] if constraints else None,
            energy_constraints=state.energy_constraints(),
            forecast=rm.power_forecast(), measurement=rm.latest_measurement())
        site.mapping.notes += notes
        # the binding once, under the energy window when there is one (its instructions pin
        # the envelope to that asset's plan) and else under the only asset
        bound_to = assets[1].id if len(assets) > 1 else assets[0].id
        for asset in assets:
            binding = pebc_binding if asset.id == bound_to else None
            if isinstance(asset, StorageAsset):
                site.problem.storage.append(asset)
                site.mapping.add(rm_id, asset.id, binding, "flexible load")
            elif isinstance(asset, FixedLoad):
                site.problem.fixed.append(asset)
                site.mapping.add(rm_id, asset.id, binding, "load")
            else:
                site.problem.curtailable.append(asset)
                site.mapping.add(rm_id, asset.id, binding, "pv")
        return True


PLUGIN = PebcPlugin()
