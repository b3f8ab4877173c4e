"""The bound from row prices (Lagrangian relaxation of the LP): never above the LP optimum,
equal to it at the LP's own duals, and a plan made without the LP solved keeps every limit."""

from __future__ import annotations

import copy

import highspy
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_planner_decompose import min_power_eur
from test_planner_properties import N, small_sites
from test_planner_warm_start import a_ptu_later, site

from cem.planner.assets import Problem, StorageAsset
from cem.planner.bound import BuiltLp, LpMemory, solve_lp
from cem.planner.dual_bound import LpShape, dual_bound, implied_boxes
from cem.planner.layout import build_layout
from cem.planner.solve import SitePlanner, check_plan


def _with_heat_pump(pr: Problem) -> Problem:
    """The site with a heat pump's buffer: a COP, a demand taken every PTU, a minimum level."""
    out = copy.deepcopy(pr)
    out.storage.append(StorageAsset(
        id="hp", kind="heat_pump", charge_max_w=3_000, charge_min_w=800, charge_efficiency=3.0,
        level_wh=6_000, level_min_wh=2_000, level_max_wh=12_000,
        usage_wh=np.full(N, 1_500, dtype=np.int64)))
    return out


def _optimum(built: BuiltLp) -> tuple[float, np.ndarray]:
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)  # as the planner: HiGHS keeps one thread count a process
    h.passModel(built.model)
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return float(h.getInfo().objective_function_value), np.asarray(h.getSolution().row_dual)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_sites(), st.booleans(), st.integers(0, 2**31 - 1))
def test_the_bound_from_any_row_prices_is_never_above_the_lp_optimum(
        pr: Problem, heat_pump: bool, seed: int) -> None:
    """EVs (V2G too), battery, PV, a mode device, a profile, kW-max, congestion, a heat pump:
    the bound holds for the LP's own prices, prices nudged off them and random ones."""
    pr = _with_heat_pump(pr) if heat_pump else pr
    built = BuiltLp.of(build_layout(pr))
    optimum, price = _optimum(built)
    shape = LpShape.of(built.model)
    lb, ub = implied_boxes(shape)
    tol = 1e-6 * max(1.0, abs(optimum))
    assert dual_bound(shape, price, lb, ub) == pytest.approx(optimum, abs=1e-5 * max(1.0, abs(optimum)))
    rng = np.random.default_rng(seed)
    for y in (price * rng.uniform(0.5, 1.5, len(price)),
              price + rng.normal(0, 0.05, len(price)),
              rng.normal(0, 1, len(price)), np.zeros(len(price))):
        assert dual_bound(shape, y, lb, ub) <= optimum + tol


def test_the_last_replans_prices_bound_the_next_lp_closely() -> None:
    """A PTU on (each EV has what it charged): the last LP's duals laid on by row key give a
    bound below the new LP's optimum and within 2 % of it, without solving the new LP."""
    first = site(evs=120)
    memory = LpMemory()
    lp = solve_lp(build_layout(first), memory=memory)
    assert lp.bound_eur is not None and lp.dispatch is not None
    nxt = a_ptu_later(first, lp.dispatch.charge[:, 0])
    built = BuiltLp.of(build_layout(nxt))
    optimum, _ = _optimum(built)
    kept = memory.prices_for(built.row_key)
    assert kept is not None
    shape = LpShape.of(built.model)
    bound = dual_bound(shape, kept, *implied_boxes(shape))
    assert bound <= optimum + 1e-6 * optimum
    assert bound >= optimum - 0.02 * abs(optimum)


@pytest.mark.parametrize("unsolved_before", [False, True],
                         ids=["LP alone", "fallback made beside the LP"])
def test_an_lp_out_of_time_gives_a_plan_within_the_limits_and_a_bound_below_the_optimum(
        unsolved_before: bool) -> None:
    """The LP runs out of time on the next replan: the plan keeps every limit, its bound
    (from the unsolved LP's row prices) is not above the LP optimum (but for what the EVs'
    minimum power adds), and it is no worse than
    the fallback. After a replan whose LP was not solved either, the fallback is made beside
    the LP (in the planning thread while the LP runs in its own)."""
    first = site(evs=240)
    planner = SitePlanner()
    plan = planner(first, time_limit_s=30.0, use_cpsat=False)
    assert plan.lp_bound_eur is not None
    charged = np.array([plan.power_w[a.id][0] for a in first.storage], dtype=float)
    nxt = a_ptu_later(first, charged)
    planner.memory.lp_solved = not unsolved_before
    planner.memory.lp.forget()  # no basis to go on from: the LP cannot finish in 10 ms
    again = planner(nxt, time_limit_s=0.01, use_cpsat=False)
    assert check_plan(nxt, again) == []
    exact = solve_lp(build_layout(nxt)).bound_eur
    assert exact is not None and again.lp_bound_eur is not None
    # (a bound from the EVs' problems may pass it by what their minimum power adds)
    assert again.lp_bound_eur <= exact + min_power_eur(again) + 1e-6 * exact
    # after an unsolved LP, on this EV-only site the bound comes from the EVs' own problems
    # (`decompose`); a live replan makes the fallback only when nothing it found is known to
    # be within 1 % of that bound (issue 14: computed once, only when there is nothing better)
    assert any(("bound from the EVs' own problems" if unsolved_before else "bound from row prices")
               in note for note in again.notes)
    if unsolved_before:
        assert any("the fallback plan" in note for note in again.notes) \
            or (again.gap is not None and again.gap <= 0.01)
    fallback = planner.__class__()(nxt, use_lp=False, use_cpsat=False)
    assert again.objective_eur <= fallback.objective_eur + 1e-6
