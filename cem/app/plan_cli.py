"""`cem plan --scenario FILE.json`: plan a scenario file offline and show the plan.

Output conventions (`--json`, one object): power in kW per PTU, positive = consumption;
`grid_import_kw` = base load - (PV - curtailed) + sum of `assets`, + import / - export.
`unmet_kwh` lists every EV (0 when its target is met); `shortfall` gives the planner's reason
for each asset that misses its target; `skipped` the planner's stages skipped or cut short to keep
the time limit ("stage: why"), and `wall_s` the seconds the planner took.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from cem.app.json_stdout import prints_to_stderr
from cem.app.scenario import BuiltScenario, ScenarioError, load_scenario, scenario_to_problem
from cem.planner.assets import Plan, Problem

console = Console(stderr=True)
MAX_EV_ROWS = 20
PLOT_FORMATS = (".png", ".svg", ".pdf")


def solver_functions() -> tuple[Callable[..., Plan], Callable[[Problem, Plan], list[str]]]:
    """The planner's plan_site and check_plan."""
    from cem.planner.check import check_plan
    from cem.planner.solve import plan_site

    return plan_site, check_plan


def _kw(values: np.ndarray | None, n: int) -> list[float]:
    if values is None:
        return [0.0] * n
    return [round(float(v) / 1000, 3) for v in np.asarray(values)]


def _finite(value: float | None, digits: int) -> float | None:
    """A number for JSON: None when unknown or not finite (JSON has no NaN)."""
    if value is None or not np.isfinite(value):
        return None
    return round(float(value), digits)


def ev_delivered_wh(built: BuiltScenario, plan: Plan) -> dict[str, float]:
    """Energy each EV receives in the plan, Wh (charging minus discharging)."""
    dt_h = built.problem.ptu_minutes / 60
    return {ev: float(np.sum(plan.power_w.get(ev, 0)) * dt_h) for ev in built.ev_target_wh}


def plan_to_json(built: BuiltScenario, plan: Plan, violations: list[str] | None = None) -> dict[str, Any]:
    """The `--json` object of a plan (see the module docstring for the conventions)."""
    problem = built.problem
    n = problem.n_ptus
    curtailed = np.zeros(n)
    for values in plan.curtailed_w.values():
        curtailed = curtailed + np.asarray(values, dtype=float)
    unmet = {ev: 0.0 for ev in built.ev_target_wh}
    for asset_id, short in plan.shortfall.items():
        unmet[asset_id] = round(short.energy_wh / 1000, 3)
    delivered = ev_delivered_wh(built, plan)
    return {
        "status": plan.status,
        "cost_eur": round(plan.cost_eur, 4),
        "energy_cost_eur": round(plan.energy_cost_eur, 4),
        "peak_cost_eur": round(plan.peak_cost_eur, 4),
        "objective_eur": _finite(getattr(plan, "objective_eur", None), 4),
        "lp_bound_eur": _finite(plan.lp_bound_eur, 4),
        "gap": _finite(plan.gap, 6),
        "peak_kw": round(plan.peak_w / 1000, 3),
        "unmet_kwh": unmet,
        "shortfall": {k: {"energy_kwh": round(v.energy_wh / 1000, 3), "reason": v.reason}
                      for k, v in plan.shortfall.items()},
        "ev_energy_kwh": {ev: {"planned": round(delivered[ev] / 1000, 3),
                               "target": round(built.ev_target_wh[ev] / 1000, 3),
                               "requested": round(built.ev_need_wh[ev] / 1000, 3)}
                          for ev in built.ev_target_wh},
        "build_s": round(plan.build_s, 4),
        "lp_solve_s": round(plan.lp_solve_s, 4),
        "solve_s": round(plan.solve_s, 4),
        "start": problem.start.isoformat().replace("+00:00", "Z"),
        "ptu_minutes": problem.ptu_minutes,
        "ptu_start": [problem.ptu_start(i).isoformat().replace("+00:00", "Z") for i in range(n)],
        "grid_import_kw": _kw(plan.grid_import_w, n),
        "base_load_kw": _kw(built.base_load_w, n),
        "pv_kw": _kw(built.pv_w, n),
        "pv_curtailed_kw": _kw(curtailed, n),
        "import_limit_kw": _kw(problem.limits.import_limit_w, n),
        "export_limit_kw": _kw(problem.limits.export_limit_w, n),
        "import_eur_per_kwh": [float(v) for v in problem.prices.import_eur_per_kwh],
        "export_eur_per_kwh": [float(v) for v in problem.prices.export_eur_per_kwh],
        "asset_kind": built.kinds,
        "assets": {asset_id: _kw(plan.power_w.get(asset_id), n) for asset_id in built.kinds},
        "level_kwh": {k: _kw(v, len(v)) for k, v in plan.level_wh.items()},
        "notes": [*built.notes, *plan.notes],
        # the planner's stages skipped or cut short to keep the time limit ("stage: why")
        "skipped": list(getattr(plan, "skipped", [])),
        "violations": violations or [],
    }


