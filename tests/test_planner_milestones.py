"""EV departure milestones (a target before the departure) in the planner's LP."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

import cem.planner.bound as bound
from cem.planner.assets import Prices, Problem, SiteLimits, StorageAsset
from cem.planner.layout import build_layout
from cem.planner.solve import plan_site

N = 16


def problem(evs: int = 6) -> Problem:
    # cheap at the end: without its milestone every EV would wait for the last PTUs
    price = np.linspace(0.40, 0.05, N)
    storage = [StorageAsset(
        id=f"ev{i}", kind="ev", charge_max_w=11040, charge_min_w=4140, level_wh=1000 * i,
        level_min_wh=0, level_max_wh=60000, target_wh=20000 + 1000 * i, available_from=0,
        available_until=12 + i % 4, target_profile=[(8 + i % 4, 20000 + 1000 * i, 60000)])
        for i in range(evs)]
    return Problem(start=datetime(2026, 11, 23, 6, tzinfo=UTC), ptu_minutes=15, n_ptus=N,
                   limits=SiteLimits(fuse_a=80, phases=3, voltage_v=230,
                                     import_limit_w=np.full(N, 50000.0),
                                     export_limit_w=np.full(N, 50000.0)),
                   prices=Prices(import_eur_per_kwh=price, export_eur_per_kwh=price * 0),
                   storage=storage)


def test_milestones_as_partial_sums_give_the_same_bound_as_level_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lay = build_layout(problem())
    assert lay.s == 6 and lay.needs_levels.all() and not bound.lp_level_assets(lay).any()
    fast = bound.solve_lp(lay)
    monkeypatch.setattr(bound, "lp_level_assets", lambda lay: lay.needs_levels)
    slow = bound.solve_lp(lay)
    assert fast.status == slow.status == "OPTIMAL"
    assert fast.bound_eur == pytest.approx(slow.bound_eur, rel=1e-7, abs=1e-6)


def test_each_ev_reaches_its_target_by_its_milestone_not_just_by_departure() -> None:
    p = problem()
    assert len(p.storage) == 6
    plan = plan_site(p, time_limit_s=2.0)
    assert plan.status in ("OPTIMAL", "FEASIBLE")
    for ev in p.storage:
        ((milestone, lo, _hi),) = ev.target_profile
        charged_wh = float(np.sum(plan.power_w[ev.id][:milestone])) * 0.25
        assert ev.level_wh + charged_wh >= lo - 11040 * 0.25, ev.id  # within one power step


def live_ev_problem(evs: int = 6) -> Problem:
    """EVs as a live site plans them: the RM's target profile says 'anything up to the maximum
    until the departure, the target at it', and the finish margin adds the target a PTU early."""
    p = problem(evs)
    for ev in p.storage:
        end = int(ev.available_until or N)
        ev.target_profile = [(end, 0, ev.level_max_wh), (end, int(ev.target_wh or 0), ev.level_max_wh),
                             (end - 1, int(ev.target_wh or 0), ev.level_max_wh)]
    return p


def test_milestones_that_cannot_bind_add_no_rows_and_leave_the_bound_as_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    live = build_layout(live_ev_problem())
    bare = problem()
    for ev in bare.storage:
        ev.target_profile = []
    rows_live = bound.build_lp(live)[0].n_rows
    # the 'up to the maximum' sides and the target at the departure (the target row's own
    # shortfall, priced once more) need no row: one row per EV, for the early target
    assert rows_live == bound.build_lp(build_layout(bare))[0].n_rows + len(bare.storage)
    fast = bound.solve_lp(live)
    # the same bound as with every milestone on per-PTU level rows of its own
    monkeypatch.setattr(bound, "lp_level_assets", lambda lay: lay.needs_levels)
    slow = bound.solve_lp(build_layout(live_ev_problem()))
    assert fast.status == slow.status == "OPTIMAL"
    assert fast.bound_eur == pytest.approx(slow.bound_eur, rel=1e-7, abs=1e-6)


def test_a_live_ev_that_cannot_make_its_target_pays_for_its_milestones_in_the_bound() -> None:
    # a window too short for the target: the shortfall at the departure costs the unmet
    # segments plus the milestone's weight, as the plan's objective counts it
    p = live_ev_problem(1)
    p.storage[0].target_wh = 60000
    p.storage[0].target_profile = [(12, 60000, 60000), (11, 60000, 60000)]
    lp = bound.solve_lp(build_layout(p))
    plan = plan_site(p, time_limit_s=2.0)
    assert lp.bound_eur is not None and plan.shortfall
    assert plan.objective_eur >= lp.bound_eur - 1e-6
    assert plan.gap is not None and plan.gap < 0.01
