"""`cem bench planner`: plan reproducible car-park scenarios built from real data, and time it.

An instance (N EVs, seed) is a workplace car park in the Netherlands on a weekday of October
2019: N sessions drawn with a seeded RNG from the bundled ACN sessions (Caltech + JPL, their
local wall-clock times placed on the Dutch day, +-10 min jitter so replicated sessions differ,
the driver's requested energy as the target, capped at 90 % of what the drawn charger delivers
in the stay), 40 % 1-phase chargers (10-32 A on a random phase)
and 60 % 3-phase (16 or 32 A), 6 A minimum current; a battery, a heat pump with a thermal
buffer and PV sized with N; an office base load; Dutch day-ahead prices of that day (bundled
2019-10 ENTSO-E data with markup, tax and VAT) and PV per kWp of that day (Renewables.ninja).
The GTV is 60 % of the uncontrolled EV peak (every EV at full power from arrival until its
energy is in) plus the base-load and heat-pump peaks, the fuse 10 % above the GTV, and a
congestion window 09:00-11:00 local time (the morning arrival peak) caps import at 60 % of the
GTV, so the limits bind.
Shortfalls therefore come from the site limits (and from departures after the horizon end
being planned pro rata); the scenario tests cover targets that cannot fit at all.

With `live_shape` (the default) every EV also has the departure milestones a live replan
gives it (`cem bench replan`): the OCPP charger RM's fill-level target profile (anything up
to full until the departure, the target at it) and the controller's finish margin (the
target `planner.ev_finish_margin_minutes` before the departure), so both benches solve
problems of one shape.

For each instance: build the Problem (timed as `scenario_s`), call `plan_site`, check the plan
with `check_plan` (violations are printed in red and counted), and report per N the p50/p95 of
build/solve/total seconds and the mean cost, bound and gap. Each run also says how far its
wall time went past the time limit (`over_limit_s`, negative within it; per N the most,
`over_limit_s_max`), which stages the planner skipped or cut short to keep it (`skipped`) and
the wall seconds of each stage it timed (`stage_s`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cem.app.scenario import Scenario, scenario_to_problem
from cem.control_types.frbc import finish_early
from cem.data import PRICES_2019_10, PV_2019_10, bundled
from cem.flex.prices import ptu_prices
from cem.planner.assets import Problem
from cem.site.config import PlannerConfig, PriceConfig
from cem.site.forecast import base_load_w, load_pv_per_kwp, pv_forecast_w
from cem.site.sessions import Session, bundled_acn_sessions, on_local_clock
from sitekit.prices import CsvPriceSource

SITE_TZ = "Europe/Amsterdam"
FINISH_MARGIN_MINUTES = PlannerConfig().ev_finish_margin_minutes  # as a live site plans
BENCH_TARIFF = PriceConfig(markup_eur_per_kwh=0.02, tax_eur_per_kwh=0.10, vat=0.21, feed_in="day_ahead")
# local midnight of 2019-10-01 is 2019-09-30 22:00 UTC, outside the bundled month: start on the 2nd
WORKDAYS = [date(2019, 10, d) for d in range(2, 22) if date(2019, 10, d).weekday() < 5]

_cache: dict[str, Any] = {}


def _sessions() -> list[Session]:
    if "sessions" not in _cache:
        sessions = [s for s in bundled_acn_sessions("both")
                    if s.arrival.weekday() < 5 and 0.5 <= s.dwell_h <= 16 and s.energy_kwh > 0.5]
        _cache["sessions"] = sessions
    return _cache["sessions"]


def _pv_per_kwp() -> dict[datetime, float]:
    if "pv" not in _cache:
        _cache["pv"] = load_pv_per_kwp(bundled(PV_2019_10))
    return _cache["pv"]


def _price_source() -> CsvPriceSource:
    if "prices" not in _cache:
        _cache["prices"] = CsvPriceSource(bundled(PRICES_2019_10))
    return _cache["prices"]


def bench_scenario(n_evs: int, seed: int, ptus: int = 96, ptu_minutes: int = 15) -> Scenario:
    """The benchmark car park with `n_evs` EVs for `seed` (same inputs -> same scenario)."""
    rng = np.random.default_rng([n_evs, seed])
    day = WORKDAYS[int(rng.integers(len(WORKDAYS)))]
    zone = ZoneInfo(SITE_TZ)
    start = datetime.combine(day, datetime.min.time(), tzinfo=zone).astimezone(UTC)
    # keep the horizon inside the bundled month of prices and PV
    last_start = datetime(2019, 11, 1, tzinfo=UTC) - timedelta(minutes=ptu_minutes * ptus)
    start = max(min(start, last_start), datetime(2019, 10, 1, tzinfo=UTC))
    n = ptus
    dt_h = ptu_minutes / 60

    pool = _sessions()
    picks = rng.integers(len(pool), size=n_evs)
    jitter = rng.uniform(-10, 10, size=n_evs)
    one_phase = rng.random(n_evs) < 0.4
    currents_1 = rng.choice([10, 13, 16, 20, 25, 32], size=n_evs)
    currents_3 = rng.choice([16, 32], size=n_evs)
    phase = rng.choice(["L1", "L2", "L3"], size=n_evs)
    priority = np.where(rng.random(n_evs) < 0.1, 2, 1)
    voltage = 230.0
    evs: list[dict[str, Any]] = []
    ev_load = np.zeros(n)
    for k in range(n_evs):
        moved = on_local_clock([pool[int(picks[k])]], day, SITE_TZ)[0]
        shift = timedelta(minutes=float(jitter[k]))
        arrival, departure = moved.arrival + shift, moved.departure + shift
        phases = 1 if one_phase[k] else 3
        amps = int(currents_1[k]) if phases == 1 else int(currents_3[k])
        max_kw = round(amps * voltage * phases / 1000, 3)
        # the driver's request, but no more than 90 % of what the drawn charger can deliver in
        # the stay: a shortfall in the benchmark then comes from the site limits, not the draw
        energy_kwh = min(moved.energy_kwh, 0.9 * max_kw * moved.dwell_h)
        ev: dict[str, Any] = {
            "id": f"ev{k:04d}", "arrival": arrival.isoformat(), "departure": departure.isoformat(),
            "energy_kwh": round(energy_kwh, 3), "max_kw": max_kw,
            "min_kw": round(6 * voltage * phases / 1000, 3), "phases": phases,
            "priority": int(priority[k]),
        }
        if phases == 1:
            ev["phase"] = str(phase[k])
        evs.append(ev)
        # uncontrolled charging: full power from arrival until the energy is in or the EV leaves
        a = max(0, int((arrival - start).total_seconds() // (ptu_minutes * 60)))
        b = min(n, int((departure - start).total_seconds() // (ptu_minutes * 60)))
        full_ptus = int(np.ceil(energy_kwh / (max_kw * dt_h)))
        ev_load[a:min(b, a + full_ptus)] += max_kw

    base = base_load_w(5000 + 1500 * n_evs, start, ptu_minutes, n, profile="office") / 1000
    kwp = 5 + 0.5 * n_evs
    pv = pv_forecast_w(_pv_per_kwp(), kwp, start, ptu_minutes, n) / 1000
    hp_kw = round(3 + 0.05 * n_evs, 1)
    gtv = float(np.ceil(0.6 * ev_load.max() + base.max() + hp_kw))
    fuse_a = float(np.ceil(gtv * 1.1 * 1000 / (3 * voltage)))
    prices = ptu_prices(_price_source(), BENCH_TARIFF, start, ptu_minutes, n).prices
    local_day = start.astimezone(zone).date()
    congestion_start = datetime.combine(local_day, datetime.min.time(), tzinfo=zone) + timedelta(hours=9)
    heat_demand = [round(0.4 * hp_kw * 3.5 * (1.2 if (i * dt_h) % 24 < 8 else 0.9), 3) for i in range(n)]
    battery_kwh = round(10 + 0.5 * n_evs, 1)
    scenario = Scenario.model_validate({
        "name": f"bench car park, {n_evs} EVs, seed {seed}",
        "description": f"ACN sessions of workdays 2019-10 on {day} Europe/Amsterdam; NL prices and PV",
        "start": start.isoformat(), "ptu_minutes": ptu_minutes, "horizon_ptus": n,
        "grid": {"fuse_a": min(fuse_a, 4000.0), "phases": 3, "voltage_v": voltage,
                 "import_limit_kw": gtv,
                 "export_limit_kw": gtv, "peak_price_eur_per_kw": 3.0,
                 "peak_so_far_kw": round(0.3 * gtv, 1)},
        "prices": {"import_eur_per_kwh": [round(float(p), 5) for p in prices.import_eur_per_kwh],
                   "export_eur_per_kwh": [round(float(p), 5) for p in prices.export_eur_per_kwh]},
        "congestion": [{"start": congestion_start.isoformat(),
                        "end": (congestion_start + timedelta(hours=2)).isoformat(),
                        "import_limit_kw": round(0.6 * gtv, 1)}],
        "base_load_kw": [round(float(v), 3) for v in base],
        "pv_kw": [round(float(v), 3) for v in pv],
        "evs": evs,
        "batteries": [{"id": "battery", "capacity_kwh": battery_kwh, "soc_kwh": round(battery_kwh / 2, 1),
                       "min_soc_kwh": round(0.1 * battery_kwh, 1), "max_charge_kw": round(battery_kwh / 2, 1),
                       "max_discharge_kw": round(battery_kwh / 2, 1), "efficiency": 0.9}],
        "heat_pumps": [{"id": "heat_pump", "max_kw": hp_kw, "min_kw": round(hp_kw * 0.3, 1),
                        "buffer_kwh": round(hp_kw * 3.5 * 3, 1), "level_kwh": round(hp_kw * 3.5 * 1.5, 1),
                        "min_level_kwh": round(hp_kw * 3.5 * 0.3, 1), "loss_kw": round(0.02 * hp_kw * 3.5, 2),
                        "demand_kw": heat_demand, "cop": 3.5}],
    })
    # from ~950 EVs the car park's fuse is above the 4000 A a site file may give (a
    # low-voltage connection): set past the check, so every size is the same kind of site
    scenario.grid = scenario.grid.model_copy(update={"fuse_a": fuse_a})
    return scenario


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def with_live_milestones(problem: Problem, margin_minutes: int = FINISH_MARGIN_MINUTES) -> Problem:
    """Each EV with the milestones a live replan gives it (in place; returned)."""
    for asset in problem.storage:
        if asset.kind != "ev" or asset.target_wh is None or asset.available_until is None:
            continue
        end = int(asset.available_until)
        asset.target_profile = [(end, 0, asset.level_max_wh),
                                (end, int(asset.target_wh), asset.level_max_wh)]
        finish_early(asset, margin_minutes, problem.ptu_minutes)
    return problem


def run_instance(n_evs: int, seed: int, ptus: int, time_limit: float,
                 live_shape: bool = True) -> dict[str, Any]:
    """Build, plan and check one instance; return its figures."""
    from cem.app.json_stdout import prints_to_stderr
    from cem.app.plan_cli import solver_functions

    plan_site, check_plan = solver_functions()
    t0 = time.perf_counter()
    built = scenario_to_problem(bench_scenario(n_evs, seed, ptus))
    if live_shape:
        with_live_milestones(built.problem)
    scenario_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with prints_to_stderr():
        plan = plan_site(built.problem, time_limit_s=time_limit)
    total_s = time.perf_counter() - t1
    violations = check_plan(built.problem, plan)
    unmet_wh = sum(s.energy_wh for asset, s in plan.shortfall.items() if asset in built.ev_target_wh)
    return {
        "seed": seed, "status": plan.status, "scenario_s": scenario_s, "build_s": plan.build_s,
        "lp_solve_s": plan.lp_solve_s, "solve_s": plan.solve_s, "total_s": total_s,
        # the plan's wall time past its time limit (negative: within it), and what the
        # planner skipped or cut short to keep it
        "over_limit_s": total_s - time_limit, "skipped": list(getattr(plan, "skipped", [])),
        "stage_s": {k: round(v, 4) for k, v in getattr(plan, "stage_s", {}).items()},
        "cost_eur": plan.cost_eur, "objective_eur": getattr(plan, "objective_eur", None),
        "lp_bound_eur": plan.lp_bound_eur, "gap": plan.gap,
        "peak_kw": plan.peak_w / 1000, "unmet_kwh": unmet_wh / 1000,
        "target_kwh": sum(built.ev_target_wh.values()) / 1000, "violations": violations,
    }


def summarise(n_evs: int, ptus: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-size figures: p50/p95 of the times, means of cost/bound/gap, statuses, violations."""
    out: dict[str, Any] = {"evs": n_evs, "ptus": ptus, "instances": len(runs)}
    for key in ("scenario_s", "build_s", "lp_solve_s", "solve_s", "total_s"):
        values = [r[key] for r in runs]
        out[f"{key}_p50"] = round(_pct(values, 50), 4)
        out[f"{key}_p95"] = round(_pct(values, 95), 4)
    for key in ("cost_eur", "objective_eur", "lp_bound_eur", "gap", "unmet_kwh", "target_kwh", "peak_kw"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.fmean(values), 4) if values else None
    out["gap_max"] = max((r["gap"] for r in runs if r["gap"] is not None), default=None)
    out["over_limit_s_max"] = round(max(r["over_limit_s"] for r in runs), 4) if runs else None
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    out["status"] = statuses
    out["violations"] = sum(len(r["violations"]) for r in runs)
    out["violation_examples"] = [v for r in runs for v in r["violations"]][:5]
    out["runs"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in runs]
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:  # pragma: no cover - both are dependencies
            return None

    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "ortools": installed("ortools"), "highspy": installed("highspy"),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def bench_command(*, evs: list[int], ptus: int, instances: int, time_limit: float, json_out: bool,
                  live_shape: bool = True) -> None:
    """Run the planner benchmark and print a table (or one JSON object with --json)."""
    err = Console(stderr=True)
    if not evs or any(n < 1 for n in evs):
        err.print("[bold red]error:[/] --evs must be at least 1")
        raise typer.Exit(2)
    if ptus < 4 or ptus > 2000 or instances < 1 or time_limit <= 0:
        err.print("[bold red]error:[/] need --ptus 4..2000, --instances >= 1, --time-limit > 0")
        raise typer.Exit(2)
    results = []
    with Progress(console=err, transient=True, disable=json_out) as progress:
        task = progress.add_task("planning", total=len(evs) * instances)
        for n_evs in evs:
            runs = []
            for seed in range(instances):
                progress.update(task, description=f"{n_evs} EVs, instance {seed + 1}/{instances}")
                run = run_instance(n_evs, seed, ptus, time_limit, live_shape)
                for violation in run["violations"]:
                    err.print(f"[bold red]VIOLATION[/] {n_evs} EVs seed {seed}: {violation}", highlight=False)
                runs.append(run)
                progress.advance(task)
            results.append(summarise(n_evs, ptus, runs))
    report = {"results": results, "time_limit_s": time_limit, "live_shape": live_shape,
              "machine": machine()}
    if json_out:
        typer.echo(json.dumps(report))
    else:
        print_table(report)
    if any(r["violations"] for r in results):
        raise typer.Exit(1)


