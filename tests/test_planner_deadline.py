"""Under a time limit too short for the LP, the decomposition or the plan from its point, the
plan the planner returns still keeps every hard limit: the fuse on every phase, the grid
connection (GTV) and a congestion window (the check of the plan sent is never skipped).
(Written on branch deadline6, whose deadline rule was not merged: it sent the fallback, 43 %
above its bound, for a congestion replan at 5000 EVs; docs/adr/0011 round 6.)"""

from __future__ import annotations

import numpy as np
from test_planner_warm_start import site

from cem.planner.check import check_plan
from cem.planner.solve import SitePlanner


def test_a_plan_under_a_short_limit_keeps_the_fuse_the_gtv_and_a_congestion_window() -> None:
    problem = site(evs=240)  # the fuse carries a third of the chargers
    problem.limits.import_limit_w = problem.limits.import_limit_w.astype(float)
    problem.limits.import_limit_w[1:9] *= 0.6  # a congestion window of two hours
    planner = SitePlanner()
    # as after a replan whose LP was not solved: the path of a live replan at scale
    planner.memory.lp_solved = False
    plan = planner(problem, time_limit_s=0.01, use_cpsat=False)
    assert check_plan(problem, plan) == []
    # what a user sees: the site's import under its GTV and the window, and (every EV on
    # three phases, nothing else on the site) each phase's current under the fuse
    assert np.all(plan.grid_import_w <= problem.limits.import_limit_w + 1)
    assert np.all(plan.grid_import_w / 3 / problem.limits.voltage_v
                  <= problem.limits.fuse_a + 1e-3)
    assert plan.lp_bound_eur is not None  # and the user is told how good it is


def test_a_live_plan_given_too_little_time_for_its_stages_says_what_it_cut_and_keeps_every_limit(
        ) -> None:
    problem = site(evs=240)
    planner = SitePlanner()
    planner(problem, time_limit_s=1.0, use_cpsat=False)  # the last replan: prices, a plan
    # the next replan (the same site), as after an LP that was not solved in time (the path
    # of a live replan at 5000 EVs: the EVs' own problems from the last prices), with far
    # less time than its price steps, the plan from their point and the plan's check take
    planner.memory.lp_solved = False
    plan = planner(problem, time_limit_s=0.01, use_cpsat=False)
    assert check_plan(problem, plan) == []
    assert np.all(plan.grid_import_w <= problem.limits.import_limit_w + 1)
    # it says what it cut short, and sends the best plan it found, not the fallback
    assert any(s.startswith("price steps: stopped for time") for s in plan.skipped), plan.skipped
    assert plan.status in ("FEASIBLE", "OPTIMAL"), plan.notes
    assert plan.gap is not None and plan.gap <= 0.01
