"""What `cem demo` shows: a live terminal view (rich Live), plain progress lines when stdout is
not a terminal, the closing summary, and the report folder (PNG plots, summary.md, summary.json).

Every figure here is measured on the simulated devices (the grid meter simulator, the
chargers' EVs), not taken from what the CEM believes, so the summary checks the CEM.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cem.app.common import fail, load_config_or_exit
from cem.app.demo import (
    SOURCE_DEMO,
    DemoError,
    DemoSettings,
    DemoSite,
    _configure_logging,
    _prepare_report,
    process_clock,
    run_demo,
    settings_for,
    with_demo_prices,
)
from cem.app.site_file import SiteFile
from sitekit import clock

BARS = " ▁▂▃▄▅▆▇█"


def _local(moment: datetime, settings: DemoSettings) -> datetime:
    return moment.astimezone(ZoneInfo(settings.timezone))


def sparkline(values: list[float], top: float) -> str:
    """One character per value, scaled to `top`."""
    if top <= 0:
        return ""
    out = []
    for value in values:
        share = min(1.0, max(0.0, value / top))
        out.append(BARS[round(share * (len(BARS) - 1))])
    return "".join(out)


@dataclass
class Now:
    """The site at this moment, as the view shows it."""

    at: datetime
    grid_kw: float
    phase_a: float
    fuse_a: float
    limit_kw: float
    limit_name: str
    avg_kw: float  # this PTU so far
    price: float
    devices: dict[str, float] = field(default_factory=dict)
    soc: float | None = None
    buffer_c: float | None = None


def current(demo: DemoSite) -> Now | None:
    """What the view needs from the latest sample."""
    rec = demo.recorder
    if not rec.samples:
        return None
    sample = rec.samples[-1]
    t = min(max(rec.ptu_of(sample.at), 0), demo.settings.n_ptus - 1)
    limit_w = float(rec.import_limit_w[t])
    gtv = demo.site.grid.import_limit_kw * 1000
    covered = float(rec.covered_s[t])
    net_wh = float(rec.import_wh[t] - rec.export_wh[t])
    return Now(at=sample.at, grid_kw=sum(sample.phase_w) / 1000,
               phase_a=max(abs(p) for p in sample.phase_w) / rec.voltage_v, fuse_a=rec.fuse_a,
               limit_kw=limit_w / 1000, limit_name="congestion" if limit_w < gtv else "GTV",
               avg_kw=net_wh * 3.6 / covered if covered > 0 else sum(sample.phase_w) / 1000,
               price=float(rec.import_price[t]), devices=dict(sample.devices_w),
               soc=sample.soc_pct, buffer_c=sample.buffer_c)


def plan_words(demo: DemoSite) -> str:
    controller = demo.controller
    plan = getattr(controller, "plan", None)
    if plan is None:
        return "no plan yet"
    gap = f", gap {plan.gap * 100:.1f}%" if plan.gap is not None else ""
    return (f"{plan.status.lower()}{gap}, solved in {plan.solve_s:.2f} s, "
            f"{controller.replans} replans, {len(controller.guard_actions)} guard actions")


class LiveView:
    """rich Live: RMs, site power against the limits, price, EVs, the plan."""

    def __init__(self, console: Console, settings: DemoSettings) -> None:
        self.console = console
        self.settings = settings
        self.live = Live(console=console, auto_refresh=False, transient=False)
        self._last = 0.0

    def intro(self, site: SiteFile, settings: DemoSettings, log_file: Path) -> None:
        self.console.print(intro_text(site, settings, log_file), highlight=False)

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def update(self, demo: DemoSite) -> None:
        if time.monotonic() - self._last < 0.2:
            return
        self._last = time.monotonic()
        self.live.update(render(demo, self.console.width), refresh=True)


class ProgressLines:
    """One plain line per simulated hour (for logs, pipes and CI)."""

    def __init__(self, console: Console, settings: DemoSettings) -> None:
        self.console = console
        self.settings = settings
        self._next: datetime | None = None

    def intro(self, site: SiteFile, settings: DemoSettings, log_file: Path) -> None:
        self.console.print(intro_text(site, settings, log_file), highlight=False, soft_wrap=True)

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, demo: DemoSite) -> None:
        state = current(demo)
        if state is None:
            return
        if self._next is None:
            self._next = state.at
        if state.at < self._next:
            return
        self._next = state.at.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        self.console.print(progress_line(demo, state), highlight=False, soft_wrap=True)


def _with_dashboard_url(out: Console, site: SiteFile,
                        update: Callable[[DemoSite], None]) -> Callable[[DemoSite], None]:
    """Print the dashboard's URL (and a token for changes) once it serves, then `update`."""
    if site.http.enabled and not site.http.tokens:
        import secrets

        from cem.site.config import RmToken

        site.http.tokens.append(RmToken(name="demo", token=secrets.token_urlsafe(18)))
    shown = False

    def on_tick(demo: DemoSite) -> None:
        nonlocal shown
        web = getattr(demo.service, "web", None)
        if not shown and web is not None:
            shown = True
            token = site.http.tokens[0].token if site.http.tokens else ""
            out.print(f"dashboard: {web.url} (API: {web.url}docs; token for changes: {token})",
                      highlight=False, soft_wrap=True)
        update(demo)

    return on_tick


