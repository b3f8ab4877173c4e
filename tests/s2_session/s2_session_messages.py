"""Valid RM-side S2 messages (as JSON dicts, with non-UUID ids like real RMs use) for the tests."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from s2python.s2_parser import TYPE_TO_MESSAGE_CLASS

from cem.s2.ids import generated_model, map_ids
from cem.s2.session import Outgoing, S2Session

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "s2"

FRBC = "FILL_RATE_BASED_CONTROL"
PPBC = "POWER_PROFILE_BASED_CONTROL"
OMBC = "OPERATION_MODE_BASED_CONTROL"
DDBC = "DEMAND_DRIVEN_BASED_CONTROL"
PEBC = "POWER_ENVELOPE_BASED_CONTROL"
NOT_CONTROLABLE = "NOT_CONTROLABLE"
NO_SELECTION = "NO_SELECTION"


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def handshake(message_id: str = "hs-1", versions: list[str] | None = None,
              role: str = "RM") -> dict[str, Any]:
    return {"message_type": "Handshake", "message_id": message_id, "role": role,
            "supported_protocol_versions": ["0.0.2-beta"] if versions is None else versions}


def details(control_types: list[str], measures: list[str] | None = None,
            message_id: str = "rmd-1", resource_id: str = "rm-1") -> dict[str, Any]:
    return {"message_type": "ResourceManagerDetails", "message_id": message_id,
            "resource_id": resource_id, "name": "test RM",
            "roles": [{"role": "ENERGY_CONSUMER", "commodity": "ELECTRICITY"}],
            "instruction_processing_delay": 1000, "available_control_types": control_types,
            "provides_forecast": True,
            "provides_power_measurement_types": measures or ["ELECTRIC.POWER.L1"]}


def _power_range(lo: float, hi: float) -> dict[str, Any]:
    return {"start_of_range": lo, "end_of_range": hi, "commodity_quantity": "ELECTRIC.POWER.L1"}


def _range(lo: float, hi: float) -> dict[str, float]:
    return {"start_of_range": lo, "end_of_range": hi}


def frbc_system_description(message_id: str = "sd-1", valid_from: datetime = T0,
                            mode_elements: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A heat-pump-like FRBC system: one actuator, modes off/on, a minimum-on timer."""
    on_elements = mode_elements or [
        {"fill_level_range": _range(0, 50), "fill_rate": _range(0.01, 0.02),
         "power_ranges": [_power_range(1000, 2000)]},
        {"fill_level_range": _range(50, 100), "fill_rate": _range(0.005, 0.01),
         "power_ranges": [_power_range(1000, 2000)]},
    ]
    return {
        "message_type": "FRBC.SystemDescription", "message_id": message_id,
        "valid_from": iso(valid_from),
        "actuators": [{
            "id": "act-1", "diagnostic_label": "heat pump", "supported_commodities": ["ELECTRICITY"],
            "operation_modes": [
                {"id": "om-off", "diagnostic_label": "off", "abnormal_condition_only": False,
                 "elements": [{"fill_level_range": _range(0, 100), "fill_rate": _range(0, 0),
                               "power_ranges": [_power_range(0, 0)]}]},
                {"id": "om-on", "diagnostic_label": "on", "abnormal_condition_only": False,
                 "elements": on_elements},
            ],
            "transitions": [
                {"id": "tr-on", "from": "om-off", "to": "om-on", "start_timers": ["t-min-on"],
                 "blocking_timers": [], "abnormal_condition_only": False},
                {"id": "tr-off", "from": "om-on", "to": "om-off", "start_timers": [],
                 "blocking_timers": ["t-min-on"], "abnormal_condition_only": False},
            ],
            "timers": [{"id": "t-min-on", "diagnostic_label": "minimum on time",
                        "duration": 600000}],
        }],
        "storage": {"diagnostic_label": "buffer", "fill_level_label": "%",
                    "provides_leakage_behaviour": True,
                    "provides_fill_level_target_profile": True, "provides_usage_forecast": True,
                    "fill_level_range": _range(0, 100)},
    }


def frbc_actuator_status(mode: str = "om-on", message_id: str = "as-1",
                         actuator: str = "act-1") -> dict[str, Any]:
    return {"message_type": "FRBC.ActuatorStatus", "message_id": message_id,
            "actuator_id": actuator, "active_operation_mode_id": mode,
            "operation_mode_factor": 0.5}


def frbc_storage_status(fill: float = 40.0, message_id: str = "ss-1") -> dict[str, Any]:
    return {"message_type": "FRBC.StorageStatus", "message_id": message_id,
            "present_fill_level": fill}


def frbc_leakage(elements: list[tuple[float, float]] | None = None, message_id: str = "lb-1",
                 valid_from: datetime = T0) -> dict[str, Any]:
    spans = elements or [(0, 50), (50, 100)]
    return {"message_type": "FRBC.LeakageBehaviour", "message_id": message_id,
            "valid_from": iso(valid_from),
            "elements": [{"fill_level_range": _range(a, b), "leakage_rate": 0.001}
                         for a, b in spans]}


