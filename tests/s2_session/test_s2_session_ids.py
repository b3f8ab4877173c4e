"""Ids that are not UUIDs: accepted, used as UUIDs inside, translated back on the wire."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from s2_session_messages import (
    FIXTURES,
    FRBC,
    T0,
    cem_message,
    connect,
    feed,
    frbc_actuator_status,
    frbc_system_description,
    instruction_status,
    status_of,
)
from s2python.common import InstructionStatus, RevokableObjects, RevokeObject
from s2python.frbc import FRBCInstruction

from cem.s2.ids import IdTranslator, is_valid_id
from cem.s2.session import InstructionStatusChanged


def test_id_pattern_is_matched_whole() -> None:
    assert is_valid_id("sd-1") and is_valid_id("a:b_c-D9") and is_valid_id("x" * 64)
    for bad in ("a", "x" * 65, "a b", "é-1", "", "sd/1", 12):
        assert not is_valid_id(bad)


def test_translation_is_deterministic_per_session_and_keeps_uuids() -> None:
    ids = IdTranslator(uuid.UUID(int=1))
    inside = ids.to_internal("sd-1")
    assert inside == ids.to_internal("sd-1")
    assert uuid.UUID(inside) and ids.to_external(inside) == "sd-1"
    assert IdTranslator(uuid.UUID(int=2)).to_internal("sd-1") != inside
    # the UUID is uuid5 of the session's namespace, whatever the id's length or characters
    for rm_id in ("sd-1", "x" * 64, "a:b_c-D9", "m0001-000000000001", "SD-1"):
        assert ids.to_internal(rm_id) == str(uuid.uuid5(uuid.UUID(int=1), rm_id))
    real = str(uuid.uuid4())
    assert ids.to_internal(real) == real and ids.to_external(real) == real
    upper = real.upper()  # not canonical: translated, and written back exactly as sent
    assert ids.to_external(ids.to_internal(upper)) == upper


def test_non_uuid_ids_are_stored_as_uuids_and_resolvable() -> None:
    session, _ = connect([FRBC])
    assert status_of(feed(session, frbc_system_description())) == "OK"
    description = session.state.of("FRBC").system_description(T0)
    assert description is not None
    actuator = description.actuators[0]
    assert isinstance(actuator.id, uuid.UUID)
    assert session.ids.external_of(actuator.id) == "act-1"
    assert session.ids.external_of(description.message_id) == "sd-1"
    modes = {session.ids.external_of(m.id) for m in actuator.operation_modes}
    assert modes == {"om-off", "om-on"}
    transition = actuator.transitions[0]
    assert session.ids.external_of(transition.from_) == "om-off"
    assert [session.ids.external_of(t) for t in transition.start_timers] == ["t-min-on"]
    assert status_of(feed(session, frbc_actuator_status())) == "OK"
    assert session.state.of("FRBC").actuator_status(actuator.id) is not None


def test_send_translates_ids_back_and_tracks_the_instruction() -> None:
    session, _ = connect([FRBC])
    feed(session, frbc_system_description())
    session.drain_events()
    description = session.state.of("FRBC").system_description(T0)
    assert description is not None
    actuator = description.actuators[0]
    on_mode = next(m for m in actuator.operation_modes
                   if session.ids.external_of(m.id) == "om-on")
    instruction = FRBCInstruction(message_id=uuid.uuid4(), id=uuid.uuid4(), actuator_id=actuator.id,
                                  operation_mode=on_mode.id, operation_mode_factor=0.5,
                                  execution_time=T0 + timedelta(minutes=15),
                                  abnormal_condition=False)
    out = session.send(instruction, T0)
    wire = json.loads(out.text)
    assert wire["actuator_id"] == "act-1" and wire["operation_mode"] == "om-on"
    assert wire["id"] == str(instruction.id)  # the CEM's own ids stay as they are
    assert out.awaits_status and out.message_id == str(instruction.message_id)
    assert out.message_id in session.pending_message_ids

    assert session.state.instruction_status(instruction.id) is None
    assert status_of(feed(session, instruction_status(str(instruction.id), "ACCEPTED"))) == "OK"
    assert session.state.instruction_status(instruction.id) == InstructionStatus.ACCEPTED
    assert status_of(feed(session, instruction_status(str(instruction.id), "STARTED",
                                                      "isu-2"))) == "OK"
    assert session.state.instruction_status(str(instruction.id)) == InstructionStatus.STARTED
    events = [e for e in session.drain_events() if isinstance(e, InstructionStatusChanged)]
    assert events == [InstructionStatusChanged(str(instruction.id), "ACCEPTED"),
                      InstructionStatusChanged(str(instruction.id), "STARTED")]

    revoke = RevokeObject(message_id=uuid.uuid4(),
                          object_type=RevokableObjects.FRBC_Instruction,
                          object_id=instruction.id)
    session.send(revoke, T0)
    record = session.state.instruction(instruction.id)
    assert record is not None and record.revoked


def test_instruction_with_rm_style_id_round_trips() -> None:
    """The documentation's EV example: instruction "instruction1" and its status update."""
    session, _ = connect([FRBC], measures=["ELECTRIC.POWER.3_PHASE_SYMMETRIC"])
    documented = (FIXTURES / "docs_ev_frbc" / "03_frbc_system_description.json").read_text()
    assert status_of(feed(session, documented)) == "OK"
    instruction = cem_message(session, {
        "message_type": "FRBC.Instruction", "message_id": "cem-msg-1", "id": "instruction1",
        "actuator_id": "actuator1", "operation_mode": "om1", "operation_mode_factor": 1,
        "execution_time": "2019-08-24T14:15:22Z", "abnormal_condition": False})
    wire = json.loads(session.send(instruction, T0).text)
    assert (wire["message_id"], wire["id"], wire["actuator_id"], wire["operation_mode"]) == (
        "cem-msg-1", "instruction1", "actuator1", "om1")
    assert status_of(feed(session, instruction_status("instruction1", "NEW"))) == "OK"
    assert session.state.instruction_status(instruction.id) == InstructionStatus.NEW