def intro_text(site: SiteFile, settings: DemoSettings, log_file: Path) -> str:
    start = _local(settings.start, settings)
    return (f"cem demo: {site.site.name}, {start:%a %d %b %Y} from {start:%H:%M} "
            f"({settings.timezone}), {settings.speed:g}x real time, "
            f"{settings.wall_seconds:.0f} s of wall time ({settings.sim_seconds / 3600:.1f} h "
            f"simulated). Ctrl-C stops. Log: {log_file}")


def progress_line(demo: DemoSite, state: Now) -> str:
    live = demo.live_visits()
    delivered = sum(o.delivered_kwh for o, _, _ in live)
    need = sum(o.target_kwh for o, _, _ in live)
    soc = f", battery {state.soc:.0f}%" if state.soc is not None else ""
    return (f"{_local(state.at, demo.settings):%H:%M} site {state.grid_kw:6.1f} kW "
            f"(PTU avg {state.avg_kw:5.1f} / {state.limit_name} {state.limit_kw:.0f} kW, "
            f"phase {state.phase_a:4.1f}/{state.fuse_a:.0f} A), "
            f"price {state.price:.3f} EUR/kWh, {len(live)} EV(s) {delivered:.0f}/{need:.0f} kWh"
            f"{soc}; {len(demo.rm_rows())} RMs; plan: {plan_words(demo)}")


CONTROL_SHORT = {"FILL_RATE_BASED_CONTROL": "FRBC", "POWER_ENVELOPE_BASED_CONTROL": "PEBC",
                 "POWER_PROFILE_BASED_CONTROL": "PPBC", "OPERATION_MODE_BASED_CONTROL": "OMBC",
                 "DEMAND_DRIVEN_BASED_CONTROL": "DDBC", "NOT_CONTROLABLE": "not controllable",
                 "NO_SELECTION": "none yet"}