def frbc_usage_forecast(message_id: str = "uf-1") -> dict[str, Any]:
    return {"message_type": "FRBC.UsageForecast", "message_id": message_id,
            "start_time": iso(T0),
            "elements": [{"duration": 3600000, "usage_rate_expected": 0.002}]}


def frbc_target(message_id: str = "ft-1") -> dict[str, Any]:
    return {"message_type": "FRBC.FillLevelTargetProfile", "message_id": message_id,
            "start_time": iso(T0),
            "elements": [{"duration": 3600000, "fill_level_range": _range(60, 100)}]}


def frbc_timer_status(timer: str = "t-min-on", message_id: str = "ts-1") -> dict[str, Any]:
    return {"message_type": "FRBC.TimerStatus", "message_id": message_id, "timer_id": timer,
            "actuator_id": "act-1", "finished_at": iso(T0 + timedelta(minutes=10))}


def ombc_system_description(message_id: str = "osd-1", valid_from: datetime = T0) -> dict[str, Any]:
    return {"message_type": "OMBC.SystemDescription", "message_id": message_id,
            "valid_from": iso(valid_from),
            "operation_modes": [
                {"id": "om-low", "power_ranges": [_power_range(0, 500)],
                 "abnormal_condition_only": False},
                {"id": "om-high", "power_ranges": [_power_range(500, 3000)],
                 "abnormal_condition_only": False},
            ],
            "transitions": [
                {"id": "tr-up", "from": "om-low", "to": "om-high", "start_timers": ["t-hold"],
                 "blocking_timers": [], "abnormal_condition_only": False},
            ],
            "timers": [{"id": "t-hold", "duration": 60000}]}


def ombc_status(mode: str = "om-high", message_id: str = "ost-1") -> dict[str, Any]:
    return {"message_type": "OMBC.Status", "message_id": message_id,
            "active_operation_mode_id": mode, "operation_mode_factor": 1.0}


def ddbc_system_description(message_id: str = "dsd-1", valid_from: datetime = T0) -> dict[str, Any]:
    return {"message_type": "DDBC.SystemDescription", "message_id": message_id,
            "valid_from": iso(valid_from),
            "actuators": [{
                "id": "dd-act", "supported_commodites": ["ELECTRICITY", "GAS"],
                "operation_modes": [
                    {"Id": "dd-gas", "power_ranges": [_power_range(0, 0)],
                     "supply_range": _range(0, 10), "abnormal_condition_only": False},
                    {"Id": "dd-el", "power_ranges": [_power_range(500, 2500)],
                     "supply_range": _range(0, 8), "abnormal_condition_only": False},
                ],
                "transitions": [
                    {"id": "dd-tr", "from": "dd-gas", "to": "dd-el", "start_timers": [],
                     "blocking_timers": [], "abnormal_condition_only": False}],
                "timers": [{"id": "dd-timer", "duration": 1000}],
            }],
            "present_demand_rate": _range(0, 5),
            "provides_average_demand_rate_forecast": True}


def ddbc_actuator_status(mode: str = "dd-el", message_id: str = "das-1") -> dict[str, Any]:
    return {"message_type": "DDBC.ActuatorStatus", "message_id": message_id,
            "actuator_id": "dd-act", "active_operation_mode_id": mode,
            "operation_mode_factor": 0.3}


def ddbc_demand_forecast(message_id: str = "dfc-1") -> dict[str, Any]:
    return {"message_type": "DDBC.AverageDemandRateForecast", "message_id": message_id,
            "start_time": iso(T0), "elements": [{"duration": 900000,
                                                  "demand_rate_expected": 2.0}]}


def ppbc_definition(message_id: str = "ppd-1", profile_id: str = "pp-1") -> dict[str, Any]:
    return {"message_type": "PPBC.PowerProfileDefinition", "message_id": message_id,
            "id": profile_id, "start_time": iso(T0), "end_time": iso(T0 + timedelta(hours=6)),
            "power_sequences_containers": [{
                "id": "psc-1",
                "power_sequences": [
                    {"id": "seq-now", "elements": [{"duration": 3600000, "power_values": [
                        {"value_expected": 2000, "commodity_quantity": "ELECTRIC.POWER.L1"}]}],
                     "is_interruptible": False, "abnormal_condition_only": False},
                    {"id": "seq-later", "elements": [{"duration": 3600000, "power_values": [
                        {"value_expected": 2000, "commodity_quantity": "ELECTRIC.POWER.L1"}]}],
                     "is_interruptible": False, "abnormal_condition_only": False},
                ]}]}


def ppbc_status(sequence: str = "seq-now", message_id: str = "pps-1") -> dict[str, Any]:
    return {"message_type": "PPBC.PowerProfileStatus", "message_id": message_id,
            "sequence_container_status": [{
                "power_profile_id": "pp-1", "sequence_container_id": "psc-1",
                "selected_sequence_id": sequence, "status": "SCHEDULED"}]}


