"""The guard's decision as a pure function, and the rule-based safe plan it falls back on."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from s2python.common import CommodityQuantity

from cem.control.guard import FlexibleLoad, GuardLimits, decide_caps, phase_power_w
from cem.control.safe_plan import safe_plan
from cem.planner.assets import FixedLoad, Prices, Problem, SiteLimits, StorageAsset

FUSE_W = 25 * 230  # 5750 W per phase
LIMITS = GuardLimits(fuse_w_per_phase=FUSE_W, import_limit_w=17000, margin=0.95)
L1_ONLY = (1.0, 0.0, 0.0)


def ev(asset_id: str, power_w: float, priority: int = 1, share=(1 / 3, 1 / 3, 1 / 3),
       min_w: float = 4140) -> FlexibleLoad:
    return FlexibleLoad(asset_id, f"rm-{asset_id}", power_w, priority, min_w, share)


def test_nothing_happens_below_the_margin() -> None:
    decision = decide_caps((5000, 5000, 5000), LIMITS, [ev("a", 11000)])
    assert not decision.acts and decision.caps == {}


def test_nothing_happens_between_the_margin_and_the_limit() -> None:
    # a plan that uses the fuse to 99% on purpose is left alone (no churn against the planner)
    decision = decide_caps((0.99 * FUSE_W, 0.99 * FUSE_W, 0.99 * FUSE_W),
                           GuardLimits(fuse_w_per_phase=FUSE_W, import_limit_w=3 * FUSE_W),
                           [ev("a", 11000)])
    assert not decision.acts


def test_phase_near_the_fuse_sheds_the_lowest_priority_load_on_that_phase() -> None:
    loads = [ev("vip", 3680, priority=5, share=L1_ONLY, min_w=1380),
             ev("low", 3680, priority=1, share=L1_ONLY, min_w=1380),
             ev("l2", 3680, priority=0, share=(0.0, 1.0, 0.0), min_w=1380)]
    # L1 at 6000 W > 0.95 * 5750 = 5462.5: 537.5 W must go, from the low-priority L1 load
    decision = decide_caps((6000, 3680, 0), LIMITS, loads)
    assert set(decision.caps) == {"low"}
    assert abs(decision.caps["low"] - (3680 - 537.5)) < 1e-6
    assert "L1 at 104% of the fuse" in decision.reason


def test_cap_below_the_minimum_switches_the_load_off_and_continues() -> None:
    # import 17.5 kW vs 16.15 kW allowed: 1.35 kW must go; 3-phase EVs of 4.14 kW minimum
    loads = [ev("a", 4500, priority=1), ev("b", 6000, priority=1), ev("c", 7000, priority=2)]
    decision = decide_caps((5830, 5830, 5840), LIMITS, loads)
    # largest of the lowest priority first: b 6000 -> 4650 (above its 4140 minimum)
    assert decision.caps == {"b": 4650}
    loads = [ev("a", 4500, priority=1), ev("c", 7000, priority=2)]
    decision = decide_caps((5830, 5830, 5840), LIMITS, loads)
    assert decision.caps == {"a": 0.0}  # 4500 - 1350 < 4140: off
    assert "import 17.5 kW above 95% of the 17.0 kW limit" in decision.reason


def test_within_one_priority_the_ev_that_can_best_wait_is_shed_first() -> None:
    # import 17.5 kW vs 16.15 kW allowed: 1.35 kW must go. The urgent EV draws the most, but
    # the one leaving in five hours with little left to charge gives way (it can catch up)
    urgent = FlexibleLoad("urgent", "rm-urgent", 7000, 1, 4140, slack_h=0.25)
    relaxed = FlexibleLoad("relaxed", "rm-relaxed", 6000, 1, 4140, slack_h=4.0)
    decision = decide_caps((5830, 5830, 5840), LIMITS, [urgent, relaxed])
    assert decision.caps == {"relaxed": 4650}
    # without deadlines (a battery, a heat pump) a load gives way before any EV with one
    battery = FlexibleLoad("battery", "rm-battery", 3000, 1, 0)
    decision = decide_caps((5830, 5830, 5840), LIMITS, [urgent, relaxed, battery])
    assert decision.caps == {"battery": 1650}
    # priority still comes first: a higher-priority relaxed EV is not shed before a lower one
    vip = FlexibleLoad("vip", "rm-vip", 6000, 5, 4140, slack_h=9.0)
    decision = decide_caps((5830, 5830, 5840), LIMITS, [urgent, vip])
    assert set(decision.caps) == {"urgent"}


def test_congestion_limit_is_respected_and_leftover_excess_reported() -> None:
    limits = GuardLimits(fuse_w_per_phase=FUSE_W, import_limit_w=8000, margin=0.95)
    # 12 kW against 7.6 kW allowed: 4.4 kW must go
    decision = decide_caps((4000, 4000, 4000), limits, [ev("a", 5000, min_w=0)])
    assert decision.caps == {"a": 600.0} and decision.excess_w == 0
    decision = decide_caps((4000, 4000, 4000), limits, [ev("a", 3000, min_w=0)])
    assert decision.caps == {"a": 0.0} and abs(decision.excess_w - 1400) < 1e-6


def test_phase_power_from_measurements() -> None:
    assert phase_power_w({CommodityQuantity.ELECTRIC_POWER_L1: 100.0,
                          CommodityQuantity.ELECTRIC_POWER_L3: 300.0}) == (100.0, 0.0, 300.0)
    assert phase_power_w({CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC: 900.0}) == \
        (300.0, 300.0, 300.0)
    assert phase_power_w({}) is None


def test_safe_plan_respects_limits_minimum_power_and_targets() -> None:
    n = 16
    limits = SiteLimits(fuse_a=25, phases=3, voltage_v=230, import_limit_w=np.full(n, 17000),
                        export_limit_w=np.full(n, 17000))
    limits.import_limit_w[4:8] = 6000  # congestion
    problem = Problem(
        start=datetime(2026, 11, 23, 17, 0, tzinfo=UTC), ptu_minutes=15, n_ptus=n, limits=limits,
        prices=Prices(np.full(n, 0.3), np.zeros(n)),
        storage=[StorageAsset(id="ev-1", kind="ev", charge_max_w=11000, charge_min_w=4140,
                              level_wh=0, level_max_wh=60000, target_wh=10000,
                              available_until=12, priority=2),
                 StorageAsset(id="ev-2", kind="ev", charge_max_w=11000, charge_min_w=4140,
                              level_wh=0, level_max_wh=60000, target_wh=30000)],
        fixed=[FixedLoad(id="base", power_w=np.full(n, 2000))])
    plan = safe_plan(problem, "test")
    total = plan.grid_import_w
    assert plan.status == "FALLBACK" and "test" in plan.notes[0]
    assert (total <= limits.import_limit_w).all()
    for row in plan.power_w.values():
        assert ((row == 0) | (row >= 4140)).all()
    assert plan.power_w["ev-1"][:4].sum() * 0.25 >= 10000 - 1  # priority EV first, to target
    per_phase = total / 3
    assert (per_phase <= 25 * 230 + 1e-6).all()
    from cem.planner.check import check_plan

    assert check_plan(problem, plan) == []


def test_safe_plan_reports_a_heat_buffer_it_cannot_keep_warm() -> None:
    """Heat demand above what a congested connection lets in: the level falls below its
    minimum, and the fallback plan says so instead of pretending it holds."""
    n = 8
    limits = SiteLimits(fuse_a=25, phases=3, voltage_v=230, import_limit_w=np.full(n, 17000),
                        export_limit_w=np.full(n, 17000))
    limits.import_limit_w[2:6] = 500  # congestion: the heat pump (1 kW minimum) cannot run
    problem = Problem(
        start=datetime(2026, 11, 23, 17, 0, tzinfo=UTC), ptu_minutes=15, n_ptus=n, limits=limits,
        prices=Prices(np.full(n, 0.3), np.zeros(n)),
        storage=[StorageAsset(id="hp", kind="heat_pump", charge_max_w=3000, charge_min_w=1000,
                              charge_efficiency=3.0, level_wh=3000, level_min_wh=2000,
                              level_max_wh=6000, usage_wh=np.full(n, 1500))])
    plan = safe_plan(problem, "test")
    assert (plan.power_w["hp"][2:6] == 0).all()
    # before the congestion it runs at its minimum where less would do: at its floor, not under
    assert (plan.level_wh["hp"][:2] >= 2000 - 1).all()
    assert plan.level_wh["hp"].min() < 2000  # the buffer cools below its floor ...
    assert plan.shortfall["hp"].energy_wh >= 2000 - plan.level_wh["hp"].min() - 1  # ... said
    assert "level below level_min" in plan.shortfall["hp"].reason
    from cem.planner.check import check_plan

    assert check_plan(problem, plan) == []


def test_the_guard_ranks_an_ev_by_the_minutes_really_left() -> None:
    """Slack (hours an EV could still wait) from the plan made part-way through its first PTU:
    only the plan's energy since then counts as done, and the minutes of the current PTU that
    are gone count as gone."""
    from datetime import timedelta

    from cem.control.mpc import SiteController
    from cem.planner.assets import Plan
    from cem.site.config import SiteConfig

    start = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    n = 8
    limits = SiteLimits(63, 3, 230, np.full(n, 40_000), np.full(n, 40_000))
    car = StorageAsset(id="car", kind="ev", charge_max_w=22_080, charge_min_w=4_140,
                       level_wh=2_000, target_wh=20_000, available_until=4)
    problem = Problem(start, 15, n, limits, Prices(np.full(n, 0.2), np.full(n, 0.1)),
                      storage=[car], first_ptu_share=1 / 3)  # made at 08:10
    now = start + timedelta(minutes=20)  # 08:20, five minutes into PTU 1
    controller = SiteController(SiteConfig.model_validate({"grid": {"fuse_a": 63}}), None,
                                solver=None, clock=lambda: now)
    controller.problem = problem
    controller.plan = Plan(status="FEASIBLE", power_w={"car": np.full(n, 12_000)},
                           grid_import_w=np.full(n, 12_000))
    done_wh = 12_000 * (10 / 60)  # 08:10-08:20 at 12 kW
    left_h = 40 / 60  # 08:20 until the departure at 09:00
    expected = left_h - (20_000 - 2_000 - done_wh) / 22_080
    assert controller._slack_h(car, controller._taken_h(now), now) == \
        pytest.approx(expected, abs=1e-9)
