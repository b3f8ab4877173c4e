"""The CP-SAT model of the site plan, built from the layout arrays, solved from a full hint.

Integer variables per asset per PTU in units of the asset's power step (an EV's domain is
{0} U [min, max] as a domain with a hole, no extra booleans); levels in 0.1 mWh with integer
coefficients per asset and PTU (the PTU's hours x efficiency x step x 10^4, rounded; for a
partial PTU 0 rounded so that the model never counts more energy into a level than it gets, nor
less out, which keeps a hint at level_max feasible); grid import g[t] in W with the import
and export limits as its domain; the fuse per phase as one linear row per phase and PTU where it
can bind; the peak as an epigraph variable floored at the peak so far. The objective is the
same as `layout.evaluate` (energy, peak, unmet-target segments, level deficits, tie-break) in
units of 1e-8 EUR, so CP-SAT's answer can be compared with the LP bound and the repaired plan.

`improve` hands CP-SAT the repaired plan as a hint for every variable and keeps whatever it
finds within the time limit (FEASIBLE is accepted).
"""

from __future__ import annotations

import math
import time

import numpy as np
from ortools.sat.python import cp_model

from cem.planner.check import check_plan
from cem.planner.layout import (
    SEGMENT_FACTORS,
    TOL_EUR_PER_WH,
    Dispatch,
    Layout,
    grid_and_phases,
    share_vector,
    start_options,
)

__all__ = ["build_model", "check_plan", "improve"]

UNIT_EUR = 1e-8  # objective unit
LS = 10_000  # level unit: 0.1 mWh (integer level coefficients stay within 1e-5 of the truth)


class _Vars:
    """Variables in creation order, so numpy index arrays can select them."""

    def __init__(self, model: cp_model.CpModel) -> None:
        self.model = model
        self.all: list[cp_model.IntVar] = []
        self.hint: list[int] = []

    def new(self, lo: int, hi: int, hint: int) -> int:
        v = self.model.new_int_var(int(lo), int(hi), "")
        self.all.append(v)
        self.hint.append(int(min(max(hint, lo), hi)))
        return v.index

    def new_domain(self, intervals: list[list[int]], hint: int) -> int:
        v = self.model.new_int_var_from_domain(cp_model.Domain.from_intervals(intervals), "")
        self.all.append(v)
        self.hint.append(int(hint))
        return v.index

    def new_bool(self, hint: bool) -> int:
        v = self.model.new_bool_var("")
        self.all.append(v)
        self.hint.append(int(hint))
        return v.index

    def expr(self, idx: np.ndarray, coef: np.ndarray) -> cp_model.LinearExprT:
        return cp_model.LinearExpr.weighted_sum([self.all[k] for k in idx], [int(c) for c in coef])


def _phase_scale(lay: Layout) -> int:
    """Integer factor making the phase shares (almost) integral: 3 for 1/3 splits, else 1000."""
    shares = [lay.share.ravel(), lay.pv_share.ravel()]
    shares += [share_vector(m.phase_share) for m in lay.problem.modes]
    shares += [share_vector(p.phase_share) for p in lay.problem.profiles]
    allv = np.concatenate(shares) if shares else np.zeros(0)
    return 3 if np.allclose(allv * 3, np.rint(allv * 3), atol=1e-9) else 1000


