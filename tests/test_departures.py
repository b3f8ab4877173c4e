"""Departure learning: the model on a small fixture of visits, the store that keeps them, and
the planner's safe-departure milestone priced at the value of an undelivered kWh."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cem.planner.assets import Prices, Problem, SiteLimits, StorageAsset
from cem.planner.solve import plan_site
from cem.site.departures import DepartureModel, Visit
from cem.store import Store

MONDAY_8 = datetime(2019, 10, 7, 8, 0, tzinfo=UTC)
# the round 5 floors off unless a test asks for them (each has its own test)
OFF = {"ev_front_load_kwh": 0.0, "ev_open_need_kwh": 0.0}


def visit(evse: str, arrival: datetime, stay_h: float, typed_h: float | None,
          driver: str | None = None) -> Visit:
    typed = None if typed_h is None else arrival + timedelta(hours=typed_h)
    return Visit(evse, arrival, arrival + timedelta(hours=stay_h), typed, 10000.0, 8000.0, driver)


def fixture() -> list[Visit]:
    """Four Mondays at 08:00 on EVSE A: said 9 h, left after 4-8 h; elsewhere, people stay."""
    out = []
    for week in range(4):
        day = MONDAY_8 - timedelta(days=7 * (week + 1))
        out += [visit("A", day, stay, 9.0) for stay in (4.0, 6.0, 8.0)]
        out += [visit("B", day + timedelta(minutes=5 * k), 9.5, 9.0) for k in range(3)]
        out += [visit("C", day + timedelta(hours=3, minutes=k), 2.0 + k, None) for k in range(3)]
    return out


def test_safe_departure_comes_from_the_most_specific_group_with_enough_visits() -> None:
    model = DepartureModel(fixture(), "UTC", min_visits=8)
    typed = MONDAY_8 + timedelta(hours=9)
    # EVSE A on Monday 08:00: 12 visits that left 1-5 h early; the 0.15 quantile of departure
    # is typed minus the 0.85 quantile of "hours early" (5 h)
    safe = model.safe_departure("A", MONDAY_8, typed, 0.15)
    assert safe is not None and safe.basis == "EVSE, weekday and hour" and safe.visits == 12
    assert safe.at == typed - timedelta(hours=5)
    # EVSE B stays longer than it says: its own group says "typed", never later
    safe_b = model.safe_departure("B", MONDAY_8, typed, 0.15)
    assert safe_b is not None and safe_b.at == typed
    # a new EVSE at 08:00 on a Tuesday: the arrival hour (A and B together) decides
    tuesday = MONDAY_8 + timedelta(days=1)
    safe_new = model.safe_departure("Z", tuesday, tuesday + timedelta(hours=9), 0.15)
    assert safe_new is not None and safe_new.basis == "arrival hour" and safe_new.visits == 24
    assert tuesday < safe_new.at < tuesday + timedelta(hours=9)
    # no typed departure: a quantile of the stay; at 11:00 only C's 12 visits (2-4 h)
    at_11 = MONDAY_8 + timedelta(hours=3)
    safe_c = model.safe_departure("C", at_11, None, 0.15)
    assert safe_c is not None and safe_c.at == at_11 + timedelta(hours=2)


def test_an_ev_that_tells_no_need_is_planned_for_the_most_comparable_visits_took() -> None:
    """An OCPP 1.6 EV: the energy of the most specific group with enough visits, its 0.99
    quantile; nothing without history."""
    visits = [Visit("A", MONDAY_8 - timedelta(days=7 * w), MONDAY_8 - timedelta(days=7 * w)
                    + timedelta(hours=5), None, None, 1000.0 * kwh)
              for w in range(1, 3) for kwh in (5, 10, 15, 20, 25)]
    model = DepartureModel(visits, "UTC", min_visits=8)
    assert model.energy("A", MONDAY_8) == pytest.approx(25000.0, rel=0.01)  # 0.99 of 5..25 kWh
    assert model.energy("A", MONDAY_8, quantile=0.8) == pytest.approx(21000.0)
    assert DepartureModel([], "UTC").energy("A", MONDAY_8) is None


def test_a_driver_known_by_card_is_judged_on_their_own_visits() -> None:
    visits = fixture() + [visit("B", MONDAY_8 - timedelta(days=d), 3.0, 9.0, driver="card 7")
                          for d in range(1, 9)]
    model = DepartureModel(visits, "UTC", min_visits=8)
    typed = MONDAY_8 + timedelta(hours=9)
    safe = model.safe_departure("B", MONDAY_8, typed, 0.15, driver="card 7")
    assert safe is not None and safe.basis == "driver" and safe.at == typed - timedelta(hours=6)


def test_no_history_or_quantile_zero_gives_no_safe_departure() -> None:
    typed = MONDAY_8 + timedelta(hours=9)
    assert DepartureModel([], "UTC").safe_departure("A", MONDAY_8, typed, 0.15) is None
    assert DepartureModel(fixture(), "UTC").safe_departure("A", MONDAY_8, typed, 0.0) is None


def test_the_store_keeps_finished_visits_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "cem.sqlite"
    rows = [(v.evse, v.driver, v.arrival, v.departure, v.typed_departure, v.need_wh,
             v.delivered_wh) for v in fixture()]

    async def scenario() -> tuple[list, list]:
        store = await Store.open(path)
        await store.record_visits(rows)
        await store.close()
        store = await Store.open(path)
        try:
            return (await store.ev_visits(),
                    await store.ev_visits(since=MONDAY_8 - timedelta(days=7, hours=1)))
        finally:
            await store.close()

    everything, last_week = asyncio.run(scenario())
    assert sorted(everything, key=str) == sorted(rows, key=str)
    assert len(last_week) == 9 and all(r[2] >= MONDAY_8 - timedelta(days=8) for r in last_week)


N = 16


def one_ev(price_late: float, value_eur_per_kwh: float) -> Problem:
    """One EV wanting 11 kWh by PTU 16; its safe departure at PTU 4; cheap after PTU 8."""
    price = np.where(np.arange(N) < 8, 0.30, price_late)
    ev = StorageAsset(id="ev", kind="ev", charge_max_w=11000, charge_min_w=4140, level_wh=0,
                      level_max_wh=11000, target_wh=11000, available_from=0, available_until=N,
                      target_profile=[(4, 11000, 11000)],
                      milestone_eur_per_wh={4: value_eur_per_kwh / 1000})
    return Problem(start=MONDAY_8, ptu_minutes=15, n_ptus=N,
                   limits=SiteLimits(fuse_a=25, phases=3, voltage_v=230,
                                     import_limit_w=np.full(N, 20000.0),
                                     export_limit_w=np.full(N, 20000.0)),
                   prices=Prices(import_eur_per_kwh=price, export_eur_per_kwh=price * 0),
                   storage=[ev])


@pytest.mark.parametrize(("price_late", "value", "front_loaded"), [
    (0.20, 0.5, True),    # waiting saves 0.10 EUR/kWh: less than a kWh's value, charge first
    (-0.40, 0.5, False),  # waiting saves 0.70 EUR/kWh: worth the risk, the plan waits
    (-0.40, 1.0, True),   # ... unless an undelivered kWh is valued higher
])
def test_the_safe_departure_costs_the_value_of_an_undelivered_kwh(
        price_late: float, value: float, front_loaded: bool) -> None:
    problem = one_ev(price_late, value)
    plan = plan_site(problem, time_limit_s=2.0, workers=1)
    power = np.asarray(plan.power_w["ev"], dtype=float)
    early_kwh = float(power[:4].sum()) * 0.25 / 1000
    assert float(power.sum()) * 0.25 == pytest.approx(11000, abs=300)  # the target is met
    assert (early_kwh > 10.5) == front_loaded, early_kwh
    # the limits hold either way: 25 A per phase is 17.25 kW, the GTV 20 kW
    assert power.max() <= 11000 + 1e-6


def commitment_case(import_limit_w: float) -> tuple[Problem, Problem, object]:
    """The previous plan charged the EV in the PTU now running; the new prices are a little
    lower two hours later (a replan would postpone it); the import limit of PTU 0 is given."""
    from cem.control.departures import commit_started

    before = one_ev(0.30, 0.5)
    before.storage[0].target_profile, before.storage[0].milestone_eur_per_wh = [], {}
    before.storage[0].target_wh = before.storage[0].level_max_wh = 4000
    previous = plan_site(before, time_limit_s=2.0, workers=1)
    previous.power_w["ev"] = np.array([11000.0, 11000.0] + [0.0] * (N - 2))
    now = one_ev(0.29, 0.5)  # one PTU later: 0.30 now, 0.29 from PTU 7 on
    now.start = before.start + timedelta(minutes=15)
    ev = now.storage[0]
    ev.target_profile, ev.milestone_eur_per_wh = [], {}
    ev.target_wh = ev.level_max_wh = 4000
    ev.level_wh = 2750
    now.limits.import_limit_w = np.full(N, 20000.0)
    now.limits.import_limit_w[0] = import_limit_w
    assert commit_started(now, before, previous, 0.5 / 1000) == 1
    return before, now, previous


def test_a_started_charge_is_not_postponed_by_the_next_replan() -> None:
    _, now, _ = commitment_case(20000.0)
    assert now.storage[0].target_profile == [(1, 4000, 4000)]
    plan = plan_site(now, time_limit_s=2.0, workers=1)
    power = np.asarray(plan.power_w["ev"], dtype=float)
    assert power[0] * 0.25 >= 1250 - 50  # the rest of the need now, not at the cheaper hour


def test_a_limit_still_moves_a_committed_charge() -> None:
    _, now, _ = commitment_case(3000.0)  # a congestion window in PTU 0: below the EV's minimum
    plan = plan_site(now, time_limit_s=2.0, workers=1)
    power = np.asarray(plan.power_w["ev"], dtype=float)
    assert power[0] == 0.0  # the limit holds (the EV cannot charge below 4.14 kW)
    assert float(power.sum()) * 0.25 == pytest.approx(1250, abs=50)  # later, all of it


def test_departure_scenarios_are_priced_at_the_share_of_drivers_that_leave_by_then() -> None:
    from cem.control.departures import DepartureLearning, OpenVisit

    def learning(**planner: object) -> DepartureLearning:
        out: DepartureLearning = _learning_from_the_fixture(**planner)
        out.open["rm"] = OpenVisit("A", MONDAY_8, MONDAY_8 + timedelta(hours=9), 11000.0, 0.0,
                                   11000.0, typed_latest=MONDAY_8 + timedelta(hours=9))
        return out

    def problem() -> Problem:
        p = one_ev(0.30, 1.0)
        p.n_ptus = 40
        p.prices = Prices(import_eur_per_kwh=np.full(40, 0.3), export_eur_per_kwh=np.zeros(40))
        p.limits.import_limit_w = np.full(40, 20000.0)
        p.limits.export_limit_w = np.full(40, 20000.0)
        ev = p.storage[0]
        ev.available_until, ev.target_profile, ev.milestone_eur_per_wh = 36, [], {}
        return p

    # EVSE A's drivers left 5, 3 or 1 h early (a third each): the 5, 10 and 20 % quantiles
    # are 5 h early (one milestone, their three shares: 0.05 + 0.1 + 0.1), 30 % 4.4 h, 50 % 3 h;
    # every driver left early, so the last share runs to 100 %: the shares add up to the value
    # but for the 5 % that leave before the first milestone
    scenarios = learning(value_of_undelivered_kwh_eur=1.0)
    p = problem()
    assert scenarios.apply(p, {"rm": ["ev"]}) == 1
    ev = p.storage[0]
    ptus = sorted(m[0] for m in ev.target_profile)
    assert ptus[0] == 16 and ptus[-1] <= 32  # 4 h and at most 8 h after 08:00
    assert all(m[1] == 11000 for m in ev.target_profile)
    prices = [ev.milestone_eur_per_wh[t] * 1000 for t in ptus]
    assert ptus == [16, 18, 24]
    assert prices == pytest.approx([0.25, 0.2, 0.5])
    # one safe departure: the full value of a kWh there; quantile 0: the typed departure only
    single = learning(departure_scenario_quantiles=[])
    p = problem()
    single.apply(p, {"rm": ["ev"]})
    assert p.storage[0].milestone_eur_per_wh == {16: pytest.approx(0.001)}
    off = learning(safe_departure_quantile=0.0)
    p = problem()
    assert off.apply(p, {"rm": ["ev"]}) == 0 and p.storage[0].target_profile == []


def _learning_from_the_fixture(**planner: object) -> Any:
    """A DepartureLearning with `OFF` and `planner` settings that learned the fixture's visits."""
    from cem.control.departures import DepartureLearning
    from cem.site.config import PlannerConfig, SiteConfig

    config = SiteConfig.model_validate({"site": {"name": "t", "timezone": "UTC"},
                                        "planner": PlannerConfig(**{**OFF, **planner}).model_dump()})
    learning = DepartureLearning(config)
    for v in fixture():
        learning.model.add(v)
    return learning


