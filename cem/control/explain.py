"""Why each EV gets what it gets now, and when it charges next, in words.

`explain_evs` is a pure function of the planner problem, the plan, the mapping back to the
RMs, the guard's last actions, the congestion windows (with their source), the operator's EV
modes and `now`. For each EV asset it finds the PTU that holds `now` and says, in this order:

1. the operator paused it, or
2. the guard capped it a moment ago (and what the guard saw), or
3. its target is met, or
4. it charges at full power, or
5. a limit binds in this PTU: the fuse on the fullest phase it uses ("held at 6 A by the fuse
   on L2"), a congestion window ("congestion window until 20:00 (import 15 kW, from api)") or
   the import limit (GTV), with its priority when EVs of higher priority are served first, or
6. a cheaper PTU later is planned instead ("waiting for cheaper hours from 02:00"), or
7. it needs no more than it gets.

`next_text` says when it charges next (the first later PTU with power in the plan) and the
shortfall the plan foresees, if any. A limit "binds" when the plan uses it to within a
tolerance (the larger of 1 % and one EV step), since the planner fills limits up exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any

import numpy as np

from cem.control.ev_modes import EvMode
from cem.control.guard import GuardDecision
from cem.flex.site_problem import SiteMapping
from cem.planner.assets import Plan, Problem, StorageAsset
from cem.planner.layout import ptu_hours

BINDING_SHARE = 0.01  # a limit used to within 1 % binds
FULL_SHARE = 0.97  # at or above this share of its maximum an EV charges "at full power"


@dataclass(frozen=True)
class EvExplanation:
    """What the page and the API say about one EV."""

    asset_id: str
    rm_id: str
    code: str  # paused, guard, target_met, full, fuse, congestion, import_limit, cheaper_later,
    #            enough, not_planned, no_ev
    text: str  # why it gets what it gets now
    next_text: str  # when it charges next, and any shortfall
    power_w: float  # planned for the PTU that holds `now`
    current_a: float | None  # per phase, from the planned power
    next_charge: datetime | None = None
    departure: datetime | None = None
    planned_wh: float = 0.0  # energy the plan gives it by its departure (or the horizon's end)
    shortfall_wh: float = 0.0
    limit: str | None = None  # "fuse L2", "congestion", "import"
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Window:
    """A congestion window as the explanation names it."""

    start: datetime
    end: datetime
    import_limit_kw: float | None
    source: str


def windows_of(rows: Iterable[Any], default_source: str = "config") -> list[Window]:
    """Congestion windows (store rows, config windows, `CongestionLimit`s) as `Window`s."""
    return [Window(r.start, r.end, r.import_limit_kw, getattr(r, "source", None) or
                   default_source) for r in rows]


def ptu_at(problem: Problem, now: datetime) -> int:
    """The index of the PTU that holds `now` (clamped to the horizon)."""
    seconds = (now - problem.start).total_seconds()
    return max(0, min(problem.n_ptus - 1, int(seconds // (problem.ptu_minutes * 60))))


def planned_phase_w(problem: Problem, plan: Plan, t: int) -> np.ndarray:
    """Planned load per phase (W) in PTU t, counted as the planner counts it for the fuse
    (production only with `fuse_production_credit`)."""
    phase = np.zeros(3)
    credit = problem.limits.fuse_production_credit

    def add(power: float, share: tuple[float, float, float]) -> None:
        if power < 0:
            power *= credit
        phase[:] += np.asarray(share) * power

    for f in problem.fixed:
        add(float(np.asarray(f.power_w)[t]) if t < len(f.power_w) else 0.0, f.phase_share)
    for c in problem.curtailable:
        prod = float(np.asarray(c.production_w)[t]) if t < len(c.production_w) else 0.0
        cut = plan.curtailed_w.get(c.id)
        add(-(max(prod, 0.0) - (float(cut[t]) if cut is not None and t < len(cut) else 0.0)),
            c.phase_share)
    for group in (problem.storage, problem.modes, problem.profiles):
        for asset in group:
            row = plan.power_w.get(asset.id)
            if row is not None and t < len(row):
                add(float(row[t]), asset.phase_share)
    return phase


def _local(moment: datetime, zone: tzinfo) -> str:
    return moment.astimezone(zone).strftime("%H:%M")


def _phases(asset: StorageAsset) -> list[int]:
    return [p for p in range(3) if asset.phase_share[p] > 1e-9]


def _amps(power_w: float, asset: StorageAsset, voltage_v: float) -> float:
    share = max(asset.phase_share)
    return power_w * share / voltage_v


def _kw(power_w: float) -> str:
    return f"{power_w / 1000:.1f} kW"


def explain_evs(problem: Problem, plan: Plan, mapping: SiteMapping, now: datetime, *,
                zone: tzinfo, guard_actions: Sequence[tuple[datetime, GuardDecision]] = (),
                guard_hold: timedelta = timedelta(minutes=5),
                congestion: Iterable[Window] = (),
                modes: Mapping[str, EvMode] | None = None,
                departures: Mapping[str, datetime] | None = None,
                ) -> dict[str, EvExplanation]:
    """An explanation per EV asset (by asset id) of `plan` at `now`."""
    t = ptu_at(problem, now)
    limits = problem.limits
    voltage = limits.voltage_v
    phase_w = planned_phase_w(problem, plan, t)
    fuse_w = limits.planned_fuse_w_per_phase
    import_w = float(np.asarray(limits.planned_import_limit_w)[t])
    grid_w = float(np.asarray(plan.grid_import_w)[t]) if len(plan.grid_import_w) > t else 0.0
    gtv_w = float(np.max(np.asarray(limits.import_limit_w))) if limits.import_limit_w.size else 0.0
    hours = ptu_hours(problem)
    prices = np.asarray(problem.prices.import_eur_per_kwh, dtype=float)
    windows = list(congestion)
    evs = [s for s in problem.storage if s.kind == "ev"]
    charging = {s.id: float(plan.power_w[s.id][t]) for s in evs
                if s.id in plan.power_w and t < len(plan.power_w[s.id])}
    recent_caps: dict[str, tuple[datetime, GuardDecision]] = {}
    for at, decision in guard_actions:
        if now - at <= guard_hold:
            for asset_id in decision.caps:
                recent_caps[asset_id] = (at, decision)
    out = {}
    for asset in evs:
        binding = mapping.bindings.get(asset.id)
        rm_id = binding.rm_id if binding is not None else asset.id
        mode = (modes or {}).get(rm_id)
        out[asset.id] = _explain_one(
            asset, rm_id, plan, problem, t, now, zone, mode=mode,
            cap=recent_caps.get(asset.id), phase_w=phase_w, fuse_w=fuse_w, import_w=import_w,
            grid_w=grid_w, gtv_w=gtv_w, hours=hours, prices=prices, windows=windows,
            voltage=voltage, charging=charging, evs=evs,
            departure=(departures or {}).get(rm_id))
    return out


def _explain_one(asset: StorageAsset, rm_id: str, plan: Plan, problem: Problem, t: int,
                 now: datetime, zone: tzinfo, *, mode: EvMode | None,
                 cap: tuple[datetime, GuardDecision] | None, phase_w: np.ndarray,
                 fuse_w: float, import_w: float, grid_w: float, gtv_w: float,
                 hours: np.ndarray, prices: np.ndarray, windows: list[Window], voltage: float,
                 charging: dict[str, float], evs: list[StorageAsset],
                 departure: datetime | None) -> EvExplanation:
    row = np.asarray(plan.power_w.get(asset.id, np.zeros(problem.n_ptus)), dtype=float)
    power = float(row[t]) if t < len(row) else 0.0
    amps = _amps(power, asset, voltage)
    end = problem.n_ptus if asset.available_until is None else min(asset.available_until,
                                                                   problem.n_ptus)
    if departure is None and asset.available_until is not None:
        departure = problem.ptu_start(asset.available_until)
    planned_wh = float(np.sum(row[t:end] * hours[t:end])) if end > t else 0.0
    shortfall = plan.shortfall.get(asset.id)
    shortfall_wh = float(shortfall.energy_wh) if shortfall is not None else 0.0
    later = [k for k in range(t + 1, end) if k < len(row) and row[k] > 1.0]
    next_charge = problem.ptu_start(later[0]) if later else None
    step = max(asset.step_w, asset.charge_min_w // 10, 1)
    base: dict[str, Any] = {"asset_id": asset.id, "rm_id": rm_id, "power_w": power,
            "current_a": round(amps, 1), "next_charge": next_charge, "departure": departure,
            "planned_wh": round(planned_wh), "shortfall_wh": shortfall_wh}

    # when it charges next, and what the plan cannot give
    if power > 1.0 and later and later[0] == t + 1:
        next_text = "keeps charging in the next PTU"
    elif next_charge is not None:
        next_text = f"charges next from {_local(next_charge, zone)}"
    else:
        next_text = "no more charging planned before it leaves" if power <= 1.0 else \
            "this is the last PTU with charging planned"
    if shortfall is not None and shortfall.energy_wh >= 50:
        next_text += f"; will miss {shortfall.energy_wh / 1000:.1f} kWh ({shortfall.reason})"

    def result(code: str, text: str, limit: str | None = None, **details: Any) -> EvExplanation:
        return EvExplanation(code=code, text=text, next_text=next_text, limit=limit,
                             details=details, **base)

    if asset.charge_max_w <= 0 and (mode is None or mode.mode != "paused"):
        return result("no_ev", "no EV that can charge (none plugged in, or it takes no more)")
    if mode is not None and mode.mode == "paused":
        since = f" since {_local(mode.set_at, zone)}" if mode.set_at else ""
        return result("paused", f"paused by the operator{since}: 0 A until set back to smart")
    if cap is not None:
        at, decision = cap
        return result("guard", f"capped at {_kw(decision.caps[asset.id])} by the guard at "
                      f"{_local(at, zone)}: {decision.reason}", "guard")
    target = asset.target_wh
    level = float(asset.level_wh)
    if target is not None and level >= target - step * 0.25 and power <= 1.0:
        return result("target_met", f"target met: {level / 1000:.1f} of "
                      f"{target / 1000:.1f} kWh")
    if power >= asset.charge_max_w * FULL_SHARE:
        why = " (charge now, set by the operator)" if mode is not None and \
            mode.mode == "charge_now" else ""
        return result("full", f"charging at full power, {_kw(power)} ({amps:.1f} A){why}")

    # a limit that binds in this PTU
    tol_fuse = max(fuse_w * BINDING_SHARE, step / max(len(_phases(asset)), 1))
    fullest = max(_phases(asset) or [0], key=lambda p: phase_w[p])
    held = f"held at {amps:.0f} A" if power > 1.0 else "held at 0 A"
    higher = sorted({s.priority for s in evs if s.priority > asset.priority
                     and charging.get(s.id, 0.0) > 1.0})
    priority = (f"; EVs of priority {', '.join(str(p) for p in higher)} are served before "
                f"this one (priority {asset.priority})") if higher else ""
    if phase_w[fullest] >= fuse_w - tol_fuse:
        return result("fuse", f"{held} by the fuse on L{fullest + 1} ("
                      f"{phase_w[fullest] / voltage:.0f} of {fuse_w / voltage:.0f} A planned)"
                      f"{priority}", f"fuse L{fullest + 1}")
    if grid_w >= import_w - max(import_w * BINDING_SHARE, step):
        moment = problem.ptu_start(t) + timedelta(minutes=problem.ptu_minutes / 2)
        window = next((w for w in windows if w.start <= max(now, moment) < w.end
                       and w.import_limit_kw is not None), None) or next(
            (w for w in windows if w.start <= now < w.end and w.import_limit_kw is not None),
            None)
        if window is not None and window.import_limit_kw is not None and \
                window.import_limit_kw * 1000 < gtv_w:
            return result("congestion", f"{held}: congestion window until "
                          f"{_local(window.end, zone)} (import at most "
                          f"{window.import_limit_kw:g} kW, from {window.source}){priority}",
                          "congestion", window_end=window.end.isoformat(),
                          window_source=window.source)
        return result("import_limit", f"{held} by the import limit ({grid_w / 1000:.1f} of "
                      f"{import_w / 1000:.1f} kW planned){priority}", "import")

    # no limit binds: the plan chose this
    if later and t < len(prices):
        cheaper = [k for k in later if k < len(prices) and prices[k] < prices[t] - 1e-9]
        if cheaper:
            first = problem.ptu_start(cheaper[0])
            now_part = f"charging at {_kw(power)} now, the rest" if power > 1.0 else "waiting"
            return result("cheaper_later", f"{now_part} for cheaper hours from "
                          f"{_local(first, zone)} ({prices[cheaper[0]] * 100:.1f} instead of "
                          f"{prices[t] * 100:.1f} ct/kWh)")
    if power > 1.0:
        by = f" by {_local(departure, zone)}" if departure is not None else ""
        return result("enough", f"charging at {_kw(power)} ({amps:.1f} A): enough to reach its "
                      f"target{by}")
    if target is None:
        return result("not_planned", "no target known: charges only when it costs nothing extra")
    if later:
        return result("cheaper_later", f"waiting: charging is planned from "
                      f"{_local(problem.ptu_start(later[0]), zone)}")
    return result("not_planned", "not planned to charge")
