"""Interoperability with RMs built on s2-python: UUID ids pass unchanged, CEM output parses."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

from s2_session_messages import T0, ack, sent, status_of
from s2python.common import (
    Commodity,
    CommodityQuantity,
    ControlType,
    EnergyManagementRole,
    Handshake,
    InstructionStatus,
    InstructionStatusUpdate,
    NumberRange,
    PowerMeasurement,
    PowerRange,
    PowerValue,
    ResourceManagerDetails,
    Role,
    RoleType,
)
from s2python.frbc import (
    FRBCActuatorDescription,
    FRBCInstruction,
    FRBCOperationMode,
    FRBCOperationModeElement,
    FRBCStorageDescription,
    FRBCSystemDescription,
)
from s2python.s2_parser import S2Parser

from cem.s2.session import Outgoing, S2Session

L1 = CommodityQuantity.ELECTRIC_POWER_L1


def _mode(power: float) -> FRBCOperationMode:
    return FRBCOperationMode(id=uuid.uuid4(), abnormal_condition_only=False, elements=[
        FRBCOperationModeElement(
            fill_level_range=NumberRange(start_of_range=0, end_of_range=100),
            fill_rate=NumberRange(start_of_range=power / 1e5, end_of_range=power / 1e5),
            power_ranges=[PowerRange(start_of_range=power, end_of_range=power,
                                     commodity_quantity=L1)])])


def _parse_all(outs: list[Outgoing]) -> None:
    """What the CEM sends must parse with s2-python's own (RM side) parser."""
    for out in outs:
        S2Parser.parse_as_any_message(out.text)


def test_s2python_rm_session_round_trip() -> None:
    session = S2Session(control_type_preference=["FRBC"])
    outs = session.start(T0)
    rm_handshake = Handshake(message_id=uuid.uuid4(), role=EnergyManagementRole.RM,
                             supported_protocol_versions=["0.0.2-beta"])
    outs += session.receive(rm_handshake.to_json(), T0)
    resource_id = uuid.uuid4()
    rm_details = ResourceManagerDetails(
        message_id=uuid.uuid4(), resource_id=resource_id, name="s2-python RM",
        roles=[Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY)],
        instruction_processing_delay=200,
        available_control_types=[ControlType.FILL_RATE_BASED_CONTROL],
        provides_forecast=False, provides_power_measurement_types=[L1])
    outs += session.receive(rm_details.to_json(), T0)
    _parse_all(outs)
    assert session.state.resource_id == resource_id
    assert session.ids.translated == {}  # UUIDs need no translation

    off, on = _mode(0), _mode(3000)
    actuator = FRBCActuatorDescription(id=uuid.uuid4(), supported_commodities=[Commodity.ELECTRICITY],
                                       operation_modes=[off, on], transitions=[], timers=[])
    description = FRBCSystemDescription(
        message_id=uuid.uuid4(), valid_from=T0 - timedelta(minutes=1), actuators=[actuator],
        storage=FRBCStorageDescription(provides_leakage_behaviour=False,
                                       provides_fill_level_target_profile=False,
                                       provides_usage_forecast=False,
                                       fill_level_range=NumberRange(start_of_range=0,
                                                                    end_of_range=100)))
    outs = session.receive(description.to_json(), T0)
    assert status_of(outs) == "OK"
    _parse_all(outs)
    measurement = PowerMeasurement(message_id=uuid.uuid4(), measurement_timestamp=T0,
                                   values=[PowerValue(commodity_quantity=L1, value=2999.5)])
    assert status_of(session.receive(measurement.to_json(), T0)) == "OK"

    instruction = FRBCInstruction(message_id=uuid.uuid4(), id=uuid.uuid4(), actuator_id=actuator.id,
                                  operation_mode=on.id, operation_mode_factor=1.0,
                                  execution_time=T0, abnormal_condition=False)
    out = session.send(instruction, T0)
    parsed = S2Parser.parse_as_any_message(out.text)
    assert parsed == instruction
    assert ack(session, out) == []
    update = InstructionStatusUpdate(message_id=uuid.uuid4(), instruction_id=instruction.id,
                                      status_type=InstructionStatus.SUCCEEDED, timestamp=T0)
    assert status_of(session.receive(update.to_json().encode(), T0)) == "OK"
    assert session.state.instruction_status(instruction.id) == InstructionStatus.SUCCEEDED
    select = sent(session.select_control_type("NO_SELECTION", T0), "SelectControlType")
    assert select[0]["control_type"] == "NO_SELECTION"
    assert json.loads(session.terminate("test over", T0)[0].text)["request"] == "TERMINATE"
