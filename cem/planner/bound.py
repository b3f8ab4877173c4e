"""The LP relaxation of the site plan, solved with HiGHS: a lower bound and a fractional plan.

The LP has the same variables, limits and objective as the CP-SAT model (see `layout.py`),
with the integrality dropped: an EV's {0} U [min, max] becomes [0, max], mode choices and a
profile's (shape, start) choice become fractions. Its optimum is therefore a lower bound on
every plan's objective, and its solution is the starting point that `hint.py` rounds and
repairs into a plan.
The matrix is assembled from numpy index arrays (kW and kWh, for conditioning) and handed to
HiGHS in one `passModel` call.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field

import highspy
import numpy as np

from cem.planner.layout import SEGMENT_FACTORS, TOL_EUR_PER_WH, Dispatch, Layout, start_options

INF = highspy.kHighsInf


class _LpArrays:
    """Columns, rows and coefficients collected as numpy blocks."""

    def __init__(self) -> None:
        self.col_lb: list[np.ndarray] = []
        self.col_ub: list[np.ndarray] = []
        self.col_cost: list[np.ndarray] = []
        self.n_cols = 0
        self.row_lb: list[np.ndarray] = []
        self.row_ub: list[np.ndarray] = []
        self.n_rows = 0
        self.a_row: list[np.ndarray] = []
        self.a_col: list[np.ndarray] = []
        self.a_val: list[np.ndarray] = []

    def cols(self, lb: np.ndarray | float, ub: np.ndarray | float, cost: np.ndarray | float,
             count: int) -> np.ndarray:
        idx = np.arange(self.n_cols, self.n_cols + count)
        self.col_lb.append(np.broadcast_to(np.asarray(lb, dtype=float), (count,)))
        self.col_ub.append(np.broadcast_to(np.asarray(ub, dtype=float), (count,)))
        self.col_cost.append(np.broadcast_to(np.asarray(cost, dtype=float), (count,)))
        self.n_cols += count
        return idx

    def rows(self, lb: np.ndarray | float, ub: np.ndarray | float, count: int) -> np.ndarray:
        idx = np.arange(self.n_rows, self.n_rows + count)
        self.row_lb.append(np.broadcast_to(np.asarray(lb, dtype=float), (count,)))
        self.row_ub.append(np.broadcast_to(np.asarray(ub, dtype=float), (count,)))
        self.n_rows += count
        return idx

    def coef(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray | float) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        vals = np.broadcast_to(np.asarray(vals, dtype=float), rows.shape)
        keep = vals != 0
        self.a_row.append(rows[keep])
        self.a_col.append(cols[keep])
        self.a_val.append(vals[keep])

    def to_highs(self) -> highspy.HighsLp:
        lp = highspy.HighsLp()
        lp.num_col_ = self.n_cols
        lp.num_row_ = self.n_rows
        lp.col_cost_ = np.concatenate(self.col_cost) if self.col_cost else np.zeros(0)
        lp.col_lower_ = np.concatenate(self.col_lb) if self.col_lb else np.zeros(0)
        lp.col_upper_ = np.concatenate(self.col_ub) if self.col_ub else np.zeros(0)
        lp.row_lower_ = np.concatenate(self.row_lb) if self.row_lb else np.zeros(0)
        lp.row_upper_ = np.concatenate(self.row_ub) if self.row_ub else np.zeros(0)
        r = np.concatenate(self.a_row) if self.a_row else np.zeros(0, dtype=np.int64)
        c = np.concatenate(self.a_col) if self.a_col else np.zeros(0, dtype=np.int64)
        v = np.concatenate(self.a_val) if self.a_val else np.zeros(0)
        order = np.argsort(c, kind="stable")
        counts = np.bincount(c, minlength=self.n_cols)
        start = np.zeros(self.n_cols + 1, dtype=np.int64)
        np.cumsum(counts, out=start[1:])
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = start.astype(np.int32)
        lp.a_matrix_.index_ = r[order].astype(np.int32)
        lp.a_matrix_.value_ = v[order]
        lp.a_matrix_.num_col_ = self.n_cols
        lp.a_matrix_.num_row_ = self.n_rows
        return lp


@dataclass
class LpIndex:
    """Where each planner quantity sits among the LP columns (-1: no column)."""

    charge: np.ndarray  # (S, n)
    discharge: np.ndarray  # (S, n)
    curtail: np.ndarray  # (K, n)
    mode_on: list[np.ndarray] = field(default_factory=list)  # per ModeAsset (n, modes)
    mode_power: list[np.ndarray] = field(default_factory=list)  # per ModeAsset (n, modes)
    profile_on: list[np.ndarray] = field(default_factory=list)  # per profile: (shape, start)s
    profile_starts: list[np.ndarray] = field(default_factory=list)  # start of each column
    profile_alts: list[np.ndarray] = field(default_factory=list)  # shape (option) of each column
    agg_rows: np.ndarray | None = None  # (groups, n) row of the per-phase-group power sum
    grp_of: np.ndarray | None = None  # (S,) group of each storage asset
    energy_row: np.ndarray | None = None  # (S,) target row of charge-only assets (-1: none)
    cap_row: np.ndarray | None = None  # (S,) level_max row of charge-only assets (-1: none)
    full_charge: np.ndarray | None = None  # (S, n) every possible charge column


@dataclass
class LpResult:
    status: str  # "OPTIMAL" or HiGHS's word for what happened
    bound_eur: float | None
    dispatch: Dispatch | None  # fractional (W)
    mode_weight: list[np.ndarray] = field(default_factory=list)  # (n, modes) fractions
    profile_weight: list[np.ndarray] = field(default_factory=list)
    build_s: float = 0.0
    solve_s: float = 0.0
    highs: highspy.Highs | None = None  # the solved model, for `polish` (warm start)
    index: LpIndex | None = None


def _grid_index(mask: np.ndarray, lp: _LpArrays, lb: np.ndarray, ub: np.ndarray,
                cost: np.ndarray) -> np.ndarray:
    """Columns for the True cells of `mask` (row-major); bounds/cost given per cell."""
    idx = np.full(mask.shape, -1, dtype=np.int64)
    count = int(mask.sum())
    idx[mask] = lp.cols(lb[mask], ub[mask], cost[mask], count)
    return idx


def build_lp(lay: Layout, keep: np.ndarray | None = None) -> tuple[_LpArrays, LpIndex]:
    """The LP relaxation as arrays (kW, kWh, EUR); `keep` (S, n) limits the charge columns of
    charge-only assets to a subset (the rest is priced in later by `solve_lp`)."""
    n, S, K = lay.n, lay.s, lay.k
    hours = lay.ptu_h
    pr = lay.problem
    lp = _LpArrays()
    ones = np.ones((S, n))
    full_c = lay.avail & (lay.cmax[:, None] > 0)
    levels = lp_level_assets(lay)
    c_mask = full_c if keep is None else full_c & (keep | levels[:, None])
    d_mask = lay.avail & (lay.dmax[:, None] > 0)
    c_idx = _grid_index(c_mask, lp, 0 * ones, lay.cmax[:, None] / 1000 * ones,
                        np.broadcast_to(lay.tie * hours, (S, n)) * ones)
    d_idx = _grid_index(d_mask, lp, 0 * ones, lay.dmax[:, None] / 1000 * ones, 0 * ones)
    cur_mask = lay.pv_curtailable[:, None] & (lay.pv > 0) if K else np.zeros((0, n), dtype=bool)
    cur_idx = _grid_index(cur_mask, lp, np.zeros((K, n)), lay.pv / 1000, np.zeros((K, n)))
    g = lp.cols(-lay.export_lim / 1000, lay.import_lim / 1000, lay.p_exp_eff * hours, n)
    t_all = np.arange(n)
    # g[t] = fixed - pv + sum(charge - discharge) + curtail + modes + profiles
    gdef = lp.rows((lay.fixed_w - lay.pv.sum(axis=0)) / 1000, (lay.fixed_w - lay.pv.sum(axis=0)) / 1000, n)
    lp.coef(gdef, g, 1.0)
    ci, ct = np.nonzero(c_mask)
    di, dtt = np.nonzero(d_mask)
    # storage power summed per phase-share group and PTU (agg[grp, t]): every storage column
    # then has two nonzeros (its group sum and its energy row), not one per phase row
    groups, grp_of = np.unique(np.round(lay.share, 9), axis=0, return_inverse=True)
    grp_of = np.asarray(grp_of).reshape(-1)
    agg = lp.cols(-INF, INF, 0.0, len(groups) * n).reshape(len(groups), n)
    agg_rows = lp.rows(0.0, 0.0, len(groups) * n).reshape(len(groups), n)
    lp.coef(agg_rows.ravel(), agg.ravel(), 1.0)
    lp.coef(agg_rows[grp_of[ci], ct], c_idx[ci, ct], -1.0)
    lp.coef(agg_rows[grp_of[di], dtt], d_idx[di, dtt], 1.0)
    lp.coef(np.tile(gdef, len(groups)), agg.ravel(), -1.0)
    ki, kt = np.nonzero(cur_mask)
    lp.coef(gdef[kt], cur_idx[ki, kt], -1.0)
    # import above the export price: imp >= g
    extra = lay.p_imp - lay.p_exp_eff
    need_imp = extra > 0
    if np.any(need_imp):
        ts = t_all[need_imp]
        imp = lp.cols(0.0, INF, extra[ts] * hours[ts], len(ts))
        r = lp.rows(0.0, INF, len(ts))
        lp.coef(r, imp, 1.0)
        lp.coef(r, g[ts], -1.0)
    if lay.peak_price > 0:
        peak = lp.cols(lay.peak_so_far / 1000, INF, lay.peak_price * 1000, 1)
        r = lp.rows(0.0, INF, n)
        lp.coef(r, np.full(n, peak[0]), 1.0)
        lp.coef(r, g, -1.0)
    index = LpIndex(charge=c_idx, discharge=d_idx, curtail=cur_idx, agg_rows=agg_rows, grp_of=grp_of,
                    energy_row=np.full(S, -1, dtype=np.int64), cap_row=np.full(S, -1, dtype=np.int64),
                    full_charge=full_c)
    # modes and shiftable profiles (relaxed choices)
    mode_cols_g: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # t, col, coef, share
    for m in pr.modes:
        nm = len(m.modes)
        lo = np.array([pm.min_w for pm in m.modes], dtype=float) / 1000
        hi = np.array([pm.max_w for pm in m.modes], dtype=float) / 1000
        on = lp.cols(0.0, 1.0, 0.0, n * nm).reshape(n, nm)
        q = lp.cols(np.tile(np.minimum(lo, 0), n), np.tile(np.maximum(hi, 0), n), 0.0, n * nm).reshape(n, nm)
        one = lp.rows(1.0, 1.0, n)
        lp.coef(np.repeat(one, nm), on.ravel(), 1.0)
        r_hi = lp.rows(-INF, 0.0, n * nm)
        lp.coef(r_hi, q.ravel(), 1.0)
        lp.coef(r_hi, on.ravel(), -np.tile(hi, n))
        r_lo = lp.rows(0.0, INF, n * nm)
        lp.coef(r_lo, q.ravel(), 1.0)
        lp.coef(r_lo, on.ravel(), -np.tile(lo, n))
        tt = np.repeat(t_all, nm)
        lp.coef(gdef[tt], q.ravel(), -1.0)
        index.mode_on.append(on)
        index.mode_power.append(q)
        mode_cols_g.append((tt, q.ravel(), np.ones(n * nm), np.asarray(m.phase_share, dtype=float)))
    for p in pr.profiles:
        # one column per (shape, start): exactly one of them runs
        options = start_options(p, n)
        starts = np.concatenate([st for _k, _shape, st in options])
        alts = np.concatenate([np.full(len(st), k) for k, _shape, st in options])
        on = lp.cols(0.0, 1.0, 0.0, len(starts))
        one = lp.rows(1.0, 1.0, 1)
        lp.coef(np.repeat(one, len(starts)), on, 1.0)
        tt_l, cc_l, vv_l = [], [], []
        col_at = iter(on)
        for _k, shape, st in options:
            prof = shape / 1000
            for s_ in st:
                col = next(col_at)
                k = min(len(prof), n - s_)
                tt_l.append(np.arange(s_, s_ + k))
                cc_l.append(np.full(k, col))
                vv_l.append(prof[:k])
        tt = np.concatenate(tt_l)
        cc = np.concatenate(cc_l)
        vv = np.concatenate(vv_l)
        lp.coef(gdef[tt], cc, -vv)
        index.profile_on.append(on)
        index.profile_starts.append(starts)
        index.profile_alts.append(alts)
        mode_cols_g.append((tt, cc, vv, np.asarray(p.phase_share, dtype=float)))
    # fuse per phase: -fuse_dn <= phase load <= fuse_up, only where it can bind
    pv_phase = lay.pv_share.T @ lay.pv if K else np.zeros((3, n))
    const = (lay.fixed_phase - pv_phase) / 1000
    for ph in range(3):
        sh = lay.share[:, ph]
        up = const[ph] + (sh[:, None] * lay.cmax[:, None] * full_c).sum(axis=0) / 1000
        dn = const[ph] - (sh[:, None] * lay.dmax[:, None] * d_mask).sum(axis=0) / 1000
        if K:
            psh = lay.pv_share[:, ph]
            up = up + (psh[:, None] * lay.pv * cur_mask).sum(axis=0) / 1000
        rows_needed = (up > lay.fuse_up[ph] / 1000 + 1e-9) | (dn < -lay.fuse_dn[ph] / 1000 - 1e-9)
        for tt, _cc, _vv, share in mode_cols_g:  # modes and profiles: keep their PTUs' rows
            if share[ph] != 0:
                rows_needed[tt] = True
        if not np.any(rows_needed):
            continue
        ts = t_all[rows_needed]
        rmap = np.full(n, -1, dtype=np.int64)
        rmap[ts] = lp.rows(-lay.fuse_dn[ph, ts] / 1000 - const[ph, ts],
                           lay.fuse_up[ph, ts] / 1000 - const[ph, ts], len(ts))
        for gi, gshare in enumerate(groups):
            if gshare[ph] != 0:
                lp.coef(rmap[ts], agg[gi, ts], gshare[ph])
        if K:
            psh = lay.pv_share[:, ph]
            sel = rows_needed[kt] & (psh[ki] != 0)
            lp.coef(rmap[kt[sel]], cur_idx[ki[sel], kt[sel]], psh[ki[sel]])
        for tt, cc, vv, share in mode_cols_g:
            s_ = share[ph] / share.sum() if share.sum() > 0 else 1 / 3
            sel = rows_needed[tt]
            if s_ != 0 and np.any(sel):
                lp.coef(rmap[tt[sel]], cc[sel], s_ * vv[sel])
    # energy and levels of storage assets
    has_t = ~np.isnan(lay.target)
    need = np.where(has_t, np.nan_to_num(lay.target) - lay.level0, 0.0)
    mono = ~levels
    e_coef = hours * lay.eta_c[:, None]  # (S, n) kWh level per kW charged in each PTU
    # monotone assets: one sum row for the target, one for the level cap
    tgt = np.flatnonzero(mono & has_t & (need > 0))
    cap = lay.lmax - lay.level0
    # target == level_max (an EV asking to be full): the target row is an equality and
    # stands for the level cap too (unmet >= 0), one row fewer per EV
    exact = np.zeros(S, dtype=bool)
    exact[tgt] = np.abs(cap[tgt] - need[tgt]) < 1e-6
    milestones, folded = _milestone_sides(lay, mono, tgt, e_coef, full_c)
    if len(tgt):
        r = lp.rows(need[tgt] / 1000, np.where(exact[tgt], need[tgt] / 1000, INF), len(tgt))
        rmap = np.full(S, -1, dtype=np.int64)
        rmap[tgt] = r
        index.energy_row[tgt] = r
        sel = rmap[ci] >= 0
        lp.coef(rmap[ci[sel]], c_idx[ci[sel], ct[sel]], e_coef[ci[sel], ct[sel]])
        _unmet_cols(lp, lay, r, tgt, need, extra_eur_per_wh=folded[tgt])
    # every PTU of the window at full power (PTU 0 counts for its share)
    max_energy = (full_c * lay.part).sum(axis=1) * lay.cmax * (lay.dt_h * lay.eta_c)
    capped = np.flatnonzero(mono & ~exact & (max_energy > cap + 1e-6))
    if len(capped):
        r = lp.rows(-INF, np.maximum(cap[capped], 0) / 1000, len(capped))
        rmap = np.full(S, -1, dtype=np.int64)
        rmap[capped] = r
        index.cap_row[capped] = r
        sel = rmap[ci] >= 0
        lp.coef(rmap[ci[sel]], c_idx[ci[sel], ct[sel]], e_coef[ci[sel], ct[sel]])
    # milestones of monotone assets (an EV's target before its departure): partial sums, only
    # the sides that can bind (`_milestone_sides`)
    if milestones:
        m_asset = np.array([m[0] for m in milestones], dtype=np.int64)
        m_ptu = np.array([m[1] for m in milestones], dtype=np.int64)
        m_lo = np.array([m[2] for m in milestones])
        m_hi = np.array([m[3] for m in milestones])
        r = lp.rows(m_lo, m_hi, len(milestones))
        # each row sums the asset's charge columns before its milestone PTU
        length = m_ptu - lay.first[m_asset]
        rows_of = np.repeat(np.arange(len(milestones)), length)
        ii = m_asset[rows_of]
        tt = lay.first[ii] + np.arange(len(rows_of)) - np.repeat(np.cumsum(length) - length, length)
        cc = c_idx[ii, tt]
        ok = cc >= 0
        lp.coef(r[rows_of[ok]], cc[ok], e_coef[ii[ok], tt[ok]])
        # a missed side costs the asset's weight per Wh: below lo (+1) or above hi (-1)
        side = np.where(np.isfinite(m_lo), 1.0, -1.0)
        u = lp.cols(0.0, INF, lay.weight[m_asset] * 1000, len(milestones))
        lp.coef(r, u, side)
    for i in np.flatnonzero(levels):
        a, b = int(lay.first[i]), int(lay.last[i])
        w = b - a
        if w <= 0:
            continue
        lv = lp.cols(-INF, lay.lmax[i] / 1000, 0.0, w)  # level after PTU a..b-1
        rhs = -lay.usage[i, a:b] / 1000
        rhs[0] += lay.level0[i] / 1000  # the level before PTU a is known
        rows = lp.rows(rhs, rhs, w)
        lp.coef(rows, lv, 1.0)
        lp.coef(rows[1:], lv[:-1], -1.0)
        ts = np.arange(a, b)
        cc = c_idx[i, ts]
        ok = cc >= 0
        lp.coef(rows[ok], cc[ok], -hours[ts[ok]] * lay.eta_c[i])
        dd = d_idx[i, ts]
        ok = dd >= 0
        lp.coef(rows[ok], dd[ok], hours[ts[ok]] / lay.eta_d[i])
        # soft level_min
        s_cols = lp.cols(0.0, INF, lay.weight[i] * 1000, w)
        r = lp.rows(lay.lmin[i] / 1000, INF, w)
        lp.coef(r, lv, 1.0)
        lp.coef(r, s_cols, 1.0)
        if has_t[i]:
            r = lp.rows(lay.target[i] / 1000, INF, 1)
            lp.coef(r, lv[-1:], 1.0)
            _unmet_cols(lp, lay, r, np.array([i]), need)
        for ptu, lo, hi in pr.storage[i].target_profile:
            if a < ptu <= b:
                col = lv[ptu - a - 1]
                u = lp.cols(0.0, INF, lay.weight[i] * 1000, 2)
                r = lp.rows(np.array([lo / 1000, -INF]), np.array([INF, hi / 1000]), 2)
                lp.coef(r, np.array([col, col]), 1.0)
                lp.coef(r, u, np.array([1.0, -1.0]))
    return lp, index


def lp_level_assets(lay: Layout) -> np.ndarray:
    """Assets whose level the LP must follow per PTU (S,) bool.

    A charge-only asset without usage that starts at or above its minimum only ever fills up:
    its level cap and target are sums, and a target-profile milestone is a partial sum. Giving
    such an asset per-PTU level rows (as `needs_levels` does for the repair and CP-SAT) made a
    1000-EV LP with departure milestones four times slower (3 s instead of 0.75 s).
    """
    monotone = (lay.dmax <= 0) & ~np.any(lay.usage != 0, axis=1) & (lay.level0 >= lay.lmin)
    return lay.needs_levels & ~monotone


def _unmet_cols(lp: _LpArrays, lay: Layout, rows: np.ndarray, assets: np.ndarray,
                need: np.ndarray, extra_eur_per_wh: np.ndarray | float = 0.0) -> None:
    """The rising unmet-energy segments (and the cheap last step) of each target row.

    `extra_eur_per_wh` (per asset) is added to every segment: a milestone at the departure
    that asks for the target itself (folded into the target row by `_milestone_sides`).
    """
    k = len(SEGMENT_FACTORS)
    seg = np.maximum(need[assets], 0) / k / 1000
    extra = np.broadcast_to(np.asarray(extra_eur_per_wh, dtype=float), (len(assets),)) * 1000
    u0 = lp.cols(0.0, lay.tol_wh[assets] / 1000, TOL_EUR_PER_WH * 1000 + extra, len(assets))
    lp.coef(rows, u0, 1.0)
    for j, f in enumerate(SEGMENT_FACTORS):
        ub = seg if j < k - 1 else np.full(len(assets), INF)
        u = lp.cols(0.0, ub, lay.weight[assets] * 1000 * f + extra, len(assets))
        lp.coef(rows, u, 1.0)


def _milestone_sides(lay: Layout, mono: np.ndarray, tgt: np.ndarray, e_coef: np.ndarray,
                     full_c: np.ndarray
                     ) -> tuple[list[tuple[int, int, float, float]], np.ndarray]:
    """The milestone rows of monotone assets that can bind, and the milestones folded away.

    Returns (asset, PTU, lo, hi) per row, in kWh charged since the window opened (one side
    per row, the other infinite), and per asset the EUR per Wh added to its unmet-target
    columns. A monotone asset only fills up, so of a milestone (ptu, lo, hi):
    - the lower side cannot bind when lo is at or below the starting level;
    - the upper side cannot bind when hi is at or above what the asset can reach by then
      (full power all along, or its level cap, which another row keeps);
    - a lower side at the departure that asks for the target itself is the target row's
      shortfall priced once more: its weight goes onto the unmet columns, no row.
    A live EV has three milestones (the RM's target profile and the finish margin): this
    leaves one row of them, where six made the 1000-EV LP three times the size.
    """
    S = lay.s
    folded = np.zeros(S)
    out: list[tuple[int, int, float, float]] = []
    has_row = np.zeros(S, dtype=bool)
    has_row[tgt] = True
    cap = np.maximum(lay.lmax - lay.level0, 0.0) / 1000
    for i in np.flatnonzero(mono & lay.needs_levels):
        a, b = int(lay.first[i]), int(lay.last[i])
        reach = None
        for ptu, lo, hi in lay.problem.storage[i].target_profile:
            if not a < ptu <= b:
                continue
            lo_k = (lo - lay.level0[i]) / 1000
            hi_k = (hi - lay.level0[i]) / 1000
            if lo_k > 1e-9:
                if ptu == b and has_row[i] and abs(lo - lay.target[i]) < 1e-6:
                    folded[i] += lay.weight[i]
                else:
                    out.append((int(i), int(ptu), lo_k, INF))
            if reach is None:
                reach = np.cumsum(e_coef[i] * full_c[i]) * lay.cmax[i] / 1000
            if hi_k < min(float(reach[ptu - 1]), cap[i]) - 1e-9:
                out.append((int(i), int(ptu), -INF, hi_k))
    return out, folded


_BANNER_LOCK = threading.Lock()
_banner_shown = False


def silence_highs_banner() -> None:
    """Make the process's first HiGHS instance with stdout closed off.

    HiGHS prints its banner on file descriptor 1 when the first instance is made; in a live view,
    a log or `--json` output that line is noise or breaks the format. Later instances print
    nothing (output_flag is off).
    """
    global _banner_shown
    with _BANNER_LOCK:
        if _banner_shown:
            return
        _banner_shown = True
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError):  # no real stdout: nothing to protect
            highspy.Highs()
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(devnull)
            os.close(saved)


def solve_lp(lay: Layout, time_limit_s: float = 10.0, threads: int = 1) -> LpResult:
    """Solve the LP relaxation; the bound is None when HiGHS did not prove optimality."""
    t0 = time.perf_counter()
    arrays, index = build_lp(lay)
    model = arrays.to_highs()
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    silence_highs_banner()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", max(float(time_limit_s), 0.05))
    h.setOptionValue("threads", max(int(threads), 1))
    h.setOptionValue("presolve", "off")  # measured: presolve finds little here and costs time
    h.passModel(model)
    h.run()
    status = h.getModelStatus()
    solve_s = time.perf_counter() - t1
    if status != highspy.HighsModelStatus.kOptimal:
        return LpResult(h.modelStatusToString(status), None, None, build_s=build_s, solve_s=solve_s)
    x = np.asarray(h.getSolution().col_value)
    bound = float(h.getInfo().objective_function_value)
    disp = _dispatch_from_x(lay, index, x)
    res = LpResult("OPTIMAL", bound, disp, build_s=build_s, solve_s=solve_s, highs=h, index=index)
    res.mode_weight = [np.clip(x[on], 0, 1) for on in index.mode_on]
    res.profile_weight = [np.clip(x[on], 0, 1) for on in index.profile_on]
    return res


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = np.zeros(idx.shape)
    m = idx >= 0
    out[m] = x[idx[m]] * 1000
    return out


def _dispatch_from_x(lay: Layout, index: LpIndex, x: np.ndarray) -> Dispatch:
    disp = Dispatch(np.maximum(_take(x, index.charge), 0), np.maximum(_take(x, index.discharge), 0),
                    np.maximum(_take(x, index.curtail), 0))
    powers = []
    for on, q in zip(index.mode_on, index.mode_power, strict=True):
        disp.mode_index.append(np.argmax(x[on], axis=1))
        powers.append(x[q].sum(axis=1) * 1000)
    disp.mode_power = np.array(powers).reshape(len(powers), lay.n)
    for on, starts, alts in zip(index.profile_on, index.profile_starts, index.profile_alts,
                                strict=True):
        best = int(np.argmax(x[on]))
        disp.profile_start.append(int(starts[best]))
        disp.profile_choice.append(int(alts[best]))
    return disp


def polish(lay: Layout, lp: LpResult, disp: Dispatch) -> Dispatch | None:
    """Re-solve the LP with every on/off choice of `disp` fixed, powers free within the domain.

    A charging PTU stays in [min, max], an idle one at 0, modes and profile starts as chosen:
    the LP then re-balances the powers around the peak, the fuse and the prices. Its solution
    keeps the integer pattern of `disp`, so it is a plan (after snapping to the power steps).
    Warm-started from the relaxation's basis; None if HiGHS does not finish.
    """
    h, index = lp.highs, lp.index
    if h is None or index is None:
        return None
    cols: list[np.ndarray] = []
    lows: list[np.ndarray] = []
    ups: list[np.ndarray] = []
    c_on = disp.charge > 0
    d_on = disp.discharge > 0
    for idx, on, lo, hi, other_on in ((index.charge, c_on, lay.cmin, lay.cmax, d_on),
                                      (index.discharge, d_on, lay.dmin, lay.dmax, c_on)):
        m = idx >= 0
        if not np.any(m):
            continue
        ii, tt = np.nonzero(m)
        on_v = on[ii, tt]
        free = (lo[ii] <= 0) & ~other_on[ii, tt]  # no minimum: may still change (batteries)
        cols.append(idx[ii, tt])
        lows.append(np.where(on_v, lo[ii], 0.0) / 1000)
        ups.append(np.where(on_v | free, hi[ii], 0.0) / 1000)
    for on, k in zip(index.mode_on, disp.mode_index, strict=True):
        chosen = np.zeros(on.shape, dtype=bool)
        chosen[np.arange(on.shape[0]), k] = True
        cols.append(on.ravel())
        lows.append(chosen.ravel().astype(float))
        ups.append(chosen.ravel().astype(float))
    for j, (on, starts, alts) in enumerate(zip(index.profile_on, index.profile_starts,
                                               index.profile_alts, strict=True)):
        choice = disp.profile_choice[j] if j < len(disp.profile_choice) else 0
        chosen = ((starts == disp.profile_start[j]) & (alts == choice)).astype(float)
        cols.append(on)
        lows.append(chosen)
        ups.append(chosen)
    if not cols:
        return None
    c = np.concatenate(cols).astype(np.int32)
    h.changeColsBounds(len(c), c, np.concatenate(lows), np.concatenate(ups))
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    x = np.asarray(h.getSolution().col_value)
    return _dispatch_from_x(lay, index, x)
