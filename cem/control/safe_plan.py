"""A rule-based plan that always exists: used when the optimiser fails, times out or is missing.

Deadline first within the limits: per PTU, the import headroom (GTV/congestion limit and the
fuse, per phase, minus fixed loads and profiles) is shared out to storages by priority, then
earliest departure; each takes what it still needs up to its maximum, or nothing when its share
falls below its minimum (the EV 6 A rule). Profiles start as early as allowed, mode devices stay
in their current (else lowest) mode at minimum power, PV is only curtailed when export would
exceed the export limit. Targets it cannot meet are reported as shortfalls. Not optimal, never
unsafe given the forecast.
"""

from __future__ import annotations

import numpy as np

from cem.planner.assets import Plan, Problem, Shortfall, StorageAsset
from cem.planner.layout import NOISE_WH, first_ptu_share, ptu_hours


def safe_plan(problem: Problem, reason: str = "fallback") -> Plan:
    """A feasible-by-construction plan for `problem` (status FALLBACK)."""
    n = problem.n_ptus
    hours = ptu_hours(problem)  # PTU 0 only the share still ahead of the plan's start
    first_share = first_ptu_share(problem)
    limits = problem.limits
    phase_w = np.zeros((3, n))
    net = np.zeros(n)
    power: dict[str, np.ndarray] = {}
    modes: dict[str, list[str | None]] = {}
    starts: dict[str, int] = {}

    def add(values: np.ndarray, share: tuple[float, float, float]) -> None:
        nonlocal net
        net = net + values
        for p in range(3):
            phase_w[p] += values * share[p]

    for load in problem.fixed:
        add(np.asarray(load.power_w[:n], dtype=float), load.phase_share)
    for pv in problem.curtailable:
        add(-np.asarray(pv.production_w[:n], dtype=float), pv.phase_share)
    for profile in problem.profiles:
        start = max(0, min(profile.earliest_start, n - 1))
        values = np.zeros(n)
        length = min(len(profile.profile_w), n - start)
        values[start:start + length] = profile.profile_w[:length]
        starts[profile.id] = start
        power[profile.id] = values.astype(np.int64)
        add(values, profile.phase_share)
    for asset in problem.modes:
        ids = {m.id: m for m in asset.modes}
        mode = ids.get(asset.current_mode or "") or min(asset.modes, key=lambda m: m.min_w,
                                                        default=None)
        values = np.full(n, float(mode.min_w) if mode else 0.0)
        modes[asset.id] = [mode.id if mode else None] * n
        power[asset.id] = values.astype(np.int64)
        add(values, asset.phase_share)

    fuse_w = limits.planned_fuse_w_per_phase
    import_w = limits.planned_import_limit_w
    order = sorted(problem.storage, key=lambda s: (-s.priority,
                                                   s.available_until if s.available_until
                                                   is not None else n))
    levels: dict[str, np.ndarray] = {}
    storage_power = {s.id: np.zeros(n) for s in order}
    level_now = {s.id: float(s.level_wh) for s in order}
    for s in order:
        levels[s.id] = np.zeros(n + 1)
        levels[s.id][0] = s.level_wh
    for t in range(n):
        for s in order:
            usage = float(s.usage_wh[t]) if s.usage_wh is not None and t < len(s.usage_wh) else 0
            if t == 0:
                usage *= first_share  # given per whole PTU
            until = s.available_until if s.available_until is not None else n
            dt_h = float(hours[t])
            want = _wanted_w(s, level_now[s.id], usage, t, dt_h) if s.available_from <= t < until \
                else 0.0
            headroom = float(import_w[t]) - net[t]
            for p in range(3):
                if s.phase_share[p] > 0:
                    headroom = min(headroom, (fuse_w - phase_w[p][t]) / s.phase_share[p])
            w = max(0.0, min(want, headroom, float(s.charge_max_w)))
            if 0 < w < s.charge_min_w:
                # less than its minimum is wanted: the minimum where the limits and the
                # level's room allow it (a heat buffer stays at its floor), else nothing
                room = float(s.level_max_wh) - level_now[s.id] + usage
                fits = s.charge_min_w * dt_h * s.charge_efficiency <= room
                w = float(s.charge_min_w) if s.charge_min_w <= headroom and fits else 0.0
            if s.step_w > 1:
                w = (w // s.step_w) * s.step_w
            storage_power[s.id][t] = w
            net[t] += w
            for p in range(3):
                phase_w[p][t] += w * s.phase_share[p]
            # below level_min is what happens when usage outruns what the limits let in (a
            # heat buffer cooling down): kept, and reported below, not hidden
            level_now[s.id] = min(float(s.level_max_wh),
                                  level_now[s.id] + dt_h * s.charge_efficiency * w - usage)
            levels[s.id][t + 1] = level_now[s.id]
    shortfall: dict[str, Shortfall] = {}
    for s in order:
        power[s.id] = np.round(storage_power[s.id]).astype(np.int64)
        until = min(s.available_until if s.available_until is not None else n, n)
        missed = (s.target_wh or 0) - levels[s.id][max(until, 0)]
        below = float(s.level_min_wh) - float(levels[s.id][1:].min(initial=s.level_min_wh))
        if s.target_wh is not None and missed > 1.0:
            shortfall[s.id] = Shortfall(round(missed), f"rule-based plan ({reason}) within the "
                                        "site limits")
        elif below > NOISE_WH:
            shortfall[s.id] = Shortfall(round(below), f"level below level_min: usage above what "
                                        f"the rule-based plan ({reason}) lets in within the site "
                                        "limits")

    curtailed: dict[str, np.ndarray] = {}
    export_excess = np.maximum(-net - limits.export_limit_w[:n], 0)
    for pv in problem.curtailable:
        if not pv.curtailable or not export_excess.any():
            continue
        cut = np.minimum(export_excess, pv.production_w[:n])
        curtailed[pv.id] = np.round(cut).astype(np.int64)
        net = net + cut
        export_excess = export_excess - cut

    prices = problem.prices
    energy_kwh = net * hours / 1000
    cost = float(np.sum(np.where(energy_kwh > 0, energy_kwh * prices.import_eur_per_kwh[:n],
                                 energy_kwh * prices.export_eur_per_kwh[:n])))
    return Plan(status="FALLBACK", power_w=power, grid_import_w=np.round(net).astype(np.int64),
                curtailed_w=curtailed,
                level_wh={k: np.round(v[1:]).astype(np.int64) for k, v in levels.items()},
                mode=modes, profile_start=starts, shortfall=shortfall,
                energy_cost_eur=cost, cost_eur=cost,
                peak_w=int(max(0, net.max(initial=0))), notes=[f"rule-based plan: {reason}"])


def _wanted_w(s: StorageAsset, level: float, usage: float, t: int, dt_h: float) -> float:
    """Power that brings the storage towards its target (or its top) in this PTU (of dt_h
    hours)."""
    goal = float(s.level_max_wh)
    if s.kind in ("heat_pump", "battery"):
        # keep a heat buffer / battery at its floor or the next target, no more
        lows = [float(lo) for ptu, lo, _ in s.target_profile if ptu > t]
        goal = max([float(s.level_min_wh), *lows[:1]])
    elif s.target_wh is not None:
        goal = float(s.target_wh)
    need = goal - level + usage
    if need <= 0:
        return 0.0
    return need / (dt_h * max(s.charge_efficiency, 1e-6))
