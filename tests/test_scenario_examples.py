"""Scenario examples: valid against the JSON schema and the models, and planned by `cem plan`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cem.app.cli import app
from cem.app.scenario import Scenario, load_scenario, scenario_to_problem, schema

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "specs" / "scenarios").glob("*.json"))
TINY = Path(__file__).parent / "fixtures" / "scenarios" / "tiny.json"
runner = CliRunner()


def _solver_ready() -> bool:
    try:
        from cem.app.plan_cli import solver_functions

        solver_functions()
    except ImportError:
        return False
    return True


needs_solver = pytest.mark.skipif(not _solver_ready(), reason="cem.planner.solve not written yet")


def test_the_three_example_sites_exist() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"home", "office_car_park", "depot"} <= names


def test_committed_schema_is_generated_from_the_models() -> None:
    committed = json.loads((ROOT / "specs" / "scenario.schema.json").read_text())
    assert committed == schema(), "regenerate: python -m cem.app.scenario --schema > specs/scenario.schema.json"
    assert committed["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("path", [*EXAMPLES, TINY], ids=lambda p: p.stem)
def test_examples_match_the_json_schema_and_the_models(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    data = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.Draft202012Validator(schema()).validate(data)
    Scenario.model_validate(data)
    built = scenario_to_problem(load_scenario(path))
    assert built.problem.n_ptus == data["horizon_ptus"]


def test_json_schema_rejects_what_the_models_reject() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    data = json.loads(TINY.read_text())
    data["evs"][0]["phases"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema())
    data["evs"][0]["phases"] = 1
    data["evs"][0]["colour"] = "red"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema())


def _plan_json(path: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["plan", "--scenario", str(path), "--json", "--time-limit", "1", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _check_conventions(path: Path, out: dict) -> None:
    built = scenario_to_problem(load_scenario(path))
    n = built.problem.n_ptus
    for key in ("status", "cost_eur", "lp_bound_eur", "gap", "peak_kw", "unmet_kwh", "build_s",
                "solve_s", "grid_import_kw", "assets", "pv_curtailed_kw", "shortfall",
                "energy_cost_eur", "peak_cost_eur", "lp_solve_s"):
        assert key in out, key
    assert out["status"] in ("OPTIMAL", "FEASIBLE", "FALLBACK")
    assert out["violations"] == []
    grid = np.array(out["grid_import_kw"])
    assert grid.shape == (n,)
    expected = np.array(out["base_load_kw"]) - (np.array(out["pv_kw"]) - np.array(out["pv_curtailed_kw"]))
    for power in out["assets"].values():
        assert len(power) == n
        expected = expected + np.array(power)
    np.testing.assert_allclose(grid, expected, atol=0.002 * (len(out["assets"]) + 3))
    # every EV is zero outside the PTUs it is plugged in
    for asset in built.problem.storage:
        if asset.kind != "ev":
            continue
        power = np.array(out["assets"][asset.id])
        outside = np.ones(n, dtype=bool)
        outside[asset.available_from:asset.available_until] = False
        assert np.all(power[outside] == 0), asset.id
        assert asset.id in out["unmet_kwh"]
    # limits hold (import limit per PTU, export limit)
    assert np.all(grid <= np.array(out["import_limit_kw"]) + 0.001)
    assert np.all(-grid <= np.array(out["export_limit_kw"]) + 0.001)


@needs_solver
def test_tiny_scenario_plans_with_the_documented_conventions(tmp_path: Path) -> None:
    png = tmp_path / "plan.png"
    out = _plan_json(TINY, "--plot", str(png))
    _check_conventions(TINY, out)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the congestion window (02:10-03:00) caps PTUs 8..11 at 4 kW
    assert out["import_limit_kw"][8:12] == [4.0] * 4
    assert max(out["grid_import_kw"][8:12]) <= 4.0 + 1e-3
    # the 1-phase EV arriving 00:20 is planned from 00:30 (PTU 2), leaving 03:40 -> until PTU 14
    assert out["assets"]["ev_l2"][:2] == [0.0, 0.0]
    assert out["assets"]["ev_l2"][14:] == [0.0, 0.0]


@needs_solver
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_plans_without_violations(path: Path) -> None:
    out = _plan_json(path)
    _check_conventions(path, out)


@needs_solver
def test_summary_table_names_status_cost_and_evs() -> None:
    result = runner.invoke(app, ["plan", "--scenario", str(TINY), "--time-limit", "1"])
    assert result.exit_code == 0, result.output
    for word in ("status", "cost", "LP bound", "peak import", "ev_l2", "ev_3ph", "target kWh"):
        assert word in result.stdout, word


@needs_solver
def test_json_stdout_is_one_object_even_with_solver_banners() -> None:
    """A real process: C libraries print on fd 1, which CliRunner does not see."""
    cem = Path(sys.executable).parent / "cem"
    done = subprocess.run([str(cem), "plan", "--scenario", str(TINY), "--json", "--time-limit", "0.5"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] in ("OPTIMAL", "FEASIBLE", "FALLBACK")


@needs_solver
def test_a_target_that_cannot_fit_is_a_reported_shortfall(tmp_path: Path) -> None:
    data = json.loads(TINY.read_text())
    data["evs"][0]["energy_kwh"] = 40  # 12 PTUs x 7.36 kW x 0.25 h = 22.08 kWh at most
    path = tmp_path / "too_much.json"
    path.write_text(json.dumps(data))
    out = _plan_json(path)
    _check_conventions(path, out)
    assert out["unmet_kwh"]["ev_l2"] >= 40 - 22.08 - 0.01
    assert out["shortfall"]["ev_l2"]["reason"]
    assert out["ev_energy_kwh"]["ev_l2"]["planned"] <= 22.08 + 0.01
