"""Level 5 of `cem simulate` is the live control loop: SiteController, Dispatcher, S2 sessions.

Runs the twin's level 5 on the bundled two-day extract (21 ACN stations on a 22-EVSE test site
whose GTV and fuse bind) and checks that every setpoint went through S2: FRBC.Instructions with
the RM's own ids, each answered OK and carried out, and that the limits held.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cem.app.site_file import load_site_file
from cem.flex.prices import ptu_prices
from cem.simulation.engine import LevelRun, SimState, run_level
from cem.simulation.inputs import SimInputs, load_inputs
from cem.simulation.kpis import level_kpis
from cem.simulation.levels import MPC_GAP_TOL, Uncontrolled, site_planner
from cem.simulation.twin import LiveControlLoop, TwinPrices

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "simulation"
SITE = FIXTURES / "site_22_evses.toml"
SESSIONS = FIXTURES / "acn_caltech_2019-10-08_09_21stations.csv"
PRICES = ROOT / "cem" / "data" / "nl_day_ahead_2019-10.csv"
PV = ROOT / "cem" / "data" / "nl_pv_per_kwp_2019-10.csv"


def inputs() -> SimInputs:
    site = load_site_file(SITE)
    return load_inputs(site, SESSIONS, PRICES, PV, date(2019, 10, 8), 2, 30.0, ocpp=site.ocpp)


Run = tuple[SimInputs, LiveControlLoop, dict[str, Any], LevelRun]


@pytest.fixture(scope="module")
def run() -> Run:
    data = inputs()
    loop = LiveControlLoop(data, site_planner(MPC_GAP_TOL), 0.2, 2)
    realised = run_level(data, loop)
    return data, loop, level_kpis(data, realised, None), realised


def test_level_5_keeps_the_limits_that_uncontrolled_charging_breaks(
        run: Run) -> None:
    data, _, kpis, _ = run
    assert kpis["ptus_over_gtv"] == 0 and kpis["fuse_minutes_over"] == 0
    assert kpis["delivered_kwh"] > 0.7 * kpis["requested_kwh"]
    uncontrolled = level_kpis(data, run_level(data, Uncontrolled(data)), None)
    assert uncontrolled["ptus_over_gtv"] > 0 and uncontrolled["fuse_minutes_over"] > 0


def test_every_setpoint_came_as_an_frbc_instruction_through_an_s2_session(
        run: Run) -> None:
    data, loop, _, _ = run
    registry = loop.registry
    assert registry.cem_refusals == [] and registry.rm_refusals == []
    assert loop.controller.replans >= 100
    charged = {s.evse.id for s in data.sessions}
    for evse_id, device in loop.evses.items():
        entry = registry.get(device.rm_id)
        assert entry is not None and entry.state.control_type.value == "FILL_RATE_BASED_CONTROL"
        if evse_id not in charged:
            continue
        assert device.received, f"{evse_id} got no instruction"
        reported = {i for i, _ in device.statuses}
        for instruction in device.received:
            assert str(instruction.actuator_id) == device.ids.actuator
            assert str(instruction.operation_mode) in (device.ids.charging, device.ids.idle)
            record = entry.state.instruction(instruction.id)  # the CEM's session sent it
            assert record is not None
            assert str(instruction.id) in reported or record.revoked
        assert {s for _, s in device.statuses} <= {"ACCEPTED", "STARTED", "ABORTED", "REJECTED"}
        assert any(s == "STARTED" for _, s in device.statuses)
        assert any(str(i.operation_mode) == device.ids.charging and i.operation_mode_factor > 0
                   for i in device.received)


def test_overstaying_evs_get_the_live_rms_next_hour_target(
        run: Run) -> None:
    data, loop, _, realised = run
    # (an OCPP 1.6 EV is planned to the RM's default need: one whose real need is smaller stops
    # drawing while offered current, the RM takes it as full and, as live, sends no target; an
    # EV that is full by its departure is not flexible any more and gets none either)
    def full_by_departure(s: Any) -> bool:
        got = realised.ev_w[s.index, :s.believed_departure_ptu].sum() * data.dt_h
        return bool(got >= s.real_need_wh - 1.0)

    late = [s for s in data.sessions if s.departure_ptu > s.believed_departure_ptu + 1
            and not s.ocpp16 and not full_by_departure(s)]
    assert late
    for s in late:
        when = data.ptu_start(s.believed_departure_ptu)
        assert when in loop.evses[s.evse.id].targets, s.session_id


def test_the_controller_plans_on_the_runs_prices() -> None:
    data = inputs()
    start, n = 37, 96
    got = ptu_prices(TwinPrices(data), data.config.prices, data.ptu_start(start),
                     data.ptu_minutes, n, fill="previous").prices
    assert np.allclose(got.import_eur_per_kwh, data.import_eur_per_kwh[start:start + n])
    assert np.allclose(got.export_eur_per_kwh, data.export_eur_per_kwh[start:start + n])


def test_the_guard_caps_chargers_through_s2_when_the_sun_goes() -> None:
    data = inputs()
    loop = LiveControlLoop(data, site_planner(MPC_GAP_TOL), 0.2, 2)
    n_s = len(data.sessions)
    state = SimState(delivered_wh=np.zeros(n_s), last_setpoint_w=np.zeros(n_s),
                     last_energy_wh=np.zeros(n_s), seen_full=np.zeros(n_s, dtype=bool))
    t = 52  # Tuesday 13:00 local: the plan counts on ~20 kW of PV to charge more
    present = np.array([s.arrival_ptu <= t < s.departure_ptu for s in data.sessions])
    assert present.sum() > 5 and data.pv_w[t] > 10_000
    loop.setpoints(t, present, state)
    ev_w = sum(np.array(d.power_w()) for d in loop.evses.values())
    assert ev_w.sum() > data.import_limit_w[t]  # only fine with the sun
    before = {d.rm_id: len(d.received) for d in loop.evses.values()}
    loop.meter.measure(list(ev_w), loop.now)  # a cloud: the meter sees the EVs alone
    loop.loop.run_until_complete(loop._pump())
    assert loop.controller.guard_count == 1
    capped = [d for d in loop.evses.values() if len(d.received) > before[d.rm_id]]
    assert capped and all(d.received[-1].execution_time == loop.now for d in capped)
    ev_w = sum(np.array(d.power_w()) for d in loop.evses.values())
    assert ev_w.sum() <= data.import_limit_w[t] and max(ev_w) <= data.fuse_w_per_phase
    loop.close()


def test_the_loop_records_each_visit_as_the_ev_leaves_and_plans_to_safe_departures(
        run: Run) -> None:
    """What the live CEM learns from: one visit per EV that left, at its EVSE, with the times the
    CEM saw (arrival, the departure it was told, the real one); with them, safe departures."""
    from cem.simulation.inputs import evse_rm_name

    data, loop, _, _ = run
    learning = loop.controller.departures
    seen = {(v.evse, v.arrival, v.departure, v.typed_departure) for v in learning.model.visits}
    left = [s for s in data.sessions if s.departure_ptu < data.n_ptus]
    assert learning.recorded == len(learning.model.visits) > 20
    # an OCPP 1.6 EV's charger gives only its default departure: the visit keeps none
    found = [(evse_rm_name(s.evse.id), data.ptu_start(s.arrival_ptu), data.ptu_start(
        s.departure_ptu), None if s.ocpp16 else data.ptu_start(s.believed_departure_ptu)) in seen
        for s in left]
    assert any(s.ocpp16 for s in left) and any(not s.ocpp16 for s in left)
    # all but an EV that overstayed until the next one plugged in within the same PTU (its
    # charger told no departure apart from an overstayer's next-hour target): two visits as one;
    # every charger described itself empty as its RM connected, so every arrival is one the CEM
    # saw, also the first EV's (CA-307), which came before the CEM's first plan
    assert learning.unseen_arrivals == 0
    assert any(f"{learning.recorded} recorded during it (0 not" in n for n in loop.notes)
    assert sum(found) >= len(left) - 1, len(left) - sum(found)
    # the first day's visits are enough history for the second: EVs planned to safe departures
    assert learning.planned > 0


def test_level_5_can_plan_on_the_day_befores_pv_instead_of_the_actual() -> None:
    """`--pv-forecast persistence`: the PV RM forecasts yesterday's PV, measures today's."""
    from cem.simulation.inputs import SimulationError

    site = load_site_file(SITE)
    data = load_inputs(site, SESSIONS, PRICES, PV, date(2019, 10, 8), 2, 30.0, ocpp=site.ocpp,
                       pv_forecast="persistence")
    assert data.pv_forecast_w is not None and data.pv_w[:96].any()
    day = 96  # no DST change between 2019-10-08 and 10
    assert np.array_equal(data.pv_forecast_w[day:2 * day], data.pv_w[:day])
    assert not np.array_equal(data.pv_forecast_w[day:2 * day], data.pv_w[day:2 * day])
    loop = LiveControlLoop(data, site_planner(MPC_GAP_TOL), 0.2, 2)
    try:
        sent = loop._pv_forecast(day + 40, 8)
        assert sent[0] == data.pv_w[day + 40]  # the running PTU: measured
        assert np.array_equal(sent[1:], data.pv_w[41:48])  # the rest: the day before
    finally:
        loop.close()
    with pytest.raises(SimulationError, match="persistence"):
        load_inputs(site, SESSIONS, PRICES, PV, date(2019, 10, 8), 2, 30.0, pv_forecast="psychic")