def build_model(lay: Layout, hint: Dispatch) -> tuple[cp_model.CpModel, _Vars, dict]:
    """The CP-SAT model with `hint` as a complete hint; returns the index arrays to read back."""
    n, S, K = lay.n, lay.s, lay.k
    hours = lay.ptu_h
    pr = lay.problem
    m = cp_model.CpModel()
    V = _Vars(m)
    step = lay.step.astype(np.int64)
    c_var = np.full((S, n), -1, dtype=np.int64)
    d_var = np.full((S, n), -1, dtype=np.int64)
    hc = np.rint(hint.charge / step[:, None]).astype(np.int64)
    hd = np.rint(hint.discharge / step[:, None]).astype(np.int64)
    for i in range(S):
        cmax_u = int(lay.cmax[i] // step[i])
        cmin_u = int(lay.cmin[i] // step[i])
        dmax_u = int(lay.dmax[i] // step[i])
        dmin_u = int(lay.dmin[i] // step[i])
        c_dom = [[0, 0], [max(cmin_u, 1), cmax_u]] if cmax_u > 0 else [[0, 0]]
        d_dom = [[0, 0], [max(dmin_u, 1), dmax_u]] if dmax_u > 0 else [[0, 0]]
        for t in range(int(lay.first[i]), int(lay.last[i])):
            if cmax_u > 0:
                c_var[i, t] = V.new_domain(c_dom, hc[i, t])
            if dmax_u > 0:
                d_var[i, t] = V.new_domain(d_dom, hd[i, t])
                if cmax_u > 0:
                    b = V.new_bool(hc[i, t] > 0)
                    m.add(V.all[c_var[i, t]] == 0).only_enforce_if(V.all[b].negated())
                    m.add(V.all[d_var[i, t]] == 0).only_enforce_if(V.all[b])
    cur_var = np.full((K, n), -1, dtype=np.int64)
    for j in range(K):
        if lay.pv_curtailable[j]:
            for t in np.flatnonzero(lay.pv[j] > 0).tolist():
                cur_var[j, t] = V.new(0, math.floor(lay.pv[j, t]), round(hint.curtail[j, t]))
    # modes and profiles
    other_terms: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # t, var, coef, share
    mode_on: list[np.ndarray] = []
    mode_q: list[np.ndarray] = []
    for j, ma in enumerate(pr.modes):
        nm = len(ma.modes)
        on = np.zeros((n, nm), dtype=np.int64)
        q = np.zeros(n, dtype=np.int64)
        lo_all = min(pm.min_w for pm in ma.modes)
        hi_all = max(pm.max_w for pm in ma.modes)
        for t in range(n):
            k_h = int(hint.mode_index[j][t]) if hint.mode_index else 0
            for k in range(nm):
                on[t, k] = V.new_bool(k == k_h)
            q[t] = V.new(lo_all, hi_all, round(hint.mode_power[j, t]) if hint.mode_power is not None else lo_all)
            m.add_exactly_one([V.all[x] for x in on[t]])
            for k, pm in enumerate(ma.modes):
                m.add_linear_constraint(V.all[q[t]], pm.min_w, pm.max_w).only_enforce_if(V.all[on[t, k]])
        if ma.min_on_ptus > 1:  # a mode switched on stays on for min_on_ptus PTUs
            for t in range(1, n):
                for k in range(nm):
                    for j in range(1, min(ma.min_on_ptus, n - t)):
                        m.add(V.all[on[t, k]] - V.all[on[t - 1, k]] <= V.all[on[t + j, k]])
        mode_on.append(on)
        mode_q.append(q)
        other_terms.append((np.arange(n), q, np.ones(n, dtype=np.int64), share_vector(ma.phase_share)))
    prof_on: list[np.ndarray] = []
    prof_starts: list[np.ndarray] = []
    prof_alts: list[np.ndarray] = []
    for j, p in enumerate(pr.profiles):
        # one boolean per (shape, start), exactly one true
        options = start_options(p, n)
        starts = np.concatenate([st for _k, _shape, st in options])
        alts = np.concatenate([np.full(len(st), k) for k, _shape, st in options])
        h_start = hint.profile_start[j] if j < len(hint.profile_start) else int(starts[0])
        h_alt = hint.profile_choice[j] if j < len(hint.profile_choice) else int(alts[0])
        on = np.array([V.new_bool(int(s) == h_start and int(a) == h_alt)
                       for s, a in zip(starts, alts, strict=True)], dtype=np.int64)
        m.add_exactly_one([V.all[x] for x in on])
        t_parts: list[np.ndarray] = []
        v_parts: list[np.ndarray] = []
        c_parts: list[np.ndarray] = []
        col_at = iter([int(x) for x in on])
        for _k, shape, st in options:
            prof = np.rint(shape).astype(np.int64)
            for s in st:
                column: int = next(col_at)
                k = min(len(prof), n - int(s))
                t_parts.append(np.arange(s, s + k))
                v_parts.append(np.full(k, column))
                c_parts.append(prof[:k])
        prof_on.append(on)
        prof_starts.append(starts)
        prof_alts.append(alts)
        other_terms.append((np.concatenate(t_parts), np.concatenate(v_parts),
                            np.concatenate(c_parts), share_vector(p.phase_share)))
    # grid import per PTU: g = fixed - pv + charge - discharge + curtail + others
    g_lo = np.ceil(-lay.export_lim).astype(np.int64)
    g_hi = np.floor(lay.import_lim).astype(np.int64)
    const = np.rint(lay.fixed_w - lay.pv.sum(axis=0)).astype(np.int64)
    g_hint_disp = _hint_grid(lay, hint)
    g_var = np.array([V.new(g_lo[t], max(g_hi[t], g_lo[t]), round(g_hint_disp[t])) for t in range(n)],
                     dtype=np.int64)
    ci, ct = np.nonzero(c_var >= 0)
    di, dtt = np.nonzero(d_var >= 0)
    ki, kt = np.nonzero(cur_var >= 0)
    by_t_idx: list[list[np.ndarray]] = [[] for _ in range(n)]
    by_t_coef: list[list[np.ndarray]] = [[] for _ in range(n)]

    def scatter(ts: np.ndarray, idx: np.ndarray, coef: np.ndarray,
                lists_i: list[list[np.ndarray]], lists_c: list[list[np.ndarray]]) -> None:
        if len(ts) == 0:
            return
        order = np.argsort(ts, kind="stable")
        ts, idx, coef = ts[order], idx[order], coef[order]
        bounds = np.searchsorted(ts, np.arange(n + 1))
        for t in range(n):
            a, b = bounds[t], bounds[t + 1]
            if b > a:
                lists_i[t].append(idx[a:b])
                lists_c[t].append(coef[a:b])

    scatter(ct, c_var[ci, ct], step[ci], by_t_idx, by_t_coef)
    scatter(dtt, d_var[di, dtt], -step[di], by_t_idx, by_t_coef)
    scatter(kt, cur_var[ki, kt], np.ones(len(kt), dtype=np.int64), by_t_idx, by_t_coef)
    for tt, vv, cc, _sh in other_terms:
        scatter(tt, vv, cc, by_t_idx, by_t_coef)
    for t in range(n):
        idx = np.concatenate([*by_t_idx[t], [g_var[t]]])
        coef = np.concatenate([*by_t_coef[t], [-1]])
        m.add(V.expr(idx, coef) == -int(const[t]))
    # fuse per phase where it can bind
    scale = _phase_scale(lay)
    pv_phase = lay.pv_share.T @ lay.pv if K else np.zeros((3, n))
    ph_const = lay.fixed_phase - pv_phase
    for ph in range(3):
        sh = lay.share[:, ph]
        up = ph_const[ph] + (sh[:, None] * lay.cmax[:, None] * (c_var >= 0)).sum(axis=0)
        dn = ph_const[ph] - (sh[:, None] * lay.dmax[:, None] * (d_var >= 0)).sum(axis=0)
        if K:
            up = up + (lay.pv_share[:, ph][:, None] * lay.pv * (cur_var >= 0)).sum(axis=0)
        need = (up > lay.fuse_up[ph] + 1e-6) | (dn < -lay.fuse_dn[ph] - 1e-6)
        for tt, _vv, _cc, share in other_terms:
            if share[ph] != 0:
                need[tt] = True
        if not np.any(need):
            continue
        li: list[list[np.ndarray]] = [[] for _ in range(n)]
        lc: list[list[np.ndarray]] = [[] for _ in range(n)]
        w = np.rint(sh * scale).astype(np.int64)
        sel = w[ci] != 0
        scatter(ct[sel], c_var[ci[sel], ct[sel]], w[ci[sel]] * step[ci[sel]], li, lc)
        sel = w[di] != 0
        scatter(dtt[sel], d_var[di[sel], dtt[sel]], -w[di[sel]] * step[di[sel]], li, lc)
        if K:
            wk = np.rint(lay.pv_share[:, ph] * scale).astype(np.int64)
            sel = wk[ki] != 0
            scatter(kt[sel], cur_var[ki[sel], kt[sel]], wk[ki[sel]], li, lc)
        for tt, vv, cc, share in other_terms:
            s_ = round(share[ph] * scale)
            if s_:
                scatter(tt, vv, cc * s_, li, lc)
        for t in np.flatnonzero(need).tolist():
            if not li[t]:
                continue
            lo = math.ceil(scale * (-lay.fuse_dn[ph, t] - ph_const[ph, t]) - 1e-6)
            hi = math.floor(scale * (lay.fuse_up[ph, t] - ph_const[ph, t]) + 1e-6)
            m.add_linear_constraint(V.expr(np.concatenate(li[t]), np.concatenate(lc[t])), lo, hi)
    # objective terms (units of UNIT_EUR)
    obj_idx: list[np.ndarray] = []
    obj_coef: list[np.ndarray] = []

    def cost(idx: np.ndarray, eur: np.ndarray) -> None:
        obj_idx.append(np.asarray(idx, dtype=np.int64))
        obj_coef.append(np.rint(np.asarray(eur, dtype=float) / UNIT_EUR).astype(np.int64))

    cost(g_var, lay.p_exp_eff * hours / 1000)
    extra = lay.p_imp - lay.p_exp_eff
    for t in np.flatnonzero((extra > 0) & (g_lo < 0)).tolist():
        imp = V.new(0, max(int(g_hi[t]), 0), max(round(g_hint_disp[t]), 0))
        m.add(V.all[imp] >= V.all[g_var[t]])
        cost(np.array([imp]), np.array([extra[t] * hours[t] / 1000]))
    pos = (extra > 0) & (g_lo >= 0)
    cost(g_var[pos], extra[pos] * hours[pos] / 1000)
    if lay.peak_price > 0:
        top = int(max(g_hi.max(), math.ceil(lay.peak_so_far)))
        pk = V.new(math.ceil(lay.peak_so_far), top, int(max(lay.peak_so_far, g_hint_disp.max())) + 1)
        for t in range(n):
            m.add(V.all[pk] >= V.all[g_var[t]])
        cost(np.array([pk]), np.array([lay.peak_price]))
    cost(c_var[ci, ct], lay.tie[ct] * hours[ct] / 1000 * step[ci])
    kc, kd = _level_coefficients(lay)
    has_t = ~np.isnan(lay.target)
    need_wh = np.where(has_t, np.nan_to_num(lay.target) - lay.level0, 0.0)

    def unmet_vars(i: int, achieved_hint_wh: float) -> tuple[np.ndarray, np.ndarray]:
        """Unmet segments (Wh) for asset i, hinted from the hint's shortfall."""
        k = len(SEGMENT_FACTORS)
        seg = max(math.ceil(need_wh[i] / k), 0)
        short = max(math.ceil(need_wh[i] - achieved_hint_wh), 0)
        tol = int(lay.tol_wh[i])
        h = min(short, tol)
        short -= h
        ids = [V.new(0, tol, h)]
        for j in range(k):
            top = seg if j < k - 1 else max(math.ceil(need_wh[i]), 0) + 1
            h = min(short, top)
            short -= h
            ids.append(V.new(0, top, h))
        us = np.array(ids, dtype=np.int64)
        cost(us, np.array([TOL_EUR_PER_WH, *(lay.weight[i] * np.array(SEGMENT_FACTORS))]))
        return us, np.full(len(ids), LS, dtype=np.int64)

    mono = ~lay.needs_levels
    for i in np.flatnonzero(mono & (lay.cmax > 0)).tolist():
        ts = np.flatnonzero(c_var[i] >= 0)
        if len(ts) == 0:
            continue
        idx = c_var[i, ts]
        coef = kc[i, ts]
        achieved_mwh = int((hc[i, ts] * coef).sum())
        if has_t[i] and need_wh[i] > 0:
            us, uc = unmet_vars(i, achieved_mwh / LS)
            m.add(V.expr(np.concatenate([idx, us]), np.concatenate([coef, uc]))
                  >= math.ceil(need_wh[i] * LS))
        cap = lay.lmax[i] - lay.level0[i]
        if int(coef.sum()) * (lay.cmax[i] // step[i]) > cap * LS:
            m.add(V.expr(idx, coef) <= math.floor(max(cap, 0) * LS))
    for i in np.flatnonzero(lay.needs_levels).tolist():
        a, b = int(lay.first[i]), int(lay.last[i])
        if b <= a:
            continue
        usage = np.rint(lay.usage[i, a:b] * LS).astype(np.int64)
        l0 = round(lay.level0[i] * LS)
        hint_l = l0 + np.cumsum(hc[i, a:b] * kc[i, a:b] * (c_var[i, a:b] >= 0)
                                - hd[i, a:b] * kd[i, a:b] * (d_var[i, a:b] >= 0) - usage)
        lo = int(min(l0, lay.lmin[i] * LS) - usage.clip(0).sum()
                 - int(kd[i, a:b].sum()) * (lay.dmax[i] // step[i])) - 1
        hi = math.floor(lay.lmax[i] * LS) + LS  # 1 Wh for the rounding of coefficients
        lv = np.array([V.new(lo, hi, int(hint_l[k])) for k in range(b - a)], dtype=np.int64)
        lmin_m = math.ceil(lay.lmin[i] * LS)
        for k, t in enumerate(range(a, b)):
            row_idx = [int(lv[k])]
            row_coef = [1]
            if k > 0:
                row_idx.append(int(lv[k - 1]))
                row_coef.append(-1)
            if c_var[i, t] >= 0:
                row_idx.append(int(c_var[i, t]))
                row_coef.append(-int(kc[i, t]))
            if d_var[i, t] >= 0:
                row_idx.append(int(d_var[i, t]))
                row_coef.append(int(kd[i, t]))
            rhs = -int(usage[k]) + (l0 if k == 0 else 0)
            m.add(V.expr(np.array(row_idx), np.array(row_coef)) == rhs)
            # soft level_min: deficit in mWh
            if lmin_m > lo:
                s = V.new(0, lmin_m - lo, max(lmin_m - int(hint_l[k]), 0))
                m.add(V.all[lv[k]] + V.all[s] >= lmin_m)
                cost(np.array([s]), np.array([lay.weight[i] / LS]))
        if has_t[i]:
            us, uc = unmet_vars(i, hint_l[-1] / LS - lay.level0[i])
            m.add(V.all[lv[-1]] + V.expr(us, uc) >= math.ceil(lay.target[i] * LS))
        for ptu, p_lo, p_hi in pr.storage[i].target_profile:
            if a < ptu <= b:
                x = lv[ptu - a - 1]
                hl = int(hint_l[ptu - a - 1])
                u_lo = V.new(0, max(p_lo * LS - lo, 0), max(p_lo * LS - hl, 0))
                u_hi = V.new(0, max(hi - p_hi * LS, 0), max(hl - p_hi * LS, 0))
                m.add(V.all[x] + V.all[u_lo] >= p_lo * LS)
                m.add(V.all[x] - V.all[u_hi] <= p_hi * LS)
                w_lo = float(pr.storage[i].milestone_eur_per_wh.get(int(ptu), lay.weight[i]))
                cost(np.array([u_lo, u_hi]), np.array([w_lo / LS, lay.weight[i] / LS]))
    idx = np.concatenate(obj_idx)
    coef = np.concatenate(obj_coef)
    keep = coef != 0
    m.minimize(V.expr(idx[keep], coef[keep]))
    h = m.proto.solution_hint
    h.vars.extend(range(len(V.all)))
    h.values.extend(V.hint)
    index = {"charge": c_var, "discharge": d_var, "curtail": cur_var, "mode_on": mode_on,
             "mode_q": mode_q, "profile_on": prof_on, "profile_starts": prof_starts,
             "profile_alts": prof_alts}
    return m, V, index


def _level_coefficients(lay: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Level change (units of 1/LS Wh) per power step charged / discharged, per asset and PTU.

    Whole PTUs round to the nearest unit. A partial PTU 0 has no round coefficient: there the
    charge coefficient rounds down and the discharge one up, so the model's level never runs
    ahead of the true one and a hint filled exactly to level_max keeps its cap row.
    """
    step = lay.step.astype(float)[:, None]
    kc_f = lay.ptu_h * lay.eta_c[:, None] * step * LS
    kd_f = lay.ptu_h / lay.eta_d[:, None] * step * LS
    kc = np.rint(kc_f)
    kd = np.rint(kd_f)
    partial = lay.part < 1.0
    kc[:, partial] = np.floor(kc_f[:, partial] + 1e-9)
    kd[:, partial] = np.ceil(kd_f[:, partial] - 1e-9)
    return kc.astype(np.int64), kd.astype(np.int64)


def _hint_grid(lay: Layout, hint: Dispatch) -> np.ndarray:
    g, _ = grid_and_phases(lay, hint)
    return g


class _StopAtGap(cp_model.CpSolverSolutionCallback):
    """Stops the search once a solution is within `slack_eur` of the LP bound."""

    def __init__(self, bound_eur: float | None, slack_eur: float) -> None:
        super().__init__()
        self.bound = bound_eur
        self.slack = slack_eur

    def on_solution_callback(self) -> None:
        if self.bound is None:
            return
        if self.objective_value * UNIT_EUR - self.bound <= self.slack:
            self.stop_search()


def improve(lay: Layout, hint: Dispatch, *, time_limit_s: float, workers: int = 2,
            bound_eur: float | None = None, slack_eur: float = 0.0
            ) -> tuple[Dispatch | None, str, float]:
    """Solve the CP-SAT model from the full hint; (dispatch or None, status, build seconds).

    Stops early once a solution is within `slack_eur` of `bound_eur` (the LP bound) or of
    CP-SAT's own bound.
    """
    t0 = time.perf_counter()
    model, _V, index = build_model(lay, hint)
    build_s = time.perf_counter() - t0
    left = time_limit_s - build_s
    if left <= 0.02:
        return None, "NO_TIME", build_s
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.num_workers = max(int(workers), 1)
    p.max_time_in_seconds = left
    p.root_lp_iterations = 100_000
    p.absolute_gap_limit = max(slack_eur, 0.0) / UNIT_EUR
    # CP-SAT would catch Ctrl-C and leave SIGINT at SIG_DFL after the solve: the next Ctrl-C
    # would kill `cem run` / `cem demo` without their clean shutdown
    p.catch_sigint_signal = False
    status = solver.solve(model, _StopAtGap(bound_eur, slack_eur))
    name = solver.status_name(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, name, build_s
    if status == cp_model.OPTIMAL and not _proved(solver):
        name = "FEASIBLE"  # CP-SAT says OPTIMAL once within absolute_gap_limit: not a proof
    x = np.asarray(list(solver.response_proto.solution), dtype=np.int64)
    return _dispatch(lay, index, x), name, build_s


def _proved(solver: cp_model.CpSolver) -> bool:
    """Whether the solution is optimal, not just within the gap limit of its bound."""
    objective, bound = solver.objective_value, solver.best_objective_bound
    return objective - bound <= max(1e-9 * abs(objective), 1.0)


def _dispatch(lay: Layout, index: dict, x: np.ndarray) -> Dispatch:
    step = lay.step[:, None].astype(float)

    def take(idx: np.ndarray) -> np.ndarray:
        out = np.zeros(idx.shape)
        ok = idx >= 0
        out[ok] = x[idx[ok]]
        return out

    disp = Dispatch(take(index["charge"]) * step, take(index["discharge"]) * step, take(index["curtail"]))
    disp.mode_index = [np.argmax(x[on], axis=1) for on in index["mode_on"]]
    disp.mode_power = np.array([x[q] for q in index["mode_q"]], dtype=float).reshape(len(index["mode_q"]), lay.n)
    for on, starts, alts in zip(index["profile_on"], index["profile_starts"], index["profile_alts"],
                                strict=True):
        best = int(np.argmax(x[on]))
        disp.profile_start.append(int(starts[best]))
        disp.profile_choice.append(int(alts[best]))
    return disp


