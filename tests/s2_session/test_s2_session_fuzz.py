"""Property tests: whatever arrives, the session answers exactly once and never crashes, and a
number that is none (NaN, infinite, absurd) is never answered OK nor kept.

Bounded in `make test` (150 examples each); a longer run sets `S2_FUZZ_EXAMPLES`."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s2_session_messages import (
    FRBC,
    PEBC,
    T0,
    connect,
    feed,
    frbc_actuator_status,
    frbc_leakage,
    frbc_storage_status,
    frbc_system_description,
    frbc_target,
    frbc_timer_status,
    frbc_usage_forecast,
    handshake,
    instruction_status,
    pebc_power_constraints,
    power_forecast,
    power_measurement,
    revoke,
    session_request,
    statuses,
)

from cem.s2.ids import NIL_UUID, is_valid_id

# a longer run: S2_FUZZ_EXAMPLES=5000 .venv/bin/pytest -q tests/s2_session/test_s2_session_fuzz.py
SETTINGS = settings(max_examples=int(os.environ.get("S2_FUZZ_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
INTERNAL_ERROR = "CEM could not process the message now"

VALID_MESSAGES: list[dict[str, Any]] = [
    frbc_system_description(), frbc_actuator_status(), frbc_storage_status(), frbc_leakage(),
    frbc_usage_forecast(), frbc_target(), frbc_timer_status(), power_measurement(),
    power_forecast(), instruction_status("ins-1"), revoke("FRBC.SystemDescription", "sd-1"),
    pebc_power_constraints(), handshake("hs-9"), session_request("RECONNECT"),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8,
)


def _ready_session() -> Any:
    session, _ = connect([FRBC, PEBC])
    feed(session, frbc_system_description())
    session.drain_events()
    return session


def _check_single_answer(session: Any, data: str | bytes, parsed: Any) -> None:
    outs = session.receive(data, T0)
    found = statuses(outs)
    if isinstance(parsed, dict) and parsed.get("message_type") == "ReceptionStatus":
        assert found == []
        return
    assert len(found) == 1, found
    answer = found[0]
    assert INTERNAL_ERROR not in answer.get("diagnostic_label", ""), answer
    if isinstance(parsed, dict) and is_valid_id(parsed.get("message_id")):
        assert answer["subject_message_id"] == parsed["message_id"]
    else:
        assert answer["subject_message_id"] == NIL_UUID
        assert answer["status"] == "INVALID_DATA"
    if session.close is not None:
        assert isinstance(parsed, dict)
        assert parsed.get("message_type") in ("SessionRequest", "Handshake")
    for out in outs:
        json.loads(out.text)  # everything sent is JSON


def _parsed(data: str | bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


@SETTINGS
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_arbitrary_text_or_bytes_get_exactly_one_status(data: str | bytes) -> None:
    _check_single_answer(_ready_session(), data, _parsed(data))


@SETTINGS
@given(json_values)
def test_arbitrary_json_gets_exactly_one_status(value: Any) -> None:
    text = json.dumps(value)
    _check_single_answer(_ready_session(), text, value)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _parent(message: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        message = message[step]
    return message


@st.composite
def mutated_messages(draw: st.DrawFn) -> dict[str, Any]:
    message = copy.deepcopy(draw(st.sampled_from(VALID_MESSAGES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(message)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(message, path)
        action = draw(st.sampled_from(["delete", "replace", "add", "message_type"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
        elif action == "message_type":
            message["message_type"] = draw(st.sampled_from(
                [m["message_type"] for m in VALID_MESSAGES] + ["FRBC.Instruction", "Nope"]))
    return message


@SETTINGS
@given(mutated_messages())
def test_mutated_valid_messages_get_exactly_one_status(message: dict[str, Any]) -> None:
    _check_single_answer(_ready_session(), json.dumps(message), message)


@SETTINGS
@given(st.from_regex(r"[a-zA-Z0-9\-_:]{2,64}", fullmatch=True),
       st.from_regex(r"[a-zA-Z0-9\-_:]{2,64}", fullmatch=True))
def test_any_schema_id_is_accepted_and_written_back(message_id: str, actuator_id: str) -> None:
    session, _ = connect([FRBC])
    description = frbc_system_description(message_id)
    description["actuators"][0]["id"] = actuator_id
    found = statuses(feed(session, description))
    assert found == [{"message_type": "ReceptionStatus", "subject_message_id": message_id,
                      "status": "OK"}]
    stored = session.state.of("FRBC").system_description(T0)
    assert stored is not None
    assert session.ids.external_of(stored.actuators[0].id) == actuator_id
    assert session.ids.external_of(stored.message_id) == message_id


# --- numbers that are none: never OK, never kept ------------------------------------------------

NOT_NUMBERS = ["NaN", "nan", "Infinity", "-Infinity", "inf", "1e400", "-1e400", 1e13, -1e300]
RAW_INFINITIES = ["1e400", "-1e400", "1E999"]  # written into the JSON text: they parse to inf


def _number_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return [p for p in _paths(value, prefix)
            if isinstance(_parent(value, p)[p[-1]], int | float)
            and not isinstance(_parent(value, p)[p[-1]], bool)]


NUMBERED = [m for m in VALID_MESSAGES if _number_paths(m)]


@SETTINGS
@given(st.sampled_from(NUMBERED), st.data())
def test_a_number_that_is_none_is_never_answered_ok(message: dict[str, Any],
                                                    data: st.DataObject) -> None:
    """Any numeric field of any valid message set to NaN, an infinity or an absurd size (as a
    string, a JSON number or 1e400 in the text) is refused, and the RM's state is unchanged."""
    message = copy.deepcopy(message)
    path = data.draw(st.sampled_from(_number_paths(message)))
    session = _ready_session()
    before = json.dumps(session.state.snapshot(), sort_keys=True, default=str)
    measured = session.state.latest_measurement()
    if data.draw(st.booleans()):
        _parent(message, path)[path[-1]] = data.draw(st.sampled_from(NOT_NUMBERS))
        text = json.dumps(message)
    else:
        marker = 987654.125  # a number that appears nowhere else, swapped for 1e400 in the text
        _parent(message, path)[path[-1]] = marker
        text = json.dumps(message).replace(repr(marker), data.draw(st.sampled_from(RAW_INFINITIES)))
    found = statuses(session.receive(text, T0))
    assert len(found) == 1, found
    # a Duration is an integer in the schema: an infinity there fails the schema first
    assert found[0]["status"] in ("INVALID_CONTENT", "INVALID_MESSAGE"), (text, found)
    assert json.dumps(session.state.snapshot(), sort_keys=True, default=str) == before
    assert session.state.latest_measurement() is measured
