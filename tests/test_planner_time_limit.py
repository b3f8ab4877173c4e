"""A plan given far less time than its stages need (issue 14, round 9: the cold plan's stages
budgeted from the deadline): it is still a whole plan that keeps every limit, not the
fallback, and it says which stages it skipped or cut short for time."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from cem.app.bench_planner import bench_scenario, with_live_milestones
from cem.app.cli import app
from cem.app.scenario import scenario_to_problem
from cem.planner.fallback import fallback_dispatch
from cem.planner.layout import build_layout, evaluate
from cem.planner.solve import check_plan, plan_site


def test_a_cold_plan_with_a_tiny_time_limit_keeps_every_limit_and_says_what_it_skipped() -> None:
    """The bench's car park at 300 EVs (a battery, a heat pump, PV, live milestones, a
    congestion window) planned cold in 0.01 s: the plan from the EVs' problems after their
    first answer, every limit kept; the price steps, the refill and the LP are said skipped."""
    problem = scenario_to_problem(bench_scenario(300, 0)).problem
    with_live_milestones(problem)
    plan = plan_site(problem, time_limit_s=0.01)
    assert check_plan(problem, plan) == []
    assert plan.status != "FALLBACK"
    assert np.all(plan.grid_import_w <= problem.limits.import_limit_w + 1)
    assert plan.lp_bound_eur is not None and plan.gap is not None
    stages = {s.split(":")[0] for s in plan.skipped}
    assert {"price steps", "refill", "LP"} <= stages, plan.skipped
    assert all(": " in s for s in plan.skipped)  # each says why
    # the same site with the time it needs is planned with nothing skipped but the stages
    # it does not need (no plan within the tolerance is refilled, the LP is not run after one)
    assert plan_site(problem, time_limit_s=30.0, use_cpsat=False).skipped == []


def test_a_small_site_with_a_tiny_time_limit_gets_a_plan_from_the_evs_problems_not_the_fallback(
        ) -> None:
    """The bench's car park at 100 EVs (below the size whose plans were budgeted before) in
    0.1 s: too little for its LP and what follows it, so the plan comes from the EVs' own
    problems, keeps every limit, says the LP was skipped for time, and costs far less than
    the rule-based fallback (which, with the LP, was the plan: 99.7 % above the bound)."""
    problem = scenario_to_problem(bench_scenario(100, 1)).problem
    with_live_milestones(problem)
    plan = plan_site(problem, time_limit_s=0.1)
    assert check_plan(problem, plan) == []
    assert plan.status != "FALLBACK"
    assert any("the plan from the EVs' problems" in note for note in plan.notes), plan.notes
    assert any(s.startswith("LP: ") for s in plan.skipped), plan.skipped
    assert plan.lp_bound_eur is not None and plan.bound_from == "EVs"
    lay = build_layout(problem)
    assert plan.objective_eur < evaluate(lay, fallback_dispatch(lay)).objective / 2


def test_the_bench_says_each_runs_time_past_its_limit_and_what_was_skipped() -> None:
    result = CliRunner().invoke(app, ["bench", "planner", "--evs", "300", "--instances", "1",
                                      "--time-limit", "0.01", "--json"])
    assert result.exit_code == 0, result.output
    size = json.loads(result.stdout)["results"][0]
    run = size["runs"][0]
    assert run["over_limit_s"] == round(run["total_s"] - 0.01, 4)
    assert size["over_limit_s_max"] == run["over_limit_s"]
    assert any(s.startswith("price steps:") for s in run["skipped"]), run["skipped"]
    assert run["stage_s"]["plan from the point"] > 0
