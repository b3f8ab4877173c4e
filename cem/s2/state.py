"""What the CEM knows about one resource manager, built from the S2 messages it sent.

`RmState` is owned by an `S2Session`: only the session changes it (the ``_``-prefixed methods),
everybody else reads it through the public properties and methods, which return s2-python model
objects whose ids are UUIDs (ids the RM sent as other strings are translated per session, see
`cem.s2.ids`). ``snapshot()`` gives a JSON-able dict for the store.

Time-dependent objects (system descriptions, leakage behaviour, PEBC constraints) are kept with
their ``valid_from``; "the one in force" at ``now`` is the one with the latest ``valid_from`` that
is not after ``now``. Future ones are kept until they come into force; older ones are pruned when
a newer one is in force.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from s2python.common import (
    CommodityQuantity,
    ControlType,
    InstructionStatus,
    InstructionStatusUpdate,
    PowerForecast,
    PowerMeasurement,
    ResourceManagerDetails,
)
from s2python.ddbc import (
    DDBCActuatorStatus,
    DDBCAverageDemandRateForecast,
    DDBCSystemDescription,
    DDBCTimerStatus,
)
from s2python.frbc import (
    FRBCActuatorStatus,
    FRBCFillLevelTargetProfile,
    FRBCLeakageBehaviour,
    FRBCStorageStatus,
    FRBCSystemDescription,
    FRBCTimerStatus,
    FRBCUsageForecast,
)
from s2python.ombc import OMBCStatus, OMBCSystemDescription, OMBCTimerStatus
from s2python.pebc import PEBCEnergyConstraint, PEBCPowerConstraints
from s2python.ppbc import PPBCPowerProfileDefinition, PPBCPowerProfileStatus

from cem.s2.ids import id_key

IdLike = uuid.UUID | str


def _key(value: object) -> str:
    return id_key(value)


class _HasValidFrom(Protocol):
    valid_from: datetime
    message_id: Any


T = TypeVar("T", bound=_HasValidFrom)


class ValidFromHistory(Generic[T]):
    """Versions of one object kind ordered by ``valid_from``; answers "which one is in force"."""

    def __init__(self) -> None:
        self._items: list[T] = []

    def add(self, item: T, now: datetime) -> None:
        """Keep ``item`` (a later one with the same valid_from replaces the earlier one)."""
        self._items = [i for i in self._items if i.valid_from != item.valid_from]
        self._items.append(item)
        self._items.sort(key=lambda i: i.valid_from)
        self.prune(now)

    def in_force(self, now: datetime) -> T | None:
        """The item with the latest valid_from <= now, or None."""
        current = None
        for item in self._items:
            if item.valid_from <= now:
                current = item
        return current

    def upcoming(self, now: datetime) -> list[T]:
        """Items that come into force after ``now``, earliest first."""
        return [i for i in self._items if i.valid_from > now]

    def latest(self) -> T | None:
        """The item with the latest valid_from, in force or not."""
        return self._items[-1] if self._items else None

    def all(self) -> list[T]:
        return list(self._items)

    def prune(self, now: datetime) -> None:
        """Forget versions superseded by the one in force at ``now``."""
        current = self.in_force(now)
        if current is not None:
            self._items = [i for i in self._items if i.valid_from >= current.valid_from]

    def drop(self, object_id: IdLike) -> bool:
        """Remove the version whose message_id is ``object_id``; True if there was one."""
        before = len(self._items)
        self._items = [i for i in self._items if _key(i.message_id) != _key(object_id)]
        return len(self._items) != before

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class MeasuredPower:
    """The latest power of one commodity quantity and when it was measured."""

    commodity_quantity: CommodityQuantity
    value_w: float
    measured_at: datetime


@dataclass
class InstructionRecord:
    """An instruction the CEM sent and what the RM said about it since."""

    instruction: Any                   # the s2-python *.Instruction model as sent
    sent_at: datetime
    status: InstructionStatus | None = None
    status_at: datetime | None = None
    revoked: bool = False


class RmState:
    """Everything one resource manager told the CEM in this session (read-only for others)."""

    def __init__(self) -> None:
        self.protocol_version: str | None = None
        self._details: ResourceManagerDetails | None = None
        self._control_type: ControlType | None = None
        self._measurements: dict[CommodityQuantity, MeasuredPower] = {}
        self._last_measurement: PowerMeasurement | None = None
        self._power_forecast: PowerForecast | None = None
        self._instructions: dict[str, InstructionRecord] = {}
        self._rm_ids: Callable[[], dict[str, str]] = dict
        self._clear_control_type_state()

    # --- changes, only by the session --------------------------------------------------------

    def _clear_control_type_state(self) -> None:
        """Forget everything that belongs to a control type (on switching or NO_SELECTION)."""
        self._frbc_sd: ValidFromHistory[FRBCSystemDescription] = ValidFromHistory()
        self._frbc_actuator_status: dict[str, FRBCActuatorStatus] = {}
        self._frbc_storage_status: FRBCStorageStatus | None = None
        self._frbc_leakage: ValidFromHistory[FRBCLeakageBehaviour] = ValidFromHistory()
        self._frbc_usage: FRBCUsageForecast | None = None
        self._frbc_target: FRBCFillLevelTargetProfile | None = None
        self._frbc_timers: dict[tuple[str, str], FRBCTimerStatus] = {}
        self._pebc_power: dict[str, PEBCPowerConstraints] = {}
        self._pebc_energy: dict[str, PEBCEnergyConstraint] = {}
        self._ppbc_definitions: dict[str, PPBCPowerProfileDefinition] = {}
        self._ppbc_status: PPBCPowerProfileStatus | None = None
        self._ombc_sd: ValidFromHistory[OMBCSystemDescription] = ValidFromHistory()
        self._ombc_status: OMBCStatus | None = None
        self._ombc_timers: dict[str, OMBCTimerStatus] = {}
        self._ddbc_sd: ValidFromHistory[DDBCSystemDescription] = ValidFromHistory()
        self._ddbc_actuator_status: dict[str, DDBCActuatorStatus] = {}
        self._ddbc_timers: dict[tuple[str, str], DDBCTimerStatus] = {}
        self._ddbc_demand_forecast: DDBCAverageDemandRateForecast | None = None

    def _set_details(self, details: ResourceManagerDetails) -> None:
        self._details = details
        advertised = set(details.provides_power_measurement_types)
        self._measurements = {q: m for q, m in self._measurements.items() if q in advertised}

    def _set_control_type(self, control_type: ControlType | None) -> None:
        if control_type != self._control_type:
            self._clear_control_type_state()
        self._control_type = control_type

    def _add_measurement(self, measurement: PowerMeasurement) -> None:
        self._last_measurement = measurement
        for value in measurement.values:
            self._measurements[value.commodity_quantity] = MeasuredPower(
                value.commodity_quantity, value.value, measurement.measurement_timestamp)

    def _record_instruction(self, instruction: Any, now: datetime) -> None:
        self._instructions[_key(instruction.id)] = InstructionRecord(instruction, now)

    def _update_instruction(self, update: InstructionStatusUpdate) -> None:
        record = self._instructions[_key(update.instruction_id)]
        record.status = update.status_type
        record.status_at = update.timestamp
        instruction = record.instruction
        if (getattr(instruction, "message_type", "") == "FRBC.Instruction"
                and update.status_type in (InstructionStatus.STARTED,
                                           InstructionStatus.SUCCEEDED)):
            # what the RM says it carried out is the actuator's mode until its next
            # ActuatorStatus: a plan made in between must not take it for the old mode (a
            # heat pump just switched on, whose minimum run time then holds it on)
            key = _key(instruction.actuator_id)
            old = self._frbc_actuator_status.get(key)
            if old is None or old.active_operation_mode_id != instruction.operation_mode or \
                    old.operation_mode_factor != instruction.operation_mode_factor:
                self._frbc_actuator_status[key] = FRBCActuatorStatus(
                    message_id=uuid.uuid4(), actuator_id=instruction.actuator_id,
                    active_operation_mode_id=instruction.operation_mode,
                    operation_mode_factor=instruction.operation_mode_factor,
                    previous_operation_mode_id=old.active_operation_mode_id if old else None,
                    transition_timestamp=update.timestamp)

    # --- read-only view ----------------------------------------------------------------------

    @property
    def details(self) -> ResourceManagerDetails | None:
        """The latest ResourceManagerDetails, or None before the RM sent them."""
        return self._details

    @property
    def control_type(self) -> ControlType | None:
        """The control type the CEM selected (None before any selection)."""
        return self._control_type

    @property
    def resource_id(self) -> uuid.UUID | None:
        return self._details.resource_id if self._details else None

    def latest_measurement(self) -> PowerMeasurement | None:
        """The last PowerMeasurement message as received."""
        return self._last_measurement

    def measured_power(self) -> dict[CommodityQuantity, MeasuredPower]:
        """Latest measured power per commodity quantity, with its time."""
        return dict(self._measurements)

    def power_forecast(self) -> PowerForecast | None:
        return self._power_forecast

    def instruction(self, instruction_id: IdLike) -> InstructionRecord | None:
        return self._instructions.get(_key(instruction_id))

    def instruction_status(self, instruction_id: IdLike) -> InstructionStatus | None:
        """The last status the RM reported for an instruction (None: unknown or none yet)."""
        record = self._instructions.get(_key(instruction_id))
        return record.status if record else None

    def instructions(self) -> dict[str, InstructionRecord]:
        return dict(self._instructions)

    # FRBC
    def frbc_system_description(self, now: datetime) -> FRBCSystemDescription | None:
        """The FRBC.SystemDescription in force at ``now``."""
        return self._frbc_sd.in_force(now)

    def frbc_upcoming_system_descriptions(self, now: datetime) -> list[FRBCSystemDescription]:
        return self._frbc_sd.upcoming(now)

    def frbc_actuator_status(self, actuator_id: IdLike) -> FRBCActuatorStatus | None:
        return self._frbc_actuator_status.get(_key(actuator_id))

    def frbc_actuator_statuses(self) -> dict[str, FRBCActuatorStatus]:
        return dict(self._frbc_actuator_status)

    @property
    def frbc_storage_status(self) -> FRBCStorageStatus | None:
        return self._frbc_storage_status

    def frbc_leakage_behaviour(self, now: datetime) -> FRBCLeakageBehaviour | None:
        return self._frbc_leakage.in_force(now)

    @property
    def frbc_usage_forecast(self) -> FRBCUsageForecast | None:
        return self._frbc_usage

    @property
    def frbc_fill_level_target_profile(self) -> FRBCFillLevelTargetProfile | None:
        return self._frbc_target

    def frbc_timer_statuses(self) -> dict[tuple[str, str], FRBCTimerStatus]:
        """(actuator_id, timer_id) -> latest FRBC.TimerStatus."""
        return dict(self._frbc_timers)

    # PEBC
    def pebc_power_constraints(self, now: datetime | None = None) -> list[PEBCPowerConstraints]:
        """Known power constraints; with ``now``: only those valid at now (valid_until open or later)."""
        items = sorted(self._pebc_power.values(), key=lambda c: c.valid_from)
        if now is None:
            return items
        return [c for c in items
                if c.valid_from <= now and (c.valid_until is None or c.valid_until > now)]

    def pebc_energy_constraints(self) -> list[PEBCEnergyConstraint]:
        return sorted(self._pebc_energy.values(), key=lambda c: c.valid_from)

    # PPBC
    def ppbc_power_profile_definitions(self) -> list[PPBCPowerProfileDefinition]:
        return list(self._ppbc_definitions.values())

    def ppbc_power_profile_definition(self, profile_id: IdLike) -> PPBCPowerProfileDefinition | None:
        return self._ppbc_definitions.get(_key(profile_id))

    @property
    def ppbc_power_profile_status(self) -> PPBCPowerProfileStatus | None:
        return self._ppbc_status

    # OMBC
    def ombc_system_description(self, now: datetime) -> OMBCSystemDescription | None:
        return self._ombc_sd.in_force(now)

    @property
    def ombc_status(self) -> OMBCStatus | None:
        return self._ombc_status

    def ombc_timer_statuses(self) -> dict[str, OMBCTimerStatus]:
        return dict(self._ombc_timers)

    # DDBC
    def ddbc_system_description(self, now: datetime) -> DDBCSystemDescription | None:
        return self._ddbc_sd.in_force(now)

    def ddbc_actuator_status(self, actuator_id: IdLike) -> DDBCActuatorStatus | None:
        return self._ddbc_actuator_status.get(_key(actuator_id))

    def ddbc_timer_statuses(self) -> dict[tuple[str, str], DDBCTimerStatus]:
        return dict(self._ddbc_timers)

    @property
    def ddbc_average_demand_rate_forecast(self) -> DDBCAverageDemandRateForecast | None:
        return self._ddbc_demand_forecast

    # --- for the store -----------------------------------------------------------------------

    def snapshot(self, now: datetime | None = None) -> dict[str, Any]:
        """All state as plain JSON types.

        Ids are the UUID strings the CEM uses; ``rm_ids`` maps those that the RM wrote otherwise
        back to the RM's own ids.
        """

        def dump(obj: Any) -> Any:
            return obj.to_json_dict() if obj is not None else None

        ct = self._control_type
        return {
            "protocol_version": self.protocol_version,
            "rm_ids": self._rm_ids(),
            "control_type": ct.value if ct is not None else None,
            "details": dump(self._details),
            "measurements": {
                q.value: {"value_w": m.value_w, "measured_at": m.measured_at.isoformat()}
                for q, m in self._measurements.items()
            },
            "power_forecast": dump(self._power_forecast),
            "instructions": {
                k: {
                    "message_type": r.instruction.message_type,
                    "sent_at": r.sent_at.isoformat(),
                    "status": r.status.value if r.status is not None else None,
                    "status_at": r.status_at.isoformat() if r.status_at else None,
                    "revoked": r.revoked,
                }
                for k, r in self._instructions.items()
            },
            "frbc": {
                "system_descriptions": [dump(s) for s in self._frbc_sd.all()],
                "actuator_status": {k: dump(v) for k, v in self._frbc_actuator_status.items()},
                "storage_status": dump(self._frbc_storage_status),
                "leakage_behaviour": [dump(s) for s in self._frbc_leakage.all()],
                "usage_forecast": dump(self._frbc_usage),
                "fill_level_target_profile": dump(self._frbc_target),
                "timer_status": [dump(v) for v in self._frbc_timers.values()],
            },
            "pebc": {
                "power_constraints": [dump(v) for v in self._pebc_power.values()],
                "energy_constraints": [dump(v) for v in self._pebc_energy.values()],
            },
            "ppbc": {
                "power_profile_definitions": [dump(v) for v in self._ppbc_definitions.values()],
                "power_profile_status": dump(self._ppbc_status),
            },
            "ombc": {
                "system_descriptions": [dump(s) for s in self._ombc_sd.all()],
                "status": dump(self._ombc_status),
                "timer_status": [dump(v) for v in self._ombc_timers.values()],
            },
            "ddbc": {
                "system_descriptions": [dump(s) for s in self._ddbc_sd.all()],
                "actuator_status": {k: dump(v) for k, v in self._ddbc_actuator_status.items()},
                "timer_status": [dump(v) for v in self._ddbc_timers.values()],
                "average_demand_rate_forecast": dump(self._ddbc_demand_forecast),
            },
        }
