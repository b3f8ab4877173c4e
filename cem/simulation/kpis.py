"""KPIs of a realised run, all measured on what the physics delivered (never on a plan).

- cost_eur: import x import price - export x export price, per PTU (all-in tariff of the site);
  eur_per_kwh: that cost per kWh delivered to the EVs (levels that deliver less look cheaper);
- peak_kw: highest 15-minute average import; ptus_over_gtv: PTUs whose average import is above
  the import limit of that PTU (GTV or a congestion window); fuse_minutes_over: minutes in which
  some phase carried more than the fuse (per-minute physics, `engine.py`);
- delivered_kwh vs requested_kwh (the EVs' real needs), served_sessions (got >= 99.5 % of their
  need, or within 50 Wh);
- per session against the optimum (`session_kpis`, for every level once the optimum ran):
  achievable = what the perfect-foresight optimum planned for that session (its plan has no
  EV taper: an upper bound; never below what its realised run delivered); the ratio
  delivered / achievable per session (1 where the achievable is under 50 Wh), its 5th
  percentile `session_ratio_p5` and mean `session_ratio_mean`, `sessions_short` (ratio below
  0.9) and `achievable_kwh`; a level at 1.0 leaves no driver worse off than the optimum would;
  `session_ratio_p5_reachable` and `sessions_short_reachable` the same against the plan capped
  by what the session's EV could take at all in its stay (`engine.reachable_wh`: full power
  from arrival under the taper), as the plan, without the taper, asks some short tapered stays
  for more than any control could give them;
- the early leavers (`session_kpis` with `early`): the sessions that really left at least one
  PTU before the departure the CEM believed (the driver's estimate, or the site's default for
  an OCPP 1.6 EV): `early_leavers`, their `early_leaver_kwh` delivered against
  `early_leaver_achievable_kwh`, and their own `early_leaver_ratio_p5` — the drivers a plan
  that waits for cheap hours would leave short;
- self_consumption: share of the PV production used on site; pv_share_of_ev: share of the EV
  energy covered by PV in the same PTU;
- replan_p50_s / replan_p95_s: wall time per planning call;
- objective_eur: the planner's own comparable objective (`cem.planner.layout.evaluate`) of the
  realised dispatch on the perfect-foresight problem: energy cost + kW-max cost + the planner's
  unmet-energy penalty (200 EUR/kWh for the first third of an EV's need, rising to 300 EUR/kWh,
  so equal EVs share a shortfall) + a negligible tie-break. The optimum row minimises exactly
  this, so by this measure it is a lower bound for every level (up to the solver's gap, which
  `objective_bound_eur`, the LP bound of that problem, makes certain).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cem.simulation.engine import LevelRun
from cem.simulation.inputs import SimInputs

SERVED_SHARE = 0.995
SERVED_SLACK_WH = 50.0
FALLBACK_UNMET_EUR_PER_KWH = 200.0
LIMIT_TOLERANCE_W = 1.0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def objective_eur(inputs: SimInputs, run: LevelRun, reference: Any | None) -> float:
    """The planner's comparable objective of the realised dispatch (see module docstring)."""
    cost = energy_cost(inputs, run.site_w)
    unmet_kwh = float(np.maximum(_needs(inputs) - run.delivered_wh, 0).sum()) / 1000
    if reference is None:
        return cost + FALLBACK_UNMET_EUR_PER_KWH * unmet_kwh
    from cem.planner.layout import empty_dispatch, evaluate

    disp = empty_dispatch(reference)
    disp.charge[:, : inputs.n_ptus] = run.ev_w
    return float(evaluate(reference, disp).objective)


def reference_layout(inputs: SimInputs) -> Any | None:
    """The perfect-foresight problem as the planner's arrays, to score every level alike."""
    try:
        from cem.planner.layout import build_layout
    except ImportError:
        return None
    from cem.simulation.levels import ev_asset, site_problem

    assets = [ev_asset(s, level_wh=0, target_wh=s.real_need_wh, available_from=s.arrival_ptu,
                       available_until=s.departure_ptu) for s in inputs.sessions]
    return build_layout(site_problem(inputs, 0, inputs.n_ptus, assets))


def _needs(inputs: SimInputs) -> np.ndarray:
    return np.array([s.real_need_wh for s in inputs.sessions], dtype=float)


def energy_cost(inputs: SimInputs, site_w: np.ndarray, first_ptu: int = 0) -> float:
    """EUR for site power `site_w` over the PTUs from `first_ptu` on."""
    end = first_ptu + len(site_w)
    imp = np.maximum(site_w, 0)
    exp = np.maximum(-site_w, 0)
    return float(np.sum(imp * inputs.import_eur_per_kwh[first_ptu:end]
                        - exp * inputs.export_eur_per_kwh[first_ptu:end]) * inputs.dt_h / 1000)