def test_send_refuses_what_a_cem_must_not_send() -> None:
    session, _ = connect([FRBC])
    instruction = cem_message(session, {
        "message_type": "PEBC.Instruction", "message_id": "m-1", "id": "env-1",
        "execution_time": "2019-08-24T14:15:22Z", "abnormal_condition": False,
        "power_constraints_id": "pc-1", "power_envelopes": [
            {"id": "pe-1", "commodity_quantity": "ELECTRIC.POWER.L1",
             "power_envelope_elements": [{"duration": 1000, "upper_limit": 0,
                                          "lower_limit": -10}]}]})
    with pytest.raises(ValueError, match="active control type is FILL_RATE_BASED_CONTROL"):
        session.send(instruction, T0)
    status = cem_message(session, {"message_type": "PowerMeasurement", "message_id": "pm-9",
                                   "measurement_timestamp": "2019-08-24T14:15:22Z",
                                   "values": [{"commodity_quantity": "ELECTRIC.POWER.L1",
                                               "value": 1}]})
    with pytest.raises(ValueError, match="does not send PowerMeasurement"):
        session.send(status, T0)


def test_send_refuses_an_instruction_naming_an_unknown_operation_mode() -> None:
    session, _ = connect([FRBC])
    feed(session, frbc_system_description())
    instruction = cem_message(session, {
        "message_type": "FRBC.Instruction", "message_id": "cem-msg-1", "id": "ins-1",
        "actuator_id": "act-1", "operation_mode": "om-turbo", "operation_mode_factor": 1,
        "execution_time": "2026-03-01T12:00:00Z", "abnormal_condition": False})
    with pytest.raises(ValueError, match="unknown operation mode om-turbo"):
        session.send(instruction, T0)
    assert session.state.instruction(instruction.id) is None
    assert "cem-msg-1" not in session.pending_message_ids


def test_an_instruction_the_rm_started_is_the_actuators_mode_until_its_next_status() -> None:
    """A plan made between the RM's STARTED and its next ActuatorStatus must see the new mode
    (a heat pump just switched on, held on by its minimum on time), not the old one."""
    session, _ = connect([FRBC])
    feed(session, frbc_system_description())
    assert status_of(feed(session, frbc_actuator_status("om-off"))) == "OK"
    actuator = session.state.of("FRBC").system_description(T0).actuators[0]
    on_mode = next(m for m in actuator.operation_modes
                   if session.ids.external_of(m.id) == "om-on")
    instruction = FRBCInstruction(message_id=uuid.uuid4(), id=uuid.uuid4(), actuator_id=actuator.id,
                                  operation_mode=on_mode.id, operation_mode_factor=0.7,
                                  execution_time=T0, abnormal_condition=False)
    session.send(instruction, T0)
    feed(session, instruction_status(str(instruction.id), "ACCEPTED"))
    status = session.state.of("FRBC").actuator_status(actuator.id)
    assert status is not None and session.ids.external_of(status.active_operation_mode_id) == \
        "om-off"  # accepted is not carried out
    feed(session, instruction_status(str(instruction.id), "STARTED", "isu-2"))
    status = session.state.of("FRBC").actuator_status(actuator.id)
    assert status is not None and str(status.active_operation_mode_id) == str(on_mode.id)
    assert status.operation_mode_factor == 0.7
    # the RM's own next status has the last word
    feed(session, frbc_actuator_status("om-off", message_id="as-2"))
    status = session.state.of("FRBC").actuator_status(actuator.id)
    assert status is not None and session.ids.external_of(status.active_operation_mode_id) == \
        "om-off"
