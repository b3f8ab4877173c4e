"""The official S2 documentation examples (tests/fixtures/s2) fed to a CEM session."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from s2_session_messages import FIXTURES, ack, cem_message, statuses

from cem.s2.session import S2Session

NOW = datetime(2024, 8, 24, 14, 30, tzinfo=UTC)
FOLDERS = ["docs_ev_frbc", "docs_hp_frbc", "docs_pv_pebc"]


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.mark.parametrize("folder", FOLDERS)
def test_documentation_examples_get_the_expected_status(folder: str) -> None:
    directory = FIXTURES / folder
    expected = _load(directory / "expected.json")
    session = S2Session(control_type_preference=["FRBC", "PEBC"])
    session.start(NOW)
    files = sorted(directory.glob("[0-9]*.json"))
    assert [f.name for f in files] == sorted(expected)
    for path in files:
        if path.name.endswith("instruction_status_update.json"):
            # the CEM sent the example's instruction first (when the example has one)
            for cem_file in directory.glob("cem_*instruction.json"):
                out = session.send(cem_message(session, _load(cem_file)), NOW)
                assert json.loads(out.text) == _load(cem_file)  # byte-for-byte the RM's ids
                ack(session, out, now=NOW)
        found = statuses(session.receive(path.read_text(), NOW))
        assert len(found) == 1, (path.name, found)
        assert found[0]["status"] == expected[path.name]["status"], (path.name, found[0])
        assert found[0]["subject_message_id"] == _load(path)["message_id"]
    assert session.close is not None  # every example ends with a SessionRequest


def test_documented_pv_limit_range_is_kept_low_to_high() -> None:
    session = S2Session(control_type_preference=["PEBC"])
    session.start(NOW)
    for name in ("01_rm_handshake.json", "02_resource_manager_details.json",
                 "03_pebc_power_constraints.json"):
        session.receive((FIXTURES / "docs_pv_pebc" / name).read_text(), NOW)
    constraints = session.state.of("PEBC").power_constraints(NOW)
    assert len(constraints) == 1
    lower = next(r for r in constraints[0].allowed_limit_ranges if r.limit_type.value == "LOWER_LIMIT")
    assert (lower.range_boundary.start_of_range, lower.range_boundary.end_of_range) == (-4000, 0)


def test_completed_heat_pump_description_is_accepted() -> None:
    session = S2Session(control_type_preference=["FRBC"])
    session.start(NOW)
    docs = FIXTURES / "docs_hp_frbc"
    for name in ("01_rm_handshake.json", "02_resource_manager_details.json"):
        assert statuses(session.receive((docs / name).read_text(), NOW))[0]["status"] == "OK"
    for name in ("frbc_system_description.json", "frbc_leakage_behaviour.json",
                 "frbc_actuator_status.json", "frbc_timer_status.json"):
        text = (FIXTURES / "hp_frbc_completed" / name).read_text()
        assert statuses(session.receive(text, NOW))[0]["status"] == "OK", name
    description = session.state.of("FRBC").system_description(NOW)
    assert description is not None and len(description.actuators[0].timers) == 2
    assert len(session.state.of("FRBC").timer_statuses()) == 1


def test_documented_ev_actuator_status_is_accepted_with_a_real_mode() -> None:
    session = S2Session(control_type_preference=["FRBC"])
    session.start(NOW)
    docs = FIXTURES / "docs_ev_frbc"
    for name in ("01_rm_handshake.json", "02_resource_manager_details.json",
                 "03_frbc_system_description.json"):
        session.receive((docs / name).read_text(), NOW)
    status = _load(docs / "05_frbc_actuator_status.json")
    status.update(active_operation_mode_id="om2", previous_operation_mode_id="om1")
    assert statuses(session.receive(json.dumps(status), NOW))[0]["status"] == "OK"
