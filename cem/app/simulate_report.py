"""The simulation report: `report.md`, `report.html` and PNG plots (matplotlib, Agg) in one folder."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from cem.simulation.engine import LevelRun
from cem.simulation.inputs import SimInputs

COLUMNS = [
    ("level", None), ("cost EUR", "cost_eur"), ("EUR/kWh", "eur_per_kwh"), ("objective EUR", "objective_eur"),
    ("peak kW", "peak_kw"), ("PTUs > GTV", "ptus_over_gtv"), ("fuse minutes", "fuse_minutes_over"),
    ("delivered kWh", "delivered_kwh"), ("of need", "delivered_pct"), ("sessions served", "served_sessions"),
    ("session p5 of optimum", "session_ratio_p5"), ("sessions < 0.9 of optimum", "sessions_short"),
    ("session p5 of reachable", "session_ratio_p5_reachable"),
    ("sessions < 0.9 of reachable", "sessions_short_reachable"),
    ("early leavers", "early_leavers"), ("early leavers kWh", "early_leaver_kwh"),
    ("early leavers p5 of optimum", "early_leaver_ratio_p5"),
    ("PV self-consumption", "self_consumption"), ("EV energy from PV", "pv_share_of_ev"),
    ("replan p50 s", "replan_p50_s"), ("replan p95 s", "replan_p95_s"),
]


def _level_title(lv: str) -> str:
    from cem.simulation.levels import LEVEL_NAMES

    return f"{lv}: {LEVEL_NAMES[lv]}" if lv != "optimum" else "optimum: perfect foresight"


def _cell(key: str | None, lv: str, k: dict[str, Any]) -> str:
    if key is None:
        return _level_title(lv)
    value = k.get(key)
    if value is None:
        return "-"
    if key in ("self_consumption", "pv_share_of_ev"):
        return f"{100 * value:.0f} %"
    if key == "delivered_pct":
        return f"{value:.1f} %"
    if key == "served_sessions":
        return f"{value} / {k['sessions']}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _times(inputs: SimInputs) -> list[datetime]:
    zone = ZoneInfo(inputs.config.site.timezone)
    return [inputs.ptu_start(i).astimezone(zone).replace(tzinfo=None) for i in range(inputs.n_ptus)]


def plot_power(inputs: SimInputs, runs: dict[str, LevelRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = _times(inputs)
    n = inputs.n_ptus
    fuse_kw = inputs.fuse_w_per_phase * 3 / 1000
    fig, axes = plt.subplots(len(runs), 1, figsize=(13, 2.3 * len(runs) + 0.6), sharex=True,
                             squeeze=False)
    top = max(max(float(r.site_w.max()) for r in runs.values()) / 1000, fuse_kw) * 1.08
    for ax, (lv, run) in zip(axes[:, 0], runs.items(), strict=True):
        ax.step(times, run.site_w / 1000, where="post", color="tab:blue", lw=1, label="site import (15-min avg)")
        ax.step(times, inputs.import_limit_w[:n] / 1000, where="post", color="tab:red", lw=1.2,
                label="import limit (GTV / congestion)")
        ax.axhline(fuse_kw, color="black", ls=":", lw=1, label="fuse (3 phases, balanced)")
        if inputs.pv_w[:n].any():
            ax.step(times, -inputs.pv_w[:n] / 1000, where="post", color="tab:orange", lw=0.8, label="PV")
        ax.set_ylim(min(-float(inputs.pv_w[:n].max()) / 1000 * 1.1, 0), top)
        ax.set_ylabel("kW")
        ax.set_title(_level_title(lv), loc="left", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=4)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_cost_per_day(inputs: SimInputs, kpis: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [d.isoformat() for d in inputs.days]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(days) + 3), 4))
    width = 0.8 / max(1, len(kpis))
    x = np.arange(len(days))
    for j, (lv, k) in enumerate(kpis.items()):
        ax.bar(x + j * width, k["cost_per_day_eur"], width, label=_level_title(lv))
    ax.set_xticks(x + width * (len(kpis) - 1) / 2, days, rotation=30, ha="right")
    ax.set_ylabel("energy cost, EUR")
    ax.set_title("Energy cost per day")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_energy_per_class(inputs: SimInputs, runs: dict[str, LevelRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted({s.ev_class for s in inputs.sessions})
    times = _times(inputs)
    fig, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 3.8), squeeze=False)
    for ax, cls in zip(axes[0], classes, strict=True):
        members = np.array([s.ev_class == cls for s in inputs.sessions])
        need = sum(s.real_need_wh for s in inputs.sessions if s.ev_class == cls) / 1000
        for lv, run in runs.items():
            energy = np.cumsum(run.ev_w[members].sum(axis=0)) * inputs.dt_h / 1000
            ax.plot(times, energy, lw=1.2, label=_level_title(lv))
        ax.axhline(need, color="black", ls="--", lw=1, label="real need")
        ax.set_title(f"{cls}: {int(members.sum())} sessions", fontsize=10)
        ax.set_ylabel("cumulative kWh")
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_session_ratios(runs: dict[str, LevelRun], path: Path) -> None:
    """Per level, the sorted per-session ratio delivered / what the optimum delivered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cem.simulation.kpis import SHORT_RATIO, session_ratios

    achievable = runs["optimum"].achievable_wh
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for lv, run in runs.items():
        if lv == "optimum":
            continue
        ratio = np.sort(session_ratios(run.delivered_wh, achievable))
        share = np.arange(1, len(ratio) + 1) / max(len(ratio), 1) * 100
        ax.step(share, ratio, where="post", lw=1.2, label=_level_title(lv))
    ax.axhline(SHORT_RATIO, color="black", ls="--", lw=1, label=f"{SHORT_RATIO:g} of the optimum")
    ax.axvline(5, color="grey", ls=":", lw=1)
    ax.set_xlabel("% of sessions (sorted)")
    ax.set_ylabel("delivered / optimum's")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _inputs_rows(inputs: SimInputs, runtime_s: float, command: str) -> list[tuple[str, str]]:
    cfg = inputs.config
    grid = cfg.grid
    return [
        ("site", f"{cfg.site.name} ({cfg.site.timezone})"),
        ("grid", f"fuse {grid.fuse_a:g} A x {grid.phases} at {grid.voltage_v:g} V "
                 f"({inputs.fuse_w_per_phase * 3 / 1000:.0f} kW balanced), GTV {grid.import_limit_kw:g} kW, "
                 f"export limit {grid.export_limit_kw:g} kW, {len(cfg.congestion)} congestion window(s)"),
        ("tariff", f"(day-ahead + {cfg.prices.markup_eur_per_kwh:g} markup + {cfg.prices.tax_eur_per_kwh:g} "
                   f"tax) x (1 + {cfg.prices.vat:g} VAT) EUR/kWh, feed-in {cfg.prices.feed_in}"),
        ("EVSEs", f"{len(inputs.evses)} from the site config"),
        ("period", f"{inputs.days[0]} .. {inputs.days[-1]} ({len(inputs.days)} day(s), "
                   f"{inputs.n_ptus} PTUs of {inputs.ptu_minutes} min incl. the tail)"),
        ("sessions", f"{len(inputs.sessions)} from {inputs.files['sessions']}"),
        ("prices", inputs.files["prices"]),
        ("PV", inputs.files["pv"]),
        ("planner", f"time limit {cfg.planner.time_limit_s:g} s per plan, horizon up to "
                    f"{cfg.planner.horizon_ptus} PTUs"),
        ("runtime", f"{runtime_s:.1f} s (all levels)"),
        ("command", command),
    ]


