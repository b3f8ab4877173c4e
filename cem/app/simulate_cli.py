"""`cem simulate`: run the levels of smart charging on real sessions and report the KPIs.

Virtual time, no sleeping: each level runs PTU by PTU through the same physics. The per-replan
time limit is the site's `planner.time_limit_s`; the perfect-foresight optimum gets
`optimum_time_limit` (10 x that per simulated day, between 5 and 60 s). Progress goes to
stderr; with `--json` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cem.app.json_stdout import prints_to_stderr
from cem.app.site_file import load_site_file
from cem.simulation.engine import LevelRun, reachable_wh, run_level
from cem.simulation.inputs import (
    OCPP16_SHARE_DEFAULT,
    SimInputs,
    SimulationError,
    load_inputs,
    parse_start,
)
from cem.simulation.kpis import (
    cost_per_day,
    early_leavers,
    level_kpis,
    reference_layout,
    session_kpis,
)
from cem.simulation.levels import LEVEL_NAMES, make_controller
from sitekit.config import ConfigError

LEVELS = ("1", "2", "3", "4", "5")
DEFAULT_PV_KWP = 100.0
WORKERS = 2

console = Console(stderr=True)


def _fail(message: str, hint: str = "") -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    if hint:
        console.print(f"  [dim]hint:[/] {hint}")
    return typer.Exit(2)


def parse_levels(text: str) -> list[str]:
    """`--levels 1,2,5` -> ['1', '2', '5'] (the optimum row is always added by the run)."""
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [w for w in wanted if w not in (*LEVELS, "optimum")]
    if unknown or not wanted:
        raise SimulationError(f"unknown level(s) {unknown or [text]}: use a comma list of 1-5, "
                              f"e.g. --levels 1,2,3,4,5")
    return [lv for lv in (*LEVELS, "optimum") if lv in wanted]


def optimum_time_limit(time_limit_s: float, days: int) -> float:
    return max(5.0, min(60.0, 10.0 * time_limit_s * days))


def run_simulation(inputs: SimInputs, levels: list[str], *, show_progress: bool = True,
                   workers: int = WORKERS) -> tuple[dict[str, LevelRun], dict[str, Any]]:
    """Run the levels (and the optimum when the planner is there); return runs and controllers."""
    time_limit = inputs.config.planner.time_limit_s
    opt_limit = optimum_time_limit(time_limit, len(inputs.days))
    runs: dict[str, LevelRun] = {}
    controllers: dict[str, Any] = {}
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description:<36}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("PTUs"), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as bar:
        tasks = {lv: bar.add_task(f"level {lv}: {LEVEL_NAMES[lv]}" if lv != "optimum"
                                  else "optimum: perfect foresight", total=inputs.n_ptus, info="")
                 for lv in levels}
        for lv in levels:
            task = tasks[lv]
            if lv == "optimum":
                bar.update(task, info=f"solving one problem (limit {opt_limit:g} s)")
            controller = make_controller(lv, inputs, time_limit_s=time_limit,
                                         optimum_time_limit_s=opt_limit, workers=workers)
            controllers[lv] = controller

            def advance(k: int, task: Any = task, controller: Any = controller) -> None:
                replans = len(controller.replan_s)
                bar.update(task, advance=k, info=f"{replans} plans" if replans else "")

            runs[lv] = run_level(inputs, controller, progress=advance)
            bar.update(task, info=f"done in {runs[lv].wall_s:.1f} s")
    return runs, controllers


def optimum_plan_kpis(controller: Any) -> dict[str, Any]:
    """How good the reference is: the optimum's plan (status, its objective on the problem it
    solved, the bound and the relative gap between them, what the bound is, the time limit).
    `objective_eur` of the optimum row is its realised run, further above the bound by what
    the EV taper keeps from the plan (`planned_kwh` - `delivered_kwh`), not by the solver."""
    plan = controller.plan
    bound = plan.lp_bound_eur
    return {
        "objective_bound_eur": None if bound is None else round(float(bound), 2),
        "plan_status": plan.status,
        "plan_objective_eur": round(float(plan.objective_eur), 2),
        "plan_gap": None if plan.gap is None else round(float(plan.gap), 8),
        "bound_from": plan.bound_from,
        "time_limit_s": round(float(controller.time_limit_s), 2),
    }


def summarise(inputs: SimInputs, runs: dict[str, LevelRun], controllers: dict[str, Any]) -> dict[str, Any]:
    """KPIs of every level, plus per-level notes, in the shape of the JSON output."""
    reference = reference_layout(inputs)
    reachable = reachable_wh(inputs)
    early = early_leavers(inputs)
    out: dict[str, Any] = {}
    for lv, run in runs.items():
        kpis = level_kpis(inputs, run, reference)
        controller = controllers[lv]
        statuses = getattr(controller, "statuses", None)
        if statuses:
            kpis["plan_statuses"] = dict(statuses)
        if hasattr(controller, "guard_actions"):
            kpis["guard_actions"] = controller.guard_actions
        if lv == "optimum":
            kpis.update(optimum_plan_kpis(controller))
        kpis["cost_per_day_eur"] = [round(c, 2) for c in cost_per_day(inputs, run)]
        if "optimum" in runs:
            kpis.update(session_kpis(run.delivered_wh, runs["optimum"].achievable_wh, reachable,
                                     early))
        if run.planned_wh is not None:
            kpis["planned_kwh"] = round(float(run.planned_wh.sum()) / 1000, 1)
        out[lv] = kpis
    return out


def simulate_command(*, site_file: Path, sessions_file: Path, prices: Path, pv: Path | None,
                     start: str, days: int, levels: str, report: Path, json_out: bool,
                     pv_kwp: float | None = None, pv_forecast: str = "perfect",
                     ocpp16_share: float = OCPP16_SHARE_DEFAULT, ev_taper: bool = True) -> None:
    """Load the inputs, run every level, write the report and print the KPI table (or JSON)."""
    started = time.perf_counter()
    try:
        config = load_site_file(site_file)
    except ConfigError as exc:
        console.print(exc.report(), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    try:
        wanted = parse_levels(levels)
        first_day = parse_start(start)
        if days < 1:
            raise SimulationError("--days must be at least 1")
        if pv_kwp is not None and pv_kwp < 0:
            raise SimulationError("--pv-kwp must be 0 or more")
        kwp = (DEFAULT_PV_KWP if pv_kwp is None else pv_kwp) if pv is not None else 0.0
        inputs = load_inputs(config, sessions_file, prices, pv, first_day, days, kwp,
                             ocpp=config.ocpp, pv_forecast=pv_forecast,
                             ocpp16_share=ocpp16_share, ev_taper=ev_taper)
        if any(lv in wanted for lv in ("4", "5")) and "optimum" not in wanted:
            wanted.append("optimum")
        elif "optimum" not in wanted:
            try:
                from cem.simulation.levels import site_planner

                site_planner()
                wanted.append("optimum")
            except SimulationError:
                inputs.notes.append("no site planner: the optimum row is left out")
        console.print(f"[bold]cem simulate[/] {config.site.name}: {len(inputs.sessions)} sessions, "
                      f"{len(inputs.evses)} EVSEs, {days} day(s) from {first_day} "
                      f"({inputs.n_ptus} PTUs), levels {', '.join(wanted)}", highlight=False)
        with prints_to_stderr():
            runs, controllers = run_simulation(inputs, wanted)
            kpis = summarise(inputs, runs, controllers)
    except SimulationError as exc:
        raise _fail(str(exc)) from None
    runtime = time.perf_counter() - started
    from cem.app.simulate_report import write_report

    try:
        files = write_report(report, inputs, runs, kpis, controllers, runtime_s=runtime,
                             command=" ".join(sys.argv))
    except OSError as exc:
        raise _fail(f"cannot write the report to {report}: {exc}") from None
    if json_out:
        payload = {"levels": kpis, "runtime_s": round(runtime, 1), "report": str(files["md"])}
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()
        return
    print_table(kpis)
    console.print(f"report: {files['md']} and {files['html']} ({runtime:.0f} s)")


SHORT_NAMES = {"1": "1 uncontrolled", "2": "2 timer", "3": "3 per-EV price", "4": "4 day plan",
               "5": "5 MPC + guard", "optimum": "optimum"}


def print_table(kpis: dict[str, Any]) -> None:
    """The KPI table on stdout (at least 120 columns wide, also when piped)."""
    table = Table(title="KPIs per level (the report has them all)")
    cols = [("level", ""), ("cost EUR", "cost_eur"), ("EUR/kWh", "eur_per_kwh"),
            ("peak kW", "peak_kw"), ("PTUs>GTV", "ptus_over_gtv"), ("fuse min", "fuse_minutes_over"),
            ("kWh", "delivered_kwh"), ("of need", "delivered_pct"), ("served", "served_sessions"),
            ("session p5", "session_ratio_p5"),
            ("PV self-use", "self_consumption"), ("EV from PV", "pv_share_of_ev"),
            ("plan p50/p95 s", "replan_p95_s")]
    for title, _ in cols:
        table.add_column(title, justify="left" if title == "level" else "right", no_wrap=True)
    for lv, k in kpis.items():
        row = [SHORT_NAMES[lv]]
        for _, key in cols[1:]:
            value = k.get(key)
            if key in ("self_consumption", "pv_share_of_ev"):
                row.append("-" if value is None else f"{100 * value:.0f}%")
            elif key == "served_sessions":
                row.append(f"{value}/{k['sessions']}")
            elif key == "delivered_pct":
                row.append(f"{value:.1f}%")
            elif key == "session_ratio_p5":
                row.append("-" if value is None else f"{value:.2f}")
            elif key == "replan_p95_s":
                row.append(f"{k['replan_p50_s']:.3f}/{value:.3f}" if k.get("replans") else "-")
            else:
                row.append("-" if value is None else f"{value:g}")
        table.add_row(*row)
    out = Console()
    if not out.is_terminal or out.width < 120:
        out = Console(width=max(out.width, 150))
    out.print(table)