def _one_ev_problem(price: np.ndarray, ev: StorageAsset) -> Problem:
    """40 PTUs from Monday 08:00 with room for the EV (20 kW, 25 A), at `price`."""
    return Problem(start=MONDAY_8, ptu_minutes=15, n_ptus=40,
                   limits=SiteLimits(fuse_a=25, phases=3, voltage_v=230,
                                     import_limit_w=np.full(40, 20000.0),
                                     export_limit_w=np.full(40, 20000.0)),
                   prices=Prices(import_eur_per_kwh=price, export_eur_per_kwh=price * 0),
                   storage=[ev])


def test_an_ev_near_full_is_planned_to_finish_earlier_for_the_taper() -> None:
    """An EV that reports its SoC and wants 75 -> 97 %: above 80 % it takes less than full
    power, so its milestones come the taper's extra hour earlier and the plan charges it by
    then; an EV in kWh charged (no SoC) and `ev_taper_from_soc = 100` keep them where they were."""
    from cem.control.departures import DepartureLearning, OpenVisit, taper_ptus

    def case(soc: bool, **planner: object) -> tuple[Problem, DepartureLearning]:
        learning = _learning_from_the_fixture(**planner)
        learning.open["rm"] = OpenVisit("A", MONDAY_8, MONDAY_8 + timedelta(hours=9), 13000.0,
                                        45000.0, 60000.0, soc=soc,
                                        typed_latest=MONDAY_8 + timedelta(hours=9))
        price = np.where(np.arange(40) < 14, 0.30, 0.10)  # cheap from 11:30: the plan waits
        ev = StorageAsset(id="ev", kind="ev", charge_max_w=7360, charge_min_w=1380,
                          level_wh=45000, level_max_wh=60000, target_wh=58000,
                          available_from=0, available_until=36)
        problem = _one_ev_problem(price, ev)
        assert learning.apply(problem, {"rm": ["ev"]}) == 1
        return problem, learning

    plain, _ = case(False)
    tapered, learning = case(True)
    shift = taper_ptus(tapered.storage[0], 0.8, 15)
    assert shift == 4 and learning.tapered == 1  # 80 -> 97 % takes an hour more than at full power
    before = sorted(m[0] for m in plain.storage[0].target_profile)
    after = sorted(m[0] for m in tapered.storage[0].target_profile)
    assert after == [t - shift for t in before]
    off, _ = case(True, ev_taper_from_soc=100)
    assert sorted(m[0] for m in off.storage[0].target_profile) == before
    # the plan: the whole need by the first (earlier) milestone, at full power at most
    plan = plan_site(tapered, time_limit_s=2.0, workers=1)
    power = np.asarray(plan.power_w["ev"], dtype=float)
    assert power.max() <= 7360 + 1e-6
    assert float(power[:after[0]].sum()) * 0.25 >= 13000 - 300
    late = np.asarray(plan_site(plain, time_limit_s=2.0, workers=1).power_w["ev"], dtype=float)
    assert float(late[:after[0]].sum()) * 0.25 < 13000 - 300  # without the taper it waits longer


