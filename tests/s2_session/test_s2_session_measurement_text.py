"""A PowerMeasurement judged straight from its text gives the full path's answer.

The session judges the common PowerMeasurement (compact JSON, a canonical UUID as its id,
plain numbers, advertised quantities) from its text with s2-python's model in strict JSON
mode; every other measurement goes the full way (parse, schema, ids, numbers, s2-python's
model). Each case here is answered by a session with the text path and by one without it,
and the answers (status, subject, label), the events and the measured power must be the same.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from s2_session_messages import FRBC, T0, connect, feed, iso, session_request, statuses

import cem.s2.session as session_module
from cem.s2.session import S2Session

ID = "3f2b8c1e-9a4d-4c7e-8b1a-2d5e6f7a8b9c"
STAMP = iso(T0)


def text(message_id: str = ID, value: str = "1500", quantity: str = "ELECTRIC.POWER.L1",
         stamp: str = f'"{STAMP}"') -> str:
    """A PowerMeasurement written as compact JSON, the way s2-python and most RMs write it."""
    return ('{"message_type":"PowerMeasurement","message_id":"' + message_id
            + '","measurement_timestamp":' + stamp + ',"values":[{"commodity_quantity":"'
            + quantity + '","value":' + value + "}]}")


CASES: dict[str, str] = {
    "canonical": text(),
    "id in upper case": text(ID.upper()),
    "id without hyphens": text(ID.replace("-", "")),
    "id in braces": text("{" + ID + "}"),
    "id not a UUID": text("pm-42"),
    "id too short": text("p"),
    "id twice, the last in upper case": text(ID).replace(
        f'"message_id":"{ID}"', f'"message_id":"{ID}","message_id":"{ID.upper()}"', 1),
    "id twice, two UUIDs": text(ID).replace(
        '"message_type"', f'"message_id":"{uuid.UUID(int=7)}","message_type"', 1),
    "id with an escape": text(ID.replace("a", "\\u0061", 1)),
    "key with an escape": text(ID).replace('"message_id"', '"message\\u005fid"'),
    "spaces around the colon": text(ID).replace('"message_id":"', '"message_id" : "'),
    "value as a string": text(value='"1500"'),
    "value true": text(value="true"),
    "value null": text(value="null"),
    "value NaN": text(value="NaN"),
    "value Infinity": text(value="Infinity"),
    "value 1e400": text(value="1e400"),
    "value beyond 10^12": text(value="1000000000001"),
    "value at -10^12": text(value="-1000000000000"),
    "value with 30 digits": text(value="1" * 30),
    "value -0.0": text(value="-0.0"),
    "value 0.1": text(value="0.1"),
    "quantity not advertised": text(quantity="ELECTRIC.POWER.L2"),
    "quantity unknown": text(quantity="ELECTRIC.POWER.L9"),
    "quantity twice": text().replace(
        '"values":[', '"values":[{"commodity_quantity":"ELECTRIC.POWER.L1","value":1},', 1),
    "no values": text().replace(
        '[{"commodity_quantity":"ELECTRIC.POWER.L1","value":1500}]', "[]"),
    "values given twice": text().replace('"values":', '"values":[],"values":', 1),
    "an extra field": text().replace('"values":', '"extra":1,"values":', 1),
    "a naive time": text(stamp=f'"{STAMP.rstrip("Z")}"'),
    "a time as a number": text(stamp="1772366400"),
    "a date only": text(stamp='"2026-03-01"'),
    "message_type twice, Handshake last": text().replace(
        '"values":', '"message_type":"Handshake","values":', 1),
    "a byte order mark": "\ufeff" + text(),
    "trailing text": text() + "x",
    "trailing white space": text() + " \n",
    "not JSON": text()[:-2],
    "a JSON array": "[" + text() + "]",
}


def _session(text_path: bool, monkeypatch: pytest.MonkeyPatch) -> S2Session:
    monkeypatch.setattr(session_module, "MEASUREMENT_MARK",
                        '"PowerMeasurement"' if text_path else "\x00 (full path only)")
    session, _ = connect([FRBC], measures=["ELECTRIC.POWER.L1"])
    session.drain_events()
    return session


def _answer(session: S2Session, data: str) -> dict[str, Any]:
    outs = feed(session, data)
    events = [(type(e).__name__, getattr(e, "kind", None)) for e in session.drain_events()]
    measured = {q.value: (m.value_w, m.measured_at)
                for q, m in session.state.measured_power().items()}
    latest = session.state.latest_measurement()
    return {"statuses": statuses(outs), "events": events, "measured": measured,
            # (an id that is not a canonical UUID becomes one of its own per session)
            "latest": latest.model_dump(exclude={"message_id"}) if latest else None,
            "accepted": session.accepted}


@pytest.mark.parametrize("case", list(CASES))
def test_the_text_path_answers_as_the_full_path(case: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    full = _answer(_session(False, monkeypatch), CASES[case])
    quick = _answer(_session(True, monkeypatch), CASES[case])
    assert quick == full


@pytest.mark.parametrize(("case", "status"), [
    ("canonical", "OK"), ("id in upper case", "OK"), ("id twice, the last in upper case", "OK"),
    ("key with an escape", "OK"), ("value NaN", "INVALID_DATA"),
    ("value 1e400", "INVALID_CONTENT"), ("value beyond 10^12", "INVALID_CONTENT"),
    ("quantity not advertised", "INVALID_CONTENT"), ("an extra field", "INVALID_MESSAGE"),
    ("a byte order mark", "INVALID_DATA"),
])
def test_the_answers_to_the_cases_the_text_path_hands_on(
        case: str, status: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the RM is told, and about which of its ids (the last one it gave, as it wrote it)."""
    answer = _answer(_session(True, monkeypatch), CASES[case])
    assert [s["status"] for s in answer["statuses"]] == [status]
    subject = answer["statuses"][0]["subject_message_id"]
    if case == "id in upper case" or case == "id twice, the last in upper case":
        assert subject == ID.upper()
    elif status != "INVALID_DATA":
        assert subject == ID