def print_table(report: dict[str, Any]) -> None:
    """Two narrow tables per size: times (p50/p95 s) and plan quality (means over instances)."""
    out = Console()
    shape = "live EV milestones" if report.get("live_shape") else "no milestones"
    times = Table(title=f"cem bench planner: times in s (p50/p95), time limit {report['time_limit_s']} s, "
                        f"{shape}, {report['machine']['cpus']} CPUs", title_justify="left")
    for col in ("EVs", "status", "build", "LP", "solve", "total", "over limit"):
        times.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
    quality = Table(title="plan quality (means over instances, EUR)", title_justify="left")
    for col in ("EVs", "cost", "objective", "LP bound", "gap", "max gap", "unmet kWh", "viol."):
        quality.add_column(col, justify="right", no_wrap=True)
    for r in report["results"]:
        status = ", ".join(f"{k} x{v}" for k, v in r["status"].items())
        times.add_row(str(r["evs"]), status, f"{r['build_s_p50']:.2f}/{r['build_s_p95']:.2f}",
                      f"{r['lp_solve_s_p50']:.2f}/{r['lp_solve_s_p95']:.2f}",
                      f"{r['solve_s_p50']:.2f}/{r['solve_s_p95']:.2f}",
                      f"{r['total_s_p50']:.2f}/{r['total_s_p95']:.2f}",
                      "-" if r.get("over_limit_s_max") is None else f"{r['over_limit_s_max']:+.2f}")
        gap = "-" if r["gap"] is None else f"{r['gap']:.1%}"
        gap_max = "-" if r["gap_max"] is None else f"{r['gap_max']:.1%}"

        def eur(key: str, row: dict[str, Any] = r) -> str:
            return "-" if row[key] is None else f"{row[key]:.2f}"

        quality.add_row(str(r["evs"]), eur("cost_eur"), eur("objective_eur"), eur("lp_bound_eur"), gap,
                        gap_max, f"{r['unmet_kwh']:.1f}/{r['target_kwh']:.0f}",
                        f"[bold red]{r['violations']}[/]" if r["violations"] else "0")
    out.print(times)
    out.print(quality)
    out.print("[dim]objective = cost + unmet-target penalties: the LP bound and the gap refer to it; "
              "a plan no replan follows may raise its bound by what the EVs' minimum power adds "
              "(still a lower bound; its notes say by how much); "
              "unmet kWh = EV shortfall / EV target.[/]")
