"""What the CEM knows about one resource manager, built from the S2 messages it sent.

`RmState` is owned by an `S2Session`: only the session changes it (the ``_``-prefixed methods),
everybody else reads it through the public properties and methods, which return s2-python model
objects whose ids are UUIDs (ids the RM sent as other strings are translated per session, see
`cem.s2.ids`). ``snapshot()`` gives a JSON-able dict for the store.

What belongs to one control type lives in that control type's plug-in (`cem.control_types`):
the state of the active control type is `of(control_type)` (e.g.
``state.of("FRBC").system_description(now)``), created on selection and dropped on a switch;
`plugin` is the active control type's plug-in. Time-dependent objects (system descriptions,
leakage behaviour, PEBC constraints) are kept with their ``valid_from``; see
`cem.control_types.base.ValidFromHistory`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from s2python.common import (
    CommodityQuantity,
    ControlType,
    InstructionStatus,
    InstructionStatusUpdate,
    PowerForecast,
    PowerMeasurement,
    ResourceManagerDetails,
)

from cem.control_types import OWNER, PLUGINS, plugin_for
from cem.control_types.base import ControlTypePlugin, TypeState, ValidFromHistory, dump
from cem.s2.ids import id_key

__all__ = ["InstructionRecord", "MeasuredPower", "RmState", "ValidFromHistory"]

IdLike = uuid.UUID | str


def _key(value: object) -> str:
    return id_key(value)


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
        # the selected control type's plug-in and its state, replaced together (a planning
        # thread may read them while the session switches)
        self._active: tuple[ControlTypePlugin[Any], TypeState] | None = None
        self._measurements: dict[CommodityQuantity, MeasuredPower] = {}
        self._last_measurement: PowerMeasurement | None = None
        self._power_forecast: PowerForecast | None = None
        self._instructions: dict[str, InstructionRecord] = {}
        # bumped by every instruction status the RM reports: who checked the statuses at one
        # count need not read them again while it holds (`Dispatcher.unchanged`)
        self.statuses_version = 0
        self._rm_ids: Callable[[], dict[str, str]] = dict
        self._details_json: tuple[Any, Any] = (None, None)   # details, their JSON (snapshot)

    # --- changes, only by the session --------------------------------------------------------

    def _set_details(self, details: ResourceManagerDetails) -> None:
        self._details = details
        advertised = set(details.provides_power_measurement_types)
        self._measurements = {q: m for q, m in self._measurements.items() if q in advertised}

    def _set_control_type(self, control_type: ControlType | None) -> None:
        """Select a control type; switching forgets everything of the one before."""
        if control_type != self._control_type:
            plugin = plugin_for(control_type)
            self._active = (plugin, plugin.new_state()) if plugin is not None else None
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
        self.statuses_version += 1
        owner = OWNER.get(getattr(record.instruction, "message_type", ""))
        active = self._active
        if owner is not None and active is not None and owner is active[0]:
            owner.instruction_status(active[1], record.instruction, update)

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
    def plugin(self) -> ControlTypePlugin[Any] | None:
        """The plug-in of the selected control type (None: none or NO_SELECTION)."""
        active = self._active
        return active[0] if active is not None else None

    def of(self, control_type: ControlType | str) -> Any:
        """The state of one control type (given as ControlType, its value or short name): the
        RM's when it is the selected one, else an empty one."""
        plugin = plugin_for(control_type)
        if plugin is None:
            raise ValueError(f"no control type {control_type!r} has a state")
        active = self._active
        if active is not None and plugin is active[0]:
            return active[1]
        return plugin.new_state()

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

    # --- for the store -----------------------------------------------------------------------

    def snapshot(self, now: datetime | None = None) -> dict[str, Any]:
        """All state as plain JSON types, with a section per control type (empty but for the
        selected one).

        Ids are the UUID strings the CEM uses; ``rm_ids`` maps those that the RM wrote otherwise
        back to the RM's own ids.
        """
        ct = self._control_type
        details = self._details
        if self._details_json[0] is not details:   # once per details (every 5 s per RM)
            self._details_json = (details, dump(details))
        out: dict[str, Any] = {
            "protocol_version": self.protocol_version,
            "rm_ids": self._rm_ids(),
            "control_type": ct.value if ct is not None else None,
            "details": self._details_json[1],
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
        }
        active = self._active
        for plugin in PLUGINS:
            if plugin.snapshot_key is not None:
                if active is not None and plugin is active[0]:
                    out[plugin.snapshot_key] = active[1].snapshot()
                else:
                    out[plugin.snapshot_key] = _empty_snapshot(plugin)
        return out


_EMPTY_SNAPSHOTS: dict[str, dict[str, Any]] = {}


def _empty_snapshot(plugin: ControlTypePlugin[Any]) -> dict[str, Any]:
    """The snapshot section of a control type that is not selected (the same every time)."""
    key = plugin.name
    found = _EMPTY_SNAPSHOTS.get(key)
    if found is None:
        found = _EMPTY_SNAPSHOTS[key] = plugin.new_state().snapshot()
    return found
