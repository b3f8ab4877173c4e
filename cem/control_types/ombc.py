"""OMBC (operation mode based control) as a plug-in: its session rules, its state, its flex binding.

Session rules: operation modes and timers have unique ids and transitions name only known
ones; a status, timer status or instruction may name only modes and timers of a kept system
description (the one in force or an upcoming one); at most `MAX_UPCOMING_VERSIONS` future
system descriptions are kept.

Flex binding: the system description in force becomes one `ModeAsset` (`cem.flex.ombc`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from s2python.common import ControlType
from s2python.ombc import OMBCStatus, OMBCSystemDescription, OMBCTimerStatus

from cem.control_types.base import (
    PluginBase,
    SessionView,
    ValidFromHistory,
    check_modes_and_transitions,
    content,
    dump,
    room_for_upcoming,
)
from cem.flex.ombc import ombc_mode_asset
from cem.flex.ptu import sid
from cem.flex.site_problem import SiteBuild
from cem.ports import RmStateView

SYSTEM_DESCRIPTION = "OMBC.SystemDescription"


class OmbcState:
    """What an OMBC RM told the CEM (read-only for all but the OMBC rules)."""

    def __init__(self) -> None:
        self._sd: ValidFromHistory[OMBCSystemDescription] = ValidFromHistory()
        self._status: OMBCStatus | None = None
        self._timers: dict[str, OMBCTimerStatus] = {}

    def system_description(self, now: datetime) -> OMBCSystemDescription | None:
        return self._sd.in_force(now)

    @property
    def status(self) -> OMBCStatus | None:
        return self._status

    def timer_statuses(self) -> dict[str, OMBCTimerStatus]:
        return dict(self._timers)

    def snapshot(self) -> dict[str, Any]:
        return {
            "system_descriptions": [dump(s) for s in self._sd.all()],
            "status": dump(self._status),
            "timer_status": [dump(v) for v in self._timers.values()],
        }


def _descriptions(state: OmbcState, now: datetime) -> list[OMBCSystemDescription]:
    versions = state._sd.versions(now)
    if not versions:
        raise content("no OMBC.SystemDescription received yet")
    return versions


class OmbcPlugin(PluginBase[OmbcState]):
    control_type = ControlType.OPERATION_MODE_BASED_CONTROL
    name = "OMBC"
    snapshot_key = "ombc"
    message_types = frozenset({SYSTEM_DESCRIPTION, "OMBC.Status", "OMBC.TimerStatus"})
    instruction_types = frozenset({"OMBC.Instruction"})
    referable_types = frozenset({SYSTEM_DESCRIPTION})
    state_class = OmbcState

    # --- session rules ------------------------------------------------------------------------

    def receive(self, state: OmbcState, message: Any, now: datetime,
                session: SessionView) -> str:
        kind = message.message_type
        if kind == SYSTEM_DESCRIPTION:
            check_modes_and_transitions(message.operation_modes, message.transitions,
                                        message.timers, "OMBC", session)
            room_for_upcoming(len(state._sd.upcoming(now)), "OMBC system descriptions")
            state._sd.add(message, now)
            return "system_description"
        if kind == "OMBC.Status":
            modes = {sid(m.id) for d in _descriptions(state, now) for m in d.operation_modes}
            for mode_id in (message.active_operation_mode_id, message.previous_operation_mode_id):
                if mode_id is not None and sid(mode_id) not in modes:
                    raise content(f"unknown operation mode {session.external_of(mode_id)}")
            state._status = message
            return "status"
        if kind == "OMBC.TimerStatus":
            timers = {sid(t.id) for d in _descriptions(state, now) for t in d.timers}
            if sid(message.timer_id) not in timers:
                raise content(f"unknown timer {session.external_of(message.timer_id)}")
            state._timers[sid(message.timer_id)] = message
            return "timer"
        return super().receive(state, message, now, session)

    def check_instruction(self, state: OmbcState, message: Any, now: datetime,
                          session: SessionView) -> None:
        modes = {sid(m.id) for d in _descriptions(state, now) for m in d.operation_modes}
        if sid(message.operation_mode_id) not in modes:
            raise content(f"unknown operation mode "
                          f"{session.external_of(message.operation_mode_id)}")

    def revoke(self, state: OmbcState, object_type: str, object_id: Any) -> bool:
        return object_type == SYSTEM_DESCRIPTION and state._sd.drop(object_id)

    # --- flex binding -------------------------------------------------------------------------

    def add_assets(self, site: SiteBuild, rm_id: str, rm: RmStateView) -> bool:
        state: OmbcState = rm.of(self.control_type)
        sd = state.system_description(site.now)
        if sd is None:
            return False
        asset, binding = ombc_mode_asset(rm_id, sd, site.grid, status=state.status,
                                         timer_statuses=list(state.timer_statuses().values()))
        site.problem.modes.append(asset)
        site.mapping.add(rm_id, asset.id, binding, "modes")
        return True


PLUGIN = OmbcPlugin()
