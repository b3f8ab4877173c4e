"""The plan from a fractional point of the LP, least laxity first (`cem.planner.laxity`):
on random EV-only sites it keeps every hard limit; on car parks with a congestion window it
is within 1 % of HiGHS's optimum, and the replan after a new congestion limit (whose LP
cannot finish) is within 1 % of its bound."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_planner_decompose import _with_milestones, an_ev
from test_planner_properties import N
from test_planner_warm_start import a_ptu_later, site

from cem.planner.assets import (
    THREE_PHASE,
    FixedLoad,
    Prices,
    Problem,
    SiteLimits,
    StorageAsset,
    single_phase,
)
from cem.planner.bound import BuiltLp, solve_lp
from cem.planner.decompose import lagrangian_bound
from cem.planner.fallback import deadline_first
from cem.planner.laxity import least_laxity_plan
from cem.planner.layout import build_layout, evaluate
from cem.planner.solve import SitePlanner, check_plan, to_plan


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(an_ev(0), min_size=1, max_size=1), st.lists(st.integers(0, 5), min_size=2, max_size=8),
       st.sampled_from([16.0, 25.0, 63.0]), st.integers(6_000, 40_000),
       st.integers(0, 1_500), st.sampled_from([1.0, 0.4]), st.booleans())
def test_a_plan_from_a_point_of_the_lp_keeps_every_limit(
        one: list[StorageAsset], more: list[int], fuse_a: float, gtv: int, base: int,
        first_share: float, flat: bool) -> None:
    """EV-only sites (1- and 3-phase EVs, minimum currents, milestones below and above,
    targets beyond reach, a congestion window, a base load, flat or moving prices): from the
    LP's optimum and from the decomposition's master point the plan keeps every hard limit
    and EV rule."""
    rng = np.random.default_rng(len(more) * 7 + int(fuse_a) + gtv)
    evs = [one[0]] + [dataclasses.replace(one[0], id=f"ev{k + 1}", available_from=min(s, N - 1),
                                   target_wh=int(rng.uniform(0, 1) * one[0].level_max_wh),
                                   phase_share=single_phase("L" + str(1 + k % 3)) if k % 2 else THREE_PHASE)
                      for k, s in enumerate(more)]
    imp = np.full(N, gtv, dtype=float)
    imp[0:5] = gtv / 2
    price = np.full(N, 0.25) if flat else rng.uniform(0.05, 0.4, N)
    pr = Problem(start=datetime(2026, 3, 2, tzinfo=UTC), ptu_minutes=15, n_ptus=N,
                 limits=SiteLimits(fuse_a=fuse_a, phases=3, voltage_v=230.0, import_limit_w=imp,
                                   export_limit_w=np.full(N, 5_000.0)),
                 prices=Prices(price, np.full(N, 0.05)),
                 fixed=[FixedLoad("base", np.full(N, base))], storage=evs, first_ptu_share=first_share)
    lay = build_layout(pr)
    built = BuiltLp.of(lay)
    lp = solve_lp(lay, built=built)
    assert lp.dispatch is not None
    master = lagrangian_bound(lay, built, point=True, steps=20)
    for point in (lp.dispatch, master.dispatch(lay, built.index) if master is not None else None):
        if point is None:
            continue
        plan = least_laxity_plan(lay, point)
        assert plan is not None
        assert check_plan(pr, to_plan(lay, plan, "FEASIBLE", [])) == []


def _congested(evs: int, seed: int, phases: bool) -> Problem:
    """A car park (`site`: moving prices) whose import a congestion window halves for its
    first 2 h, each EV with a milestone before its departure; `phases`: a third of the EVs
    on L2 alone."""
    pr = _with_milestones(site(evs=evs, seed=seed), seed)
    if phases:
        for k, a in enumerate(pr.storage):
            if k % 3 == 1:
                a.phase_share, a.charge_max_w, a.charge_min_w = single_phase("L2"), 7360, 1380
    pr.limits.import_limit_w = pr.limits.import_limit_w.astype(float)
    pr.limits.import_limit_w[0:8] *= 0.5
    return pr


HORIZON = 48  # the bench's site: 12 h ahead


def bench_like(evs: int, seed: int, congestion: bool = True) -> Problem:
    """The shape of `cem bench replan`'s site: three-phase 16 A chargers (6 A minimum), all
    EVs there from now, leaving in 13-45 PTUs with 3-40 kWh to charge (the target at the
    departure and a PTU before it, 0.2 EUR per Wh missed), a fuse for 40 % of them, flat
    prices; `congestion`: import halved for the first 2 h."""
    rng = np.random.default_rng(seed)
    storage = []
    for i in range(evs):
        leave = min(int(rng.integers(13, 46)), HORIZON)
        need = int(rng.uniform(3000, 40000))
        storage.append(StorageAsset(
            id=f"ev{i}", kind="ev", charge_max_w=11040, charge_min_w=4140, level_wh=0,
            level_max_wh=150000, target_wh=need, available_from=0, available_until=leave,
            target_profile=[(leave - 1, need, 150000), (leave, need, 150000)],
            milestone_eur_per_wh={leave - 1: 0.2}))
    fuse_a = evs * 16 * 0.4
    imp = np.full(HORIZON, fuse_a * 690 * 0.9)
    if congestion:
        imp[0:8] *= 0.5
    return Problem(start=datetime(2026, 11, 23, 6, tzinfo=UTC), ptu_minutes=15, n_ptus=HORIZON,
                   limits=SiteLimits(fuse_a=fuse_a, phases=3, voltage_v=230, import_limit_w=imp,
                                     export_limit_w=np.full(HORIZON, 1e6)),
                   prices=Prices(np.full(HORIZON, 0.25), np.zeros(HORIZON)), storage=storage)


def _from_the_lp_optimum(pr: Problem) -> tuple[Any, Any, float, float]:
    """The plan made from the LP's optimum: it keeps every limit; (layout, plan, its
    objective, the LP optimum)."""
    lay = build_layout(pr)
    lp = solve_lp(lay)
    assert lp.dispatch is not None and lp.bound_eur is not None
    plan = least_laxity_plan(lay, lp.dispatch)
    assert plan is not None
    assert check_plan(pr, to_plan(lay, plan, "FEASIBLE", [])) == []
    return lay, plan, evaluate(lay, plan).objective, lp.bound_eur


@pytest.mark.parametrize("seed", [0, 5])
def test_on_the_benchs_shape_the_plan_is_within_1pct_of_the_lp_optimum(seed: int) -> None:
    """200 EVs as the bench's, a congestion window: from the LP's optimum the plan keeps
    every limit and is within 1 % of it (0.02-0.23 % in seeds 0-5)."""
    _, _, mine, optimum = _from_the_lp_optimum(bench_like(200, seed))
    assert mine - optimum <= 0.01 * mine


def test_on_a_congested_car_park_with_moving_prices_the_plan_beats_the_fallback_by_far() -> None:
    """Moving prices, a milestone halfway, a third of the EVs on one phase (its fuse binds):
    the plan is within 10 % of the LP optimum where the fallback is 40-52 % above (offline,
    seeds 0-4: three-phase 0.03-3.3 %, with the phase 1.7-7 %; the LP with its polish
    0.3-2.8 %, when it has the time: the planner takes this plan when the LP will not
    finish)."""
    for phases in (False, True):
        lay, _, mine, optimum = _from_the_lp_optimum(_congested(120, 1, phases))
        assert mine - optimum <= 0.10 * mine
        fallback = deadline_first(lay)
        assert fallback is not None and mine < 0.8 * evaluate(lay, fallback).objective


def test_the_replan_after_a_congestion_window_is_within_1pct_of_its_bound() -> None:
    """The bench's shape at 200 EVs: a replan solved (the LP's basis kept), then a
    congestion window halves the import for 2 h; the last plan no longer fits, so the bound
    from the EVs' problems and the plan from its master's point come first (the LP only if
    that plan is not good enough): the plan keeps every limit and is within 1 % of its
    bound, which is not above the LP optimum."""
    first = bench_like(200, 0, congestion=False)
    planner = SitePlanner()
    plan = planner(first, time_limit_s=30.0, use_cpsat=False)
    assert plan.lp_solved
    charged = np.array([plan.power_w[a.id][0] for a in first.storage], dtype=float)
    nxt = a_ptu_later(first, charged)
    nxt.limits.import_limit_w = nxt.limits.import_limit_w.astype(float)
    nxt.limits.import_limit_w[0:8] *= 0.5
    again = planner(nxt, time_limit_s=2.0, use_cpsat=False)
    assert check_plan(nxt, again) == []
    exact = solve_lp(build_layout(nxt)).bound_eur
    assert exact is not None and again.lp_bound_eur is not None and again.gap is not None
    assert again.lp_bound_eur <= exact + 1e-6 * exact
    assert again.gap <= 0.01
    assert any("the plan from the EVs' problems" in note for note in again.notes)
