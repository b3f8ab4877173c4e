"""Exactly one ReceptionStatus per received message, with the right code; CEM messages' statuses."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from s2_session_messages import (
    FRBC,
    OMBC,
    PEBC,
    PPBC,
    T0,
    ack,
    connect,
    feed,
    frbc_actuator_status,
    frbc_leakage,
    frbc_system_description,
    frbc_target,
    frbc_timer_status,
    instruction_status,
    ombc_status,
    ombc_system_description,
    pebc_energy_constraint,
    pebc_power_constraints,
    power_measurement,
    ppbc_definition,
    ppbc_status,
    revoke,
    sent,
    statuses,
)

from cem.s2.ids import NIL_UUID
from cem.s2.session import (
    MAX_UPCOMING_VERSIONS,
    MessageRejected,
    ReceptionConfirmed,
    ReceptionFailed,
    S2Session,
    StateChanged,
)


def _frbc_session() -> S2Session:
    session, _ = connect([FRBC, OMBC, PEBC, PPBC], measures=["ELECTRIC.POWER.L1"])
    assert statuses(feed(session, frbc_system_description()))[0]["status"] == "OK"
    session.drain_events()
    return session


def _with(message: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(message)
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _mode_gap() -> dict[str, Any]:
    elements = [
        {"fill_level_range": {"start_of_range": 0, "end_of_range": 40},
         "fill_rate": {"start_of_range": 0.01, "end_of_range": 0.02},
         "power_ranges": [{"start_of_range": 1000, "end_of_range": 2000,
                           "commodity_quantity": "ELECTRIC.POWER.L1"}]},
        {"fill_level_range": {"start_of_range": 50, "end_of_range": 100},
         "fill_rate": {"start_of_range": 0.01, "end_of_range": 0.02},
         "power_ranges": [{"start_of_range": 1000, "end_of_range": 2000,
                           "commodity_quantity": "ELECTRIC.POWER.L1"}]}]
    return frbc_system_description("sd-gap", mode_elements=elements)


def _mode_duplicate() -> dict[str, Any]:
    element = {"fill_level_range": {"start_of_range": 0, "end_of_range": 100},
               "fill_rate": {"start_of_range": 0.01, "end_of_range": 0.02},
               "power_ranges": [{"start_of_range": 1000, "end_of_range": 2000,
                                 "commodity_quantity": "ELECTRIC.POWER.L1"}]}
    return frbc_system_description("sd-dup", mode_elements=[element, element])


def _transition_to_unknown_mode() -> dict[str, Any]:
    message = frbc_system_description("sd-bad-tr")
    message["actuators"][0]["transitions"][0]["to"] = "om-missing"
    return message


def _transition_from(mode_id: str) -> dict[str, Any]:
    message = frbc_system_description("sd-x")
    message["actuators"][0]["transitions"][0]["from"] = mode_id
    return message


Case = tuple[str, Any, str, str]
CASES: list[Case] = [
    # INVALID_DATA: cannot even tell which message it is
    ("not json", "hello", "INVALID_DATA", "not JSON"),
    ("not utf-8", b"\xff\xfe\x00", "INVALID_DATA", "not UTF-8"),
    ("json array", "[1, 2]", "INVALID_DATA", "not an object"),
    ("json number", "42", "INVALID_DATA", "not an object"),
    ("nan literal", '{"message_type": "PowerMeasurement", "message_id": "pm-1", "x": NaN}',
     "INVALID_DATA", "not JSON"),
    ("no message_id", _with(power_measurement(), message_id=...), "INVALID_DATA", "message_id"),
    ("message_id not a string", _with(power_measurement(), message_id=12345), "INVALID_DATA",
     "message_id"),
    ("message_id with spaces", _with(power_measurement(), message_id="a b"), "INVALID_DATA",
     "message_id"),
    ("message_id too long", _with(power_measurement(), message_id="x" * 65), "INVALID_DATA",
     "message_id"),
    # INVALID_MESSAGE: fails the S2 schema
    ("unknown message_type", {"message_type": "FRBC.Nonsense", "message_id": "m-1"},
     "INVALID_MESSAGE", "unknown message_type"),
    ("missing message_type", {"message_id": "m-1"}, "INVALID_MESSAGE", "unknown message_type"),
    ("missing field", _with(power_measurement(), values=...), "INVALID_MESSAGE", "values"),
    ("extra field", _with(power_measurement(), colour="blue"), "INVALID_MESSAGE", "colour"),
    ("wrong type", _with(frbc_actuator_status(), operation_mode_factor="half"),
     "INVALID_MESSAGE", "operation_mode_factor"),
    ("naive timestamp", _with(power_measurement(), measurement_timestamp="2026-03-01T12:00:00"),
     "INVALID_MESSAGE", "measurement_timestamp"),
    ("bad enum", _with(power_measurement(), values=[{"commodity_quantity": "WIND",
                                                     "value": 1}]),
     "INVALID_MESSAGE", "commodity_quantity"),
    ("id not matching pattern", _with(frbc_actuator_status(), actuator_id="act 1!"),
     "INVALID_MESSAGE", "actuator_id"),
    ("nested id not matching pattern", _transition_from("om off!"), "INVALID_MESSAGE",
     "actuators[0].transitions[0].from"),
    ("nested id too short", _transition_from("o"), "INVALID_MESSAGE", "actuators.0.transitions"),
    # INVALID_CONTENT: valid schema, wrong meaning
    ("CEM-only message from RM", {"message_type": "SelectControlType", "message_id": "sct-1",
                                  "control_type": "FILL_RATE_BASED_CONTROL"},
     "INVALID_CONTENT", "does not accept"),
    ("instruction from RM",
     {"message_type": "FRBC.Instruction", "message_id": "in-1", "id": "ins-1",
      "actuator_id": "act-1", "operation_mode": "om-on", "operation_mode_factor": 1,
      "execution_time": "2026-03-01T12:00:00Z", "abnormal_condition": False},
     "INVALID_CONTENT", "does not accept"),
    ("unknown actuator", frbc_actuator_status(actuator="act-9"), "INVALID_CONTENT",
     "unknown actuator act-9"),
    ("unknown operation mode", frbc_actuator_status(mode="om-turbo"), "INVALID_CONTENT",
     "unknown operation mode om-turbo"),
    ("unknown timer", frbc_timer_status(timer="t-nope"), "INVALID_CONTENT", "unknown timer t-nope"),
    ("measurement quantity not advertised",
     power_measurement({"ELECTRIC.POWER.L2": 100.0}), "INVALID_CONTENT", "ELECTRIC.POWER.L2"),
    ("fill level gap in operation mode", _mode_gap(), "INVALID_CONTENT", "gap"),
    ("duplicate fill level range", _mode_duplicate(), "INVALID_CONTENT", "overlap"),
    ("fill level overlap in leakage", frbc_leakage([(0, 60), (50, 100)]), "INVALID_CONTENT",
     "overlap"),
    ("fill level gap in leakage", frbc_leakage([(0, 40), (50, 100)]), "INVALID_CONTENT", "gap"),
    ("transition to unknown mode", _transition_to_unknown_mode(), "INVALID_CONTENT",
     "om-missing"),
    ("target range upside down",
     {**frbc_target(), "elements": [{"duration": 1000, "fill_level_range":
                                     {"start_of_range": 80, "end_of_range": 20}}]},
     "INVALID_CONTENT", "start"),
    ("control type not active: OMBC", ombc_system_description(), "INVALID_CONTENT",
     "FILL_RATE_BASED_CONTROL"),
    ("control type not active: PEBC", pebc_power_constraints(), "INVALID_CONTENT",
     "active control type"),
    ("control type not active: PPBC", ppbc_definition(), "INVALID_CONTENT", "active control type"),
    ("status for unknown instruction", instruction_status("ins-404"), "INVALID_CONTENT",
     "unknown instruction ins-404"),
    ("revoke unknown object", revoke("FRBC.SystemDescription", "sd-404"), "INVALID_CONTENT",
     "sd-404"),
    ("revoke an instruction", revoke("FRBC.Instruction", "ins-1"), "INVALID_CONTENT",
     "only the CEM"),
    # OK
    ("actuator status", frbc_actuator_status(), "OK", ""),
    ("measurement", power_measurement(), "OK", ""),
]


@pytest.mark.parametrize(("name", "message", "expected", "label"), CASES,
                         ids=[c[0] for c in CASES])
def test_each_message_gets_exactly_one_status_with_the_right_code(
        name: str, message: Any, expected: str, label: str) -> None:
    session = _frbc_session()
    outs = feed(session, message)
    found = statuses(outs)
    assert len(found) == 1, found
    assert found[0]["status"] == expected, found[0]
    assert label in found[0].get("diagnostic_label", ""), found[0]
    assert session.close is None  # a bad message never ends the session
    if expected == "INVALID_DATA":
        assert found[0]["subject_message_id"] == NIL_UUID
    elif isinstance(message, dict):
        assert found[0]["subject_message_id"] == message["message_id"]
    rejected = [e for e in session.drain_events() if isinstance(e, MessageRejected)]
    assert len(rejected) == (0 if expected == "OK" else 1)


def test_rejected_message_leaves_state_untouched() -> None:
    session = _frbc_session()
    before = json.dumps(session.state.snapshot(), sort_keys=True)
    feed(session, frbc_actuator_status(mode="om-turbo"))
    feed(session, _mode_gap())
    assert json.dumps(session.state.snapshot(), sort_keys=True) == before


def test_pebc_and_ombc_and_ppbc_content_rules() -> None:
    session, _ = connect([PEBC])
    assert statuses(feed(session, pebc_energy_constraint(upper=500, lower=1000)))[0]["status"] \
        == "INVALID_CONTENT"
    session, _ = connect([OMBC])
    assert statuses(feed(session, ombc_status()))[0]["status"] == "INVALID_CONTENT"  # no SD yet
    feed(session, ombc_system_description())
    assert statuses(feed(session, ombc_status("om-x")))[0]["status"] == "INVALID_CONTENT"
    assert statuses(feed(session, ombc_status()))[0]["status"] == "OK"
    session, _ = connect([PPBC])
    feed(session, ppbc_definition())
    assert statuses(feed(session, ppbc_status("seq-x")))[0]["status"] == "INVALID_CONTENT"
    assert statuses(feed(session, ppbc_status()))[0]["status"] == "OK"


def test_temporary_error_while_closing_and_when_too_many_future_versions() -> None:
    session = _frbc_session()
    for i in range(MAX_UPCOMING_VERSIONS):
        future = frbc_system_description(f"sd-f{i}", valid_from=T0 + timedelta(hours=i + 1))
        assert statuses(feed(session, future))[0]["status"] == "OK"
    one_more = frbc_system_description("sd-too-many", valid_from=T0 + timedelta(days=30))
    assert statuses(feed(session, one_more))[0]["status"] == "TEMPORARY_ERROR"
    session.terminate("maintenance", T0)
    found = statuses(feed(session, power_measurement()))
    assert found[0]["status"] == "TEMPORARY_ERROR"
    assert "closing" in found[0]["diagnostic_label"]


def test_received_reception_status_is_never_answered() -> None:
    session = _frbc_session()
    assert feed(session, {"message_type": "ReceptionStatus", "subject_message_id": "zz-1",
                          "status": "OK"}) == []
    assert feed(session, {"message_type": "ReceptionStatus", "status": "BROKEN"}) == []


def test_reception_status_resolves_pending_cem_messages() -> None:
    session, outs = connect([FRBC, PEBC])
    handshake_out, response_out, select_out = (
        next(o for o in outs if o.message_type == t)
        for t in ("Handshake", "HandshakeResponse", "SelectControlType"))
    assert set(session.pending_message_ids) == {handshake_out.message_id,
                                                response_out.message_id, select_out.message_id}
    session.drain_events()
    assert ack(session, handshake_out) == []
    assert ack(session, response_out, "OK") == []
    events = session.drain_events()
    assert ReceptionConfirmed(handshake_out.message_id, "Handshake") in events
    assert session.pending_message_ids == [select_out.message_id]
    # the RM refuses the control type: the CEM knows nothing is active
    ack(session, select_out, "INVALID_CONTENT", label="not now")
    events = session.drain_events()
    failed = [e for e in events if isinstance(e, ReceptionFailed)]
    assert failed == [ReceptionFailed(select_out.message_id, "INVALID_CONTENT", "not now",
                                      "SelectControlType")]
    assert session.state.control_type is not None
    assert session.state.control_type.value == "NO_SELECTION"
    assert StateChanged("control_type", "SelectControlType") in events
    assert session.pending_message_ids == []


def test_missing_reception_status_times_out_via_expire() -> None:
    session = S2Session(control_type_preference=["FRBC"], reception_timeout_s=5)
    out = session.start(T0)[0]
    session.expire(T0 + timedelta(seconds=4.9))
    assert session.drain_events() == []
    session.expire(T0 + timedelta(seconds=5))
    events = session.drain_events()
    assert len(events) == 1 and isinstance(events[0], ReceptionFailed)
    assert events[0].message_id == out.message_id and events[0].status == "TIMEOUT"
    assert events[0].message_type == "Handshake" and "5 s" in events[0].diagnostic_label
    session.expire(T0 + timedelta(seconds=20))
    assert session.drain_events() == []  # reported once
    assert ack(session, out) == []        # a late status is ignored quietly
    assert session.drain_events() == []


def test_sent_select_control_type_is_a_pending_message() -> None:
    session, outs = connect([FRBC])
    select = sent(outs, "SelectControlType")[0]
    assert select["message_id"] in session.pending_message_ids