def test_a_measurement_before_details_or_while_closing_is_not_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before ResourceManagerDetails, and once the session is closing, the full path's answer."""
    for text_path in (True, False):
        monkeypatch.setattr(session_module, "MEASUREMENT_MARK",
                            '"PowerMeasurement"' if text_path else "\x00")
        session = S2Session()
        session.start(T0)
        feed(session, {"message_type": "Handshake", "message_id": "hs-1", "role": "RM",
                       "supported_protocol_versions": ["0.0.2-beta"]})
        [before] = statuses(feed(session, text()))
        assert before["status"] == "INVALID_CONTENT"
        assert "before ResourceManagerDetails" in before["diagnostic_label"]
        session, _ = connect([FRBC])
        feed(session, session_request("TERMINATE"))
        [closing] = statuses(feed(session, text()))
        assert closing["status"] == "TEMPORARY_ERROR"
        assert session.state.latest_measurement() is None


def test_the_common_measurement_is_judged_from_its_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's and s2-python's spelling is taken by the text path, not parsed twice: the
    session does not parse its JSON (the full path's first step) and answers OK."""
    session = _session(True, monkeypatch)

    def no_parse(data: str) -> Any:
        raise AssertionError("parsed on the full path")

    monkeypatch.setattr(session_module, "_parse_json", no_parse)
    [status] = statuses(feed(session, text(value="2500.5")))
    assert status == {"message_type": "ReceptionStatus", "subject_message_id": ID,
                      "status": "OK"}
    assert json.loads(text())["message_id"] == ID
    assert session.state.measured_power()[
        next(iter(session.state.measured_power()))].value_w == 2500.5


@pytest.mark.parametrize("case", list(CASES))
def test_measurement_text_takes_only_what_the_full_path_answers_ok(case: str) -> None:
    """`S2Session.measurement_text` (the server's measurement lane): the id as written for
    a measurement the full path accepts under that same id, the state as the full path leaves
    it, and no event or answer of its own; None and nothing changed for every other text,
    which `receive` then judges the full way (once) with the full path's answer."""
    session, _ = connect([FRBC], measures=["ELECTRIC.POWER.L1"])
    session.drain_events()
    full, _ = connect([FRBC], measures=["ELECTRIC.POWER.L1"])
    full.drain_events()
    expected = statuses(feed(full, CASES[case]))
    taken = session.measurement_text(CASES[case])
    if taken is not None:
        assert expected == [{"message_type": "ReceptionStatus", "subject_message_id": taken,
                             "status": "OK"}]
        assert session.accepted == ("PowerMeasurement", taken)
        assert session.events == []
        assert session.state.latest_measurement() == full.state.latest_measurement()
        assert session.state.measured_power() == full.state.measured_power()
    else:
        assert session.state.latest_measurement() is None
        assert statuses(feed(session, CASES[case])) == expected
    assert case != "canonical" or taken == ID