def _fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def print_summary(out: Console, name: str, built: BuiltScenario, plan: Plan, data: dict[str, Any]) -> None:
    """A human summary: status, cost and bound, peak against the limits, EVs against targets."""
    limits = built.problem.limits
    fuse_kw = limits.fuse_a * limits.voltage_v * limits.phases / 1000
    head = Table(title=f"Plan of {name}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    colour = "green" if plan.status in ("OPTIMAL", "FEASIBLE") else "yellow"
    head.add_row("status", f"[{colour}]{plan.status}[/]")
    head.add_row("cost", f"{plan.cost_eur:.2f} EUR (energy {plan.energy_cost_eur:.2f}, "
                         f"peak {plan.peak_cost_eur:.2f})")
    gap = "-" if plan.gap is None else f"{plan.gap:.2%}"
    objective = getattr(plan, "objective_eur", None)
    head.add_row("LP bound / gap", f"{_fmt(plan.lp_bound_eur, '.2f', ' EUR')} / {gap} on the objective "
                                   f"{_fmt(objective, '.2f', ' EUR')} (cost + unmet-target penalties)")
    low, high = limits.import_limit_w.min() / 1000, limits.import_limit_w.max() / 1000
    congestion = f", congestion down to {low:g} kW" if low < high else ""
    head.add_row("peak import", f"{plan.peak_w / 1000:.1f} kW (GTV {high:g} kW{congestion}, "
                                f"fuse {limits.fuse_a:g} A x {limits.phases} = {fuse_kw:.1f} kW)")
    head.add_row("max export", f"{max(0.0, -min(data['grid_import_kw'])):.1f} kW "
                               f"(limit {limits.export_limit_w.min() / 1000:g} kW)")
    if any(data["pv_curtailed_kw"]):
        head.add_row("PV curtailed", f"{sum(data['pv_curtailed_kw']) * built.problem.ptu_minutes / 60:.1f} kWh")
    head.add_row("times", f"build {plan.build_s:.3f} s, LP {plan.lp_solve_s:.3f} s, "
                          f"solve {plan.solve_s:.3f} s")
    out.print(head)
    if built.ev_target_wh:
        evs = Table(title="EVs", title_justify="left")
        for col in ("EV", "planned kWh", "target kWh", "requested kWh", "unmet kWh", "reason"):
            evs.add_column(col, justify="left" if col in ("EV", "reason") else "right")
        shown = list(built.ev_target_wh)
        if len(shown) > MAX_EV_ROWS:
            shown = [ev for ev in shown if data["unmet_kwh"][ev] > 0.05][:MAX_EV_ROWS]
            evs.title = (f"EVs: {len(built.ev_target_wh)}, {sum(1 for v in data['unmet_kwh'].values() if v > 0.05)}"
                         f" miss their target (shown, at most {MAX_EV_ROWS}); --json lists all")
        for ev in shown:
            target = built.ev_target_wh[ev]
            planned = data["ev_energy_kwh"][ev]["planned"]
            short = plan.shortfall.get(ev)
            unmet = data["unmet_kwh"][ev]
            evs.add_row(ev, f"{planned:.1f}", f"{target / 1000:.1f}", f"{built.ev_need_wh[ev] / 1000:.1f}",
                        f"[red]{unmet:.1f}[/]" if unmet > 0.05 else "0.0", short.reason if short else "")
        out.print(evs)
    for note in data["notes"]:
        out.print(f"[dim]note:[/] {note}", highlight=False, soft_wrap=True)
    for skipped in data["skipped"]:
        out.print(f"[dim]skipped for time:[/] {skipped}", highlight=False, soft_wrap=True)
    for violation in data["violations"]:
        out.print(f"[bold red]violation:[/] {violation}", highlight=False, soft_wrap=True)


def plan_command(scenario: Path, *, json_out: bool, plot: Path | None, time_limit: float) -> None:
    """Load, convert, plan, check and print one scenario; user mistakes exit 2 without traceback."""
    try:
        parsed = load_scenario(scenario)
        built = scenario_to_problem(parsed)
    except ScenarioError as exc:
        console.print(exc.report(), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except ValueError as exc:  # conversion found something the checks let through
        console.print(f"{scenario}: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    if time_limit <= 0:
        console.print("error: --time-limit must be positive", markup=False)
        raise typer.Exit(2)
    if plot is not None and (plot.suffix.lower() not in PLOT_FORMATS or not plot.parent.is_dir()):
        console.print(f"error: --plot {plot}: give a file in an existing folder ending in "
                      f"{', '.join(PLOT_FORMATS)}", markup=False)
        raise typer.Exit(2)
    plan_site, check_plan = solver_functions()
    started = time.perf_counter()
    with prints_to_stderr():
        plan = plan_site(built.problem, time_limit_s=time_limit)
    wall_s = time.perf_counter() - started
    violations = check_plan(built.problem, plan)
    data = plan_to_json(built, plan, violations)
    data["wall_s"] = round(wall_s, 4)
    if plot is not None:
        from cem.app.plan_plot import plot_plan

        plot_plan(built, plan, plot, title=parsed.name or scenario.stem)
    if json_out:
        typer.echo(json.dumps(data))
    else:
        print_summary(Console(), parsed.name or scenario.name, built, plan, data)
        if plot is not None:
            Console().print(f"plot written to {plot}", soft_wrap=True)
    if violations:
        raise typer.Exit(1)
