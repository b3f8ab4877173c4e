"""`cem bench replan`: a live replan over S2 sessions, timed, with the loop's lag."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cem.app.cli import app


def test_bench_replan_plans_every_charger_through_s2_and_reports_figures() -> None:
    # two untimed replans after the cold start, then two timed ones
    result = CliRunner().invoke(app, ["bench", "replan", "--evs", "12", "--replans", "2",
                                      "--warmup", "2", "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [r["gc_freeze"] for r in runs] == [True, False]
    for run in runs:
        assert run["evs"] == 12 and run["replans"] == 2 and run["warmup_replans"] == 2
        assert run["cem_refused_rm_messages"] == 0 and run["rm_refusals"] == 0
        # the real planner's plans, not the rule-based fallback
        assert run["plan_status"] and set(run["plan_status"]) <= {"OPTIMAL", "FEASIBLE"}
        # the timed replans' S2 traffic: the moved EV's reports (2 a replan) and what changed
        assert run["s2_messages_during_replans"] >= 2 * run["replans"]
        # and of those, the revokes and instructions the CEM sent the RMs per replan
        sent = run["revokes_per_replan"] + run["instructions_per_replan"]
        assert run["revokes_per_replan"] >= 0 and run["instructions_per_replan"] >= 0
        assert sent * run["replans"] <= run["s2_messages_during_replans"]
        assert 0 < run["replan_p50_s"] <= run["replan_max_s"]
        # each timed replan, the planner's part of it, and those within the deadline
        assert len(run["replans_s"]) == len(run["replan_solves_s"]) == 2
        assert max(run["replans_s"]) == run["replan_max_s"]
        assert all(0 < solve <= replan for solve, replan
                   in zip(run["replan_solves_s"], run["replans_s"], strict=True))
        assert run["deadlines_kept"] == sum(1 for x in run["replans_s"]
                                            if x <= run["time_limit_s"])
        # the planner's time limit in each: the deadline, or less by the work around it
        assert len(run["replan_planner_limits_s"]) == 2
        assert all(0.5 * run["time_limit_s"] <= limit <= run["time_limit_s"]
                   for limit in run["replan_planner_limits_s"])
        assert run["loop_lag_max_ms"] is not None and run["loop_lag_max_ms"] >= 0
        # the timed replans only: two gaps, each against the LP optimum
        assert len(run["gaps"]) == 2 and run["bounds"] == ["LP", "LP"]
        assert run["gaps_within_1pct"] == sum(1 for g in run["gaps"] if g <= 0.01)
        assert run["solve_p50_s"] > 0


def test_bench_replan_reports_the_planner_alone_the_gap_and_a_new_limit_reaching_the_rms() -> None:
    result = CliRunner().invoke(app, ["bench", "replan", "--evs", "12", "--replans", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    for run in json.loads(result.stdout)["runs"]:
        # the same problems solved by the planner alone, in the same run: beside the bench's
        # lag ticker as the replans were (the ratio's), and bare
        assert run["solve_p50_s"] > 0 and run["replan_over_solve"] > 0
        assert run["solve_bare_p50_s"] > 0
        assert run["replan_over_solve"] == round(run["replan_p50_s"] / run["solve_p50_s"], 2) \
            or abs(run["replan_over_solve"] - run["replan_p50_s"] / run["solve_p50_s"]) < 0.05
        assert run["gap_max"] is not None and 0 <= run["gap_max"] < 0.5
        # each gap says what it is measured against (12 EVs: the LP is solved in time)
        assert run["bounds"] == ["LP", "LP"]
        assert run["gaps_within_1pct"] == sum(1 for g in run["gaps"] if g <= 0.01)
        assert run["lp_warm_starts"] == 2  # each replan went on from the last basis
        assert run["cold_plan_status"] in ("OPTIMAL", "FEASIBLE", "FALLBACK")
        # the congestion window made RMs lower: each acknowledged its new instruction, the
        # first (the fast path's cut) no later than the replan's
        assert run["rms_acked_new_limit"] > 0
        assert 0 < run["limit_to_ack_p99_s"] <= run["limit_to_replan_ack_p99_s"] \
            <= run["limit_replan_s"]
        # the site as instructed kept the limit, and no instruction after it went over again
        assert run["limit_fast_path_rms"] > 0
        assert run["limit_kept_s"] is not None and run["limit_kept_s"] <= run["limit_replan_s"]
        assert run["instructed_max_over_limit_kw"] == 0
        # a congestion plan more than 1 % above its bound whose LP was not solved is followed
        # by replans at once (at most 3); the last one's gap, and when a plan within 1 % was there
        assert (run["limit_follow_ups"] == 0) == (run["limit_gap"] <= 0.01
                                                  or run["limit_lp_solved"])
        assert run["limit_follow_ups"] <= 3
        if run["limit_within_1pct_s"] is not None:
            assert run["limit_gap_final"] <= 0.01
            assert run["limit_within_1pct_s"] >= run["limit_replan_s"]