def pebc_power_constraints(message_id: str = "pc-msg-1", constraint_id: str = "pc-1",
                           valid_from: datetime = T0) -> dict[str, Any]:
    return {"message_type": "PEBC.PowerConstraints", "message_id": message_id,
            "id": constraint_id, "valid_from": iso(valid_from), "consequence_type": "VANISH",
            "allowed_limit_ranges": [
                {"commodity_quantity": "ELECTRIC.POWER.L1", "limit_type": "UPPER_LIMIT",
                 "range_boundary": _range(0, 0), "abnormal_condition_only": False},
                {"commodity_quantity": "ELECTRIC.POWER.L1", "limit_type": "LOWER_LIMIT",
                 "range_boundary": _range(-4000, 0), "abnormal_condition_only": False}]}


def pebc_energy_constraint(message_id: str = "ec-msg-1", constraint_id: str = "ec-1",
                           upper: float = 3000, lower: float = 1000) -> dict[str, Any]:
    return {"message_type": "PEBC.EnergyConstraint", "message_id": message_id,
            "id": constraint_id, "valid_from": iso(T0),
            "valid_until": iso(T0 + timedelta(hours=4)), "upper_average_power": upper,
            "lower_average_power": lower, "commodity_quantity": "ELECTRIC.POWER.L1"}


def power_measurement(values: dict[str, float] | None = None, message_id: str = "pm-1",
                      at: datetime = T0) -> dict[str, Any]:
    vals = values if values is not None else {"ELECTRIC.POWER.L1": 1500.0}
    return {"message_type": "PowerMeasurement", "message_id": message_id,
            "measurement_timestamp": iso(at),
            "values": [{"commodity_quantity": q, "value": v} for q, v in vals.items()]}


def power_forecast(message_id: str = "pf-1") -> dict[str, Any]:
    return {"message_type": "PowerForecast", "message_id": message_id, "start_time": iso(T0),
            "elements": [{"duration": 900000, "power_values": [
                {"value_expected": -2500, "commodity_quantity": "ELECTRIC.POWER.L1"}]}]}


def revoke(object_type: str, object_id: str, message_id: str = "rv-1") -> dict[str, Any]:
    return {"message_type": "RevokeObject", "message_id": message_id,
            "object_type": object_type, "object_id": object_id}


def session_request(request: str, label: str = "bye", message_id: str = "sr-1") -> dict[str, Any]:
    return {"message_type": "SessionRequest", "message_id": message_id, "request": request,
            "diagnostic_label": label}


def instruction_status(instruction_id: str, status: str = "ACCEPTED",
                       message_id: str = "isu-1") -> dict[str, Any]:
    return {"message_type": "InstructionStatusUpdate", "message_id": message_id,
            "instruction_id": instruction_id, "status_type": status, "timestamp": iso(T0)}


# --- driving a session ---------------------------------------------------------------------------


def feed(session: S2Session, message: dict[str, Any] | str | bytes,
         now: datetime = T0) -> list[Outgoing]:
    data = json.dumps(message) if isinstance(message, dict) else message
    return session.receive(data, now)


def statuses(outs: list[Outgoing]) -> list[dict[str, Any]]:
    return [json.loads(o.text) for o in outs if o.message_type == "ReceptionStatus"]


def status_of(outs: list[Outgoing]) -> str:
    """The single ReceptionStatus value in ``outs`` (asserts there is exactly one)."""
    found = statuses(outs)
    assert len(found) == 1, f"expected exactly one ReceptionStatus, got {found}"
    return found[0]["status"]


def sent(outs: list[Outgoing], message_type: str) -> list[dict[str, Any]]:
    return [json.loads(o.text) for o in outs if o.message_type == message_type]


def ack(session: S2Session, out: Outgoing, status: str = "OK", now: datetime = T0,
        label: str | None = None) -> list[Outgoing]:
    """The RM's ReceptionStatus for a CEM message."""
    message: dict[str, Any] = {"message_type": "ReceptionStatus",
                               "subject_message_id": out.message_id, "status": status}
    if label:
        message["diagnostic_label"] = label
    return session.receive(json.dumps(message), now)


def connect(control_types: list[str], preference: list[str] | None = None,
            measures: list[str] | None = None) -> tuple[S2Session, list[Outgoing]]:
    """A session through start, the RM's Handshake and its ResourceManagerDetails."""
    session = S2Session(control_type_preference=preference or ["FRBC", "PPBC", "OMBC", "DDBC",
                                                                "PEBC"])
    outs = session.start(T0)
    outs += feed(session, handshake())
    outs += feed(session, details(control_types, measures))
    return session, outs


def cem_message(session: S2Session, message: dict[str, Any]) -> Any:
    """An s2-python model for a CEM message written with the RM's own ids."""
    gen = generated_model(message["message_type"])
    assert gen is not None
    internal = map_ids(gen, message, session.ids.to_internal)
    return TYPE_TO_MESSAGE_CLASS[message["message_type"]].model_validate(internal)


def new_id() -> uuid.UUID:
    return uuid.uuid4()
