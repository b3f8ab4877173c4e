"""`cem bench planner` on a tiny size: the JSON report parses and the plans have no violations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cem.app.bench_planner import bench_scenario
from cem.app.cli import app
from cem.app.scenario import scenario_to_problem

runner = CliRunner()


def _solver_ready() -> bool:
    try:
        from cem.app.plan_cli import solver_functions

        solver_functions()
    except ImportError:
        return False
    return True


def test_bench_scenario_is_reproducible_and_binding() -> None:
    a = bench_scenario(20, seed=3, ptus=96)
    b = bench_scenario(20, seed=3, ptus=96)
    assert a == b
    assert bench_scenario(20, seed=4) != a
    built = scenario_to_problem(a)
    evs = [s for s in built.problem.storage if s.kind == "ev"]
    assert len(evs) == 20
    assert {s.phase_share for s in evs} - {(1 / 3, 1 / 3, 1 / 3)}, "some EVs are 1-phase"
    assert all(s.charge_min_w in (1380, 4140) for s in evs)  # 6 A on 1 or 3 phases
    kinds = {s.kind for s in built.problem.storage}
    assert {"ev", "battery", "heat_pump"} <= kinds and built.problem.curtailable
    limits = built.problem.limits
    assert limits.import_limit_w.min() < limits.import_limit_w.max()  # a congestion window
    # uncontrolled charging (full power from arrival) would exceed the GTV
    uncontrolled = np.zeros(96)
    for s in evs:
        ptus = int(np.ceil((s.target_wh or 0) / (s.charge_max_w / 4)))
        uncontrolled[s.available_from:min(s.available_until, s.available_from + ptus)] += s.charge_max_w
    assert uncontrolled.max() > limits.import_limit_w.max()


def test_bench_rejects_bad_options() -> None:
    result = runner.invoke(app, ["bench", "planner", "--evs", "0", "--json"])
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.skipif(not _solver_ready(), reason="cem.planner.solve not written yet")
def test_bench_json_on_five_evs_has_no_violations() -> None:
    result = runner.invoke(app, ["bench", "planner", "--evs", "5", "--instances", "1", "--ptus", "48",
                                 "--time-limit", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (row,) = report["results"]
    assert row["evs"] == 5 and row["instances"] == 1
    assert row["violations"] == 0, row["violation_examples"]
    for key in ("build_s_p50", "solve_s_p95", "total_s_p50", "cost_eur", "lp_bound_eur", "gap",
                "lp_solve_s_p50", "status"):
        assert key in row
    assert set(row["status"]) <= {"OPTIMAL", "FEASIBLE", "FALLBACK"}
    assert report["machine"]["cpus"] >= 1


def test_every_instance_stays_inside_the_bundled_data() -> None:
    for seed in range(25):
        bench_scenario(3, seed=seed)  # raises if a day falls outside the bundled prices / PV
    assert bench_scenario(3, seed=0, ptus=2000).horizon_ptus == 2000


def test_office_example_is_the_bench_car_park_with_50_evs() -> None:
    from pathlib import Path

    from cem.app.scenario import load_scenario

    example = load_scenario(Path(__file__).parent.parent / "specs" / "scenarios" / "office_car_park.json")
    built = bench_scenario(50, seed=1)
    assert example.model_copy(update={"name": "", "description": ""}) == \
        built.model_copy(update={"name": "", "description": ""})


def test_the_bench_gives_each_ev_the_milestones_of_a_live_replan() -> None:
    from cem.app.bench_planner import with_live_milestones

    problem = with_live_milestones(scenario_to_problem(bench_scenario(20, seed=2)).problem)
    evs = [s for s in problem.storage if s.kind == "ev" and s.target_wh]
    assert evs
    for ev in evs:
        end = ev.available_until
        assert (end, ev.target_wh, ev.level_max_wh) in ev.target_profile  # the RM's target
        early = [ptu for ptu, lo, _hi in ev.target_profile if ptu < end and lo == ev.target_wh]
        # the finish margin: the target a PTU before the departure (unless the stay is a PTU)
        assert early == [end - 1] or end - ev.available_from <= 1


@pytest.mark.skipif(not _solver_ready(), reason="cem.planner.solve not written yet")
def test_bench_with_and_without_the_live_shape_reports_which() -> None:
    for flag, shape in (("--live-shape", True), ("--no-live-shape", False)):
        result = runner.invoke(app, ["bench", "planner", "--evs", "4", "--instances", "1",
                                     "--ptus", "48", "--time-limit", "1", "--json", flag])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["live_shape"] is shape
        assert report["results"][0]["violations"] == 0
