"""The congestion fast path: the plan in force made to keep a new import limit at once.

A congestion window (or a lower import limit) that is in force now or starts within the next
PTU cannot wait for the full replan: at 1000 EVs that takes 1-3 s, and its LP often does not
finish when a window moves the optimum far. `cut_to_limit` lowers the flexible loads of the
plan in force in every PTU (from `from_ptu` on) whose planned import is above the new limit,
all assets of a PTU at once in numpy, in three passes:

1. charging above what a milestone forces (the level an EV must have by a PTU, at full power
   from then on): lowest priority first, within a priority the asset with the most slack to
   its departure first (a battery or any storage without a target has all the time);
2. battery discharge, as far as its level allows over the rest of the plan;
3. charging below what milestones force, in the same order: only where the limit forces it.

A load cut below its minimum power (an EV's 6 A) is switched off; no level is taken below its
minimum in any later PTU (a heat pump's buffer). Levels fall with what is cut, from that PTU
on, so the next PTU's floors see it. Powers only go down (charging less, discharging more):
every instruction built from the cut plan asks for at most what the plan had. What the
flexible loads cannot absorb (fixed loads alone above the limit) is left in `excess_w`.
The control loop dispatches the rows that changed and replans as usual (`cem.control.mpc`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from cem.planner.assets import Plan, Problem, StorageAsset
from cem.planner.layout import ptu_hours


@dataclass
class Cut:
    """The plan after the cut, and what was cut."""

    plan: Plan
    changed: dict[str, int] = field(default_factory=dict)  # asset id -> first PTU cut
    ptus: list[int] = field(default_factory=list)  # PTUs whose import was above the limit
    below_milestones: set[str] = field(default_factory=set)  # cut below what milestones force
    discharged: set[str] = field(default_factory=set)  # storage discharging more
    excess_w: float = 0.0  # the most any PTU is still above the limit (fixed loads)


def cut_to_limit(problem: Problem, plan: Plan, limit_w: np.ndarray, *, from_ptu: int = 0) -> Cut:
    """`plan` with its flexible loads lowered so that its import keeps `limit_w` (per PTU,
    the import a plan may use) in PTUs [from_ptu, n); `plan` itself is left as it is."""
    n = min(problem.n_ptus, len(plan.grid_import_w), len(limit_w))
    grid = np.asarray(plan.grid_import_w[:n], dtype=float).copy()
    limit = np.asarray(limit_w[:n], dtype=float)
    over = [t for t in range(from_ptu, n) if grid[t] > limit[t] + 0.5]
    if not over:
        return Cut(plan=plan)
    assets = [s for s in problem.storage if s.id in plan.power_w]
    if not assets:
        return Cut(plan=plan, ptus=over, excess_w=float(max(grid[t] - limit[t] for t in over)))
    hours = ptu_hours(problem)[:n]
    ends = np.cumsum(hours)  # hours from the plan's start to the end of each PTU
    power = np.zeros((len(assets), n))
    for i, s in enumerate(assets):
        row = np.asarray(plan.power_w[s.id], dtype=float)[:n]
        power[i, :len(row)] = row
    old_power = power.copy()
    cmax = np.array([float(s.charge_max_w) for s in assets])
    cmin = np.array([float(s.charge_min_w) for s in assets])
    dmax = np.array([float(s.discharge_max_w) for s in assets])
    dmin = np.array([float(s.discharge_min_w) for s in assets])
    eff_c = np.array([float(s.charge_efficiency) or 1.0 for s in assets])
    eff_d = np.array([float(s.discharge_efficiency) or 1.0 for s in assets])
    lmin = np.array([float(s.level_min_wh) for s in assets])
    level0 = np.array([float(s.level_wh) for s in assets])
    levels = _levels(problem, plan, assets, power, hours, level0, eff_c, eff_d)
    # milestones as arrays: (asset, PTU whose start the level is due at, lowest level)
    ms_asset, ms_ptu, ms_lo = [], [], []
    for i, s in enumerate(assets):
        for ptu, lo, _hi in s.target_profile:
            ms_asset.append(i)
            ms_ptu.append(int(ptu))
            ms_lo.append(float(lo))
        if s.target_wh is not None:
            ms_asset.append(i)
            ms_ptu.append(n if s.available_until is None else int(s.available_until))
            ms_lo.append(float(s.target_wh))
    m_asset = np.array(ms_asset, dtype=np.int64)
    m_ptu = np.minimum(np.array(ms_ptu, dtype=np.int64), n)
    m_lo = np.array(ms_lo, dtype=float)
    order = _order(assets, levels, level0, ends, hours, over[0], cmax, eff_c)
    cut = Cut(plan=plan, ptus=over)
    for t in over:
        need = grid[t] - limit[t]
        start_level = levels[:, t - 1] if t > 0 else level0
        forced = _forced_w(t, start_level, m_asset, m_ptu, m_lo, ends, hours, cmax, eff_c,
                           len(assets))
        for stage in ("above milestones", "discharge", "below milestones"):
            if need <= 0.5:
                break
            h = hours[t]
            # how far each level may fall from here on (no later level below its minimum)
            room_wh = np.maximum(0.0, (levels[:, t:] - lmin[:, None]).min(axis=1))
            p = power[:, t]
            if stage == "discharge":
                low = -np.minimum(dmax, room_wh * eff_d / max(h, 1e-9))
                reducible = np.where((dmax > 0) & (p <= 0), np.maximum(0.0, p - low), 0.0)
                reducible = np.where((p == 0) & (reducible < dmin), 0.0, reducible)
            else:
                floor = np.maximum(forced, 0.0) if stage == "above milestones" else np.zeros(len(p))
                floor = np.where(floor > 0, np.maximum(floor, cmin), 0.0)
                floor = np.maximum(floor, p - room_wh / max(h * 1.0, 1e-9) / eff_c)
                reducible = np.where(p > 0, np.maximum(0.0, p - np.minimum(floor, p)), 0.0)
            take = _shed(order, reducible, need)
            if not take.any():
                continue
            new = p - take
            if stage == "discharge":  # a partial discharge below its minimum goes to it
                new = np.where((new < 0) & (new > -dmin), -dmin, new)
                cut.discharged.update(assets[i].id for i in np.flatnonzero(take > 0))
            else:  # a charge cut below its minimum power is switched off
                new = np.where((new > 0) & (new < cmin - 0.5), 0.0, new)
                if stage == "below milestones":
                    cut.below_milestones.update(assets[i].id for i in np.flatnonzero(take > 0))
            new = np.floor(new)
            delta_level = h * (_level_rate(new, eff_c, eff_d) - _level_rate(p, eff_c, eff_d))
            levels[:, t:] += delta_level[:, None]
            need -= float(np.sum(p - new))
            power[:, t] = new
        grid[t] = limit[t] + max(need, 0.0)
        cut.excess_w = max(cut.excess_w, max(need, 0.0))
    changed = np.flatnonzero(np.any(power != old_power, axis=1))
    if not len(changed):
        return cut
    power_w = dict(plan.power_w)
    level_wh = dict(plan.level_wh)
    total = np.asarray(plan.grid_import_w, dtype=np.int64).copy()
    for k in changed.tolist():
        s = assets[k]
        first = int(np.flatnonzero(power[k] != old_power[k])[0])
        cut.changed[s.id] = first
        row = np.asarray(plan.power_w[s.id]).copy()
        row[:n] = power[k].astype(row.dtype)
        total[:n] += (power[k] - old_power[k]).astype(np.int64)
        power_w[s.id] = row
        if s.id in plan.level_wh:
            lv = np.asarray(plan.level_wh[s.id]).copy()
            lv[:n] = np.round(levels[k]).astype(lv.dtype)
            level_wh[s.id] = lv
    cut.plan = dataclasses.replace(
        plan, power_w=power_w, level_wh=level_wh, grid_import_w=total,
        notes=[*plan.notes, f"cut at once to a new import limit in PTUs {over[0]}-{over[-1]}: "
                            f"{len(cut.changed)} asset(s)"])
    return cut


def _levels(problem: Problem, plan: Plan, assets: list[StorageAsset], power: np.ndarray, hours: np.ndarray,
            level0: np.ndarray, eff_c: np.ndarray, eff_d: np.ndarray) -> np.ndarray:
    """The plan's level of each asset at the end of each PTU (computed where it has none)."""
    n = power.shape[1]
    levels = np.zeros_like(power)
    for i, s in enumerate(assets):
        row = plan.level_wh.get(s.id)
        if row is not None and len(row) >= n:
            levels[i] = np.asarray(row, dtype=float)[:n]
            continue
        usage = np.zeros(n) if s.usage_wh is None else np.asarray(s.usage_wh, dtype=float)[:n]
        rate = _level_rate(power[i], np.full(n, eff_c[i]), np.full(n, eff_d[i]))
        levels[i] = level0[i] + np.cumsum(hours * rate - np.pad(usage, (0, n - len(usage))))
    return levels