def test_departures_are_learned_as_the_share_of_the_typed_stay() -> None:
    """Half the drivers typed 10 h and left after 5 h, half typed 2 h and left after 1 h: every
    one stayed half the stay they typed. A new driver who types 2 h is planned to leave after
    1 h, not at once (5 h early, the most of the pooled "hours early", is all of their stay)."""
    visits = [visit("D", MONDAY_8 - timedelta(days=d), *(5.0, 10.0) if d % 2 else (1.0, 2.0))
              for d in range(1, 13)]
    short_typed = MONDAY_8 + timedelta(hours=2)
    share = DepartureModel(visits, "UTC").safe_departure("D", MONDAY_8, short_typed, 0.15)
    assert share is not None and share.at == MONDAY_8 + timedelta(hours=1)
    long_typed = MONDAY_8 + timedelta(hours=10)
    share_long = DepartureModel(visits, "UTC").safe_departure("D", MONDAY_8, long_typed, 0.15)
    assert share_long is not None and share_long.at == MONDAY_8 + timedelta(hours=5)
    hours = DepartureModel(visits, "UTC", relative=False).safe_departure("D", MONDAY_8,
                                                                         short_typed, 0.15)
    assert hours is not None and hours.at == MONDAY_8


def test_every_arriving_ev_gets_its_first_kwh_within_the_front_load_window() -> None:
    """Cheap power from 09:00 and learned departures hours away: the plan waits for the cheap
    hours, so a driver who leaves in the first hour goes home empty. With `ev_front_load_kwh = 3`
    the first 3 kWh come within `ev_front_load_minutes` (60) of arrival, at any price, inside
    the EV's maximum; an EV that already got them, or whose window passed, is left to the
    departure milestones."""
    from cem.control.departures import DepartureLearning, OpenVisit

    def case(arrival: datetime, delivered_wh: float = 0.0,
             **planner: object) -> tuple[Problem, DepartureLearning]:
        learning = _learning_from_the_fixture(**planner)
        learning.open["rm"] = OpenVisit("A", arrival, MONDAY_8 + timedelta(hours=9), 13000.0,
                                        0.0, 20000.0, delivered_wh=delivered_wh,
                                        typed_latest=MONDAY_8 + timedelta(hours=9))
        price = np.where(np.arange(40) < 4, 0.30, 0.10)
        ev = StorageAsset(id="ev", kind="ev", charge_max_w=7360, charge_min_w=1380,
                          level_wh=0, level_max_wh=20000, target_wh=13000,
                          available_from=0, available_until=36)
        problem = _one_ev_problem(price, ev)
        learning.apply(problem, {"rm": ["ev"]})
        return problem, learning

    def first_hour_kwh(problem: Problem) -> float:
        power = np.asarray(plan_site(problem, time_limit_s=2.0, workers=1).power_w["ev"], dtype=float)
        assert power.max() <= 7360 + 1e-6
        assert float(power.sum()) * 0.25 == pytest.approx(13000, abs=300)  # the target is met
        return float(power[:4].sum()) * 0.25 / 1000

    waiting, _ = case(MONDAY_8)
    assert first_hour_kwh(waiting) < 0.5  # without a floor the plan waits for 09:00
    floor, learning = case(MONDAY_8, ev_front_load_kwh=3)
    assert learning.front_loaded == 1
    assert (4, 3000, 20000) in floor.storage[0].target_profile
    assert floor.storage[0].milestone_eur_per_wh[4] == pytest.approx(0.001)  # 1 EUR/kWh
    priced, _ = case(MONDAY_8, ev_front_load_kwh=3, ev_front_load_eur_per_kwh=0.1)
    assert priced.storage[0].milestone_eur_per_wh[4] == pytest.approx(0.0001)
    assert first_hour_kwh(floor) >= 3.0 - 0.1
    got_it, learning = case(MONDAY_8, delivered_wh=3000, ev_front_load_kwh=3)
    late, learning_late = case(MONDAY_8 - timedelta(hours=1), ev_front_load_kwh=3)
    assert learning.front_loaded == learning_late.front_loaded == 0
    assert first_hour_kwh(got_it) < 0.5 and first_hour_kwh(late) < 0.5


