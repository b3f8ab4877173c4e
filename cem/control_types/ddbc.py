"""DDBC (demand driven based control) as a plug-in: its session rules, its state, its flex binding.

Session rules: actuator ids unique; per actuator, operation modes and timers unique and
transitions naming only known ones; statuses, timer statuses and instructions may name only
actuators, modes and timers of a kept system description; at most `MAX_UPCOMING_VERSIONS`
future system descriptions are kept. Operation modes use the schema's ``Id`` (s2-python
0.11.1 wants an extra ``id`` and a list as ``supply_range``: the message is adapted for it).

Flex binding: one `ModeAsset` per actuator of the system description in force
(`cem.flex.ddbc`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from s2python.common import ControlType, NumberRange
from s2python.ddbc import (
    DDBCActuatorStatus,
    DDBCAverageDemandRateForecast,
    DDBCSystemDescription,
    DDBCTimerStatus,
)

from cem.control_types.base import (
    PluginBase,
    SessionView,
    ValidFromHistory,
    actuators,
    check_actuator_modes,
    check_actuator_timer,
    check_modes_and_transitions,
    content,
    dump,
    room_for_upcoming,
    unique,
)
from cem.flex.ddbc import ddbc_mode_assets
from cem.flex.ptu import sid
from cem.flex.site_problem import SiteBuild
from cem.ports import RmStateView

SYSTEM_DESCRIPTION = "DDBC.SystemDescription"


class DdbcState:
    """What a DDBC RM told the CEM (read-only for all but the DDBC rules)."""

    def __init__(self) -> None:
        self._sd: ValidFromHistory[DDBCSystemDescription] = ValidFromHistory()
        self._actuator_status: dict[str, DDBCActuatorStatus] = {}
        self._timers: dict[tuple[str, str], DDBCTimerStatus] = {}
        self._demand_forecast: DDBCAverageDemandRateForecast | None = None

    def system_description(self, now: datetime) -> DDBCSystemDescription | None:
        return self._sd.in_force(now)

    def actuator_status(self, actuator_id: Any) -> DDBCActuatorStatus | None:
        return self._actuator_status.get(sid(actuator_id))

    def timer_statuses(self) -> dict[tuple[str, str], DDBCTimerStatus]:
        return dict(self._timers)

    @property
    def average_demand_rate_forecast(self) -> DDBCAverageDemandRateForecast | None:
        return self._demand_forecast

    def snapshot(self) -> dict[str, Any]:
        return {
            "system_descriptions": [dump(s) for s in self._sd.all()],
            "actuator_status": {k: dump(v) for k, v in self._actuator_status.items()},
            "timer_status": [dump(v) for v in self._timers.values()],
            "average_demand_rate_forecast": dump(self._demand_forecast),
        }


def adapt_system_description(data: dict[str, Any]) -> dict[str, Any]:
    """s2-python 0.11.1's DDBC.OperationMode wants an extra ``id`` and a list as supply_range.

    The S2 schema has ``Id`` and a single NumberRange; feed the wrapper both spellings.
    """
    out = dict(data)
    found = []
    for actuator in out.get("actuators", []):
        actuator = dict(actuator)
        modes = []
        for mode in actuator.get("operation_modes", []):
            mode = dict(mode)
            mode.setdefault("id", mode.get("Id"))
            if isinstance(mode.get("supply_range"), dict):
                mode["supply_range"] = [mode["supply_range"]]
            modes.append(mode)
        actuator["operation_modes"] = modes
        found.append(actuator)
    out["actuators"] = found
    return out


class DdbcPlugin(PluginBase[DdbcState]):
    control_type = ControlType.DEMAND_DRIVEN_BASED_CONTROL
    name = "DDBC"
    snapshot_key = "ddbc"
    message_types = frozenset({SYSTEM_DESCRIPTION, "DDBC.ActuatorStatus", "DDBC.TimerStatus",
                               "DDBC.AverageDemandRateForecast"})
    instruction_types = frozenset({"DDBC.Instruction"})
    referable_types = frozenset({SYSTEM_DESCRIPTION})
    state_class = DdbcState

    # --- session rules ------------------------------------------------------------------------

    def adapt(self, message_type: str, data: dict[str, Any]) -> dict[str, Any]:
        return adapt_system_description(data) if message_type == SYSTEM_DESCRIPTION else data

    def receive(self, state: DdbcState, message: Any, now: datetime,
                session: SessionView) -> str:
        kind = message.message_type
        if kind == SYSTEM_DESCRIPTION:
            unique([a.id for a in message.actuators], "actuator")
            for actuator in message.actuators:
                check_modes_and_transitions(
                    actuator.operation_modes, actuator.transitions, actuator.timers,
                    f"actuator {session.external_of(actuator.id)}", session)
            room_for_upcoming(len(state._sd.upcoming(now)), "DDBC system descriptions")
            state._sd.add(message, now)
            return "system_description"
        if kind == "DDBC.ActuatorStatus":
            found = actuators(state._sd, message.actuator_id, now, "DDBC", session)
            check_actuator_modes(found, message, session)
            state._actuator_status[sid(message.actuator_id)] = message
            return "status"
        if kind == "DDBC.TimerStatus":
            found = actuators(state._sd, message.actuator_id, now, "DDBC", session)
            check_actuator_timer(found, message, session)
            state._timers[(sid(message.actuator_id), sid(message.timer_id))] = message
            return "timer"
        if kind == "DDBC.AverageDemandRateForecast":
            state._demand_forecast = message
            return "forecast"
        return super().receive(state, message, now, session)

    def check_instruction(self, state: DdbcState, message: Any, now: datetime,
                          session: SessionView) -> None:
        found = actuators(state._sd, message.actuator_id, now, "DDBC", session)
        modes = {sid(m.id) for a in found for m in a.operation_modes}
        if sid(message.operation_mode_id) not in modes:
            raise content(f"unknown operation mode "
                          f"{session.external_of(message.operation_mode_id)}")

    def revoke(self, state: DdbcState, object_type: str, object_id: Any) -> bool:
        return object_type == SYSTEM_DESCRIPTION and state._sd.drop(object_id)

    @staticmethod
    def present_demand_rate(state: DdbcState, rate: NumberRange) -> None:
        """S2 JSON v1.0.0 reports the present demand rate apart (DDBC.PresentDemandStatus,
        see `cem.s2.json_v1`): it goes onto every kept system description."""
        for description in state._sd.all():
            description.present_demand_rate = rate

    # --- flex binding -------------------------------------------------------------------------

    def add_assets(self, site: SiteBuild, rm_id: str, rm: RmStateView) -> bool:
        state: DdbcState = rm.of(self.control_type)
        sd = state.system_description(site.now)
        if sd is None:
            return False
        statuses = {sid(a.id): s for a in sd.actuators
                    if (s := state.actuator_status(a.id)) is not None}
        for asset, binding in ddbc_mode_assets(
                rm_id, sd, site.grid, site.now, forecast=state.average_demand_rate_forecast,
                statuses=statuses, timer_statuses=list(state.timer_statuses().values())):
            site.problem.modes.append(asset)
            site.mapping.add(rm_id, asset.id, binding, "ddbc")
        return True


PLUGIN = DdbcPlugin()
