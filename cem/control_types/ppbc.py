"""PPBC (power profile based control) as a plug-in: its session rules, its state, its flex binding.

Session rules: a power profile must end after it starts; its sequence containers, and the
sequences of each, have unique ids; a status may name only known profiles, containers and
sequences; definitions whose end has passed are forgotten; at most `MAX_UPCOMING_VERSIONS`
live ones are kept.

Flex binding: each definition becomes a shiftable profile, or a fixed load once it runs
(`cem.flex.ppbc`); an RM without a plannable definition is planned as fixed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from s2python.common import ControlType
from s2python.ppbc import PPBCPowerProfileDefinition, PPBCPowerProfileStatus

from cem.control_types.base import PluginBase, SessionView, content, dump, room_for_upcoming, unique
from cem.flex.ppbc import ppbc_assets
from cem.flex.ptu import sid
from cem.flex.site_problem import SiteBuild
from cem.planner.assets import FixedLoad
from cem.ports import RmStateView

DEFINITION = "PPBC.PowerProfileDefinition"
STATUS = "PPBC.PowerProfileStatus"


class PpbcState:
    """What a PPBC RM told the CEM (read-only for all but the PPBC rules)."""

    def __init__(self) -> None:
        self._definitions: dict[str, PPBCPowerProfileDefinition] = {}
        self._status: PPBCPowerProfileStatus | None = None

    def power_profile_definitions(self) -> list[PPBCPowerProfileDefinition]:
        return list(self._definitions.values())

    def power_profile_definition(self, profile_id: Any) -> PPBCPowerProfileDefinition | None:
        return self._definitions.get(sid(profile_id))

    @property
    def power_profile_status(self) -> PPBCPowerProfileStatus | None:
        return self._status

    def snapshot(self) -> dict[str, Any]:
        return {
            "power_profile_definitions": [dump(v) for v in self._definitions.values()],
            "power_profile_status": dump(self._status),
        }


class PpbcPlugin(PluginBase[PpbcState]):
    control_type = ControlType.POWER_PROFILE_BASED_CONTROL
    name = "PPBC"
    snapshot_key = "ppbc"
    message_types = frozenset({DEFINITION, STATUS})
    instruction_types = frozenset({"PPBC.ScheduleInstruction", "PPBC.StartInterruptionInstruction",
                                   "PPBC.EndInterruptionInstruction"})
    state_class = PpbcState

    # --- session rules ------------------------------------------------------------------------

    def receive(self, state: PpbcState, message: Any, now: datetime,
                session: SessionView) -> str:
        if message.message_type == DEFINITION:
            if message.end_time <= message.start_time:
                raise content("power profile end_time is not after start_time")
            unique([c.id for c in message.power_sequences_containers], "sequence container")
            for container in message.power_sequences_containers:
                unique([s.id for s in container.power_sequences], "power sequence")
            live = sum(1 for d in state._definitions.values() if d.end_time > now)
            room_for_upcoming(live, "PPBC power profiles")
            state._definitions = {k: d for k, d in state._definitions.items()
                                  if d.end_time > now}
            state._definitions[sid(message.id)] = message
            return "power_profile"
        if message.message_type == STATUS:
            for status in message.sequence_container_status:
                profile = state.power_profile_definition(status.power_profile_id)
                if profile is None:
                    raise content(f"unknown power profile "
                                  f"{session.external_of(status.power_profile_id)}")
                container = next((c for c in profile.power_sequences_containers
                                  if sid(c.id) == sid(status.sequence_container_id)), None)
                if container is None:
                    raise content(f"unknown sequence container "
                                  f"{session.external_of(status.sequence_container_id)}")
                if status.selected_sequence_id is not None and sid(
                        status.selected_sequence_id) not in {sid(s.id)
                                                             for s in container.power_sequences}:
                    raise content(f"unknown power sequence "
                                  f"{session.external_of(status.selected_sequence_id)}")
            state._status = message
            return "status"
        return super().receive(state, message, now, session)

    def check_instruction(self, state: PpbcState, message: Any, now: datetime,
                          session: SessionView) -> None:
        profile = state.power_profile_definition(message.power_profile_id)
        if profile is None:
            raise content(f"unknown power profile "
                          f"{session.external_of(message.power_profile_id)}")
        container = next((c for c in profile.power_sequences_containers
                          if sid(c.id) == sid(message.sequence_container_id)), None)
        if container is None or sid(message.power_sequence_id) not in {
                sid(q.id) for q in container.power_sequences}:
            raise content("unknown sequence container or power sequence")

    def revoke(self, state: PpbcState, object_type: str, object_id: Any) -> bool:
        return object_type == DEFINITION and \
            state._definitions.pop(str(object_id), None) is not None

    # --- flex binding -------------------------------------------------------------------------

    def add_assets(self, site: SiteBuild, rm_id: str, rm: RmStateView) -> bool:
        state: PpbcState = rm.of(self.control_type)
        added = False
        for definition in state.power_profile_definitions():
            profile, binding = ppbc_assets(rm_id, definition, site.grid, site.now,
                                           status=state.power_profile_status)
            site.mapping.notes += binding.notes
            if profile is None:
                continue
            if isinstance(profile, FixedLoad):
                site.problem.fixed.append(profile)
            else:
                site.problem.profiles.append(profile)
            site.mapping.add(rm_id, profile.id, binding, "profile")
            added = True
        return added


PLUGIN = PpbcPlugin()