def write_report(folder: Path, inputs: SimInputs, runs: dict[str, LevelRun], kpis: dict[str, Any],
                 controllers: dict[str, Any], *, runtime_s: float, command: str) -> dict[str, Path]:
    """Write the report folder; return the paths of what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"power": folder / "site_power.png", "cost": folder / "cost_per_day.png",
             "energy": folder / "energy_per_class.png", "md": folder / "report.md",
             "html": folder / "report.html"}
    plot_power(inputs, runs, files["power"])
    plot_cost_per_day(inputs, kpis, files["cost"])
    plot_energy_per_class(inputs, runs, files["energy"])
    if "optimum" in runs:
        files["sessions"] = folder / "session_ratios.png"
        plot_session_ratios(runs, files["sessions"])
    rows = _inputs_rows(inputs, runtime_s, command)
    notes = list(inputs.notes)
    for lv, run in runs.items():
        notes += [f"level {lv}: {note}" for note in run.notes]
    from cem.simulation.levels import __doc__ as levels_doc

    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# Simulation report: {inputs.config.site.name}", "", f"Made {created} by `cem simulate`.", "",
          "## KPIs per level", "",
          "| " + " | ".join(c for c, _ in COLUMNS) + " |",
          "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for lv, k in kpis.items():
        md.append("| " + " | ".join(_cell(key, lv, k) for _, key in COLUMNS) + " |")
    md += ["", "Cost: the site's energy bill (import minus feed-in). Objective: cost plus the planner's "
           "penalty for unmet EV energy, scored alike for every level on the perfect-foresight problem "
           "(the optimum minimises it). Limits and fuse are measured on the realised power, never clipped.",
           "", "![site power against limits](site_power.png)", "",
           "![cost per day](cost_per_day.png)", "", "![energy per EV class](energy_per_class.png)", "",
           *(["Per session: delivered / what the perfect-foresight optimum delivered to that "
              "session (sorted; the 5th percentile is `session p5`).", "",
              "![per-session delivered vs the optimum](session_ratios.png)", ""]
             if "sessions" in files else []),
           "## Inputs", ""]
    md += [f"- **{name}**: {value}" for name, value in rows]
    md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    md += ["", "## How the levels work", "", (levels_doc or "").strip(), ""]
    files["md"].write_text("\n".join(md), encoding="utf-8")

    esc = html.escape
    table = ["<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c, _ in COLUMNS) + "</tr>"]
    for lv, k in kpis.items():
        table.append("<tr>" + "".join(f"<td>{esc(_cell(key, lv, k))}</td>" for _, key in COLUMNS) + "</tr>")
    table.append("</table>")
    page = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Simulation report: {esc(inputs.config.site.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child{text-align:left}img{max-width:100%}pre{white-space:pre-wrap}</style></head><body>",
        f"<h1>Simulation report: {esc(inputs.config.site.name)}</h1><p>Made {esc(created)} by "
        "<code>cem simulate</code>.</p><h2>KPIs per level</h2>", *table,
        "<p>Cost: the site's energy bill. Objective: cost plus the planner's unmet-energy penalty, "
        "scored alike on the perfect-foresight problem. Limits and fuse measured on realised power.</p>",
        "<img src='site_power.png' alt='site power'><img src='cost_per_day.png' alt='cost per day'>",
        "<img src='energy_per_class.png' alt='energy per EV class'>",
        *(["<img src='session_ratios.png' alt='per-session delivered vs the optimum'>"]
          if "sessions" in files else []),
        "<h2>Inputs</h2><ul>",
        *[f"<li><b>{esc(name)}</b>: {esc(value)}</li>" for name, value in rows], "</ul><h2>Notes</h2><ul>",
        *[f"<li>{esc(n)}</li>" for n in notes], "</ul><h2>How the levels work</h2>",
        f"<pre>{esc((levels_doc or '').strip())}</pre></body></html>",
    ]
    files["html"].write_text("\n".join(page), encoding="utf-8")
    return files
