"""Handshake, version negotiation and control-type selection of the CEM's S2 session."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from s2_session_messages import (
    DDBC,
    FRBC,
    NO_SELECTION,
    NOT_CONTROLABLE,
    OMBC,
    PEBC,
    PPBC,
    T0,
    connect,
    details,
    feed,
    handshake,
    sent,
    status_of,
    statuses,
)

from cem.s2.session import (
    ControlTypeSelected,
    HandshakeDone,
    RmDetails,
    S2Session,
    SessionClosed,
)


def test_start_sends_the_cem_handshake_once() -> None:
    session = S2Session(control_type_preference=["FRBC"])
    outs = session.start(T0)
    assert len(outs) == 1
    message = json.loads(outs[0].text)
    assert message["message_type"] == "Handshake"
    assert message["role"] == "CEM"
    assert message["supported_protocol_versions"] == ["0.0.2-beta"]
    assert outs[0].awaits_status and outs[0].message_id == message["message_id"]
    assert session.start(T0) == []


def test_rm_handshake_is_answered_with_status_then_handshake_response() -> None:
    session = S2Session(control_type_preference=["FRBC"])
    session.start(T0)
    outs = feed(session, handshake())
    assert [o.message_type for o in outs] == ["ReceptionStatus", "HandshakeResponse"]
    assert statuses(outs)[0] == {"message_type": "ReceptionStatus", "subject_message_id": "hs-1",
                                 "status": "OK"}
    assert sent(outs, "HandshakeResponse")[0]["selected_protocol_version"] == "0.0.2-beta"
    assert session.handshake_done
    assert session.state.protocol_version == "0.0.2-beta"
    assert HandshakeDone("0.0.2-beta") in session.drain_events()


def test_handshake_before_start_still_sends_the_cem_handshake() -> None:
    session = S2Session(control_type_preference=["FRBC"])
    outs = feed(session, handshake())
    assert [o.message_type for o in outs] == ["ReceptionStatus", "Handshake", "HandshakeResponse"]


def test_first_common_version_in_cem_order_is_selected() -> None:
    session = S2Session(control_type_preference=["FRBC"], versions=("1.0.0", "0.0.2-beta"))
    session.start(T0)
    outs = feed(session, handshake(versions=["0.0.2-beta", "1.0.0"]))
    assert sent(outs, "HandshakeResponse")[0]["selected_protocol_version"] == "1.0.0"


@pytest.mark.parametrize("offered", [["0.0.1"], None])
def test_no_common_version_answers_then_closes(offered: list[str] | None) -> None:
    session = S2Session(control_type_preference=["FRBC"])
    session.start(T0)
    message = handshake(versions=offered or [])
    if offered is None:
        del message["supported_protocol_versions"]  # optional in the schema
    outs = feed(session, message)
    assert [o.message_type for o in outs] == ["ReceptionStatus"]
    status = statuses(outs)[0]
    assert status["status"] == "INVALID_CONTENT"
    assert "no common S2 protocol version" in status["diagnostic_label"]
    assert session.close is not None and session.close.code == 1002
    assert "0.0.2-beta" in session.close.reason
    assert any(isinstance(e, SessionClosed) for e in session.drain_events())
    assert not session.handshake_done


def test_handshake_from_a_cem_is_refused_without_closing() -> None:
    session = S2Session(control_type_preference=["FRBC"])
    outs = feed(session, handshake(role="CEM"))
    assert status_of(outs) == "INVALID_CONTENT"
    assert session.close is None


def test_second_handshake_is_invalid_content() -> None:
    session, _ = connect([FRBC])
    assert status_of(feed(session, handshake("hs-2"))) == "INVALID_CONTENT"


@pytest.mark.parametrize(("available", "expected"), [
    ([FRBC], FRBC),
    ([PPBC], PPBC),
    ([OMBC], OMBC),
    ([DDBC], DDBC),
    ([PEBC], PEBC),
    ([NOT_CONTROLABLE], NOT_CONTROLABLE),
])
def test_details_lead_to_select_control_type(available: list[str], expected: str) -> None:
    session = S2Session(control_type_preference=["FRBC", "PPBC", "OMBC", "DDBC", "PEBC"])
    session.start(T0)
    feed(session, handshake())
    session.drain_events()
    outs = feed(session, details(available))
    assert status_of(outs) == "OK"
    selects = sent(outs, "SelectControlType")
    assert [s["control_type"] for s in selects] == [expected]
    assert session.state.control_type is not None
    assert session.state.control_type.value == expected
    events = session.drain_events()
    assert isinstance(events[0], RmDetails) and events[0].resource_id == "rm-1"
    assert ControlTypeSelected(expected) in events


@pytest.mark.parametrize(("preference", "expected"), [
    (["FRBC", "PEBC"], FRBC),
    (["PEBC", "FRBC"], PEBC),
    (["OMBC", "PEBC"], PEBC),           # OMBC not offered: next preference
    (["POWER_ENVELOPE_BASED_CONTROL"], PEBC),  # S2 names work too
])
def test_preference_order_decides(preference: list[str], expected: str) -> None:
    _, outs = connect([FRBC, PEBC, NOT_CONTROLABLE], preference=preference)
    assert [s["control_type"] for s in sent(outs, "SelectControlType")] == [expected]


def test_default_preference_is_frbc_ppbc_ombc_ddbc_pebc() -> None:
    session = S2Session()
    session.start(T0)
    feed(session, handshake())
    outs = feed(session, details([PEBC, DDBC, OMBC, PPBC]))
    assert sent(outs, "SelectControlType")[0]["control_type"] == PPBC


def test_nothing_preferred_offered_selects_not_controlable_or_no_selection() -> None:
    _, outs = connect([PEBC, NOT_CONTROLABLE], preference=["FRBC"])
    assert sent(outs, "SelectControlType")[0]["control_type"] == NOT_CONTROLABLE
    _, outs = connect([PEBC], preference=["FRBC"])
    assert sent(outs, "SelectControlType")[0]["control_type"] == NO_SELECTION


def test_unknown_preference_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown control type 'XYZ'"):
        S2Session(control_type_preference=["XYZ"])


def test_messages_before_the_handshake_are_invalid_content() -> None:
    session = S2Session(control_type_preference=["FRBC"])
    session.start(T0)
    outs = feed(session, details([FRBC]))
    assert status_of(outs) == "INVALID_CONTENT"
    assert "before the handshake" in statuses(outs)[0]["diagnostic_label"]
    assert session.state.details is None
    # the session goes on: the handshake still works afterwards
    assert status_of(feed(session, handshake())[:1]) == "OK"


def test_session_without_rm_handshake_is_closed_by_expire() -> None:
    session = S2Session(control_type_preference=["FRBC"], handshake_timeout_s=30)
    session.start(T0)
    session.expire(T0 + timedelta(seconds=29))
    assert session.close is None
    session.expire(T0 + timedelta(seconds=30))
    assert session.close is not None and session.close.code == 1008
    assert "no Handshake within 30 s" in session.close.reason
    done, _ = connect([FRBC])
    done.expire(T0 + timedelta(hours=1))
    assert done.close is None
