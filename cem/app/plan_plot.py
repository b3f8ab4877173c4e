"""A PNG of a plan: site power stacked per asset type against the limits, and the prices.

Top: consumption stacked above zero (base load, EVs, heat pumps, battery charging), production
below zero (PV used, battery discharging, V2G), the grid import line, the GTV / congestion
import limit, the fuse's power and the export limit. Bottom: import and export prices.
Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from cem.app.scenario import BuiltScenario
from cem.planner.assets import Plan

COLOURS = {"base load": "#9e9e9e", "ev": "#1f77b4", "heat_pump": "#d62728", "battery": "#2ca02c",
           "pv": "#ffbf00"}


def plot_plan(built: BuiltScenario, plan: Plan, path: Path, *, title: str = "") -> Path:
    """Write the plot of `plan` to `path` (PNG) and return the path."""
    problem = built.problem
    n = problem.n_ptus
    dt_h = problem.ptu_minutes / 60
    hours = np.arange(n + 1) * dt_h
    kw = 1 / 1000

    by_kind: dict[str, np.ndarray] = {}
    for asset_id, kind in built.kinds.items():
        power = np.asarray(plan.power_w.get(asset_id, np.zeros(n)), dtype=float)
        by_kind[kind] = by_kind.get(kind, np.zeros(n)) + power
    curtailed = sum((np.asarray(v, dtype=float) for v in plan.curtailed_w.values()), np.zeros(n))
    pv_used = (built.pv_w if built.pv_w is not None else np.zeros(n)) - curtailed

    positive = {"base load": np.clip(built.base_load_w if built.base_load_w is not None else np.zeros(n), 0, None)}
    negative = {"pv": -pv_used}
    for kind, power in by_kind.items():
        positive[kind] = np.clip(power, 0, None)
        if np.any(power < 0):
            negative[kind] = np.clip(power, None, 0)

    fig, (ax, axp) = plt.subplots(2, 1, figsize=(14, 7), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})

    def stack(parts: dict[str, np.ndarray], label_suffix: str) -> None:
        bottom = np.zeros(n)
        for name, values in parts.items():
            if not np.any(values):
                continue
            top = bottom + values * kw
            ax.fill_between(hours[:-1], bottom, top, step="post", alpha=0.65,
                            color=COLOURS.get(name, None), label=f"{name.replace('_', ' ')}{label_suffix}",
                            linewidth=0)
            bottom = top

    stack(positive, "")
    stack(negative, " (production)")
    grid = np.append(plan.grid_import_w, plan.grid_import_w[-1]) * kw
    ax.step(hours, grid, where="post", color="black", linewidth=1.5, label="grid import")
    limits = problem.limits
    ax.step(hours, np.append(limits.import_limit_w, limits.import_limit_w[-1]) * kw, where="post",
            color="#d62728", linestyle="--", label="import limit (GTV / congestion)")
    ax.step(hours, -np.append(limits.export_limit_w, limits.export_limit_w[-1]) * kw, where="post",
            color="#ff7f0e", linestyle="--", label="export limit")
    fuse_kw = limits.fuse_a * limits.voltage_v * limits.phases / 1000
    ax.axhline(fuse_kw, color="#7f0000", linestyle=":", label=f"fuse {limits.fuse_a:g} A ({fuse_kw:.1f} kW)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("kW (+ consumption)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    gap = "" if plan.gap is None else f", gap {plan.gap:.1%}"
    ax.set_title(f"{title} — {plan.status}, cost {plan.cost_eur:.2f} EUR, peak {plan.peak_w / 1000:.1f} kW{gap}")

    axp.step(hours, np.append(problem.prices.import_eur_per_kwh, problem.prices.import_eur_per_kwh[-1]),
             where="post", label="import")
    axp.step(hours, np.append(problem.prices.export_eur_per_kwh, problem.prices.export_eur_per_kwh[-1]),
             where="post", label="export")
    axp.axhline(0, color="black", linewidth=0.5)
    axp.set_ylabel("EUR/kWh")
    axp.set_xlabel(f"hours from {problem.start:%Y-%m-%d %H:%M} UTC")
    axp.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
