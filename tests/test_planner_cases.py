"""Small hand-checkable site plans: what a site owner would notice in the plan."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from cem.planner.assets import (
    THREE_PHASE,
    Curtailable,
    FixedLoad,
    ModeAsset,
    PowerMode,
    Prices,
    Problem,
    ShiftableProfile,
    SiteLimits,
    StorageAsset,
    single_phase,
)
from cem.planner.solve import check_plan, plan_site

START = datetime(2026, 1, 5, tzinfo=UTC)


def site(n: int = 8, *, fuse_a: float = 63.0, import_w: int | list[int] = 40_000,
         export_w: int = 40_000, price: list[float] | None = None, export_price: list[float] | None = None,
         peak_price: float = 0.0, ptu_minutes: int = 60) -> Problem:
    """A 3-phase 230 V site with hourly PTUs unless told otherwise."""
    imp = np.asarray(import_w if isinstance(import_w, list) else [import_w] * n, dtype=np.int64)
    p = np.asarray(price if price is not None else [0.3] * n, dtype=float)
    e = np.asarray(export_price if export_price is not None else p - 0.1, dtype=float)
    return Problem(start=START, ptu_minutes=ptu_minutes, n_ptus=n,
                   limits=SiteLimits(fuse_a=fuse_a, phases=3, voltage_v=230.0, import_limit_w=imp,
                                     export_limit_w=np.full(n, export_w), peak_price_eur_per_kw=peak_price),
                   prices=Prices(p, e))


def ev(id: str, *, max_w: int = 11_040, min_w: int = 4_140, target: int = 11_040, arrive: int = 0,
       leave: int | None = None, phase: str | None = None, priority: int = 1, v2g_w: int = 0,
       level: int = 0, level_max: int | None = None, eff: float = 1.0) -> StorageAsset:
    return StorageAsset(
        id=id, kind="ev", charge_max_w=max_w, charge_min_w=min_w, discharge_max_w=v2g_w,
        discharge_min_w=min(min_w, v2g_w), charge_efficiency=eff, discharge_efficiency=eff,
        level_wh=level, level_max_wh=level_max if level_max is not None else max(target, level),
        available_from=arrive, available_until=leave, target_wh=target, priority=priority,
        phase_share=single_phase(phase) if phase else THREE_PHASE)


def plan_ok(problem: Problem, **kw: float) -> object:
    plan = plan_site(problem, time_limit_s=kw.pop("time_limit_s", 0.5), **kw)
    assert check_plan(problem, plan) == []
    assert plan.status in ("OPTIMAL", "FEASIBLE")
    if plan.lp_bound_eur is not None:
        assert plan.lp_bound_eur <= plan.objective_eur + 1e-6
    return plan


def test_two_evs_charge_in_the_cheap_hours() -> None:
    pr = site(price=[0.4, 0.4, 0.1, 0.1, 0.4, 0.4, 0.4, 0.4])
    pr.storage = [ev("a", target=11_040), ev("b", max_w=7_360, min_w=1_380, target=7_360, phase="L1")]
    plan = plan_ok(pr)
    for asset in ("a", "b"):
        p = plan.power_w[asset]
        assert p[[2, 3]].sum() == p.sum()  # all energy in the cheap hours
        assert asset not in plan.shortfall
    assert plan.power_w["a"].sum() == 11_040


def test_fuse_binds_on_one_phase_and_the_other_phases_still_charge() -> None:
    pr = site(n=3, fuse_a=16.0)  # 3680 W per phase
    pr.storage = [ev(f"l1_{k}", max_w=3_680, min_w=1_380, target=3_680, phase="L1") for k in range(3)]
    pr.storage.append(ev("l2", max_w=3_680, min_w=1_380, target=3 * 3_680, phase="L2"))
    plan = plan_ok(pr)
    l1 = sum(plan.power_w[f"l1_{k}"] for k in range(3))
    assert np.all(l1 <= 3_680)
    assert l1.sum() == 3 * 3_680  # the three L1 cars take turns and are all served
    assert np.all(plan.power_w["l2"] == 3_680)  # L2 is not held back by L1
    assert not plan.shortfall


def test_congestion_window_moves_charging() -> None:
    limit = [40_000, 40_000, 2_000, 2_000, 2_000, 40_000, 40_000, 40_000]
    pr = site(import_w=limit, price=[0.4, 0.4, 0.1, 0.1, 0.1, 0.3, 0.4, 0.4])
    pr.fixed = [FixedLoad("base", np.full(8, 1_000))]
    pr.storage = [ev("a", target=22_080)]
    plan = plan_ok(pr)
    assert np.all(plan.grid_import_w[2:5] <= 2_000)
    assert np.all(plan.power_w["a"][2:5] == 0)
    assert plan.power_w["a"][5] == 11_040  # the cheapest hour outside the window
    assert "a" not in plan.shortfall


def test_kw_max_spreads_charging_and_reports_the_peak() -> None:
    pr = site(n=4, peak_price=5.0, price=[0.3, 0.3, 0.3, 0.3])
    pr.storage = [ev("a", target=22_080)]
    plan = plan_ok(pr)
    assert plan.peak_w == int(plan.grid_import_w.max())
    assert plan.peak_w <= 5_520 + 10  # 22 kWh over 4 hours, not 2 x 11 kW
    assert plan.peak_cost_eur == pytest.approx(5.0 * plan.peak_w / 1000)
    flat = plan_ok(site(n=4, peak_price=0.0, price=[0.3, 0.3, 0.3, 0.3]))
    assert flat.peak_w == 0


def test_battery_charges_at_negative_prices_and_discharges_at_high_ones() -> None:
    prices = [-0.1, -0.1, 0.5, 0.5]
    pr = site(n=4, price=prices, export_price=prices)
    pr.fixed = [FixedLoad("base", np.full(4, 2_000))]
    pr.storage = [StorageAsset(id="bat", kind="battery", charge_max_w=5_000, discharge_max_w=5_000,
                               charge_efficiency=0.95, discharge_efficiency=0.95, level_wh=5_000,
                               level_min_wh=1_000, level_max_wh=10_000)]
    plan = plan_ok(pr)
    p = plan.power_w["bat"]
    assert p[0] > 0 and p[1] > 0
    assert p[2] < 0 and p[3] < 0
    assert np.all(plan.level_wh["bat"] >= 1_000 - 2) and np.all(plan.level_wh["bat"] <= 10_000 + 2)


def test_pv_surplus_charges_the_ev_and_curtails_only_what_export_needs() -> None:
    pv = np.array([0, 10_000, 10_000, 0])
    pr = site(n=4, export_w=3_000, price=[0.3] * 4, export_price=[0.05] * 4)
    pr.fixed = [FixedLoad("base", np.full(4, 1_000))]
    pr.curtailable = [Curtailable("pv", pv)]
    pr.storage = [ev("a", max_w=3_680, min_w=1_380, target=2 * 3_680, arrive=1, leave=3, phase="L1")]
    plan = plan_ok(pr)
    assert np.all(plan.power_w["a"][1:3] == 3_680)  # the EV runs on the surplus
    assert np.all(-plan.grid_import_w <= 3_000)
    # curtailment is exactly what the export limit needs: 10 - 1 - 3.68 - 3 kW
    assert plan.curtailed_w["pv"][1:3] == pytest.approx([2_320, 2_320], abs=5)
    loose = site(n=4, export_w=20_000, price=[0.3] * 4, export_price=[0.05] * 4)
    loose.fixed, loose.curtailable = pr.fixed, pr.curtailable
    assert plan_ok(loose).curtailed_w["pv"].sum() == 0


def test_unmeetable_target_is_a_shortfall_with_a_reason() -> None:
    pr = site(n=4)
    pr.storage = [ev("a", target=50_000, arrive=1, leave=3),
                  ev("soc", level=51_000, target=67_200, level_max=75_000, arrive=1, leave=2)]
    plan = plan_ok(pr)
    assert np.all(plan.power_w["a"][1:3] == 11_040)
    short = plan.shortfall["a"]
    assert short.energy_wh == pytest.approx(50_000 - 2 * 11_040, abs=20)
    assert "window too short" in short.reason and "at most 22.1 kWh more" in short.reason
    # an EV whose level is its battery's charge (SoC): the reason counts what it can get more
    assert "at most 11.0 kWh more in 1 PTUs (needs 16.2)" in plan.shortfall["soc"].reason


def test_higher_priority_is_served_first_when_limits_bind() -> None:
    pr = site(n=2, import_w=11_040)
    pr.storage = [ev("low", target=22_080, priority=1), ev("high", target=22_080, priority=2)]
    plan = plan_ok(pr)
    assert "high" not in plan.shortfall
    assert plan.shortfall["low"].energy_wh == pytest.approx(22_080, abs=20)
    assert "site limits" in plan.shortfall["low"].reason


def test_v2g_discharges_when_paid_and_still_meets_the_target() -> None:
    prices = [1.0, 0.1, 0.1, 0.1]
    pr = site(n=4, price=prices, export_price=[p - 0.05 for p in prices])
    pr.fixed = [FixedLoad("base", np.full(4, 5_000))]
    pr.storage = [ev("a", target=30_000, level=20_000, level_max=40_000, v2g_w=5_000, min_w=1_380, eff=0.95)]
    plan = plan_ok(pr)
    assert plan.power_w["a"][0] < 0  # sells in the dear hour
    assert "a" not in plan.shortfall
    assert plan.level_wh["a"][-1] >= 30_000 - 30


def test_base_load_above_the_limit_still_gives_a_plan_with_a_note() -> None:
    pr = site(n=3, import_w=[10_000, 2_000, 10_000])
    pr.fixed = [FixedLoad("base", np.full(3, 3_000))]
    pr.storage = [ev("a", max_w=3_680, min_w=1_380, target=7_000, phase="L1")]
    plan = plan_site(pr, time_limit_s=0.5)
    assert plan.power_w["a"][1] == 0  # everything flexible off where the inputs break the limit
    assert any("exceed the import limit" in note for note in plan.notes)
    violations = check_plan(pr, plan)
    assert len(violations) == 1 and "PTU 1" in violations[0]


def test_fallback_plan_keeps_the_limits() -> None:
    pr = site(n=6, fuse_a=20.0, import_w=12_000)
    pr.fixed = [FixedLoad("base", np.full(6, 1_500))]
    pr.storage = [ev("a", target=20_000, leave=4), ev("b", max_w=4_600, min_w=1_380, target=9_000, phase="L2"),
                  ev("c", max_w=4_600, min_w=1_380, target=9_000, phase="L2", leave=3)]
    plan = plan_site(pr, use_lp=False, use_cpsat=False)
    assert plan.status == "FALLBACK"
    assert check_plan(pr, plan) == []
    # deadline first: "c" (leaves at 3) gets its energy before "b" takes the phase
    assert "c" not in plan.shortfall


def test_heat_pump_keeps_its_buffer_above_the_minimum() -> None:
    n = 8
    pr = site(n=n, price=[0.1, 0.1, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1])
    pr.storage = [StorageAsset(id="hp", kind="heat_pump", charge_max_w=3_000, charge_min_w=1_000,
                               charge_efficiency=3.5, level_wh=5_000, level_min_wh=2_000,
                               level_max_wh=20_000, usage_wh=np.full(n, 2_500))]
    plan = plan_ok(pr)
    assert "hp" not in plan.shortfall
    assert np.all(plan.level_wh["hp"] >= 2_000 - 2)
    p = plan.power_w["hp"]
    assert np.all((p == 0) | ((p >= 1_000) & (p <= 3_000)))
    assert p[:2].sum() >= p[2:6].sum() / 4  # it preheats in the cheap hours


@pytest.mark.parametrize("cpsat", [False, True])
def test_a_small_heat_pump_keeps_its_buffer_in_a_fast_plan(cpsat: bool) -> None:
    """The demo's heat pump (on: 2-3 kW; its buffer 1.5 kWh, 0.75 kWh used a PTU) next to an
    EV, planned in 0.1 s: its buffer never under its minimum, no shortfall, the plan near its
    bound. (The LP keeps the buffer at its top with 0.75 kW, below the minimum power: the
    rounding used to switch on into a full buffer, that PTU was then cut, and the buffer
    stayed 0.4 kWh short all day, a penalty 99 % of the objective.)"""
    n = 96
    price = 0.20 + 0.05 * np.sin(np.arange(n) / n * 2 * np.pi)  # cheap first: it fills up
    pr = site(n=n, fuse_a=50.0, import_w=30_000, export_w=20_000, price=list(price),
              ptu_minutes=15)
    pr.storage = [StorageAsset(id="hp", kind="heat_pump", charge_max_w=3_000, charge_min_w=2_000,
                               level_wh=748, level_min_wh=0, level_max_wh=1_496,
                               usage_wh=np.full(n, 187)),
                  ev("car", max_w=11_000, min_w=4_140, target=20_000, arrive=4, leave=40)]
    plan = plan_site(pr, time_limit_s=0.1, use_cpsat=cpsat)
    assert check_plan(pr, plan) == []
    assert plan.shortfall == {}
    assert plan.level_wh["hp"].min() >= 0
    assert plan.level_wh["hp"].max() <= 1_496
    p = plan.power_w["hp"]
    assert np.all((p == 0) | ((p >= 2_000) & (p <= 3_000)))
    assert plan.gap is not None and plan.gap < 0.05

def test_modes_and_shiftable_profile_pick_cheap_hours() -> None:
    pr = site(n=6, price=[0.5, 0.5, 0.1, 0.1, 0.5, 0.5])
    pr.modes = [ModeAsset("boiler", [PowerMode("off", 0, 0), PowerMode("on", 2_000, 3_000)])]
    pr.profiles = [ShiftableProfile("washer", np.array([2_000, 1_000]), earliest_start=0, latest_start=4)]
    plan = plan_ok(pr)
    assert plan.profile_start["washer"] == 2
    assert plan.mode["boiler"] == ["off"] * 6  # no reason to run it
    assert list(plan.power_w["washer"]) == [0, 0, 2_000, 1_000, 0, 0]


def test_a_site_without_flexibility_and_odd_inputs_still_get_a_plan() -> None:
    pr = site(n=4)
    pr.fixed = [FixedLoad("base", np.full(4, 1_000))]
    plan = plan_site(pr)
    assert list(plan.grid_import_w) == [1_000] * 4
    odd = site(n=4)
    odd.storage = [ev("gone", target=5_000, arrive=4, leave=4), ev("late", target=5_000, arrive=3, leave=2)]
    plan = plan_site(odd)
    assert check_plan(odd, plan) == []
    assert set(plan.shortfall) == {"gone", "late"}


def test_equal_priority_evs_share_a_shortfall_fairly() -> None:
    pr = site(n=2, import_w=11_040)
    pr.storage = [ev("a", target=22_080), ev("b", target=22_080)]
    plan = plan_ok(pr)
    got = {k: int(plan.power_w[k].sum()) for k in ("a", "b")}
    assert sum(got.values()) == 22_080
    assert abs(got["a"] - got["b"]) <= 22_080 / 3  # neither is left with nothing


def test_checker_names_each_broken_rule() -> None:
    pr = site(n=2, fuse_a=16.0, import_w=5_000)
    pr.storage = [ev("a", max_w=3_680, min_w=1_380, target=3_680, phase="L1", arrive=1)]
    plan = plan_site(pr)
    plan.power_w["a"] = np.array([1_000, 5_000])  # outside its window, above max, L1 over the fuse
    plan.grid_import_w = plan.power_w["a"].copy()
    found = " | ".join(check_plan(pr, plan))
    assert "outside its window" in found
    assert "outside {0} U [1380, 3680]" in found
    assert "fuse L1" in found
    assert "import 5000 W > limit" not in found and "import" not in found.split("fuse")[0]


def test_plan_reports_bound_gap_and_timings() -> None:
    pr = site(price=[0.4, 0.4, 0.1, 0.1, 0.4, 0.4, 0.4, 0.4])
    pr.storage = [ev("a", target=11_040), ev("b", max_w=7_360, min_w=1_380, target=7_360, phase="L2")]
    plan = plan_ok(pr)
    assert plan.lp_bound_eur is not None and plan.gap is not None and 0 <= plan.gap <= 0.01
    # with a kW-max price on hourly PTUs the 6 A minimum makes the LP bound weak: CP-SAT then
    # proves the plan optimal although the gap to the bound stays large
    pr.limits.peak_price_eur_per_kw = 2.0
    plan = plan_ok(pr, time_limit_s=2.0)
    assert plan.status == "OPTIMAL" and plan.gap is not None and plan.gap > 0.01
    assert plan.cost_eur == pytest.approx(plan.energy_cost_eur + plan.peak_cost_eur)
    assert plan.objective_eur >= plan.cost_eur - 1e-9
    assert plan.build_s > 0 and plan.lp_solve_s > 0


def test_a_mode_switched_on_stays_on_for_its_minimum_time() -> None:
    # a generator that pays in the dear hours and costs in the cheap ones would flip every hour
    pr = site(n=6, price=[0.5, -0.2, 0.5, -0.2, 0.5, 0.5])
    pr.fixed = [FixedLoad("base", np.full(6, 4_000))]
    pr.modes = [ModeAsset("chp", [PowerMode("off", 0, 0), PowerMode("run", -3_000, -2_000)],
                          min_on_ptus=3)]
    plan = plan_ok(pr)
    names = plan.mode["chp"]
    assert "run" in names
    for t in range(1, 6):
        if names[t] != names[t - 1]:
            assert all(x == names[t] for x in names[t:t + 3])


def l1_consumption(problem, plan) -> np.ndarray:  # type: ignore[no-untyped-def]
    return sum(plan.power_w[a.id] * a.phase_share[0] for a in problem.storage)


def test_forecast_pv_is_fuse_headroom_only_when_trusted() -> None:
    # 3 x 16 A (3680 W a phase); two 1-phase EVs on L1 want 7.4 kW each; 6 kW of PV forecast
    def problem(credit: float):  # type: ignore[no-untyped-def]
        p = site(4, fuse_a=16.0)
        p.limits.fuse_production_credit = credit
        p.storage = [ev("a", max_w=7_360, min_w=1_380, target=20_000, phase="L1"),
                     ev("b", max_w=7_360, min_w=1_380, target=20_000, phase="L1")]
        p.curtailable = [Curtailable("pv", np.full(4, 6_000), curtailable=False,
                                     phase_share=single_phase("L1"))]
        return p

    trusted = problem(1.0)
    plan = plan_ok(trusted)
    # with the forecast trusted, the EVs take the PV on top of the fuse
    assert l1_consumption(trusted, plan).max() > 3_680 + 1_000
    live = problem(0.0)
    plan = plan_site(live, time_limit_s=0.5)
    # live, consumption alone stays within the fuse: a cloud cannot trip it
    assert l1_consumption(live, plan).max() <= 3_680 + 1e-6
    assert plan.shortfall  # and the drivers are told what they will miss


def test_a_plan_called_optimal_is_one_nothing_beats_and_the_vip_is_served_in_full() -> None:
    """CP-SAT stops within the gap tolerance of the LP bound: such a plan is FEASIBLE, and only a
    proved one is OPTIMAL (a gap-free solve finds nothing better). The tolerance is a share of
    the plan's cost, not of the staff EV's large unavoidable shortfall penalty: the VIP does not
    end a rounding step short."""
    n = 96
    price = 0.05 + 0.25 * (np.arange(n) % 7) / 6
    pr = site(n, fuse_a=16, import_w=10**9, price=list(price), ptu_minutes=15)
    pr.first_ptu_share = 0.54  # a replan part-way through PTU 0
    pr.storage = [ev(who, max_w=22_080, target=30_000, leave=17, level_max=60_000, priority=p)
                  for who, p in (("staff", 1), ("vip", 5))]
    for s in pr.storage:
        s.step_w = 69  # 0.1 A on 3 phases
    quick = plan_ok(pr, time_limit_s=2.0)
    assert "vip" not in quick.shortfall and quick.shortfall["staff"].energy_wh > 10_000
    exact = plan_ok(pr, time_limit_s=20.0, gap_tol=0.0)
    assert exact.status == "OPTIMAL"
    if quick.status == "OPTIMAL":
        assert quick.objective_eur <= exact.objective_eur + 1e-6
    else:
        assert quick.status == "FEASIBLE"
