"""Bad scenarios: every mistake with its JSON path, exit 2, no traceback; conversion rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cem.app.cli import app
from cem.app.scenario import ScenarioError, parse_scenario, scenario_to_problem

FIXTURES = Path(__file__).parent / "fixtures" / "scenarios"
runner = CliRunner()


def tiny() -> dict[str, Any]:
    return json.loads((FIXTURES / "tiny.json").read_text())


def _plan_error(tmp_path: Path, data: Any) -> str:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    result = runner.invoke(app, ["plan", "--scenario", str(path), "--json"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""  # nothing on stdout for a --json consumer to misread
    return result.output


def test_bad_ev_fixture_lists_each_mistake_with_its_path() -> None:
    result = runner.invoke(app, ["plan", "--scenario", str(FIXTURES / "bad_ev.json")])
    assert result.exit_code == 2
    out = result.output
    assert "Traceback" not in out
    assert "evs[0].departure: must be after arrival" in out
    assert "evs[1].arrival: needs a UTC offset" in out
    assert "evs[1].energy_kwh" in out
    assert "evs[1].phases" in out
    assert "evs[2].maxkw: unknown key" in out
    # checks across fields run too, so one run lists every mistake
    assert "prices.import_eur_per_kwh: 3 values for horizon_ptus 8" in out
    assert "evs[2].id: id 'b' is already used by evs[1]" in out


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["prices"].update(import_eur_per_kwh=[0.1] * 10), "prices.import_eur_per_kwh: 10 values for horizon_ptus 16"),
        (lambda d: d["evs"][1].update(id="ev_l2"), "evs[1].id: id 'ev_l2' is already used by evs[0]"),
        (lambda d: d["batteries"][0].update(soc_kwh=9), "batteries[0].soc_kwh: 9.0 is outside"),
        (lambda d: d["grid"].update(fuse_a=-1), "grid.fuse_a"),
        (lambda d: d["grid"].update(phases=2), "grid.phases"),
        (lambda d: d.pop("start"), "start: required"),
        (lambda d: d["heat_pumps"][0].update(demand_kw=[1.0] * 5), "heat_pumps[0].demand_kw: 5 values"),
        (lambda d: d["congestion"][0].update(end="2026-11-23T01:00:00Z"), "congestion[0]"),
        (lambda d: d["evs"][0].update(departure="2026-11-22T21:00:00Z"), "evs[0].departure"),
        (lambda d: d["evs"][0].update(phases=3), "evs[0].phase: only for 1-phase EVs"),
        (lambda d: d.update(ptu_minutes=7), "ptu_minutes: 7 must divide 60"),
        (lambda d: d.update(pv_kw=[-1.0]), "pv_kw: values must be >= 0"),
    ],
)
def test_each_mistake_names_its_json_path(tmp_path: Path, change: Any, expected: str) -> None:
    data = tiny()
    change(data)
    assert expected in _plan_error(tmp_path, data)


def test_broken_json_names_line_and_column(tmp_path: Path) -> None:
    out = _plan_error(tmp_path, '{"start": "2026-11-23T00:00:00Z",\n "prices": {]\n}')
    assert "not valid JSON" in out and "line 2" in out


def test_missing_file_and_non_object(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", "--scenario", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "file not found" in result.output
    assert "must be a JSON object" in _plan_error(tmp_path, "[1, 2]")


def test_ev_times_are_rounded_inward_to_whole_ptus() -> None:
    built = scenario_to_problem(parse_scenario(json.dumps(tiny())))
    ev = {a.id: a for a in built.problem.storage}
    # 00:20 -> from PTU 2 (00:30); 03:40 -> until PTU 14 (03:30-03:45 is not whole)
    assert (ev["ev_l2"].available_from, ev["ev_l2"].available_until) == (2, 14)
    assert ev["ev_l2"].phase_share == (0.0, 1.0, 0.0)
    assert ev["ev_l2"].charge_min_w == (6 * 230)  # 6 A on one phase by default
    # plugged in before start, leaves after the 4 h horizon (stay 00:00-06:00 from start):
    # planned over the whole horizon with the pro-rata target 20 kWh x 4/6
    assert (ev["ev_3ph"].available_from, ev["ev_3ph"].available_until) == (0, 16)
    assert ev["ev_3ph"].target_wh == round(20000 * 4 / 6)
    assert ev["ev_3ph"].level_max_wh == 20000
    assert ev["ev_3ph"].charge_min_w == (6 * 230 * 3)
    assert any("leaves after the horizon" in note for note in built.notes)


def test_units_and_per_ptu_arrays() -> None:
    data = tiny()
    data["pv_kw"] = [*data["pv_kw"], 9, 9]  # longer than the horizon: clipped with a note
    built = scenario_to_problem(parse_scenario(json.dumps(data)))
    p = built.problem
    assert list(p.fixed[0].power_w) == [500] * 16
    assert p.curtailable[0].production_w[8] == 5000 and len(p.curtailable[0].production_w) == 16
    assert any("pv_kw: 18 values" in note for note in built.notes)
    np.testing.assert_allclose(p.prices.export_eur_per_kwh, [0.05] * 16)
    assert p.prices.import_eur_per_kwh[8] == -0.05
    assert list(p.limits.import_limit_w[7:13]) == [10000, 4000, 4000, 4000, 4000, 10000]
    assert list(p.limits.export_limit_w) == [3000] * 16
    assert p.limits.peak_so_far_w == 2000 and p.limits.peak_price_eur_per_kw == 2.0
    bat = next(a for a in p.storage if a.id == "bat")
    assert bat.charge_efficiency == pytest.approx(0.9 ** 0.5)
    assert (bat.level_wh, bat.level_min_wh, bat.level_max_wh) == (2500, 500, 5000)
    hp = next(a for a in p.storage if a.id == "hp")
    assert hp.charge_efficiency == 3 and hp.charge_max_w == 2000
    assert list(hp.usage_wh) == [400] * 16  # (1.5 + 0.1) kW x 0.25 h thermal


def test_ev_arriving_after_the_horizon_is_left_out_with_a_note() -> None:
    data = tiny()
    data["evs"][0].update(arrival="2026-11-23T05:00:00Z", departure="2026-11-23T08:00:00Z")
    built = scenario_to_problem(parse_scenario(json.dumps(data)))
    assert "ev_l2" not in {a.id for a in built.problem.storage}
    assert any("arrives after the horizon" in note for note in built.notes)


def test_scenario_error_lists_all_problems() -> None:
    data = tiny()
    data["evs"][0]["max_kw"] = 0
    data["batteries"][0]["efficiency"] = 1.5
    with pytest.raises(ScenarioError) as info:
        parse_scenario(json.dumps(data), "x.json")
    paths = [p.path for p in info.value.problems]
    assert paths == ["evs[0].max_kw", "batteries[0].efficiency"]
    assert info.value.report().startswith("x.json: 2 problem(s)")


def test_plot_path_mistakes_exit_2_before_planning(tmp_path: Path) -> None:
    for bad in (tmp_path / "no" / "such" / "plan.png", tmp_path / "plan.txt"):
        result = runner.invoke(app, ["plan", "--scenario", str(FIXTURES / "tiny.json"), "--plot", str(bad)])
        assert result.exit_code == 2 and "--plot" in result.output and "Traceback" not in result.output


def test_v2g_ev_can_discharge_what_it_charged() -> None:
    data = tiny()
    data["evs"][1]["v2g_max_discharge_kw"] = 5
    ev = next(a for a in scenario_to_problem(parse_scenario(json.dumps(data))).problem.storage
              if a.id == "ev_3ph")
    assert (ev.discharge_max_w, ev.discharge_min_w, ev.level_min_wh) == (5000, 4140, 0)