def cost_per_day(inputs: SimInputs, run: LevelRun) -> list[float]:
    """Energy cost per simulated local day (the tail after the last day counts to the last day)."""
    bounds = [*inputs.day_starts[1:], inputs.n_ptus]
    out, lo = [], 0
    for k, hi in enumerate(bounds):
        hi = inputs.n_ptus if k == len(bounds) - 1 else hi
        out.append(energy_cost(inputs, run.site_w[lo:hi], lo) if hi > lo else 0.0)
        lo = hi
    return out


SHORT_RATIO = 0.9


def session_ratios(delivered_wh: np.ndarray, achievable_wh: np.ndarray) -> np.ndarray:
    """Delivered / achievable per session, capped at 1; 1 where almost nothing was achievable."""
    delivered = np.asarray(delivered_wh, dtype=float)
    achievable = np.asarray(achievable_wh, dtype=float)
    ratio = np.divide(delivered, achievable, out=np.ones_like(delivered),
                      where=achievable > SERVED_SLACK_WH)
    return np.minimum(ratio, 1.0)


def early_leavers(inputs: SimInputs) -> np.ndarray:
    """Per session: it left at least one PTU before the departure the CEM believed."""
    return np.array([s.departure_ptu < s.believed_departure_ptu for s in inputs.sessions],
                    dtype=bool)


def session_kpis(delivered_wh: np.ndarray, achievable_wh: np.ndarray,
                 reachable: np.ndarray | None = None,
                 early: np.ndarray | None = None) -> dict[str, Any]:
    """The per-session KPIs of a level against what the optimum delivered (module docstring);
    with `reachable` (`engine.reachable_wh`) also against the optimum's plan capped by it, and
    with `early` (`early_leavers`) those of the sessions that left before their believed
    departure."""
    ratio = session_ratios(delivered_wh, achievable_wh)
    out: dict[str, Any] = {
        "achievable_kwh": round(float(np.sum(achievable_wh)) / 1000, 1),
        "session_ratio_p5": round(percentile(list(ratio), 5), 3),
        "session_ratio_mean": round(float(ratio.mean()), 4) if len(ratio) else 1.0,
        "sessions_short": int(np.count_nonzero(ratio < SHORT_RATIO)),
    }
    if reachable is not None:
        capped = session_ratios(delivered_wh, np.minimum(achievable_wh, reachable))
        out["session_ratio_p5_reachable"] = round(percentile(list(capped), 5), 3)
        out["sessions_short_reachable"] = int(np.count_nonzero(capped < SHORT_RATIO))
    if early is not None:
        out["early_leavers"] = int(np.count_nonzero(early))
        out["early_leaver_kwh"] = round(float(np.sum(delivered_wh[early])) / 1000, 1)
        out["early_leaver_achievable_kwh"] = round(float(np.sum(achievable_wh[early])) / 1000, 1)
        out["early_leaver_ratio_p5"] = round(percentile(list(ratio[early]), 5), 3) \
            if early.any() else None
    return out


def level_kpis(inputs: SimInputs, run: LevelRun, reference: Any | None) -> dict[str, Any]:
    """The KPI record of one level (the keys of `--json`)."""
    n = inputs.n_ptus
    dt_h = inputs.dt_h
    site = run.site_w
    need = _needs(inputs)
    delivered = run.delivered_wh
    pv = inputs.pv_w[:n].astype(float)
    pv_total = float(pv.sum())
    exported = float(np.maximum(-site, 0).sum())
    ev_total = float(run.ev_total_w.sum())
    served = int(np.count_nonzero(delivered >= np.minimum(need * SERVED_SHARE, need - SERVED_SLACK_WH)))
    cost = energy_cost(inputs, site)
    return {
        "cost_eur": round(cost, 2),
        "objective_eur": round(objective_eur(inputs, run, reference), 2),
        "peak_kw": round(float(max(site.max(), 0.0)) / 1000, 2),
        "ptus_over_gtv": int(np.count_nonzero(site > inputs.import_limit_w[:n] + LIMIT_TOLERANCE_W)),
        "fuse_minutes_over": int(run.fuse_minutes.sum()),
        "max_phase_current_a": round(float(run.max_phase_a.max()), 1),
        "eur_per_kwh": round(cost / (float(delivered.sum()) / 1000), 4) if delivered.sum() > 0 else None,
        "delivered_kwh": round(float(delivered.sum()) / 1000, 1),
        "requested_kwh": round(float(need.sum()) / 1000, 1),
        "delivered_pct": round(100 * float(delivered.sum()) / float(need.sum()), 1) if need.sum() else 100.0,
        "served_sessions": served,
        "sessions": len(need),
        "self_consumption": round(1 - exported / pv_total, 4) if pv_total > 0 else None,
        "pv_share_of_ev": round(float(np.minimum(run.ev_total_w, pv).sum()) / ev_total, 4)
        if ev_total > 0 and pv_total > 0 else None,
        "import_kwh": round(float(np.maximum(site, 0).sum()) * dt_h / 1000, 1),
        "replans": len(run.replan_s),
        "replan_p50_s": round(percentile(run.replan_s, 50), 4),
        "replan_p95_s": round(percentile(run.replan_s, 95), 4),
        "wall_s": round(run.wall_s, 2),
    }
