"""Why each EV gets what it gets (cem/control/explain.py) and the operator's EV modes
(cem/control/ev_modes.py), on real planner runs of small problems."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np

from cem.control.ev_modes import EvMode, EvModes, apply_mode
from cem.control.explain import Window, explain_evs
from cem.control.guard import GuardDecision
from cem.flex.site_problem import SiteMapping
from cem.planner.assets import Prices, Problem, SiteLimits, StorageAsset, single_phase
from cem.planner.solve import plan_site

START = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)  # 12:00 in Amsterdam
ZONE = ZoneInfo("Europe/Amsterdam")
N = 16
NOW = START + timedelta(minutes=1)


def problem(*evs: StorageAsset, fuse_a: float = 25, import_w: np.ndarray | None = None,
            prices: np.ndarray | None = None) -> Problem:
    return Problem(
        start=START, ptu_minutes=15, n_ptus=N,
        limits=SiteLimits(fuse_a=fuse_a, phases=3, voltage_v=230,
                          import_limit_w=np.full(N, 17000) if import_w is None else import_w,
                          export_limit_w=np.full(N, 17000)),
        prices=Prices(np.full(N, 0.25) if prices is None else prices, np.zeros(N)),
        storage=list(evs))


def ev(name: str, *, phase: str = "L2", need_wh: int = 10000, until: int = 12,
       priority: int = 1, level_wh: int = 0) -> StorageAsset:
    return StorageAsset(id=name, kind="ev", charge_max_w=7360, charge_min_w=1380,
                        level_wh=level_wh, level_max_wh=60000, target_wh=need_wh,
                        available_until=until, priority=priority,
                        phase_share=single_phase(phase))


def explain(pr: Problem, **kwargs: object) -> dict[str, object]:
    plan = plan_site(pr, time_limit_s=1)
    return explain_evs(pr, plan, SiteMapping(), NOW, zone=ZONE, **kwargs)  # type: ignore[arg-type]


def test_the_fuse_on_the_evs_phase_holds_the_lower_priority_back() -> None:
    out = explain(problem(ev("staff"), ev("vip", priority=3), fuse_a=16))
    staff, vip = out["staff"], out["vip"]
    assert vip.code == "fuse" and vip.text == "held at 16 A by the fuse on L2 (16 of 16 A planned)"
    assert staff.code == "fuse" and staff.limit == "fuse L2"
    assert staff.text.startswith("held at 0 A by the fuse on L2")
    assert "EVs of priority 3 are served before this one (priority 1)" in staff.text
    # it waits for the VIP to finish, and the plan says when and what it will miss
    assert staff.next_charge is not None and staff.next_charge > NOW
    assert f"charges next from {staff.next_charge.astimezone(ZONE):%H:%M}" in staff.next_text
    assert "will miss" in staff.next_text and staff.shortfall_wh > 0


def test_a_congestion_window_names_its_end_and_source() -> None:
    limit = np.full(N, 17000)
    limit[:8] = 3000  # 12:00-14:00 local
    window = Window(START, START + timedelta(hours=2), 3.0, "api")
    out = explain(problem(ev("car", phase="L1"), import_w=limit), congestion=[window])
    car = out["car"]
    assert car.code == "congestion" and car.limit == "congestion"
    assert "congestion window until 14:00 (import at most 3 kW, from api)" in car.text
    assert car.text.startswith("held at 13 A")  # 3 kW on one phase
    assert car.power_w <= 3000


def test_the_import_limit_without_a_window_is_the_gtv() -> None:
    out = explain(problem(ev("a", phase="L1"), ev("b", phase="L2"), ev("c", phase="L3"),
                          fuse_a=40, import_w=np.full(N, 6000)))
    assert {e.code for e in out.values()} == {"import_limit"}
    assert all("by the import limit (6.0 of 6.0 kW planned)" in e.text for e in out.values())


def test_a_price_valley_later_is_why_it_waits() -> None:
    prices = np.full(N, 0.30)
    prices[8:] = 0.10  # from 14:00 local
    out = explain(problem(ev("car", need_wh=5000, until=16), prices=prices))
    car = out["car"]
    assert car.code == "cheaper_later" and car.power_w == 0
    assert car.text == "waiting for cheaper hours from 14:00 (10.0 instead of 30.0 ct/kWh)"
    assert car.next_text == "charges next from 14:00"
    assert car.planned_wh >= 5000 * 0.98


def test_target_met_full_power_and_the_guard() -> None:
    done = ev("done", level_wh=10000, need_wh=10000)
    hurry = ev("hurry", need_wh=40000, until=6, phase="L1")
    pr = problem(done, hurry, fuse_a=40)
    plan = plan_site(pr, time_limit_s=1)
    out = explain_evs(pr, plan, SiteMapping(), NOW, zone=ZONE)
    assert out["done"].code == "target_met" and out["done"].text == "target met: 10.0 of 10.0 kWh"
    assert out["hurry"].code == "full" and "charging at full power, 7.4 kW (32.0 A)" in \
        out["hurry"].text
    cap = GuardDecision(caps={"hurry": 1380.0}, reason="L1 at 101% of the fuse")
    capped = explain_evs(pr, plan, SiteMapping(), NOW, zone=ZONE,
                         guard_actions=[(NOW - timedelta(minutes=1), cap)])
    assert capped["hurry"].code == "guard"
    assert capped["hurry"].text == ("capped at 1.4 kW by the guard at 12:00: L1 at 101% of "
                                    "the fuse")
    # an old guard action no longer explains the present
    later = explain_evs(pr, plan, SiteMapping(), NOW, zone=ZONE,
                        guard_actions=[(NOW - timedelta(hours=1), cap)])
    assert later["hurry"].code == "full"


def test_modes_change_what_the_planner_gives() -> None:
    prices = np.full(N, 0.30)
    prices[8:] = 0.10
    # smart: waits for the valley; charge now: full power at once
    smart = problem(ev("car", need_wh=5000, until=16), prices=prices)
    assert plan_site(smart, time_limit_s=1).power_w["car"][0] == 0
    now = problem(ev("car", need_wh=5000, until=16), prices=prices, fuse_a=40)
    apply_mode(now.storage[0], EvMode("charge_now"), now)
    plan = plan_site(now, time_limit_s=1)
    assert plan.power_w["car"][0] >= 7360 * 0.97 and plan.power_w["car"][1] >= 7360 * 0.97
    out = explain_evs(now, plan, SiteMapping(), NOW, zone=ZONE,
                      modes={"car": EvMode("charge_now")})
    assert out["car"].text.endswith("(charge now, set by the operator)")
    # a minimum first: about 3 kWh at once, then the rest in the valley
    first = problem(ev("car", need_wh=8000, until=16), prices=prices, fuse_a=40)
    apply_mode(first.storage[0], EvMode("smart", min_kwh=3), first)
    plan = plan_site(first, time_limit_s=1)
    early_wh = float(np.sum(plan.power_w["car"][:8]) * 0.25)
    assert 2900 <= early_wh <= 3700
    assert float(np.sum(plan.power_w["car"]) * 0.25) >= 8000 * 0.98
    # paused: nothing, and no shortfall to chase
    paused = problem(ev("car", need_wh=8000, until=16), prices=prices)
    apply_mode(paused.storage[0], EvMode("paused"), paused)
    plan = plan_site(paused, time_limit_s=1)
    assert not np.any(plan.power_w["car"]) and "car" not in plan.shortfall
    out = explain_evs(paused, plan, SiteMapping(), NOW, zone=ZONE,
                      modes={"car": EvMode("paused", set_at=START)})
    assert out["car"].code == "paused" and out["car"].text.startswith(
        "paused by the operator since 12:00")


async def test_a_mode_ends_when_the_ev_leaves() -> None:
    modes = EvModes()
    await modes.set("rm-1", "paused", None, START)
    present = problem(ev("rm-1"))
    assert modes.apply(present, {"rm-1": ["rm-1"]}) == []
    assert present.storage[0].charge_max_w == 0
    left = problem(StorageAsset(id="rm-1", kind="ev", charge_max_w=0))  # idle only: no EV
    gone = modes.apply(left, {"rm-1": ["rm-1"]})
    assert gone == ["rm-1"]
    await modes.forget(gone)
    assert modes.get("rm-1") is None
    # not connected (a restart): the mode is kept until the charger says its EV left
    await modes.set("rm-2", "charge_now", None, START)
    assert modes.apply(problem(), {}) == [] and modes.get("rm-2") is not None