def test_in_a_rush_the_floors_ask_no_more_than_the_site_can_give_first_come_first_floored() -> None:
    """20 EVs that arrived in the last 20 minutes on a site whose fuse (25 A, 17.25 kW) gives
    about 17 kWh in their floors' hour: 5 kWh floors for all would ask 100 kWh, more than the
    site has, and the plan would spread the hour over every EV. The floors ask what is there
    (at most 17.25 kWh in all), the earliest arrivals first, and the plan gives the first
    two their 5 kWh within their hour."""
    from cem.control.departures import OpenVisit

    learning = _learning_from_the_fixture(ev_front_load_kwh=5)
    evs = []
    for k in range(20):
        rm = f"rm{k}"
        arrival = MONDAY_8 - timedelta(minutes=20 - k)  # rm0 came first
        learning.open[rm] = OpenVisit("A", arrival, MONDAY_8 + timedelta(hours=9), 13000.0,
                                      0.0, 20000.0, typed_latest=MONDAY_8 + timedelta(hours=9))
        evs.append(StorageAsset(id=f"ev{k}", kind="ev", charge_max_w=7360, charge_min_w=1380,
                                level_wh=0, level_max_wh=20000, target_wh=13000,
                                available_from=0, available_until=36))
    problem = _one_ev_problem(np.full(40, 0.20), evs[0])
    problem.storage = evs
    learning.apply(problem, {f"rm{k}": [f"ev{k}"] for k in range(20)})
    floors = {ev.id: [m for m in ev.target_profile if m[0] <= 4] for ev in evs}
    asked = sum(m[1] for f in floors.values() for m in f)
    assert 15000 <= asked <= 25 * 230 * 3 + 1  # what the fuse gives by 09:00, not 20 x 5 kWh
    # rm0 and rm1 (07:40, 07:41; floors at 08:45) get their 5 kWh, rm2 what is left by then
    assert [m[1] for m in floors["ev0"]] == [m[1] for m in floors["ev1"]] == [5000]
    assert 0 < floors["ev2"][0][1] < 5000
    assert floors["ev19"] == []  # the last arrival: nothing left in its hour
    plan = plan_site(problem, time_limit_s=2.0, workers=1)
    for k in range(2):
        power = np.asarray(plan.power_w[f"ev{k}"], dtype=float)
        assert float(power[:3].sum()) * 0.25 >= 5000 - 100  # its 5 kWh by its floor's PTU