def render(demo: DemoSite, width: int = 160) -> Any:
    """The live view as one rich renderable (about 20 lines; tables stacked when narrow)."""
    settings = demo.settings
    state = current(demo)
    if state is None:
        return Text("starting the CEM, the OCPP central system, the chargers and the Modbus "
                    "devices ...")
    head = Text()
    head.append(f"{_local(state.at, settings):%a %d %b %H:%M}", style="bold")
    head.append(f"  ({settings.speed:g}x)   ")
    over = state.avg_kw > state.limit_kw
    head.append(f"site {state.grid_kw:5.1f} kW", style="bold")
    head.append(f", this PTU {state.avg_kw:5.1f} kW of {state.limit_kw:.0f} kW "
                f"{state.limit_name}", style="red" if over else "green")
    head.append("   ")
    head.append(f"phase max {state.phase_a:4.1f} A of {state.fuse_a:.0f} A fuse",
                style="red" if state.phase_a > state.fuse_a else "green")
    head.append(f"   price {state.price:.3f} EUR/kWh")

    controls = {name: CONTROL_SHORT.get(control, control) for name, control in demo.rm_rows()}
    rms = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="resource managers (measured)",
                title_justify="left")
    for column, justify in (("RM", "left"), ("S2", "left"), ("kW", "right"), ("", "left")):
        rms.add_column(column, justify=justify)  # type: ignore[arg-type]
    notes = {"battery": f"SoC {state.soc:.0f} %" if state.soc is not None else "",
             "heat pump": f"buffer {state.buffer_c:.1f} °C" if state.buffer_c is not None
             else ""}
    for name, watts in state.devices.items():
        if name in ("EV chargers", "base load"):
            continue
        rms.add_row(name, controls.get(name, "-"), f"{watts / 1000:.1f}", notes.get(name, ""))
    meter = next((n for n in controls if "meter" in n), None)
    if meter is not None:
        rms.add_row(meter, controls[meter], f"{state.grid_kw:.1f}", "whole site")
    rms.add_row("(base load)", "", f"{state.devices.get('base load', 0) / 1000:.1f}", "no RM")

    evs = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="EV chargers (OCPP -> S2 RM per EVSE)",
                title_justify="left")
    for column in ("EVSE", "OCPP", "S2", "EV", "kW", "kWh of target", "leaves"):
        evs.add_column(column, justify="right" if column in ("kW",) else "left")
    plugged = {o.where: (o, evse) for o, _station, evse in demo.live_visits()}
    for station in demo.stations:
        for evse in station.evses.values():
            where = f"{station.cp_id}/{evse.evse_id}"
            control = controls.get(f"EV charger {where}", "-")
            entry = plugged.get(where)
            if entry is None:
                evs.add_row(where, station.version, control, "", "", "", "")
                continue
            outcome, _ = entry
            share = outcome.delivered_kwh / outcome.target_kwh if outcome.target_kwh > 0 else 1
            bar = "█" * round(min(1.0, share) * 10) + "·" * (10 - round(min(1.0, share) * 10))
            evs.add_row(where, station.version, control, outcome.visit.id_tag,
                        f"{evse.power_w / 1000:.1f}",
                        f"{bar} {outcome.delivered_kwh:4.1f}/{outcome.target_kwh:4.1f}",
                        f"{_local(outcome.visit.departure, settings):%H:%M}")
    done = [o for o in demo.outcomes if o.left and o.where]
    away = [o for o in demo.outcomes if o.left and not o.where]
    foot = Text(f"{len(done)} EV(s) left, {sum(o.met for o in done)} with their target; "
                f"{len(away)} drove on (every EVSE busy)", style="dim")

    plan_text = Text(f"plan: {plan_words(demo)}")
    controller = demo.controller
    plan = getattr(controller, "plan", None)
    problem = getattr(controller, "problem", None)
    if plan is not None and problem is not None:
        now_t = max(0, int((clock.now() - problem.start).total_seconds() // 900))
        grid = [float(x) / 1000 for x in plan.grid_import_w[now_t:now_t + 48]]
        limits = [float(x) / 1000 for x in problem.limits.import_limit_w[now_t:now_t + 48]]
        prices = [float(x) for x in problem.prices.import_eur_per_kwh[now_t:now_t + 48]]
        top = max([*limits, *grid, 1.0])
        plan_text.append("\nnext 12 h  planned import ")
        plan_text.append(sparkline(grid, top), style="cyan")
        plan_text.append("\n           import limit   ")
        plan_text.append(sparkline(limits, top), style="yellow")
        if prices:
            low, high = min(prices), max(prices)
            plan_text.append("\n           price          ")
            plan_text.append(sparkline([p - low + (high - low) * 0.1 for p in prices],
                                       (high - low) * 1.1 or 1.0), style="green")
    if width >= 140:
        tables: Any = _side_by_side(rms, evs)
    else:  # an 80 x 24 terminal: the RMs as two lines, the EV table without its title
        parts = [f"{name} {controls.get(name, '-')} {watts / 1000:.1f} kW"
                 + (f" ({notes[name]})" if notes.get(name) else "")
                 for name, watts in state.devices.items()
                 if name not in ("EV chargers", "base load")]
        if meter is not None:
            parts.append(f"{meter} {controls[meter]}")
        evs.title = None
        tables = Group(Text("RMs: " + " · ".join(parts), style="dim"), evs)
    return Panel(Group(head, tables, foot, plan_text),
                 title=f"cem demo: {demo.site.site.name}", subtitle="Ctrl-C stops",
                 expand=False)


def _side_by_side(*tables: Table) -> Table:
    grid = Table.grid(padding=(0, 2))
    for _ in tables:
        grid.add_column()
    grid.add_row(*tables)
    return grid


# --- the summary and the report -----------------------------------------------------------------


def summarise(demo: DemoSite) -> dict[str, Any]:
    """Energy, cost, peak, EV targets and limits, measured on the simulated site."""
    demo.judge_visits()
    totals = demo.recorder.totals()
    controller = demo.controller
    visits = [o for o in demo.outcomes if o.where]
    left = [o for o in visits if o.left]
    profiles = charging_profiles(demo)
    over_max = [p for p in profiles if p["unit"] == "A" and p["limit"] > p["max_current_a"] + 0.01]
    plan = getattr(controller, "plan", None)
    simulated_s = (demo.recorder.samples[-1].at - demo.settings.start).total_seconds() \
        if demo.recorder.samples else 0.0
    return {
        "site": demo.site.site.name,
        "day": demo.settings.day.isoformat(),
        "speed": demo.settings.speed,
        "stopped_by": demo.stopped_by,
        "wall_s": round(time.monotonic() - demo.started_wall, 1),
        "simulated_h": round(simulated_s / 3600, 2),
        "rms_connected": demo.max_rms,
        "rms_expected": sum(cp.evses for cp in demo.site.ocpp.charge_points)
        + len(demo.site.modbus.devices or [1, 2, 3, 4]),
        "replans": int(getattr(controller, "replans", 0) or 0),
        "guard_actions": len(getattr(controller, "guard_actions", []) or []),
        "last_plan_status": plan.status if plan is not None else None,
        "import_kwh": round(totals["import_kwh"], 2),
        "export_kwh": round(totals["export_kwh"], 2),
        "cost_eur": round(totals["cost_eur"], 2),
        "peak_kw": round(totals["peak_kw"], 2),
        "peak_limit_kw": round(totals["peak_limit_kw"], 2),
        "min_headroom_kw": round(totals["min_headroom_kw"], 2),
        "ptus": int(totals["ptus"]),
        "ptus_over_limit": int(totals["ptus_over_limit"]),
        "max_phase_a": round(totals["max_phase_a"], 1),
        "fuse_a": totals["fuse_a"],
        "fuse_never_exceeded": totals["max_phase_a"] <= totals["fuse_a"] + 1e-6,
        "minutes_over_fuse": round(totals["over_fuse_minutes"], 1),
        "highest_phase_current_at": _worst(demo),
        "limits_never_exceeded": totals["ptus_over_limit"] == 0,
        "ev_visits": len(demo.outcomes),
        "ev_charged": len(visits),
        "ev_drove_on": len(demo.outcomes) - len(visits),
        "ev_left": len(left),
        "ev_targets_met": sum(o.met for o in left),
        "ev_left_before_known_departure": sum(o.left_early for o in left),
        "ev_targets_met_when_departure_known": sum(o.met for o in left if not o.left_early),
        # why the others did not get their target (see VisitOutcome.outcome): these and
        # ev_targets_met add up to ev_left (an EV that left early with its target is met)
        "ev_left_early": sum(o.outcome == "left-early" for o in left),
        "ev_ev_limited": sum(o.outcome == "ev-limited" for o in left),
        "ev_stay_limited": sum(o.outcome == "stay-limited" for o in left),
        "ev_site_limited": sum(o.outcome == "site-limited" for o in left),
        "ev_missed": sum(o.outcome == "missed" for o in left),
        "ev_missed_by_cem": [f"{o.visit.id_tag}: {o.reason(demo.settings.speed)}"
                             for o in left if o.outcome == "missed"],
        "ev_energy_kwh": round(sum(o.delivered_kwh for o in visits), 2),
        "charging_profiles": len(profiles),
        "charging_profiles_over_max": len(over_max),
        "max_profile_limit_a": max((p["limit"] for p in profiles if p["unit"] == "A"),
                                   default=0.0),
    }


def _worst(demo: DemoSite) -> dict[str, Any] | None:
    """When the highest phase current was measured, and what drew it."""
    worst = demo.recorder.worst
    if worst is None:
        return None
    return {"at": _local(worst.at, demo.settings).isoformat(timespec="seconds"),
            "phase_a": [round(p / demo.recorder.voltage_v, 1) for p in worst.phase_w],
            "devices_kw": {k: round(v / 1000, 2) for k, v in worst.devices_w.items()},
            "evse_kw": {k: round(v / 1000, 2) for k, v in worst.evse_w.items() if v}}


def charging_profiles(demo: DemoSite) -> list[dict[str, Any]]:
    """Every charging profile the simulated chargers received, with their EVSE's maximum."""
    out = []
    for station in demo.stations:
        for entry in station.profile_log:
            evse = station.evses.get(entry["evse_id"])
            out.append({**entry, "cp_id": station.cp_id, "version": station.version,
                        "max_current_a": evse.max_current_a if evse else
                        max(e.max_current_a for e in station.evses.values())})
    return out


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    ok = "[green]yes[/]" if summary["fuse_never_exceeded"] else "[red]NO[/]"
    ok_limit = "[green]yes[/]" if summary["limits_never_exceeded"] else "[red]NO[/]"
    table = Table(title=f"demo summary: {summary['site']}, {summary['day']} "
                        f"({summary['simulated_h']:.1f} h simulated in {summary['wall_s']:.0f} s; "
                        f"{summary['stopped_by']})", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("RMs connected", f"{summary['rms_connected']} of {summary['rms_expected']}"),
        ("replans / guard actions", f"{summary['replans']} / {summary['guard_actions']}"),
        ("energy imported / exported", f"{summary['import_kwh']:.1f} / "
                                       f"{summary['export_kwh']:.1f} kWh"),
        ("energy cost", f"{summary['cost_eur']:.2f} EUR"),
        ("peak (15-min average)", f"{summary['peak_kw']:.1f} kW (limit then "
                                  f"{summary['peak_limit_kw']:.0f} kW)"),
        ("import limit kept in every PTU", f"{ok_limit} ({summary['ptus_over_limit']} of "
                                           f"{summary['ptus']} PTUs over)"),
        ("fuse never exceeded", f"{ok} (max {summary['max_phase_a']:.1f} A of "
                                f"{summary['fuse_a']:g} A, {summary['minutes_over_fuse']:g} "
                                "min over)"),
        ("EVs charged / drove on", f"{summary['ev_charged']} / {summary['ev_drove_on']}"),
        ("EVs left with their target", f"{summary['ev_targets_met']} of {summary['ev_left']}"),
        ("... of those staying as long as the CEM knew",
         f"{summary['ev_targets_met_when_departure_known']} of "
         f"{summary['ev_left'] - summary['ev_left_before_known_departure']}"),
        ("... the others: why", f"{summary['ev_left_early']} left before the "
                                f"CEM's departure, {summary['ev_ev_limited']} EV-limited, "
                                f"{summary['ev_stay_limited']} stay too short, "
                                f"{summary['ev_site_limited']} held by the site's limits, "
                                f"{summary['ev_missed']} missed by the CEM"),
        ("EV energy delivered", f"{summary['ev_energy_kwh']:.1f} kWh"),
        ("charging profiles sent", f"{summary['charging_profiles']} (max "
                                   f"{summary['max_profile_limit_a']:g} A, "
                                   f"{summary['charging_profiles_over_max']} above the EVSE)"),
    ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    for line in summary["ev_missed_by_cem"]:
        console.print(f"missed by the CEM: {line}", highlight=False, soft_wrap=True)


def write_report(demo: DemoSite, summary: dict[str, Any]) -> list[Path]:
    """PNG plots, summary.md and summary.json in the report folder; returns the files."""
    folder = demo.settings.report
    folder.mkdir(parents=True, exist_ok=True)
    written = [*plot_report(demo, folder)]
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    written.append(folder / "summary.json")
    profiles = folder / "charging_profiles.csv"
    with profiles.open("w", newline="", encoding="utf-8") as handle:
        columns = ["cp_id", "version", "evse_id", "purpose", "limit", "unit", "phases",
                   "max_current_a", "transaction_id", "accepted"]
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(charging_profiles(demo))
    written.append(profiles)
    visits = folder / "ev_visits.csv"
    with visits.open("w", newline="", encoding="utf-8") as handle:
        rows = csv.writer(handle)
        rows.writerow(["ev", "evse", "ocpp", "arrival", "departure", "requested_kwh",
                         "cem_need_kwh", "cem_departure", "battery_room_kwh", "target_kwh",
                         "delivered_kwh", "met", "left", "left_before_cem_departure",
                         "offered_kwh", "ev_refused_kwh", "below_full_kwh",
                         "below_full_at_limits_kwh", "waited_min",
                         "outcome", "reason"])
        for o in demo.outcomes:
            rows.writerow([
                o.visit.id_tag, o.where or "drove on", o.version,
                _local(o.visit.arrival, demo.settings).isoformat(timespec="minutes"),
                _local(o.visit.departure, demo.settings).isoformat(timespec="minutes"),
                o.visit.energy_kwh, "" if o.need_kwh is None else round(o.need_kwh, 2),
                "" if o.cem_departure is None else
                _local(o.cem_departure, demo.settings).isoformat(timespec="minutes"),
                round(o.room_kwh, 2), round(o.target_kwh, 2) if o.where else "",
                round(o.delivered_kwh, 2), o.met if o.where else "", o.left, o.left_early,
                round(o.offered_kwh, 2), round(o.refused_kwh, 2), round(o.held_kwh, 2),
                round(o.held_at_limit_kwh, 2),
                "" if o.waited_s is None else round(o.waited_s / 60, 1),
                o.outcome if o.where and o.left else "",
                o.reason(demo.settings.speed) if o.where and o.left else ""])
    written.append(visits)
    lines = [f"# cem demo: {summary['site']}", "",
             f"Simulated {summary['simulated_h']:.1f} h of {summary['day']} at "
             f"{summary['speed']:g}x in {summary['wall_s']:.0f} s of wall time "
             f"({summary['stopped_by']}). Figures are measured on the simulated grid meter and "
             "EVs.", "", "| what | value |", "|---|---|"]
    for key, value in summary.items():
        if key in ("site", "day"):
            continue
        if isinstance(value, list):
            value = "; ".join(str(v) for v in value) or "none"
        lines.append(f"| {key.replace('_', ' ')} | {value} |")
    lines += ["", "Plots: " + ", ".join(f"![{p.stem}]({p.name})" for p in written
                                        if p.suffix == ".png"), ""]
    (folder / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    written.append(folder / "summary.md")
    return written


def plot_report(demo: DemoSite, folder: Path) -> list[Path]:
    """Power per device against the limits, and prices, per PTU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = demo.recorder
    settings = demo.settings
    n = max(1, min(settings.n_ptus, rec.ptu_of(rec.samples[-1].at) + 1 if rec.samples else 1))
    zone = ZoneInfo(settings.timezone)
    times = [(settings.start + timedelta(minutes=15 * i)).astimezone(zone) for i in range(n)]
    fig, (ax, ax_price) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 1]})
    for name in [k for k in rec.energy_wh if k != "grid"]:
        ax.step(times, rec.average_kw(name)[:n], where="post", label=name, linewidth=1)
    ax.step(times, rec.average_kw("grid")[:n], where="post", label="grid (meter)", color="black",
            linewidth=2)
    ax.step(times, rec.import_limit_w[:n] / 1000, where="post", label="import limit (GTV / "
            "congestion)", color="red", linestyle="--")
    fuse_kw = demo.site.grid.fuse_a * demo.site.grid.voltage_v * demo.site.grid.phases / 1000
    ax.axhline(fuse_kw, color="darkred", linestyle=":", label=f"fuse ({fuse_kw:.0f} kW)")
    ax.axhline(-demo.site.grid.export_limit_kw, color="purple", linestyle="--", linewidth=0.8,
               label="export limit")
    ax.set_ylabel("kW (15-min average)")
    ax.set_title(f"{demo.site.site.name}: {settings.day} at {settings.speed:g}x")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    ax_price.step(times, rec.import_price[:n], where="post", color="tab:green",
                  label="import price")
    ax_price.set_ylabel("EUR/kWh")
    ax_price.grid(alpha=0.3)
    ax_price.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    power = folder / "power.png"
    fig.savefig(power, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4))
    phase_a = rec.max_phase_a[:n]
    ax.step(times, phase_a, where="post",  # type: ignore[arg-type]  # matplotlib takes datetimes
            label="highest phase current (max per PTU)")
    ax.axhline(demo.site.grid.fuse_a, color="darkred", linestyle=":", label="fuse")
    ax.set_ylabel("A")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fuse = folder / "phase_current.png"
    fig.savefig(fuse, dpi=110)
    plt.close(fig)

    visits = [o for o in demo.outcomes if o.where]
    out = [power, fuse]
    if visits:
        fig, ax = plt.subplots(figsize=(11, max(3, 0.3 * len(visits) + 1)))
        labels = [f"{o.visit.id_tag} {o.where}" for o in visits]
        y = np.arange(len(visits))
        ax.barh(y, [o.target_kwh for o in visits], color="lightgray", label="target")
        ax.barh(y, [o.delivered_kwh for o in visits], height=0.5,
                color=["tab:green" if o.met else "tab:orange" for o in visits],
                label="delivered")
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlabel("kWh")
        ax.legend(fontsize=8)
        fig.tight_layout()
        evs = folder / "ev_energy.png"
        fig.savefig(evs, dpi=110)
        plt.close(fig)
        out.append(evs)
    if not math.isfinite(float(np.nansum(rec.import_price))):
        return out
    return out


def packaged_demo() -> Path:
    """The demo site file that ships with the package (or beside it, in a checkout)."""
    from cem.app.packaged import specs_folder

    try:
        return specs_folder() / "sites" / "demo.toml"
    except FileNotFoundError:
        return SOURCE_DEMO


def demo_command(*, config: Path, duration: float | None, speed: float | None,
                 report: Path) -> None:
    """`cem demo`: run the simulated site, show it live, then the summary and the report."""
    from rich.console import Console


    if not config.exists() and config == Path("specs/sites/demo.toml"):
        config = packaged_demo()  # run from another folder: the demo site that ships
    site = with_demo_prices(load_config_or_exit(config))
    try:
        settings = settings_for(site, duration=duration, speed=speed, report=report)
        _prepare_report(report)
    except DemoError as exc:
        fail(str(exc))
    site.store.path = report / "cem-demo.db"
    site.ocpp.database = report / "ocpp-demo.db"
    log_file = _configure_logging(report)
    try:  # HiGHS prints a banner with its first model: before the view starts, not into it
        from cem.planner.bound import silence_highs_banner
    except ImportError:
        pass
    else:
        silence_highs_banner()
    out = Console()
    view = LiveView(out, settings) if out.is_terminal else ProgressLines(
        out, settings)
    view.intro(site, settings, log_file)
    on_tick = _with_dashboard_url(out, site, view.update)
    try:
        with process_clock(settings), view:
            demo = asyncio.run(run_demo(site, settings, on_tick=on_tick))
    except DemoError as exc:
        fail(str(exc), f"details in {log_file}")
    except KeyboardInterrupt:  # a second Ctrl-C during the shutdown
        Console(stderr=True).print("stopped")
        sys.exit(130)
    summary = summarise(demo)
    print_summary(out, summary)
    try:
        written = write_report(demo, summary)
    except OSError as exc:
        fail(f"cannot write the report to {report}: {exc.strerror or exc}")
    out.print(f"report: {', '.join(str(p) for p in written)}; log: {log_file}",
              highlight=False, soft_wrap=True)
