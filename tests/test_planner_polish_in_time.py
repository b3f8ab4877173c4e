"""The polish after an LP that used up its own time: it gets the time the plan has left.

HiGHS counts a time limit from an instance's first run, so a polish (a second run of the
relaxation's instance, the on/off pattern fixed) used to inherit what the relaxation had left
of its limit: nothing when the LP finished late, and the live replan kept the rounded plan, 5 %
above the bound at 1000 EVs. The polished plan keeps every limit and is within 1 % of the
bound.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from test_planner_warm_start import site

from cem.planner.bound import solve_lp
from cem.planner.hint import polish_plan, round_and_repair
from cem.planner.layout import build_layout, evaluate, grid_and_phases


def test_a_polish_after_an_lp_that_used_its_whole_limit_still_runs() -> None:
    lay = build_layout(site(evs=120, seed=7))  # a car park: the fuse carries a third
    lp = solve_lp(lay, time_limit_s=30)
    assert lp.bound_eur is not None and lp.highs is not None
    # as if the relaxation had finished just at its limit
    lp.highs.setOptionValue("time_limit", lp.highs.getRunTime())
    repaired = round_and_repair(lay, lp.dispatch)
    polished = polish_plan(lay, lp, repaired, time_limit_s=10)
    assert polished is not None
    rounded, best = evaluate(lay, repaired), evaluate(lay, polished)
    assert best.objective <= rounded.objective
    assert (best.objective - lp.bound_eur) / best.objective < 0.01
    g, phases = grid_and_phases(lay, polished)
    assert np.all(g <= lay.import_lim + 1e-3) and np.all(phases <= lay.fuse_up + 1e-3)
    on = polished.charge > 0
    assert np.all(polished.charge[on] >= np.broadcast_to(lay.cmin[:, None], on.shape)[on] - 1e-6)



def test_an_lp_out_of_time_gives_the_best_of_the_last_plan_and_the_fallback() -> None:
    """Fifteen minutes on, the EVs not having said what they charged: the last plan laid onto
    the new problem leaves every EV it charged in PTU 0 short. With no LP plan (and time left)
    the planner returns the better of that plan repaired and the fallback, within the limits."""
    from cem.planner.check import check_plan
    from cem.planner.solve import SitePlanner, plan_site

    first = site(evs=240, seed=7)
    planner = SitePlanner()
    plan = planner(first, time_limit_s=30.0, use_cpsat=False)
    assert plan.lp_bound_eur is not None
    later = site(evs=240, seed=7)
    later.start = first.start + timedelta(minutes=15)  # the same EVs, levels as they were
    again = planner(later, time_limit_s=5.0, use_lp=False, use_cpsat=False)  # no LP plan
    assert again.lp_bound_eur is None
    assert any("the best of the last plan, repaired, the fallback plan" in n for n in again.notes)
    assert check_plan(later, again) == []
    fallback = plan_site(later, use_lp=False, use_cpsat=False)
    assert again.objective_eur <= fallback.objective_eur + 1e-6