def test_an_ev_that_tells_no_need_and_still_takes_energy_is_asked_for_more() -> None:
    """An OCPP 1.6 EV (the charger's default need, 20 kWh) that has taken 21 kWh and still
    draws: comparable visits took 8 kWh, so without `ev_open_need_kwh` nothing more is asked
    of it; with 10 kWh its departure milestones ask 31 kWh, and the plan charges it."""
    from cem.control.departures import OpenVisit

    def case(**planner: object) -> Problem:
        learning = _learning_from_the_fixture(**planner)
        learning.open["rm"] = OpenVisit("C", MONDAY_8, None, None, 21000.0, 150000.0,
                                        defaults=True)
        price = np.full(40, 0.30)
        ev = StorageAsset(id="ev", kind="ev", charge_max_w=7360, charge_min_w=1380,
                          level_wh=21000, level_max_wh=150000, target_wh=20000,
                          available_from=0, available_until=36)
        problem = _one_ev_problem(price, ev)
        learning.apply(problem, {"rm": ["ev"]})
        return problem

    assert case().storage[0].target_profile == []
    asked = case(ev_open_need_kwh=10)
    assert asked.storage[0].target_profile
    assert {m[1] for m in asked.storage[0].target_profile} == {31000}
    power = np.asarray(plan_site(asked, time_limit_s=2.0, workers=1).power_w["ev"], dtype=float)
    assert power.max() <= 7360 + 1e-6
    assert float(power.sum()) * 0.25 == pytest.approx(10000, abs=300)


