"""S2 Connect mode (no Handshake) and S2 JSON v1.0.0 (DDBC) in the sans-I/O session."""

from __future__ import annotations

from typing import Any

from s2_session_messages import (
    DDBC,
    FRBC,
    T0,
    ack,
    connect,
    ddbc_actuator_status,
    ddbc_system_description,
    details,
    feed,
    frbc_actuator_status,
    frbc_system_description,
    handshake,
    sent,
    status_of,
)

from cem.s2.session import S2Session


def s2connect_session(control_types: list[str], version: str = "v1.0.0") -> S2Session:
    session = S2Session(control_type_preference=["FRBC", "DDBC"])
    session.start_s2connect(version)
    assert session.start(T0) == []                     # no Handshake of the CEM's own
    outs = feed(session, details(control_types))       # the RM starts with its details
    assert status_of(outs) == "OK"
    for out in outs:
        if out.message_type == "SelectControlType":
            ack(session, out)
    return session


def v1_system_description() -> dict[str, Any]:
    description = ddbc_system_description()
    del description["present_demand_rate"]
    return description


def test_s2connect_mode_starts_at_details_and_refuses_a_handshake() -> None:
    session = s2connect_session([FRBC])
    assert session.state.protocol_version == "v1.0.0"
    assert session.state.control_type is not None
    assert status_of(feed(session, handshake("hs-late"))) == "INVALID_CONTENT"
    assert status_of(feed(session, frbc_system_description())) == "OK"


def test_v1_ddbc_system_description_and_present_demand_status() -> None:
    session = s2connect_session([DDBC])
    assert status_of(feed(session, ddbc_system_description())) == "INVALID_MESSAGE"
    assert status_of(feed(session, v1_system_description())) == "OK"
    status = {"message_type": "DDBC.PresentDemandStatus", "message_id": "pds-1",
              "present_demand_rate": {"start_of_range": 2, "end_of_range": 4}}
    assert status_of(feed(session, status)) == "OK"
    in_force = session.state.of("DDBC").system_description(T0)
    assert in_force is not None and in_force.present_demand_rate.end_of_range == 4
    assert status_of(feed(session, {**status, "message_id": "pds-2", "extra": 1})) == \
        "INVALID_MESSAGE"
    upside_down = {**status, "message_id": "pds-3",
                   "present_demand_rate": {"start_of_range": 5, "end_of_range": 1}}
    assert status_of(feed(session, upside_down)) == "INVALID_CONTENT"


def test_present_demand_status_is_not_a_0_0_2_beta_message() -> None:
    session, outs = connect([DDBC])
    assert sent(outs, "SelectControlType")
    status = {"message_type": "DDBC.PresentDemandStatus", "message_id": "pds-1",
              "present_demand_rate": {"start_of_range": 2, "end_of_range": 4}}
    assert status_of(feed(session, status)) == "INVALID_MESSAGE"
    assert status_of(feed(session, ddbc_system_description())) == "OK"


def test_operation_mode_factor_is_checked_both_ways() -> None:
    session = s2connect_session([FRBC])
    assert status_of(feed(session, frbc_system_description())) == "OK"
    too_much = {**frbc_actuator_status(), "operation_mode_factor": 1.5}
    assert status_of(feed(session, too_much)) == "INVALID_CONTENT"
    assert status_of(feed(session, frbc_actuator_status(message_id="as-2"))) == "OK"
    ddbc = s2connect_session([DDBC])
    feed(ddbc, v1_system_description())
    assert status_of(feed(ddbc, {**ddbc_actuator_status(), "operation_mode_factor": -0.1})) == \
        "INVALID_CONTENT"


def test_a_present_demand_rate_that_is_no_number_is_refused() -> None:
    session = s2connect_session([DDBC])
    assert status_of(feed(session, v1_system_description())) == "OK"
    for number in ("NaN", "-Infinity", 1e15):
        status = {"message_type": "DDBC.PresentDemandStatus", "message_id": "pds-nan",
                  "present_demand_rate": {"start_of_range": 0, "end_of_range": number}}
        outs = feed(session, status)
        assert status_of(outs) == "INVALID_CONTENT"
        label = next(o.text for o in outs if o.message_type == "ReceptionStatus")
        assert "present_demand_rate.end_of_range" in label
    in_force = session.state.of("DDBC").system_description(T0)
    assert in_force is not None and in_force.present_demand_rate.end_of_range == 0