def _level_rate(power: np.ndarray, eff_c: np.ndarray, eff_d: np.ndarray) -> np.ndarray:
    """Wh of level per hour at these powers (charging times its efficiency, discharging over it)."""
    return eff_c * np.maximum(power, 0.0) - np.maximum(-power, 0.0) / eff_d


def _order(assets: list[StorageAsset], levels: np.ndarray, level0: np.ndarray, ends: np.ndarray,
           hours: np.ndarray, first: int, cmax: np.ndarray, eff_c: np.ndarray) -> np.ndarray:
    """Who is cut first: lowest priority, then the most hours of slack to the departure."""
    start_level = levels[:, first - 1] if first > 0 else level0
    began = ends[first] - hours[first]
    slack = np.full(len(assets), math.inf)
    for i, s in enumerate(assets):
        if s.target_wh is None or cmax[i] <= 0:
            continue
        until = len(ends) if s.available_until is None else min(int(s.available_until), len(ends))
        left_h = (ends[until - 1] if until > 0 else 0.0) - began
        missing = max(0.0, float(s.target_wh) - float(start_level[i]))
        slack[i] = left_h - missing / (cmax[i] * eff_c[i])
    priority = np.array([s.priority for s in assets])
    return np.lexsort((-slack, priority))


def _forced_w(t: int, start_level: np.ndarray, m_asset: np.ndarray, m_ptu: np.ndarray,
              m_lo: np.ndarray, ends: np.ndarray, hours: np.ndarray, cmax: np.ndarray,
              eff_c: np.ndarray, count: int) -> np.ndarray:
    """Per asset, the power PTU t must have for every later milestone to stay within reach at
    full power from the next PTU on (0: none forces anything)."""
    forced = np.zeros(count)
    ahead = m_ptu > t
    if not ahead.any():
        return forced
    a, p, lo = m_asset[ahead], m_ptu[ahead], m_lo[ahead]
    later_h = ends[p - 1] - ends[t]  # hours of PTUs t+1 .. p-1
    missing = lo - start_level[a] - cmax[a] * eff_c[a] * later_h
    need_w = missing / (max(hours[t], 1e-9) * eff_c[a])
    np.maximum.at(forced, a, need_w)
    return forced


def _shed(order: np.ndarray, reducible: np.ndarray, need: float) -> np.ndarray:
    """Watts to take from each asset, in `order`, until `need` is met (or nothing is left)."""
    ranked = reducible[order]
    cum = np.cumsum(ranked)
    k = int(np.searchsorted(cum, need))
    take = np.zeros_like(ranked)
    take[:k] = ranked[:k]
    if k < len(ranked):
        take[k] = need - (cum[k - 1] if k > 0 else 0.0)
    out = np.zeros_like(reducible)
    out[order] = take
    return out