def test_only_an_arrival_the_cem_saw_gets_the_floor_and_is_learned_from() -> None:
    """A CEM (re)started beside a parked EV does not know when it came: that EV gets no
    front-load floor (a restart would rush every parked EV at the value of a kWh) and its visit,
    once it ends, is not learned from (its stay would be the time since the restart). An EV that
    then plugs into the charger the CEM saw empty gets both."""
    learning = _learning_from_the_fixture(ev_front_load_kwh=3)
    price = np.full(40, 0.10)

    def observe(at: datetime, plugged: bool) -> tuple[Problem, list[Visit]]:
        ev = StorageAsset(id="ev", kind="ev", charge_max_w=7360 if plugged else 0,
                          charge_min_w=1380 if plugged else 0, level_wh=0,
                          level_max_wh=20000 if plugged else 0, target_wh=13000 if plugged else 0,
                          available_from=0, available_until=36)
        problem = _one_ev_problem(price, ev)
        problem.start = at
        closed = learning.observe(problem, {"rm": ["ev"]}, {}, {"rm": "A"}, at)
        learning.apply(problem, {"rm": ["ev"]})
        return problem, closed

    parked, _ = observe(MONDAY_8, plugged=True)   # the CEM's first plan: the EV is there
    assert learning.front_loaded == 0
    assert all(m[0] > 4 for m in parked.storage[0].target_profile)  # its departures' only
    known = len(learning.model.visits)
    _, closed = observe(MONDAY_8 + timedelta(hours=3), plugged=False)
    assert closed == [] and learning.unseen_arrivals == 1 and len(learning.model.visits) == known
    arrived_at = MONDAY_8 + timedelta(hours=4)
    seen, _ = observe(arrived_at, plugged=True)
    assert learning.front_loaded == 1 and (4, 3000, 20000) in seen.storage[0].target_profile
    _, closed = observe(arrived_at + timedelta(hours=2), plugged=False)
    assert [(v.evse, v.arrival) for v in closed] == [("A", arrived_at)]


def test_departures_can_be_learned_per_typed_stay_within_the_arrival_hour() -> None:
    """Of the 08:00 arrivals, ten typed 10 h and left after half of it, thirty typed 2 h and
    stayed: pooled, a new 10 h driver's 0.3 quantile is the whole typed stay (the short stays
    outnumber the long); per typed stay it is what the long stays really did, 5 h."""
    visits = [visit("E", MONDAY_8 - timedelta(days=d), 5.0, 10.0) for d in range(1, 11)]
    visits += [visit("F", MONDAY_8 - timedelta(days=d), 2.0, 2.0) for d in range(1, 31)]
    typed = MONDAY_8 + timedelta(hours=10)
    pooled = DepartureModel(visits, "UTC").safe_departure("G", MONDAY_8, typed, 0.3)
    split = DepartureModel(visits, "UTC", by_typed_stay=True).safe_departure(
        "G", MONDAY_8, typed, 0.3)
    assert pooled is not None and pooled.at == typed and pooled.basis == "arrival hour"
    assert split is not None and split.at == MONDAY_8 + timedelta(hours=5)
    assert split.basis == "arrival hour and typed stay" and split.visits == 10


