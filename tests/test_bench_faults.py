"""`cem bench faults`: faults made on the twin and on the demo site, measured against a run
without them (short runs here; the whole campaign is `cem bench faults --json`)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cem.app.bench_faults import run_demo_campaign, run_twin
from cem.app.cli import app


@pytest.mark.slow
def test_a_solver_that_times_out_leaves_the_twin_on_safe_plans_within_its_limits() -> None:
    base, fault = run_twin(["solver_timeout"], ptus=44, time_limit_s=0.2)
    assert base.fault == "none" and base.fallback_plans == 0
    assert fault.fault == "solver_timeout"
    assert fault.fallback_plans >= 8  # every plan of the two hours is the rule-based safe plan
    assert fault.fuse_minutes_over == 0 and fault.ptus_over_gtv == 0
    assert fault.back_to_normal_min == 0.0  # the first plan after it is optimised again
    assert fault.energy_not_delivered_kwh == pytest.approx(base.ev_kwh - fault.ev_kwh, abs=0.05)


@pytest.mark.slow
def test_a_cem_restarted_mid_ptu_gets_every_rm_back_on_the_demo_site() -> None:
    base, restart = run_demo_campaign(["cem_restart"], hours=4.5, repeat_baseline=False)
    assert base.plans > 0 and base.back_to_normal_min is None
    assert restart.fault == "cem_restart" and not restart.notes
    # the RMs come back to the new CEM by themselves and it plans them all, with prices
    assert restart.back_to_normal_min is not None
    assert 0 < restart.back_to_normal_min < 90
    assert restart.ev_kwh > 0


def test_the_command_refuses_unknown_faults_and_places() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "faults", "--faults", "meteor_strike"])
    assert result.exit_code == 2
    assert "unknown fault(s) meteor_strike" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["bench", "faults", "--where", "moon"])
    assert result.exit_code == 2 and "use twin, demo or twin,demo" in result.output
