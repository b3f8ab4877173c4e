"""The plan checker: every hard limit and asset rule a returned plan must keep.

`check_plan(problem, plan)` lists violations in words (empty list: the plan is valid): fuse
current per phase (import and export direction), import and export limits per PTU, storage
power outside its window or outside {0} U [min, max] (and discharge outside its range),
levels above level_max (PTU 0 lasting only `Problem.first_ptu_share`), levels below level_min
and targets missed (an EV's departure target, a PEBC energy window's lower bound) unless the
plan reports a shortfall for that asset, and shiftable profiles that do not run one of their
shapes from a start in that shape's window. Limits that the inputs alone break (base load above
the import limit) are noted in the plan and still reported here: they are real.
"""

from __future__ import annotations

import numpy as np

from cem.planner.assets import Plan, Problem, ShiftableProfile
from cem.planner.layout import first_ptu_share, per_ptu, profile_power, ptu_hours

TOL_W = 1.0


def _share(v: tuple[float, float, float]) -> np.ndarray:
    a = np.asarray(v, dtype=float)
    return a / a.sum() if a.sum() > 0 else np.full(3, 1 / 3)


def check_plan(problem: Problem, plan: Plan) -> list[str]:
    """Violations of hard limits and asset domains in `plan` (empty when it is valid)."""
    out: list[str] = []
    n = problem.n_ptus
    lim = problem.limits
    g = np.zeros(n)
    phase = np.zeros((3, n))

    def add(power: np.ndarray, share: tuple[float, float, float]) -> None:
        nonlocal g
        g += power
        phase[:] += np.outer(_share(share), power)

    for f in problem.fixed:
        add(per_ptu(f.power_w, n), f.phase_share)
    for c in problem.curtailable:
        prod = np.maximum(per_ptu(c.production_w, n), 0)
        cur = np.asarray(plan.curtailed_w.get(c.id, np.zeros(n)), dtype=float)[:n]
        if np.any(cur < -TOL_W) or np.any(cur > prod + TOL_W):
            out.append(f"{c.id}: curtailment outside 0..production")
        if not c.curtailable and np.any(cur > TOL_W):
            out.append(f"{c.id}: curtailed but not curtailable")
        add(-(prod - cur), c.phase_share)
    _check_storage(problem, plan, out, g, phase)
    for m in problem.modes:
        p = np.asarray(plan.power_w.get(m.id, np.zeros(n)), dtype=float)[:n]
        add(p, m.phase_share)
        names = plan.mode.get(m.id)
        if names is not None and m.min_on_ptus > 1:
            for t in range(1, len(names)):
                if names[t] != names[t - 1]:
                    run = names[t:t + m.min_on_ptus]
                    if any(x != names[t] for x in run):
                        out.append(f"{m.id}: mode {names[t]} from PTU {t} held less than "
                                   f"{m.min_on_ptus} PTUs")
                        break
        if names is not None:
            by_id = {pm.id: pm for pm in m.modes}
            for t, name in enumerate(names[:n]):
                pm = by_id.get(name) if name is not None else None
                if pm is None or not (pm.min_w - TOL_W <= p[t] <= pm.max_w + TOL_W):
                    out.append(f"{m.id}: power {p[t]:.0f} W in PTU {t} not within mode {name}")
                    break
    for pf in problem.profiles:
        p = np.asarray(plan.power_w.get(pf.id, np.zeros(n)), dtype=float)[:n]
        add(p, pf.phase_share)
        _check_profile(pf, plan, p, n, out)
    fuse = lim.planned_fuse_w_per_phase
    for ph in range(3):
        bad = np.flatnonzero(phase[ph] > fuse + TOL_W)
        if len(bad):
            t = int(bad[0])
            out.append(f"fuse L{ph + 1}: {phase[ph, t] / lim.voltage_v:.1f} A > {lim.planned_fuse_a} A in PTU {t} "
                       f"({len(bad)} PTUs)")
        bad = np.flatnonzero(-phase[ph] > fuse + TOL_W)
        if len(bad):
            t = int(bad[0])
            out.append(f"fuse L{ph + 1} (export): {-phase[ph, t] / lim.voltage_v:.1f} A > {lim.planned_fuse_a} A "
                       f"in PTU {t} ({len(bad)} PTUs)")
    imp = per_ptu(lim.planned_import_limit_w, n)
    bad = np.flatnonzero(g > imp + TOL_W)
    if len(bad):
        t = int(bad[0])
        out.append(f"import {g[t]:.0f} W > limit {imp[t]:.0f} W in PTU {t} ({len(bad)} PTUs)")
    exp = per_ptu(lim.export_limit_w, n)
    bad = np.flatnonzero(-g > exp + TOL_W)
    if len(bad):
        t = int(bad[0])
        out.append(f"export {-g[t]:.0f} W > limit {exp[t]:.0f} W in PTU {t} ({len(bad)} PTUs)")
    reported = per_ptu(plan.grid_import_w, n)
    if reported.shape == g.shape and np.any(np.abs(reported - g) > TOL_W * 10):
        t = int(np.argmax(np.abs(reported - g)))
        out.append(f"grid_import_w {reported[t]:.0f} W differs from the sum of powers {g[t]:.0f} W in PTU {t}")
    return out