async def test_an_ev_that_plugs_in_before_the_cems_first_plan_is_an_arrival_it_saw(
        tmp_path: Path) -> None:
    """The CEM starts; two OCPP charger RMs connect. One describes its charger empty, and an EV
    plugs in there before the CEM's first plan: the CEM saw that arrival (it gets the front-load
    floor, and its visit is learned from). The other connects with its EV already plugged in,
    and one reconnects with an EV after a lost session: nobody knows when those came."""
    from s2python.common import ControlType
    from test_control_loop import SYM, FakeRegistry, config, now

    from cem.control.mpc import SiteController
    from resource_managers.ocpp_charger import frbc

    store = await Store.open(tmp_path / "cem.db")
    registry = FakeRegistry()
    queue = registry.subscribe()
    controller = SiteController(config(ev_front_load_kwh=3), registry, store, solver=None)
    ids = {rm: frbc.FrbcIds.for_resource(uuid.uuid5(uuid.NAMESPACE_URL, rm))
           for rm in ("evse-1", "evse-2")}

    async def pump() -> None:
        while not queue.empty():
            await controller.handle_event(queue.get_nowait())

    def charger(rm: str, ev: bool) -> None:
        at = now()
        flex = frbc.EvseFlex(name=rm, online=True, has_session=ev, phases=3, phase="L1",
                             min_current_a=6, max_current_a=16, need_kwh=10.0 if ev else None,
                             departure=at + timedelta(hours=2) if ev else None)
        registry.feed(rm, frbc.system_description(flex, ids[rm], at))
        target = frbc.fill_level_target(flex, at)
        if target is not None:
            registry.feed(rm, target)
        registry.feed(rm, frbc.storage_status(flex))

    def connect(rm: str) -> None:
        registry.connect(rm, f"EV charger {rm}", [ControlType.FILL_RATE_BASED_CONTROL], [SYM])

    try:
        connect("evse-1")
        charger("evse-1", ev=False)  # as it connects: no EV
        connect("evse-2")
        await pump()
        charger("evse-1", ev=True)  # an EV comes before the first plan
        charger("evse-2", ev=True)  # an EV that was there when its charger connected
        await pump()
        first = now()
        await controller.replan(["the first plan"])
        assert controller.departures.front_loaded == 1  # evse-1's EV only
        for rm in ids:
            charger(rm, ev=False)  # both leave
        await pump()
        await controller.replan(["EVs left"])
        # evse-1 again: its RM's session ends, and it comes back with an EV plugged in
        registry.disconnect("evse-1")
        await pump()
        connect("evse-1")
        charger("evse-1", ev=True)
        await pump()
        await controller.replan(["evse-1 is back"])
        charger("evse-1", ev=False)
        await pump()
        await controller.replan(["the EV left"])
        await store.flush()
        visits = await store.ev_visits()
        assert [v[0] for v in visits] == ["EV charger evse-1"]  # the store keeps ms
        assert abs(visits[0][2] - first) < timedelta(seconds=1)
        assert controller.departures.unseen_arrivals == 2
    finally:
        await controller.stop()
        await store.close()


def test_an_ev_that_tells_no_departure_keeps_the_value_of_the_stays_past_its_chargers_default() -> None:
    """An OCPP 1.6 EV whose charger's default departure is 2.5 h after it came, where
    comparable visits stayed 2-4 h: its asset ends at their median stay (3 h), and the share
    of the drivers who leave after that still goes on its last PTU instead of being dropped:
    with a kWh at 0.60 EUR, dearer than the shares before the default (0.45 EUR), the plan
    charges it."""
    from cem.control.departures import OpenVisit

    arrival = MONDAY_8 + timedelta(hours=3)  # EVSE C's Mondays at 11:00 stayed 2, 3 or 4 h
    learning = _learning_from_the_fixture(ev_open_need_kwh=10, value_of_undelivered_kwh_eur=1.0)
    learning.open["rm"] = OpenVisit("C", arrival, None, None, 21000.0, 150000.0, defaults=True)
    price = np.full(40, 0.60)
    ev = StorageAsset(id="ev", kind="ev", charge_max_w=7360, charge_min_w=1380,
                      level_wh=21000, level_max_wh=150000, target_wh=20000,
                      available_from=0, available_until=10)
    problem = _one_ev_problem(price, ev)
    problem.start = arrival
    assert learning.apply(problem, {"rm": ["ev"]}) == 1
    power = np.asarray(plan_site(problem, time_limit_s=2.0, workers=1).power_w["ev"], dtype=float)
    assert float(power.sum()) * 0.25 == pytest.approx(10000, abs=300)  # the open need, charged
    assert power[12:].sum() == 0  # gone by its learned median stay as far as the plan knows
    asked = problem.storage[0]
    assert sum(asked.milestone_eur_per_wh.values()) * 1000 == pytest.approx(0.95)
    assert max(m[0] for m in asked.target_profile if m[1] == 31000) == 12


