"""Every number an RM sends is finite and plausible before the CEM uses or stores it.

NaN, infinities (also as the strings lax parsers accept, and ``1e400``, which parses to one)
and absurd magnitudes are answered INVALID_CONTENT with the field named, and change nothing;
so is a storage fill level far outside the range the RM itself declared.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from s2_session_messages import (
    DDBC,
    FRBC,
    PPBC,
    T0,
    connect,
    ddbc_system_description,
    feed,
    frbc_actuator_status,
    frbc_storage_status,
    frbc_system_description,
    frbc_usage_forecast,
    power_forecast,
    power_measurement,
    ppbc_definition,
    statuses,
)

from cem.s2.session import S2Session


def _answer(session: S2Session, text: str) -> dict[str, Any]:
    found = statuses(session.receive(text, T0))
    assert len(found) == 1, found
    return found[0]


def _measurement_text(value: str) -> str:
    """A PowerMeasurement with `value` written into the JSON as it is (1e400 has no float)."""
    return json.dumps(power_measurement({"ELECTRIC.POWER.L1": 1.0})).replace(
        '"value": 1.0', f'"value": {value}')


@pytest.mark.parametrize("value,says", [
    ('"NaN"', "is not a number (NaN)"),
    ('"nan"', "is not a number (NaN)"),
    ('"Infinity"', "is infinite"),
    ('"-Infinity"', "is -infinite"),
    ("1e400", "is infinite"),
    ("-1e400", "is -infinite"),
    ('"1e400"', "is infinite"),
    ("2.5e13", "beyond any plausible value"),
    ("1000000000001", "beyond any plausible value"),   # an integer just past 10^12
    ("-1.0000000001e12", "beyond any plausible value"),
])
def test_a_measurement_that_is_no_number_is_refused_and_not_kept(value: str, says: str) -> None:
    session, _ = connect([FRBC])
    assert _answer(session, _measurement_text("1500"))["status"] == "OK"
    kept = session.state.latest_measurement()
    answer = _answer(session, _measurement_text(value))
    assert answer["status"] == "INVALID_CONTENT", answer
    assert answer["diagnostic_label"].startswith("PowerMeasurement: values[0].value ")
    assert says in answer["diagnostic_label"]
    assert session.state.latest_measurement() is kept  # the good one stays, nothing NaN
    assert kept.values[0].value == 1500


@pytest.mark.parametrize("value", ["1000000000000", "-1e12", "0", "-0.0", "1e-300", "17"])
def test_a_measurement_within_the_plausible_range_is_kept(value: str) -> None:
    session, _ = connect([FRBC])
    answer = _answer(session, _measurement_text(value))
    assert answer["status"] == "OK", answer
    kept = session.state.latest_measurement()
    assert kept is not None and kept.values[0].value == float(value)


def test_json_constants_stay_invalid_data() -> None:
    """NaN / Infinity written as bare JSON constants are not JSON at all."""
    session, _ = connect([FRBC])
    answer = _answer(session, _measurement_text("NaN"))
    assert answer["status"] == "INVALID_DATA"


def _with_number(message: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    target = message
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return message


CASES = [
    (FRBC, frbc_system_description(message_id="sd-2"),
     ["actuators", 0, "operation_modes", 1, "elements", 0, "power_ranges", 0, "end_of_range"],
     "actuators[0].operation_modes[1].elements[0].power_ranges[0].end_of_range"),
    (FRBC, frbc_system_description(message_id="sd-3"),
     ["storage", "fill_level_range", "end_of_range"], "storage.fill_level_range.end_of_range"),
    (FRBC, frbc_storage_status(), ["present_fill_level"], "present_fill_level"),
    (FRBC, frbc_usage_forecast(), ["elements", 0, "usage_rate_expected"],
     "elements[0].usage_rate_expected"),
    (FRBC, power_forecast(), ["elements", 0, "power_values", 0, "value_expected"],
     "elements[0].power_values[0].value_expected"),
    (DDBC, ddbc_system_description(), ["present_demand_rate", "start_of_range"],
     "present_demand_rate.start_of_range"),
    (PPBC, ppbc_definition(), ["power_sequences_containers", 0, "power_sequences", 0,
                               "elements", 0, "power_values", 0, "value_expected"],
     "power_sequences_containers[0].power_sequences[0].elements[0].power_values[0]"
     ".value_expected"),
]


@pytest.mark.parametrize("bad", ["NaN", "-Infinity", 1e13])
@pytest.mark.parametrize("control_type,message,path,where", CASES)
def test_every_number_of_every_message_is_judged(control_type: str, message: dict[str, Any],
                                                 path: list[Any], where: str,
                                                 bad: Any) -> None:
    session, _ = connect([control_type])
    if control_type == FRBC:
        assert _answer(session, json.dumps(frbc_system_description()))["status"] == "OK"
    before = session.state.snapshot()
    answer = _answer(session, json.dumps(_with_number(json.loads(json.dumps(message)), path,
                                                      bad)))
    assert answer["status"] == "INVALID_CONTENT", answer
    assert f"{message['message_type']}: {where} " in answer["diagnostic_label"]
    assert session.state.snapshot() == before


def test_a_factor_outside_0_to_1_is_refused_with_its_place() -> None:
    session, _ = connect([FRBC])
    feed(session, frbc_system_description())
    status = frbc_actuator_status()
    status["operation_mode_factor"] = 1.5
    answer = _answer(session, json.dumps(status))
    assert answer["status"] == "INVALID_CONTENT"
    assert answer["diagnostic_label"] == ("FRBC.ActuatorStatus: operation_mode_factor is 1.5, "
                                          "outside 0..1 (a share of the operation mode)")


@pytest.mark.parametrize("level,status", [
    (40.0, "OK"), (101.0, "OK"), (-3.0, "OK"),  # a storage may stray outside its band
    (199.0, "OK"), (201.0, "INVALID_CONTENT"), (-150.0, "INVALID_CONTENT"),
    (1000.0, "INVALID_CONTENT"),
])
def test_a_fill_level_far_outside_the_declared_range_is_refused(level: float,
                                                                status: str) -> None:
    session, _ = connect([FRBC])
    feed(session, frbc_system_description())  # storage 0..100
    answer = _answer(session, json.dumps(frbc_storage_status(fill=level)))
    assert answer["status"] == status, answer
    kept = session.state.of(FRBC).storage_status
    if status == "OK":
        assert kept is not None and kept.present_fill_level == level
    else:
        assert kept is None
        assert answer["diagnostic_label"] == (
            f"present_fill_level {level:g} is far outside the storage's fill_level_range "
            "0..100 the RM declared")


def test_good_messages_still_pass() -> None:
    session, _ = connect([FRBC])
    for message in (frbc_system_description(), frbc_storage_status(), frbc_actuator_status(),
                    frbc_usage_forecast(), power_forecast(), power_measurement()):
        assert _answer(session, json.dumps(message))["status"] == "OK", message


@pytest.mark.parametrize("value", ["123456789012345678901234567890", "1e400", "NaN", "-0.0",
                                   "0.1", "1.0000000000000002", '"\\ud800"', "1500"])
def test_orjson_and_the_standard_library_give_the_same_answer(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session parses with orjson when it can; what orjson reads otherwise (an integer
    beyond 64 bits, 1e400, NaN, a lone surrogate) is answered as the standard library reads it."""
    import cem.s2.session as session_module

    answers = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(session_module, "_fast_loads", None)
        session, _ = connect([FRBC])
        answer = _answer(session, _measurement_text(value))
        answer.pop("subject_message_id", None)
        answers.append(answer)
    assert answers[0] == answers[1]