def _check_storage(problem: Problem, plan: Plan, out: list[str], g: np.ndarray, phase: np.ndarray) -> None:
    """Windows, power domains and levels of every storage asset, checked as arrays."""
    n = problem.n_ptus
    dt = problem.ptu_minutes / 60
    hours = ptu_hours(problem)  # PTU 0 only the share still ahead of the plan's start
    assets = [a for a in problem.storage if plan.power_w.get(a.id) is not None]
    out.extend(f"{a.id}: no power in the plan" for a in problem.storage if plan.power_w.get(a.id) is None)
    if not assets:
        return
    P = np.array([per_ptu(plan.power_w[a.id], n) for a in assets]).reshape(len(assets), n)
    keys = [tuple(float(x) for x in a.phase_share) for a in assets]
    shares = {k: np.asarray(k) / sum(k) if sum(k) > 0 else np.full(3, 1 / 3) for k in set(keys)}
    share = np.array([shares[k] for k in keys]).reshape(len(assets), 3)  # a few distinct ones
    g += P.sum(axis=0)
    phase += np.einsum("sp,sn->pn", share, P)  # not share.T @ P: see layout.phase_sum
    first = np.array([max(a.available_from, 0) for a in assets])
    last = np.array([n if a.available_until is None else min(a.available_until, n) for a in assets])
    t = np.arange(n)
    inside = (t[None, :] >= first[:, None]) & (t[None, :] < last[:, None])
    cmin = np.array([a.charge_min_w for a in assets], dtype=float)[:, None]
    cmax = np.array([a.charge_max_w for a in assets], dtype=float)[:, None]
    dmin = np.array([a.discharge_min_w for a in assets], dtype=float)[:, None]
    dmax = np.array([a.discharge_max_w for a in assets], dtype=float)[:, None]
    outside = ~inside & (np.abs(P) > TOL_W)
    ch = P > TOL_W
    bad_c = ch & ((P < cmin - TOL_W) | (P > cmax + TOL_W))
    dis = P < -TOL_W
    bad_d = dis & ((-P < dmin - TOL_W) | (-P > dmax + TOL_W))
    usage = np.zeros((len(assets), n))
    for k, a in enumerate(assets):
        if a.usage_wh is not None:
            u = per_ptu(a.usage_wh, n)
            usage[k, first[k]:last[k]] = u[first[k]:last[k]]
    if n:
        usage[:, 0] *= first_ptu_share(problem)  # given per whole PTU
    eta_c = np.array([a.charge_efficiency for a in assets])[:, None]
    eta_d = np.array([a.discharge_efficiency for a in assets])[:, None]
    level0 = np.array([a.level_wh for a in assets], dtype=float)[:, None]
    lmax = np.array([a.level_max_wh for a in assets], dtype=float)[:, None]
    lmin = np.array([a.level_min_wh for a in assets], dtype=float)[:, None]
    lv = level0 + np.cumsum(hours * (eta_c * np.maximum(P, 0) - np.maximum(-P, 0) / eta_d) - usage, axis=1)
    tol = 10.0 + 1e-4 * np.maximum(np.abs(lmax), 1)  # within metering accuracy
    over = lv > np.maximum(lmax, level0) + tol
    under = lv < lmin - tol
    # the level at the end of the window against the target (a PEBC energy window's lower bound)
    target = np.array([np.nan if a.target_wh is None else float(a.target_wh) for a in assets])
    end = np.where(last > first, lv[np.arange(len(assets)), np.maximum(last - 1, 0)], level0[:, 0])
    # the last power step of one PTU may stay unmet without a shortfall (as `to_plan` reports)
    step_wh = dt * eta_c[:, 0] * np.array([max(a.step_w, 10) for a in assets], dtype=float)
    short = ~np.isnan(target) & (end < np.nan_to_num(target) - tol[:, 0] - step_wh)
    short &= np.array([a.id not in plan.shortfall for a in assets])
    rows = np.flatnonzero(outside.any(axis=1) | bad_c.any(axis=1) | bad_d.any(axis=1)
                          | over.any(axis=1) | under.any(axis=1) | short)
    for k in rows.tolist():
        a = assets[k]
        p = P[k]
        if outside[k].any():
            x = int(np.argmax(outside[k]))
            out.append(f"{a.id}: power {p[x]:.0f} W in PTU {x} outside its window {first[k]}..{last[k]}")
        if bad_c[k].any():
            x = int(np.argmax(bad_c[k]))
            out.append(f"{a.id}: charge {p[x]:.0f} W in PTU {x} outside {{0}} U "
                       f"[{a.charge_min_w}, {a.charge_max_w}]")
        if bad_d[k].any():
            x = int(np.argmax(bad_d[k]))
            out.append(f"{a.id}: discharge {-p[x]:.0f} W in PTU {x} outside {{0}} U "
                       f"[{a.discharge_min_w}, {a.discharge_max_w}]")
        if over[k].any():
            x = int(np.argmax(over[k]))
            out.append(f"{a.id}: level {lv[k, x]:.0f} Wh after PTU {x} above level_max {a.level_max_wh}")
        if short[k]:
            out.append(f"{a.id}: level {end[k]:.0f} Wh at PTU {last[k]} below its target "
                       f"{a.target_wh} Wh without a reported shortfall")
        if under[k].any() and a.id not in plan.shortfall:
            x = int(np.argmax(under[k]))
            out.append(f"{a.id}: level {lv[k, x]:.0f} Wh after PTU {x} below level_min {a.level_min_wh} "
                       "without a reported shortfall")


def _check_profile(pf: ShiftableProfile, plan: Plan, p: np.ndarray, n: int, out: list[str]) -> None:
    """A profile runs one of its shapes, from a start inside that shape's window."""
    start = plan.profile_start.get(pf.id)
    if start is None:
        return
    options = pf.options()
    choice = plan.profile_choice.get(pf.id, 0)
    if not 0 <= choice < len(options):
        out.append(f"{pf.id}: option {choice} does not exist ({len(options)} shapes)")
        return
    opt = options[choice]
    if not (opt.earliest_start <= start <= opt.latest_start):
        out.append(f"{pf.id}: start {start} outside {opt.earliest_start}..{opt.latest_start}"
                   + (f" (option {choice})" if choice else ""))
    expected = np.rint(profile_power(opt.profile_w, start, n))
    if np.any(np.abs(p - expected) > TOL_W):
        t = int(np.argmax(np.abs(p - expected)))
        out.append(f"{pf.id}: power {p[t]:.0f} W in PTU {t} is not its shape {choice} "
                   f"started at PTU {start} ({expected[t]:.0f} W)")
