"""Per-RM state: valid_from, revoke, control-type switching, session end, snapshot."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from s2_session_messages import (
    DDBC,
    FRBC,
    NO_SELECTION,
    OMBC,
    PEBC,
    PPBC,
    T0,
    connect,
    ddbc_actuator_status,
    ddbc_demand_forecast,
    ddbc_system_description,
    details,
    feed,
    frbc_actuator_status,
    frbc_leakage,
    frbc_storage_status,
    frbc_system_description,
    frbc_target,
    frbc_usage_forecast,
    ombc_status,
    ombc_system_description,
    pebc_energy_constraint,
    pebc_power_constraints,
    power_forecast,
    power_measurement,
    ppbc_definition,
    ppbc_status,
    revoke,
    sent,
    session_request,
    status_of,
)
from s2python.common import CommodityQuantity, ControlType

from cem.s2.session import (
    ControlTypeSelected,
    ReconnectRequested,
    SessionClosed,
    StateChanged,
)

HOUR = timedelta(hours=1)


def test_system_description_in_force_is_latest_valid_from_not_after_now() -> None:
    session, _ = connect([FRBC])
    for name, start in (("sd-past", T0 - HOUR), ("sd-now", T0), ("sd-next", T0 + HOUR)):
        assert status_of(feed(session, frbc_system_description(name, valid_from=start))) == "OK"
    state, ext = session.state, session.ids.external_of

    def in_force(at: object) -> str | None:
        description = state.of("FRBC").system_description(at)  # type: ignore[arg-type]
        return ext(description.message_id) if description else None

    assert in_force(T0 - 2 * HOUR) is None
    assert in_force(T0 + timedelta(minutes=59)) == "sd-now"
    assert in_force(T0 + HOUR) == "sd-next"
    assert [ext(d.message_id) for d in state.of("FRBC").upcoming_system_descriptions(T0)] == ["sd-next"]
    # a description that is no longer in force is forgotten once a newer one is
    kept = json.dumps(state.snapshot()["frbc"]["system_descriptions"])
    assert session.ids.to_internal("sd-past") not in kept
    assert session.ids.to_internal("sd-now") in kept


def test_statuses_forecasts_targets_are_kept() -> None:
    session, _ = connect([FRBC])
    for message in (frbc_system_description(), frbc_actuator_status(), frbc_storage_status(42.5),
                    frbc_leakage(), frbc_usage_forecast(), frbc_target(), power_forecast()):
        assert status_of(feed(session, message)) == "OK"
    state = session.state
    assert state.of("FRBC").storage_status is not None
    assert state.of("FRBC").storage_status.present_fill_level == 42.5
    assert len(state.of("FRBC").actuator_statuses()) == 1
    assert state.of("FRBC").leakage_behaviour(T0) is not None
    assert state.of("FRBC").usage_forecast is not None and state.of("FRBC").fill_level_target_profile
    assert state.power_forecast() is not None
    kinds = [e.kind for e in session.drain_events() if isinstance(e, StateChanged)]
    assert kinds[-7:] == ["system_description", "status", "status", "leakage", "forecast",
                          "target", "forecast"]


def test_latest_measurement_per_commodity_quantity_with_time() -> None:
    session, _ = connect([FRBC], measures=["ELECTRIC.POWER.L1", "ELECTRIC.POWER.L2"])
    feed(session, power_measurement({"ELECTRIC.POWER.L1": 100.0, "ELECTRIC.POWER.L2": 200.0}))
    feed(session, power_measurement({"ELECTRIC.POWER.L1": 150.0}, "pm-2", at=T0 + HOUR))
    measured = session.state.measured_power()
    assert measured[CommodityQuantity.ELECTRIC_POWER_L1].value_w == 150.0
    assert measured[CommodityQuantity.ELECTRIC_POWER_L1].measured_at == T0 + HOUR
    assert measured[CommodityQuantity.ELECTRIC_POWER_L2].value_w == 200.0
    latest = session.state.latest_measurement()
    assert latest is not None and latest.measurement_timestamp == T0 + HOUR
    # the same quantity twice in one message is refused
    twice = power_measurement(message_id="pm-3")
    twice["values"] = twice["values"] * 2
    assert status_of(feed(session, twice)) == "INVALID_CONTENT"


@pytest.mark.parametrize(("control_type", "setup", "object_type", "object_id", "gone"), [
    (FRBC, [frbc_system_description()], "FRBC.SystemDescription", "sd-1",
     lambda s: s.of("FRBC").system_description(T0) is None),
    (OMBC, [ombc_system_description()], "OMBC.SystemDescription", "osd-1",
     lambda s: s.of("OMBC").system_description(T0) is None),
    (DDBC, [ddbc_system_description()], "DDBC.SystemDescription", "dsd-1",
     lambda s: s.of("DDBC").system_description(T0) is None),
    (PPBC, [ppbc_definition()], "PPBC.PowerProfileDefinition", "pp-1",
     lambda s: s.of("PPBC").power_profile_definitions() == []),
    (PEBC, [pebc_power_constraints()], "PEBC.PowerConstraints", "pc-1",
     lambda s: s.of("PEBC").power_constraints() == []),
    (PEBC, [pebc_energy_constraint()], "PEBC.EnergyConstraint", "ec-1",
     lambda s: s.of("PEBC").energy_constraints() == []),
])
def test_revoke_drops_the_object(control_type: str, setup: list[dict[str, object]],
                                 object_type: str, object_id: str, gone: object) -> None:
    session, _ = connect([control_type])
    for message in setup:
        assert status_of(feed(session, message)) == "OK"
    assert not gone(session.state)  # type: ignore[operator]
    session.drain_events()
    assert status_of(feed(session, revoke(object_type, object_id))) == "OK"
    assert gone(session.state)  # type: ignore[operator]
    assert StateChanged("revoked", object_type) in session.drain_events()
    # revoking it again: the CEM no longer knows it
    assert status_of(feed(session, revoke(object_type, object_id, "rv-2"))) == "INVALID_CONTENT"


def test_other_control_types_keep_their_state() -> None:
    session, _ = connect([OMBC])
    feed(session, ombc_system_description())
    assert status_of(feed(session, ombc_status())) == "OK"
    assert session.state.of("OMBC").status is not None and len(session.state.of("OMBC").timer_statuses()) == 0
    session, _ = connect([DDBC])
    for message in (ddbc_system_description(), ddbc_actuator_status(), ddbc_demand_forecast()):
        assert status_of(feed(session, message)) == "OK"
    actuator = session.state.of("DDBC").system_description(T0).actuators[0]  # type: ignore[union-attr]
    assert session.state.of("DDBC").actuator_status(actuator.id) is not None
    assert session.state.of("DDBC").average_demand_rate_forecast is not None
    session, _ = connect([PPBC])
    feed(session, ppbc_definition())
    assert status_of(feed(session, ppbc_status())) == "OK"
    assert session.state.of("PPBC").power_profile_status is not None
    session, _ = connect([PEBC])
    feed(session, pebc_power_constraints())
    feed(session, pebc_power_constraints("pc-msg-2", "pc-2", valid_from=T0 + HOUR))
    assert len(session.state.of("PEBC").power_constraints()) == 2
    assert len(session.state.of("PEBC").power_constraints(T0)) == 1


def test_switch_control_type_on_demand_drops_previous_state() -> None:
    session, _ = connect([FRBC, PEBC])
    feed(session, frbc_system_description())
    feed(session, frbc_storage_status())
    session.drain_events()
    outs = session.select_control_type("PEBC", T0)
    assert [m["control_type"] for m in sent(outs, "SelectControlType")] == [
        "POWER_ENVELOPE_BASED_CONTROL"]
    assert session.state.control_type == ControlType.POWER_ENVELOPE_BASED_CONTROL
    assert session.state.of("FRBC").system_description(T0) is None
    assert session.state.of("FRBC").storage_status is None
    assert ControlTypeSelected("POWER_ENVELOPE_BASED_CONTROL") in session.drain_events()
    assert status_of(feed(session, frbc_storage_status(message_id="ss-2"))) == "INVALID_CONTENT"
    assert status_of(feed(session, pebc_power_constraints())) == "OK"
    assert session.select_control_type("PEBC", T0) == []  # already active: nothing to send


def test_no_selection_on_demand_and_errors() -> None:
    session, _ = connect([FRBC])
    outs = session.select_control_type(NO_SELECTION, T0)
    assert sent(outs, "SelectControlType")[0]["control_type"] == NO_SELECTION
    assert status_of(feed(session, frbc_system_description())) == "INVALID_CONTENT"
    with pytest.raises(ValueError, match="does not offer POWER_ENVELOPE_BASED_CONTROL"):
        session.select_control_type("PEBC", T0)
    with pytest.raises(ValueError, match="unknown control type"):
        session.select_control_type("TURBO", T0)


def test_refreshed_details_switch_when_the_active_type_disappears_or_a_better_one_comes() -> None:
    session, _ = connect([PEBC, FRBC], preference=["FRBC", "PEBC"])
    assert session.state.control_type == ControlType.FILL_RATE_BASED_CONTROL
    outs = feed(session, details([PEBC], message_id="rmd-2"))
    assert status_of(outs) == "OK"
    assert sent(outs, "SelectControlType")[0]["control_type"] == PEBC
    outs = feed(session, details([PEBC], message_id="rmd-3"))  # unchanged: no new selection
    assert sent(outs, "SelectControlType") == []
    outs = feed(session, details([PEBC, FRBC], message_id="rmd-4"))
    assert sent(outs, "SelectControlType")[0]["control_type"] == FRBC


def test_refreshed_details_forget_measurements_no_longer_advertised() -> None:
    session, _ = connect([FRBC], measures=["ELECTRIC.POWER.L1", "ELECTRIC.POWER.L2"])
    feed(session, power_measurement({"ELECTRIC.POWER.L1": 1.0, "ELECTRIC.POWER.L2": 2.0}))
    feed(session, details([FRBC], ["ELECTRIC.POWER.L1"], message_id="rmd-2"))
    assert list(session.state.measured_power()) == [CommodityQuantity.ELECTRIC_POWER_L1]


def test_rm_reconnect_request_closes_with_event() -> None:
    session, _ = connect([FRBC])
    session.drain_events()
    outs = feed(session, session_request("RECONNECT", "firmware update"))
    assert status_of(outs) == "OK"
    assert session.close is not None and session.close.code == 1000
    assert "reconnect" in session.close.reason and "firmware update" in session.close.reason
    events = session.drain_events()
    assert ReconnectRequested() in events
    assert any(isinstance(e, SessionClosed) for e in events)


def test_rm_terminate_request_closes_with_its_reason() -> None:
    session, _ = connect([FRBC])
    outs = feed(session, session_request("TERMINATE", "device switched off"))
    assert status_of(outs) == "OK"
    assert session.close is not None and "device switched off" in session.close.reason
    assert not any(isinstance(e, ReconnectRequested) for e in session.drain_events())


def test_cem_terminate_sends_session_request_then_closes() -> None:
    session, _ = connect([FRBC])
    outs = session.terminate("CEM shutting down", T0)
    assert [o.message_type for o in outs] == ["SessionRequest"]
    message = json.loads(outs[0].text)
    assert message["request"] == "TERMINATE" and message["diagnostic_label"] == "CEM shutting down"
    assert session.close is not None and session.close.code == 1000
    assert session.close.reason == "CEM shutting down"
    assert session.terminate("again", T0) == []


def test_snapshot_is_plain_json() -> None:
    session, _ = connect([FRBC])
    for message in (frbc_system_description(), frbc_actuator_status(), frbc_storage_status(),
                    frbc_leakage(), power_measurement()):
        feed(session, message)
    snapshot = session.state.snapshot()
    again = json.loads(json.dumps(snapshot))
    assert again["control_type"] == "FILL_RATE_BASED_CONTROL"
    assert again["protocol_version"] == "0.0.2-beta"
    assert len(again["frbc"]["system_descriptions"]) == 1
    assert again["measurements"]["ELECTRIC.POWER.L1"]["value_w"] == 1500.0
    assert again["details"]["available_control_types"] == ["FILL_RATE_BASED_CONTROL"]


def test_snapshot_maps_internal_ids_back_to_the_rm_ids() -> None:
    session, _ = connect([FRBC])
    feed(session, frbc_system_description())
    rm_ids = session.state.snapshot()["rm_ids"]
    assert rm_ids[session.ids.to_internal("act-1")] == "act-1"
    assert rm_ids[session.ids.to_internal("sd-1")] == "sd-1"
    # message ids of plain messages are not remembered (a long session must not grow)
    feed(session, power_measurement(message_id="pm-77"))
    assert "pm-77" not in session.state.snapshot()["rm_ids"].values()
    # nor are ids of rejected messages
    feed(session, frbc_actuator_status(mode="om-turbo"))
    assert "om-turbo" not in session.state.snapshot()["rm_ids"].values()


def test_control_type_chosen_on_demand_survives_a_details_refresh() -> None:
    session, _ = connect([FRBC, PEBC], preference=["FRBC", "PEBC"])
    session.select_control_type("PEBC", T0)
    outs = feed(session, details([FRBC, PEBC], message_id="rmd-2"))
    assert sent(outs, "SelectControlType") == []
    assert session.state.control_type == ControlType.POWER_ENVELOPE_BASED_CONTROL
    outs = feed(session, details([FRBC], message_id="rmd-3"))  # PEBC gone: preference again
    assert sent(outs, "SelectControlType")[0]["control_type"] == FRBC


def test_status_may_refer_to_an_upcoming_system_description() -> None:
    session, _ = connect([FRBC])
    feed(session, frbc_system_description())
    upcoming = frbc_system_description("sd-2", valid_from=T0 + HOUR)
    upcoming["actuators"][0]["operation_modes"][1]["id"] = "om-eco"
    upcoming["actuators"][0]["transitions"][0]["to"] = "om-eco"
    upcoming["actuators"][0]["transitions"][1]["from"] = "om-eco"
    assert status_of(feed(session, upcoming)) == "OK"
    assert status_of(feed(session, frbc_actuator_status("om-eco"))) == "OK"
    assert status_of(feed(session, frbc_actuator_status("om-on", "as-2"))) == "OK"
    assert status_of(feed(session, frbc_actuator_status("om-x", "as-3"))) == "INVALID_CONTENT"


def test_expired_pebc_constraints_and_ppbc_profiles_are_forgotten() -> None:
    session, _ = connect([PEBC])
    first = pebc_power_constraints()
    first["valid_until"] = "2026-03-01T13:00:00Z"
    feed(session, first)
    feed(session, pebc_energy_constraint())
    later = T0 + 5 * HOUR
    feed(session, pebc_power_constraints("pc-msg-2", "pc-2", valid_from=later), now=later)
    feed(session, pebc_energy_constraint("ec-msg-2", "ec-2"), now=later)
    assert [session.ids.external_of(c.id) for c in session.state.of("PEBC").power_constraints()] == [
        "pc-2"]
    assert len(session.state.of("PEBC").energy_constraints()) == 1
    session, _ = connect([PPBC])
    feed(session, ppbc_definition())
    feed(session, ppbc_definition("ppd-2", "pp-2"), now=T0 + 7 * HOUR)
    assert [session.ids.external_of(d.id)
            for d in session.state.of("PPBC").power_profile_definitions()] == ["pp-2"]


def test_a_control_types_state_is_reached_through_its_plugin() -> None:
    session, _ = connect([FRBC, OMBC])
    assert session.state.plugin is not None and session.state.plugin.name == "FRBC"
    feed(session, frbc_system_description())
    # by ControlType, its value or its short name: the same state, the RM's own
    frbc = session.state.of("FRBC")
    assert frbc is session.state.of(ControlType.FILL_RATE_BASED_CONTROL)
    assert frbc is session.state.of(FRBC)
    assert frbc.system_description(T0) is not None
    # a control type not selected has nothing: an empty state, not another RM's or an error
    assert session.state.of("OMBC").system_description(T0) is None
    assert session.state.snapshot()["ombc"] == {"system_descriptions": [], "status": None,
                                                "timer_status": []}
    session.select_control_type("NO_SELECTION", T0)
    assert session.state.plugin is None
    assert session.state.of("FRBC").system_description(T0) is None
    with pytest.raises(ValueError, match="no control type 'XYZ'"):
        session.state.of("XYZ")