def test_an_ev_that_tells_no_departure_is_charged_after_its_chargers_default_while_comparable_drivers_stay() -> None:
    """An OCPP 1.6 EV's charger says it leaves 2.5 h after it came (its default), but half of
    the comparable visits (EVSE C's Mondays at 11:00: 2, 3 or 4 h) stayed 3 h or more. Power
    costs 0.60 EUR a kWh until that default and 0.05 EUR after it: the plan charges the EV in
    the cheap half hour after the default, up to the median stay, and the rest before it
    (before, it ended at the default and all of it was bought at 0.60 EUR)."""
    from cem.control.departures import OpenVisit

    arrival = MONDAY_8 + timedelta(hours=3)
    learning = _learning_from_the_fixture(ev_open_need_kwh=10, value_of_undelivered_kwh_eur=1.0)
    learning.open["rm"] = OpenVisit("C", arrival, None, None, 21000.0, 150000.0, defaults=True)
    price = np.where(np.arange(40) < 10, 0.60, 0.05)
    ev = StorageAsset(id="ev", kind="ev", charge_max_w=7360, charge_min_w=1380,
                      level_wh=21000, level_max_wh=150000, target_wh=20000,
                      available_from=0, available_until=10,
                      target_profile=[(10, 20000, 150000), (6, 20000, 150000)])
    problem = _one_ev_problem(price, ev)
    problem.start = arrival
    assert learning.apply(problem, {"rm": ["ev"]}) == 1
    plan = plan_site(problem, time_limit_s=2.0, workers=1)
    power = np.asarray(plan.power_w["ev"], dtype=float)
    assert float(power.sum()) * 0.25 == pytest.approx(10000, abs=300)  # the open need
    assert power[10:12].min() == pytest.approx(7360, abs=50)  # after the default, cheap
    assert power[12:].sum() == 0  # gone by the median stay as far as the plan knows
    assert float(power[:10].sum()) * 0.25 == pytest.approx(10000 - 2 * 7360 * 0.25, abs=300)
    assert learning.stretched == 1


def test_a_typed_departure_the_history_says_is_too_early_is_planned_past() -> None:
    """EVSE D's Mondays at 09:00: drivers typed a 4 h stay and stayed 7.5-8.5 h, every one of
    them (EVSE A's: 2-4.5 h). A new driver there types 13:00 and 20 kWh; power costs 0.30 EUR a kWh until 14:00
    and 0.05 after. With `late_departure_quantile` the plan gives half the need by the typed
    departure (the floor, by its finish margin) and the rest in the cheap hours after it,
    before the learned late departure (the 0.05 quantile: 09:00 + 1.9 x 4 h); without it,
    and for a driver on EVSE A, whose history says its typed departure is late, not early,
    all of it comes before the typed departure."""
    from cem.control.departures import OpenVisit

    arrival = MONDAY_8 + timedelta(hours=1)
    typed = arrival + timedelta(hours=4)  # PTU 20 of the problem

    def case(evse: str, quantile: float) -> tuple[np.ndarray, Any]:
        learning = _learning_from_the_fixture(late_departure_quantile=quantile,
                                              late_departure_floor_share=0.5)
        for week in range(4):
            day = arrival - timedelta(days=7 * (week + 1))
            for k, stay in enumerate((7.5, 7.75, 8.0, 8.25, 8.5)):
                learning.model.add(visit("D", day + timedelta(minutes=k), stay, 4.0))
            for k, stay in enumerate((2.0, 3.0, 3.5, 4.0, 4.5)):
                learning.model.add(visit("A", day + timedelta(minutes=k), stay, 4.0))
        learning.open["rm"] = OpenVisit(evse, arrival, typed, 20000.0, 0.0, 60000.0,
                                        typed_latest=typed)
        ev = StorageAsset(id="ev", kind="ev", charge_max_w=7360, charge_min_w=1380,
                          level_wh=0, level_max_wh=60000, target_wh=20000,
                          available_from=4, available_until=20,
                          target_profile=[(20, 20000, 60000), (16, 20000, 60000)])
        problem = _one_ev_problem(np.where(np.arange(40) < 24, 0.30, 0.05), ev)
        learning.apply(problem, {"rm": ["ev"]})
        plan = plan_site(problem, time_limit_s=2.0, workers=1)
        return np.asarray(plan.power_w["ev"], dtype=float), learning

    power, learning = case("D", 0.05)
    assert float(power.sum()) * 0.25 == pytest.approx(20000, abs=300)  # the whole need
    assert float(power[:16].sum()) * 0.25 == pytest.approx(10000, abs=300)  # the floor in time
    assert float(power[24:35].sum()) * 0.25 == pytest.approx(10000, abs=300)  # cheap, late
    assert power[35:].sum() == 0  # not after the learned late departure
    assert learning.past_typed == 1
    for evse, quantile in (("D", 0.0), ("A", 0.05)):  # off; a history that says early
        power, learning = case(evse, quantile)
        assert float(power[:16].sum()) * 0.25 == pytest.approx(20000, abs=300), evse
        assert power[20:].sum() == 0, evse
        assert learning.past_typed == 0
