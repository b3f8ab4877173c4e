"""A live replan starts part-way through PTU 0: the plan counts only the share still ahead."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from test_flex_site_problem import NOW, ev_session

from cem.control.safe_plan import safe_plan
from cem.flex.site_problem import build_problem
from cem.planner.assets import (
    FixedLoad,
    Plan,
    Prices,
    Problem,
    SiteLimits,
    StorageAsset,
)
from cem.planner.check import check_plan
from cem.planner.solve import plan_site
from cem.site.config import SiteConfig

N = 4
DT_H = 0.25
EV_MAX_W = 11_000
PTU_WH = EV_MAX_W * DT_H  # one whole PTU at full power: 2750 Wh


def site(share: float, *, need_wh: int, prices: list[float] | None = None) -> Problem:
    """One EV that may charge in PTUs 0-2 (it leaves at the start of PTU 3); PTU 0 cheapest."""
    p = np.array(prices or [0.10, 0.20, 0.30, 0.40])
    return Problem(
        start=datetime(2026, 11, 23, 17, 0, tzinfo=UTC), ptu_minutes=15, n_ptus=N,
        limits=SiteLimits(fuse_a=63.0, phases=3, voltage_v=230.0,
                          import_limit_w=np.full(N, 40_000), export_limit_w=np.full(N, 40_000)),
        prices=Prices(p, p * 0),
        storage=[StorageAsset(id="ev", kind="ev", charge_max_w=EV_MAX_W, level_wh=0,
                              level_max_wh=60_000, available_until=3, target_wh=need_wh)],
        first_ptu_share=share)


def energy_wh(plan: Plan, ptus: slice) -> float:
    return float(plan.power_w["ev"][ptus].sum()) * DT_H


def test_the_level_after_ptu_0_counts_only_its_share_and_later_ptus_make_up_for_it() -> None:
    need = 5_500  # two whole PTUs at full power
    whole = plan_site(site(1.0, need_wh=need))
    late = plan_site(site(0.4, need_wh=need))
    for plan in (whole, late):
        assert plan.power_w["ev"][0] == EV_MAX_W  # the cheapest PTU at full power either way
        assert plan.level_wh["ev"][2] >= need - 1 and not plan.shortfall
    assert whole.level_wh["ev"][0] == PTU_WH
    # replanned at 40 % of PTU 0 still ahead: its 11 kW move 40 % of a PTU's energy
    assert late.level_wh["ev"][0] == round(0.4 * late.power_w["ev"][0] * DT_H) == 1_100
    # the rest comes in PTUs 1-2: 4400 Wh instead of the 2750 Wh a whole PTU 0 leaves
    assert energy_wh(whole, slice(1, 3)) == pytest.approx(need - PTU_WH, abs=10 * DT_H)
    assert energy_wh(late, slice(1, 3)) == pytest.approx(need - 0.4 * PTU_WH, abs=10 * DT_H)
    level = 0.4 * late.power_w["ev"][0] * DT_H + np.cumsum(late.power_w["ev"][1:] * DT_H)
    assert np.allclose(late.level_wh["ev"][1:], level, atol=1)


def test_a_need_that_fits_three_whole_ptus_is_short_when_ptu_0_is_partly_gone() -> None:
    need = round(2.5 * PTU_WH)  # 6875 Wh: fits in PTUs 0-2 only when PTU 0 is whole
    whole = plan_site(site(1.0, need_wh=need))
    assert not whole.shortfall and whole.level_wh["ev"][2] >= need - 1
    late = plan_site(site(0.4, need_wh=need))
    assert (late.power_w["ev"][:3] == EV_MAX_W).all()  # everything it can
    reachable = (0.4 + 2) * PTU_WH  # 6600 Wh
    assert late.level_wh["ev"][2] == reachable
    short = late.shortfall["ev"]
    assert short.energy_wh == need - reachable and "window too short" in short.reason
    assert check_plan(site(0.4, need_wh=need), late) == []
    # and the share-1 plan, carried out from 40 % of PTU 0, misses the target: the checker
    # recomputes the level on the share like the planner does
    assert any("below its target" in v for v in check_plan(site(0.4, need_wh=need), whole))


def test_the_energy_cost_of_ptu_0_is_priced_on_its_share() -> None:
    prices = [0.30, 0.10, 0.10, 0.10]
    problems = {}
    for share in (1.0, 0.4):
        pr = site(share, need_wh=0, prices=prices)
        pr.storage = []
        pr.fixed = [FixedLoad("base", np.full(N, 2_000))]  # 2 kW all along
        problems[share] = pr
    kwh_per_ptu = 2.0 * DT_H
    whole = plan_site(problems[1.0])
    late = plan_site(problems[0.4])
    assert whole.energy_cost_eur == pytest.approx(kwh_per_ptu * (0.30 + 3 * 0.10))
    assert late.energy_cost_eur == pytest.approx(kwh_per_ptu * (0.4 * 0.30 + 3 * 0.10))
    assert late.peak_w == whole.peak_w == 2_000  # power (and the kW-max) is not scaled
    # the rule-based fallback prices it the same way
    assert safe_plan(problems[0.4]).energy_cost_eur == pytest.approx(late.energy_cost_eur)


def test_cp_sat_plans_partial_ptu_0_levels_that_the_checker_accepts() -> None:
    """From the rule-based start (no LP), CP-SAT must keep the level rows on the share."""
    need = 5_500
    pr = site(0.4, need_wh=need)
    pr.storage.append(StorageAsset(  # a battery with usage: levels per PTU, both directions
        id="bat", kind="battery", charge_max_w=5_000, discharge_max_w=5_000,
        charge_efficiency=0.95, discharge_efficiency=0.95, level_wh=4_000, level_min_wh=1_000,
        level_max_wh=8_000, usage_wh=np.array([400, 400, 400, 400])))
    plan = plan_site(pr, time_limit_s=2.0, use_lp=False)
    assert any("CP-SAT improved" in note for note in plan.notes)
    assert check_plan(pr, plan) == []
    assert plan.level_wh["ev"][2] >= need - 1 and "ev" not in plan.shortfall
    bat = plan.power_w["bat"].astype(float)
    hours = DT_H * np.array([0.4, 1, 1, 1])
    usage = np.array([0.4 * 400, 400, 400, 400])  # usage is per whole PTU: PTU 0 its share
    level = 4_000 + np.cumsum(hours * (0.95 * np.maximum(bat, 0) - np.maximum(-bat, 0) / 0.95)
                              - usage)
    assert np.allclose(plan.level_wh["bat"], level, atol=1)


def test_safe_plan_levels_count_the_share_of_ptu_0() -> None:
    pr = site(0.4, need_wh=5_500)
    plan = safe_plan(pr)
    assert plan.power_w["ev"][0] == EV_MAX_W
    assert plan.level_wh["ev"][0] == round(0.4 * PTU_WH)
    assert plan.level_wh["ev"][2] >= 5_500 - 1 and not plan.shortfall
    assert check_plan(pr, plan) == []


@pytest.mark.parametrize(("now", "share"), [
    (NOW, 8 / 15),  # 17:07: 8 of the 15 minutes of the 17:00 PTU are left
    (datetime(2026, 11, 23, 17, 14, 59, 900_000, tzinfo=UTC), 0.05),  # clamped, not ~0
    (datetime(2026, 11, 23, 17, 15, tzinfo=UTC), 1.0),  # on the boundary: a whole PTU
])
def test_build_problem_sets_the_share_of_ptu_0_from_now(now: datetime, share: float) -> None:
    config = SiteConfig.model_validate({"planner": {"horizon_ptus": 8}})
    ev, _ = ev_session()
    problem, _ = build_problem({"ev-3": ev.state}, config, None, [], now)
    assert problem.start <= now < problem.start + timedelta(minutes=15)
    assert problem.first_ptu_share == pytest.approx(share)
    plan = plan_site(problem, time_limit_s=1.0)
    assert check_plan(problem, plan) == []
