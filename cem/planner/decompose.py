"""A lower bound from a cold start: the site rows priced, every EV's own problem solved exactly.

Lagrangian relaxation of only the rows that couple the EVs (charge-only assets that only fill
up: `bound.lp_level_assets` false): each EV's power in a phase group and PTU enters the
group's sum through a column `s[g, t]` of the rest of the LP, and the equation
`s[g, t] = sum of the EVs' powers there` is priced with `lam[g, t]` (EUR per kW in the PTU).
For any `lam` the LP's optimum is at least

    L(lam) = R(lam) + sum over EVs of V_i(lam)

with R the rest of the LP (grid, kW-max, fuse, congestion, batteries, PV, modes, profiles,
`s` at cost -lam, boxed by what the EVs can draw) solved by HiGHS (a small LP: groups x PTUs
columns and the site rows), and V_i the EV's own LP (its charge columns at cost + lam, its
energy and level-cap rows, its milestones and unmet-energy segments) solved exactly in numpy
(`ev_values`). At the LP's own row prices L is the LP optimum; from the grid's prices a few
supergradient steps close most of the gap, without the big LP finishing.

The EV's own problem is a laminar one: its milestones are sums over nested prefixes of its
window and its target a sum over the window, each with a concave reward (a milestone's weight
per Wh up to its level, the unmet-energy segments) or a cap. Its optimum is the infimal
convolution of convex piecewise-linear costs, prefix by prefix: sort the PTUs' prices per kWh,
lower the first `lo` kWh of a prefix by the milestone's weight (raise those past `hi`),
merge the next PTUs, and at the end fill, cheapest first, every kWh whose price is below the
target's marginal reward (`ev_values`; checked against HiGHS on random EVs in the tests).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import highspy
import numpy as np

from cem.planner.bound import (
    C_CHARGE,
    C_MILESTONE,
    C_UNMET,
    INF,
    R_CAP,
    R_ENERGY,
    R_MILESTONE,
    BuiltLp,
    LpIndex,
    _dispatch_from_x,
    _milestone_sides,
    entity_key,
    lp_level_assets,
)
from cem.planner.layout import SEGMENT_FACTORS, TOL_EUR_PER_WH, Dispatch, Layout, charge_price


@dataclass
class EvBlocks:
    """The EVs' own problems as arrays (kW, kWh, EUR): E EVs x W columns, column j of EV e
    being PTU `ptu[e, j]` (its window from its first PTU; W the longest window)."""

    asset: np.ndarray  # (E,) index into the layout's storage assets
    group: np.ndarray  # (E,) phase group
    ptu: np.ndarray  # (E, W) the PTU of each column (clipped into the horizon)
    price_kw: np.ndarray  # (E, W) the charge column's own cost (EUR per kW in the PTU)
    e_coef: np.ndarray  # (E, W) kWh into the level per kW charged in the PTU
    ub_kw: np.ndarray  # (E, W) the charge column's box (0: no column)
    cap_kwh: np.ndarray  # (E,) most energy the EV may take (inf: no cap row)
    tranche_kwh: np.ndarray  # (E, J) the target's reward tranches, highest reward first
    tranche_eur: np.ndarray  # (E, J) their reward, EUR per kWh (decreasing)
    ms_col: np.ndarray  # (E, M) milestone: a sum over the columns before this one (W + 1: none)
    ms_lo: np.ndarray  # (E, M) kWh the prefix should reach (-inf: no lower side)
    ms_hi: np.ndarray  # (E, M) kWh it should not pass (inf: no upper side)
    ms_w: np.ndarray  # (E, M) EUR per kWh missed
    n: int = 0  # PTUs of the horizon
    # rows by window length (first row, end row, the longest window among them), the EVs
    # sorted so: `ev_values` solves each bucket on its own width, not every EV on the
    # longest window (at 5000 EVs the windows fill 43 % of E x W; four buckets 73 %). Empty:
    # one bucket
    buckets: tuple[tuple[int, int, int], ...] = ()

    @property
    def count(self) -> int:
        return len(self.asset)

    def cell(self, groups: int) -> np.ndarray:
        """(E, W) the flat (group, PTU) index of each column, for `np.bincount`."""
        return self.group[:, None] * self.n + self.ptu

    def per_group(self, power: np.ndarray, groups: int) -> np.ndarray:
        """The EVs' powers (E, W) summed per group and PTU: (groups, n)."""
        return np.bincount(self.cell(groups).ravel(), power.ravel(),
                           minlength=groups * self.n).reshape(groups, self.n)

    def full(self, power: np.ndarray) -> np.ndarray:
        """(E, W) -> (E, n) powers per PTU."""
        out = np.zeros((self.count, self.n))
        ok = self.ub_kw > 0
        rows = np.broadcast_to(np.arange(self.count)[:, None], ok.shape)
        out[rows[ok], self.ptu[ok]] = power[ok]
        return out


def ev_blocks(lay: Layout) -> EvBlocks:
    """The charge-only assets that only fill up (the LP gives them sums, not level rows), with
    their rows as `bound.build_lp` builds them."""
    n = lay.n
    levels = lp_level_assets(lay)
    mono = ~levels
    full_c = lay.avail & (lay.cmax[:, None] > 0)
    hours = lay.ptu_h
    e_coef_all = hours * lay.eta_c[:, None]
    has_t = ~np.isnan(lay.target)
    need = np.where(has_t, np.nan_to_num(lay.target) - lay.level0, 0.0)
    tgt = np.flatnonzero(mono & has_t & (need > 0))
    cap = lay.lmax - lay.level0
    exact = np.zeros(lay.s, dtype=bool)
    exact[tgt] = np.abs(cap[tgt] - need[tgt]) < 1e-6
    milestones, folded = _milestone_sides(lay, mono, tgt, e_coef_all, full_c)
    # the EVs by window length (`EvBlocks.buckets`)
    asset = np.flatnonzero(mono)
    asset = asset[np.argsort(lay.last[asset] - lay.first[asset], kind="stable")]
    E = len(asset)
    _groups, grp_of = np.unique(np.round(lay.share, 9), axis=0, return_inverse=True)
    grp_of = np.asarray(grp_of).reshape(-1)
    first = lay.first[asset]
    W = max(int((lay.last[asset] - first).max()) if E else 0, 1)
    ptu = np.minimum(first[:, None] + np.arange(W), max(n - 1, 0))
    rows = np.arange(E)[:, None]
    fc = full_c[asset[:, None], ptu] & (first[:, None] + np.arange(W) < n)
    e_coef = np.where(fc, e_coef_all[asset[:, None], ptu], 0.0)
    ub_kw = np.where(fc, lay.cmax[asset, None] / 1000, 0.0)
    price_kw = np.where(fc, (charge_price(lay) * hours)[asset[:, None], ptu], 0.0)
    del rows
    # the level cap: an exact target row stands for it; without a cap row the cap cannot bind
    max_energy = (full_c * lay.part).sum(axis=1) * lay.cmax * (lay.dt_h * lay.eta_c)
    cap_kwh = np.full(lay.s, np.inf)
    capped = mono & (max_energy > cap + 1e-6)
    cap_kwh[capped] = np.maximum(cap[capped], 0) / 1000
    cap_kwh[exact] = need[exact] / 1000
    # the unmet columns of a target row, filled cheapest first: the tranches of delivered
    # energy, from the first kWh (the dearest segment still missed) to the last (tol)
    k = len(SEGMENT_FACTORS)
    J = k + 1
    tranche_kwh = np.zeros((lay.s, J))
    tranche_eur = np.zeros((lay.s, J))
    if len(tgt):
        nd = need[tgt] / 1000
        seg = nd / k
        ubs = np.stack([lay.tol_wh[tgt] / 1000, *([seg] * (k - 1)), np.full(len(tgt), np.inf)], axis=1)
        cost = np.stack([np.full(len(tgt), TOL_EUR_PER_WH * 1000)]
                        + [lay.weight[tgt] * 1000 * f for f in SEGMENT_FACTORS], axis=1)
        cost = cost + folded[tgt, None] * 1000
        before = np.concatenate([np.zeros((len(tgt), 1)), np.cumsum(ubs, axis=1)[:, :-1]], axis=1)
        fill = np.clip(nd[:, None] - before, 0.0, ubs)
        tranche_kwh[tgt] = fill[:, ::-1]
        tranche_eur[tgt] = cost[:, ::-1]
    # milestones per EV, by PTU (then lo, hi, weight)
    pos = np.full(lay.s, -1, dtype=np.int64)
    pos[asset] = np.arange(E)
    m_asset, m_ptu, m_lo, m_hi, m_w = milestones
    e_of = pos[m_asset]
    order = np.lexsort((m_w, m_hi, m_lo, m_ptu, e_of))
    e_of, m_ptu, m_lo, m_hi, m_w = e_of[order], m_ptu[order], m_lo[order], m_hi[order], m_w[order]
    count = np.bincount(e_of, minlength=E) if len(e_of) else np.zeros(E, dtype=np.int64)
    M = int(count.max()) if E else 0
    slot = np.arange(len(e_of)) - np.repeat(np.cumsum(count) - count, count)
    ms_col = np.full((E, M), W + 1, dtype=np.int64)
    ms_lo = np.full((E, M), -np.inf)
    ms_hi = np.full((E, M), np.inf)
    ms_w = np.zeros((E, M))
    ms_col[e_of, slot] = m_ptu - first[e_of]
    ms_lo[e_of, slot] = np.where(m_lo > -INF, m_lo, -np.inf)
    ms_hi[e_of, slot] = np.where(m_hi < INF, m_hi, np.inf)
    ms_w[e_of, slot] = m_w * 1000
    span = np.maximum(lay.last[asset] - first, 1)
    n_buckets = min(BUCKETS, E // BUCKET_MIN_ROWS)
    cuts = [E * k // n_buckets for k in range(n_buckets + 1)] if n_buckets > 1 else []
    buckets = tuple((a, b, int(span[b - 1])) for a, b in itertools.pairwise(cuts))
    return EvBlocks(asset=asset, group=grp_of[asset], ptu=ptu, price_kw=price_kw, e_coef=e_coef,
                    ub_kw=ub_kw, cap_kwh=cap_kwh[asset], tranche_kwh=tranche_kwh[asset],
                    tranche_eur=tranche_eur[asset], ms_col=ms_col, ms_lo=ms_lo, ms_hi=ms_hi,
                    ms_w=ms_w, n=n, buckets=buckets)


# `EvBlocks.buckets`: at most this many, of at least this many EVs each
BUCKETS = 4
BUCKET_MIN_ROWS = 500


def _rows(blocks: EvBlocks, start: int, end: int, width: int) -> EvBlocks:
    """The EVs `start:end` on their first `width` columns (every column they have), as views."""
    return EvBlocks(asset=blocks.asset[start:end], group=blocks.group[start:end],
                    ptu=blocks.ptu[start:end, :width], price_kw=blocks.price_kw[start:end, :width],
                    e_coef=blocks.e_coef[start:end, :width], ub_kw=blocks.ub_kw[start:end, :width],
                    cap_kwh=blocks.cap_kwh[start:end], tranche_kwh=blocks.tranche_kwh[start:end],
                    tranche_eur=blocks.tranche_eur[start:end], ms_col=blocks.ms_col[start:end],
                    ms_lo=blocks.ms_lo[start:end], ms_hi=blocks.ms_hi[start:end],
                    ms_w=blocks.ms_w[start:end], n=blocks.n)


def _split_at(eff: np.ndarray, amt: np.ndarray, member: np.ndarray, where: np.ndarray,
              delta: np.ndarray, below: bool, slot: int, col: np.ndarray) -> None:
    """Among each EV's pieces in `member`, sorted by `eff`, add `delta` to the price of the
    kWh below `where` (`below`) or above it, splitting the piece it falls in (into column
    `slot`). In place; only the EVs with a member are touched."""
    todo = np.flatnonzero(member.any(axis=1))
    if len(todo) == 0:
        return
    ef, am, mb = eff[todo], amt[todo], member[todo]
    key = np.where(mb & (am > 0), ef, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    rows = np.arange(len(todo))[:, None]
    a = np.where(np.isfinite(key[rows, order]), am[rows, order], 0.0)
    end = np.cumsum(a, axis=1)
    start = end - a
    w = where[todo, None]
    inside = (start < w) & (end > w) & (a > 0)
    moved = ((end <= w) if below else (start >= w)) & (a > 0)
    e_in, k_in = np.nonzero(inside)
    at = order[e_in, k_in]
    part = (w[e_in, 0] - start[e_in, k_in]) if below else (end[e_in, k_in] - w[e_in, 0])
    d = delta[todo]
    am[e_in, slot] = part
    ef[e_in, slot] = ef[e_in, at] + d[e_in]
    col[todo[e_in], slot] = col[todo[e_in], at]
    am[e_in, at] -= part
    e_mv, k_mv = np.nonzero(moved)
    ef[e_mv, order[e_mv, k_mv]] += d[e_mv]
    eff[todo], amt[todo] = ef, am


def ev_values(blocks: EvBlocks, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each EV's own LP with `lam` ((groups, n) EUR per kW in the PTU) added to its charge
    columns' cost: the optimum (E,) and the powers (E, W) kW that reach it.

    EVs with at most one milestone, a lower side only (a live EV's finish margin: every EV of
    the bench's car park), take one sort of their columns (`_one_milestone`); the others, and
    any whose milestone's kWh are not all cheaper than the rest, the general greedy
    (`_ev_values_general`). Both give the same answer (tests/test_planner_decompose.py)."""
    E, W = blocks.e_coef.shape
    M = blocks.ms_col.shape[1]
    if E == 0:
        return np.zeros(0), np.zeros((0, W))
    if blocks.buckets:  # each bucket of EVs on its own width
        values, out = np.zeros(E), np.zeros((E, W))
        for start, end, width in blocks.buckets:
            values[start:end], out[start:end, :width] = ev_values(
                _rows(blocks, start, end, width), lam)
        return values, out
    has_lo = np.isfinite(blocks.ms_lo) & (blocks.ms_lo > 0)
    simple = ~np.isfinite(blocks.ms_hi).any(axis=1) & (has_lo.sum(axis=1) <= 1)
    if not simple.any():
        return _ev_values_general(blocks, lam)
    rows = np.flatnonzero(simple)
    part = blocks if len(rows) == E else _take(blocks, rows)
    lam_kw = lam.ravel()[part.group[:, None] * blocks.n + part.ptu]
    power, done = _one_milestone(part, lam_kw, has_lo[rows] if M else np.zeros((len(rows), 0), bool))
    if len(rows) == E and done.all():
        return _ev_objective(part, lam_kw, power), power
    values = np.zeros(E)
    out = np.zeros((E, W))
    values[rows[done]] = _ev_objective(_take(part, np.flatnonzero(done)), lam_kw[done], power[done])
    out[rows[done]] = power[done]
    rest = np.setdiff1d(np.arange(E), rows[done], assume_unique=True)
    values[rest], out[rest] = _ev_values_general(_take(blocks, rest), lam)
    return values, out


def _one_milestone(blocks: EvBlocks, lam_kw: np.ndarray, has_lo: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The powers (E, W) of EVs with at most one milestone, a lower side only (`has_lo`: (E, M)
    which), and whether each is solved here (E,): the columns sorted once by their price per
    kWh; the cheapest `lo` kWh before the milestone are worth its weight more (they come
    first, when all of them are then cheaper than every other kWh and below 0 EUR: else not
    solved here), the rest follow in price order, and every kWh is taken while its price is
    below the target's reward for it (the tranches), up to the level cap."""
    E, W = blocks.e_coef.shape
    ok = blocks.ub_kw > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.where(ok, (blocks.price_kw + lam_kw) / blocks.e_coef, np.inf)
    amt = np.where(ok, blocks.e_coef * blocks.ub_kw, 0.0)
    order = np.argsort(eff, axis=1, kind="stable")
    flat = (order + (np.arange(E) * W)[:, None]).ravel()
    p = eff.ravel().take(flat).reshape(E, W)
    a = amt.ravel().take(flat).reshape(E, W)
    # the milestone: the prefix of columns before it, its lower side and weight per EV
    m = np.argmax(has_lo, axis=1) if has_lo.shape[1] else np.zeros(E, dtype=np.int64)
    has = has_lo[np.arange(E), m] if has_lo.shape[1] else np.zeros(E, dtype=bool)
    lo = np.where(has, blocks.ms_lo[np.arange(E), m] if has_lo.shape[1] else 0.0, 0.0)
    w = blocks.ms_w[np.arange(E), m] if has_lo.shape[1] else np.zeros(E)
    c = blocks.ms_col[np.arange(E), m] if has_lo.shape[1] else np.zeros(E, dtype=np.int64)
    member = (order < c[:, None]) & has[:, None] & (a > 0)
    am = np.where(member, a, 0.0)
    cm_end = np.cumsum(am, axis=1)
    cm_start = cm_end - am
    lo_c = lo[:, None]
    shifted = member & (cm_end <= lo_c)
    inside = member & (cm_start < lo_c) & (cm_end > lo_c)
    s_amt = np.where(shifted, a, np.where(inside, lo_c - cm_start, 0.0))
    u = np.where(shifted, 0.0, np.where(inside, cm_end - lo_c, a))
    first = np.minimum(lo, cm_end[:, -1])  # the kWh worth the milestone's weight more
    u_end = first[:, None] + np.cumsum(u, axis=1)
    u_start = u_end - u
    # solved here when the milestone's kWh (their price less its weight) are all cheaper than
    # every other kWh and than 0 (then taken whole, up to the cap)
    dearest = np.where(shifted | inside, p + (-w)[:, None], -np.inf).max(axis=1)
    cheapest = np.where(u > 0, p, np.inf).min(axis=1)
    done = (dearest < 0) & (dearest < cheapest)
    # the kWh whose reward is above p: the tranches rewarded more, all of it when p < 0
    reach = np.zeros((E, W))
    for j in range(blocks.tranche_kwh.shape[1]):
        reach += np.where(blocks.tranche_eur[:, j:j + 1] > p, blocks.tranche_kwh[:, j:j + 1], 0.0)
    reach = np.where(p < 0, np.inf, reach)
    cap = blocks.cap_kwh[:, None]
    taken = np.maximum(np.minimum(first, blocks.cap_kwh),
                       np.minimum(np.minimum(reach, cap), u_end).max(axis=1))
    t = taken[:, None]
    take = np.clip(t - cm_start, 0.0, s_amt) + np.clip(t - u_start, 0.0, u)
    energy = np.zeros(E * W)
    energy[flat] = take.ravel()
    energy = energy.reshape(E, W)
    with np.errstate(divide="ignore", invalid="ignore"):
        power = np.where(ok, energy / np.where(ok, blocks.e_coef, 1.0), 0.0)
    return np.minimum(power, blocks.ub_kw), done


def _ev_values_general(blocks: EvBlocks, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ev_values` for any nested milestones, lower and upper sides (a sort per side)."""
    E, W = blocks.e_coef.shape
    M = blocks.ms_col.shape[1]
    P = W + 2 * M
    ok = blocks.ub_kw > 0
    lam_kw = lam[blocks.group[:, None], blocks.ptu]
    eff = np.full((E, P), np.inf)
    amt = np.zeros((E, P))
    col = np.zeros((E, P), dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        eff[:, :W] = np.where(ok, (blocks.price_kw + lam_kw) / blocks.e_coef, np.inf)
    amt[:, :W] = np.where(ok, blocks.e_coef * blocks.ub_kw, 0.0)
    col[:, :W] = np.arange(W)
    for m in range(M):
        member = col < blocks.ms_col[:, m:m + 1]
        lo, hi, w = blocks.ms_lo[:, m], blocks.ms_hi[:, m], blocks.ms_w[:, m]
        has_lo = np.isfinite(lo) & (lo > 0)
        _split_at(eff, amt, member & has_lo[:, None], np.where(has_lo, lo, 0.0), -w, True,
                  W + 2 * m, col)
        has_hi = np.isfinite(hi)
        _split_at(eff, amt, member & has_hi[:, None], np.where(has_hi, np.maximum(hi, 0.0), 0.0),
                  w, False, W + 2 * m + 1, col)
    # the whole window: cheapest first, each kWh while its price is below the target's reward
    order = np.argsort(eff, axis=1, kind="stable")
    rows = np.arange(E)[:, None]
    p = eff[rows, order]
    a = np.where(np.isfinite(p), amt[rows, order], 0.0)
    end = np.cumsum(a, axis=1)
    start = end - a
    # the energy whose reward is above p: the tranches rewarded more, all of it when p < 0
    reach = np.zeros((E, P))
    for j in range(blocks.tranche_kwh.shape[1]):
        reach += np.where(blocks.tranche_eur[:, j:j + 1] > p, blocks.tranche_kwh[:, j:j + 1], 0.0)
    reach = np.where(p < 0, np.inf, reach)
    reach = np.minimum(reach, blocks.cap_kwh[:, None])
    take = np.clip(np.minimum(reach, end) - start, 0.0, a)
    energy = np.bincount((rows * W + col[rows, order]).ravel(), take.ravel(),
                         minlength=E * W).reshape(E, W)
    with np.errstate(divide="ignore", invalid="ignore"):
        power = np.where(ok, energy / np.where(ok, blocks.e_coef, 1.0), 0.0)
    power = np.minimum(power, blocks.ub_kw)
    return _ev_objective(blocks, lam_kw, power), power


def _ev_objective(blocks: EvBlocks, lam_kw: np.ndarray, power: np.ndarray) -> np.ndarray:
    """Each EV's own objective for these powers (E, W): the columns' cost plus `lam_kw`, the
    milestones missed and the target's unmet energy (cheapest segments first)."""
    E, W = power.shape
    energy = power * blocks.e_coef
    value = ((blocks.price_kw + lam_kw) * power).sum(axis=1)
    prefix = np.concatenate([np.zeros((E, 1)), np.cumsum(energy, axis=1)], axis=1)
    M = blocks.ms_col.shape[1]
    if M:
        z = prefix[np.arange(E)[:, None], np.minimum(blocks.ms_col, W)]
        with np.errstate(invalid="ignore"):
            miss = np.where(np.isfinite(blocks.ms_lo), np.maximum(blocks.ms_lo - z, 0.0), 0.0) \
                + np.where(np.isfinite(blocks.ms_hi), np.maximum(z - blocks.ms_hi, 0.0), 0.0)
        value += (blocks.ms_w * np.where(blocks.ms_col <= W, miss, 0.0)).sum(axis=1)
    total = prefix[:, -1]
    before = np.concatenate([np.zeros((E, 1)), np.cumsum(blocks.tranche_kwh, axis=1)[:, :-1]], axis=1)
    covered = np.clip(total[:, None] - before, 0.0, blocks.tranche_kwh)
    value += (blocks.tranche_eur * (blocks.tranche_kwh - covered)).sum(axis=1)
    return value


class RestLp:
    """The LP without the EVs' columns and rows, and per phase group and PTU a column `s` for
    the EVs' power (cost -lam, box 0 to what they can draw there), solved warm by HiGHS; and
    its Dantzig-Wolfe master (`Master`)."""

    def __init__(self, built: BuiltLp, lay: Layout, blocks: EvBlocks) -> None:
        shape = built.shape
        n = lay.n
        ev_ent = np.array([entity_key(lay.ids[i]) for i in blocks.asset], dtype=np.int64)
        ckind, cent = built.col_key >> 57, (built.col_key >> 23) & 0xFFFFFFF
        rkind, rent = built.row_key >> 57, (built.row_key >> 23) & 0xFFFFFFF
        drop_c = np.isin(ckind, [C_CHARGE, C_UNMET, C_MILESTONE]) & np.isin(cent, ev_ent)
        drop_r = np.isin(rkind, [R_ENERGY, R_CAP, R_MILESTONE]) & np.isin(rent, ev_ent)
        keep_c, keep_r = ~drop_c, ~drop_r
        new_col = np.cumsum(keep_c) - 1
        new_row = np.cumsum(keep_r) - 1
        nz = keep_c[shape.col] & keep_r[shape.row]
        agg_rows = built.index.agg_rows
        assert agg_rows is not None
        G = agg_rows.shape[0]
        smax = blocks.per_group(blocks.ub_kw, G)
        self.where = np.nonzero(smax > 0)  # (group, PTU) cells with an s column
        self.s_max = smax[self.where]
        self.groups, self.n = G, n
        self.cells = len(self.where[0])
        self.agg_row = new_row[agg_rows[self.where]]  # the rest's row of each cell
        self.n_cols, self.n_rows = int(keep_c.sum()), int(keep_r.sum())
        self.keep_c = keep_c
        self.cost, self.lower, self.upper = shape.cost[keep_c], shape.col_lower[keep_c], shape.col_upper[keep_c]
        self.row_lower, self.row_upper = shape.row_lower[keep_r], shape.row_upper[keep_r]
        self.nz = (new_row[shape.row[nz]], new_col[shape.col[nz]], shape.val[nz])
        self.s_cols = np.arange(self.n_cols, self.n_cols + self.cells, dtype=np.int32)
        self.h = _highs(self._lp([(np.zeros(self.cells), np.zeros(self.cells), self.s_max, -1.0)], 0))

    def _lp(self, extra: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]], more_rows: int
            ) -> highspy.HighsLp:
        """The rest with blocks of one column per cell (cost, lower, upper, coefficient in the
        cell's group row) and `more_rows` empty rows fixed at 1."""
        cost, lower, upper = [self.cost], [self.lower], [self.upper]
        r, c, v = [self.nz[0]], [self.nz[1]], [self.nz[2]]
        at = self.n_cols
        for cst, lo, up, coef in extra:
            cost.append(cst)
            lower.append(lo)
            upper.append(up)
            r.append(self.agg_row)
            c.append(np.arange(at, at + self.cells))
            v.append(np.full(self.cells, coef))
            at += self.cells
        return _highs_lp(np.concatenate(cost), np.concatenate(lower), np.concatenate(upper),
                         np.concatenate([self.row_lower, np.ones(more_rows)]),
                         np.concatenate([self.row_upper, np.ones(more_rows)]),
                         np.concatenate(r), np.concatenate(c), np.concatenate(v))

    def solve(self, lam: np.ndarray) -> tuple[float, np.ndarray] | None:
        """R(lam) and the `s` that reaches it ((groups, n) kW), None when HiGHS did not solve it."""
        self.h.changeColsCost(self.cells, self.s_cols, -lam[self.where])
        _run(self.h)
        if self.h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return None
        s = np.zeros((self.groups, self.n))
        s[self.where] = np.asarray(self.h.getSolution().col_value)[self.s_cols]
        return float(self.h.getInfo().objective_function_value), s


def _highs_lp(cost: np.ndarray, lower: np.ndarray, upper: np.ndarray, row_lower: np.ndarray,
              row_upper: np.ndarray, r: np.ndarray, c: np.ndarray, v: np.ndarray) -> highspy.HighsLp:
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(cost), len(row_lower)
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = cost, lower, upper
    lp.row_lower_, lp.row_upper_ = row_lower, row_upper
    order = np.argsort(c, kind="stable")
    start = np.zeros(len(cost) + 1, dtype=np.int64)
    np.cumsum(np.bincount(c, minlength=len(cost)), out=start[1:])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = start.astype(np.int32)
    lp.a_matrix_.index_ = r[order].astype(np.int32)
    lp.a_matrix_.value_ = v[order].astype(float)
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = len(cost), len(row_lower)
    return lp


# HiGHS's primal simplex after the first solve: between the price steps the rest LP and the
# master change only their costs and gain columns (at 0), so the last basis stays primal
# feasible and the primal simplex goes on from it, where the dual simplex starts over from a
# dual infeasible one (the master at 1000-5000 EVs: 18-28 -> 5-8 ms a solve on the 2-core
# machine). The first, cold, solve is the dual simplex's (at 300 EVs the primal one took the
# rest LP's first solve from ~3 to ~15 ms)
PRIMAL_SIMPLEX = 4


def _run(h: highspy.Highs) -> None:
    """Solve, then leave `h` to the primal simplex for the solves after this one."""
    h.run()
    h.setOptionValue("simplex_strategy", PRIMAL_SIMPLEX)


def _highs(lp: highspy.HighsLp) -> highspy.Highs:
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("presolve", "off")
    h.setOptionValue("threads", 1)
    h.passModel(lp)
    return h


class Master:
    """The Dantzig-Wolfe master of the site rows: the rest of the LP with the EVs' power a
    convex combination of the EVs' answers so far (one column each: their own cost, their
    power per group and PTU), and per cell two columns that keep the row prices within
    `delta` of a centre (a box step: the master's duals are the next prices). Its optimum is
    the LP's over those combinations, at least the LP optimum when the box does not bind."""

    def __init__(self, rest: RestLp) -> None:
        self.rest = rest
        z, inf = np.zeros(rest.cells), np.full(rest.cells, INF)
        self.h = _highs(rest._lp([(z, z, inf, -1.0), (z, z, inf, 1.0)], 1))
        self.up = np.arange(rest.n_cols, rest.n_cols + rest.cells, dtype=np.int32)
        self.down = self.up + rest.cells
        self.convex = rest.n_rows
        self.powers: list[np.ndarray] = []
        self.rest_x: np.ndarray | None = None  # the rest's columns in the last solution

    def add(self, cost: np.ndarray | float, per_cell: np.ndarray, power: np.ndarray | None) -> None:
        """An answer of the EVs: their own cost, their power per cell, per EV (E, W; kept
        for the master's point only when given)."""
        d = per_cell[self.rest.where]
        keep = np.abs(d) > 1e-12
        idx = np.concatenate([self.rest.agg_row[keep], [self.convex]]).astype(np.int32)
        val = np.concatenate([-d[keep], [1.0]])
        self.h.addCol(float(cost), 0.0, INF, len(idx), idx, val)
        if power is not None:
            self.powers.append(power)

    def solve(self, centre: np.ndarray, delta: np.ndarray | float
              ) -> tuple[float, np.ndarray, np.ndarray] | None:
        """The master with the prices boxed to centre +- delta: its value, its prices
        (groups, n) and the weights of the answers; None when HiGHS did not solve it."""
        lam = centre[self.rest.where]
        dl = np.broadcast_to(np.asarray(delta, dtype=float), lam.shape)
        self.h.changeColsCost(len(self.up), self.up, -(lam - dl))
        self.h.changeColsCost(len(self.down), self.down, lam + dl)
        _run(self.h)
        if self.h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return None
        sol = self.h.getSolution()
        y = np.zeros((self.rest.groups, self.rest.n))
        y[self.rest.where] = np.asarray(sol.row_dual)[self.rest.agg_row]
        first = self.rest.n_cols + 2 * self.rest.cells
        x = np.asarray(sol.col_value)
        self.rest_x = x[:self.rest.n_cols]
        return float(self.h.getInfo().objective_function_value), y, x[first:]


@dataclass
class DecomposedBound:
    """The best L(lam) found, the prices that gave it, and the master's combination of the
    EVs' answers (a point of the LP, for a plan)."""

    bound_eur: float
    lam: np.ndarray  # (groups, n)
    blocks: EvBlocks
    ev_power_kw: np.ndarray  # (E, W) the EVs' powers: the master's last point (`point`), else
    # the last answer's
    master_eur: float | None  # the master's last value (an LP point's objective when not boxed)
    steps: int
    seconds: float
    rest_x: np.ndarray | None = None  # the rest's columns in the master's last solution
    keep_c: np.ndarray | None = None  # which of the LP's columns the rest has
    min_power_eur: float = 0.0  # what the EVs' minimum power added to the bound (`with_min_power`)
    timed_out: bool = False  # the price steps stopped for the deadline (not converged)

    def with_min_power(self, lay: Layout, deadline: float | None = None) -> None:
        """Raise `bound_eur` by what the EVs' minimum power adds to their own problems at
        `lam` (`integer_values`, stopped at `deadline`): still a lower bound on every plan's
        objective (a plan charges an EV nothing or from its minimum power), and above the
        LP's optimum when an EV's own answer needs less than its minimum somewhere."""
        cmin_kw = lay.cmin[self.blocks.asset] / 1000
        lower, lp = integer_values(self.blocks, self.lam, cmin_kw, deadline)
        self.min_power_eur = float((lower - lp).sum())
        self.bound_eur += self.min_power_eur

    def dispatch(self, lay: Layout, index: LpIndex) -> Dispatch | None:
        """The master's last solution as a (fractional) dispatch: the EVs' combined powers
        and the rest's columns, laid onto the LP's columns."""
        if self.rest_x is None or self.keep_c is None:
            return None
        x = np.zeros(len(self.keep_c))
        x[self.keep_c] = self.rest_x
        b = self.blocks
        ok = b.ub_kw > 0
        rows = np.broadcast_to(b.asset[:, None], ok.shape)
        cols = index.charge[rows[ok], b.ptu[ok]]
        x[cols[cols >= 0]] = self.ev_power_kw[ok][cols >= 0]
        return _dispatch_from_x(lay, index, x)


# the master's point is taken with the prices boxed this many times their scale: not boxed
UNBOX_DELTA = 1e4
# `lagrangian_bound`'s look-ahead stops no price steps before this many answers (fewer give a
# point far from the optimum: the plan from it 62-78 % above the bound at 5000 EVs when a
# slow first answer stopped them at one or two); until then only the deadline does
LOOK_AHEAD_AFTER = 4


def lagrangian_bound(lay: Layout, built: BuiltLp | None = None, lam0: np.ndarray | None = None,
                     steps: int = 100, deadline: float | None = None, tol: float = 1e-4,
                     point: bool = False, look_ahead: float | None = None
                     ) -> DecomposedBound | None:
    """max of L(lam) by a box-step bundle (`Master`) from `lam0` ((groups, n), the last
    replan's prices) or from the import prices, until the master's prediction is within `tol`
    of the best value, `steps` answers or the `deadline` (`time.perf_counter`; with
    `look_ahead`, from the `LOOK_AHEAD_AFTER`-th answer on, no step is begun unless the time
    left covers it, the master's point and `look_ahead` more steps (the time of what follows),
    each as long as the steps so far; the first answer is always taken). None without
    EVs to decompose or when the rest of the LP could not be solved. `point`: keep every
    answer's powers, for the master's point (`DecomposedBound.dispatch`; memory grows with
    the answers, kept as float32: 0.77 MB an answer at 2000 EVs)."""
    began = time.perf_counter()
    built = BuiltLp.of(lay) if built is None else built
    blocks = ev_blocks(lay)
    if blocks.count == 0:
        return None
    rest = RestLp(built, lay, blocks)
    G, n = rest.groups, rest.n
    if lam0 is not None and lam0.shape == (G, n) and np.all(np.isfinite(lam0)):
        lam = lam0.copy()
    else:
        lam = np.broadcast_to(lay.p_imp * lay.ptu_h, (G, n)).copy()
    master = Master(rest)

    def value(at: np.ndarray) -> tuple[float, np.ndarray, np.ndarray] | None:
        got = rest.solve(at)
        if got is None:
            return None
        r_val, _s = got
        values, power = ev_values(blocks, at)
        per_cell = blocks.per_group(power, G)
        total = float(values.sum())
        master.add(total - float((at * per_cell).sum()), per_cell,
                   power.astype(np.float32) if point else None)
        return r_val + total, per_cell, power

    got = value(lam)
    if got is None:
        return None
    centre, best = lam, got[0]
    scale = max(float(np.abs(lam).max()), 1e-3)
    delta = 0.5 * scale if lam0 is None else 0.1 * scale
    power_mix = got[2]
    master_eur: float | None = None
    last_weights: np.ndarray | None = None
    count = 1
    later_s: list[float] = []  # the steps' wall seconds
    timed_out = False
    for _ in range(steps - 1):
        # (the next step, the master without the box for the point: about a step, and then
        # `look_ahead` steps; from the `LOOK_AHEAD_AFTER`-th answer on, each step as long as
        # the steps so far but the first, whose rest LP starts cold)
        ahead = 0.0 if look_ahead is None or count < LOOK_AHEAD_AFTER or not later_s \
            else (1.0 + point + look_ahead) * sum(later_s) / len(later_s)
        if deadline is not None and time.perf_counter() + ahead > deadline:
            timed_out = True
            break
        step_began = time.perf_counter()
        solved = master.solve(centre, delta)
        if solved is None:
            break
        predicted, y, weights = solved
        master_eur = predicted
        last_weights = weights
        if predicted - best <= tol * max(abs(best), 1.0):
            at_edge = np.abs(y - centre).max() >= 0.999 * delta
            if not at_edge:
                break
            delta *= 2
            continue
        got = value(y)
        count += 1
        later_s.append(time.perf_counter() - step_began)
        if got is None:
            break
        power_mix = got[2]
        if got[0] >= best + 0.1 * (predicted - best):  # a serious step: move the centre
            if np.abs(y - centre).max() >= 0.999 * delta:
                delta *= 2
            centre, best = y, got[0]
        else:
            delta *= 0.5
    if point and (last_weights is not None or look_ahead is not None):
        # the master without the box: the best mix of the answers that meets the site rows
        # (the boxed one buys its way out of them while the prices still move: at 5000 EVs
        # cut short after 8-14 answers its point was 2-9 % above the bound, the plan from
        # it 7-8 %; unboxed 0.4-1.5 %, the plan 1.5-2.7 %; converged, the same). With
        # `look_ahead` also after the first answer alone: a point to plan from, where
        # without one a mixed site's plan was the asset-at-a-time fallback (300 EVs, 0.01 s:
        # 0.64 s more, 2.58 M EUR)
        solved = master.solve(centre, UNBOX_DELTA * scale)
        if solved is not None:
            master_eur, _y, last_weights = solved
    if point and last_weights is not None:  # the master's last point: its mix of the answers
        power_mix = np.zeros(blocks.ub_kw.shape)
        for w, p in zip(last_weights, master.powers[:len(last_weights)], strict=True):
            if w > 1e-9:
                power_mix += w * p
    return DecomposedBound(best, centre, blocks, power_mix, master_eur, count,
                           time.perf_counter() - began, master.rest_x, rest.keep_c,
                           timed_out=timed_out)


def _take(blocks: EvBlocks, rows: np.ndarray) -> EvBlocks:
    """The EVs `rows` (repeats allowed) as blocks of their own, arrays copied."""
    return EvBlocks(asset=blocks.asset[rows], group=blocks.group[rows], ptu=blocks.ptu[rows],
                    price_kw=blocks.price_kw[rows], e_coef=blocks.e_coef[rows],
                    ub_kw=blocks.ub_kw[rows].copy(), cap_kwh=blocks.cap_kwh[rows].copy(),
                    tranche_kwh=blocks.tranche_kwh[rows].copy(),
                    tranche_eur=blocks.tranche_eur[rows], ms_col=blocks.ms_col[rows],
                    ms_lo=blocks.ms_lo[rows].copy(), ms_hi=blocks.ms_hi[rows].copy(),
                    ms_w=blocks.ms_w[rows], n=blocks.n)


def _force_on(nodes: EvBlocks, rows: np.ndarray, col: np.ndarray, kw: np.ndarray) -> None:
    """Column `col` of each node in `rows` charges at least `kw`: that much is taken out of its
    box and counted as delivered before the later PTUs (milestone sides, target tranches
    from the most rewarded one, the level cap). In place; the cost is the caller's."""
    kwh = kw * nodes.e_coef[rows, col]
    nodes.ub_kw[rows, col] -= kw
    inside = col[:, None] < nodes.ms_col[rows]
    nodes.ms_lo[rows] -= np.where(inside, kwh[:, None], 0.0)
    nodes.ms_hi[rows] -= np.where(inside, kwh[:, None], 0.0)
    before = np.concatenate([np.zeros((len(rows), 1)),
                             np.cumsum(nodes.tranche_kwh[rows], axis=1)[:, :-1]], axis=1)
    nodes.tranche_kwh[rows] -= np.clip(kwh[:, None] - before, 0.0, nodes.tranche_kwh[rows])
    nodes.cap_kwh[rows] -= kwh


def integer_values(blocks: EvBlocks, lam: np.ndarray, cmin_kw: np.ndarray,
                   deadline: float | None = None, max_nodes: int = 50_000
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Each EV's own problem with its minimum power (a PTU charges 0 or from `cmin_kw` (E,)
    up): a lower bound on its optimum at `lam`, at least its LP's (`ev_values`), and the LP
    optimum (E,) for comparison. Branch and bound on the columns below their minimum, all
    EVs at once: a column off (box 0) or on (its minimum taken out of the box, counted as
    delivered); a node whose LP answer has no column below its minimum is an EV's plan.
    Stopped at `deadline` (after the roots' children) or `max_nodes` open nodes, an EV's bound is the least of its best
    plan and its open nodes' LP optima: valid whenever it stops."""
    lp_vals, power = ev_values(blocks, lam)
    eps = 1e-6
    below = (power > eps) & (power < cmin_kw[:, None] - eps)
    root = np.flatnonzero(below.any(axis=1))
    out = lp_vals.copy()
    if len(root) == 0:
        return out, lp_vals
    owner = root.copy()
    nodes = _take(blocks, root)
    const = np.zeros(len(root))
    forced = np.zeros(nodes.ub_kw.shape, dtype=bool)
    best = np.full(blocks.count, np.inf)  # per EV, its best plan so far
    rounds = 0
    while True:
        rounds += 1
        # (the roots' answers are the EVs' own, known already)
        vals, power = (lp_vals[root], power[root]) if rounds == 1 else ev_values(nodes, lam)
        vals = vals + const
        low = (power > eps) & (power < cmin_kw[owner][:, None] - eps) & ~forced
        leaf = ~low.any(axis=1)
        np.minimum.at(best, owner[leaf], vals[leaf])
        live = ~leaf & (vals < best[owner] - 1e-9)
        # (the roots' children at least: a root alone is its LP)
        late = rounds > 1 and deadline is not None and time.perf_counter() > deadline
        if not live.any() or late or 2 * int(live.sum()) > max_nodes:
            bound = best.copy()
            np.minimum.at(bound, owner[live], vals[live])
            out[root] = np.maximum(bound[root], lp_vals[root])
            return out, lp_vals
        # branch on each live node's column below its minimum with the most power
        keep = np.flatnonzero(live)
        col = np.argmax(np.where(low[keep], power[keep], -1.0), axis=1)
        rows2 = np.concatenate([keep, keep])
        child = _take(nodes, rows2)
        child_forced = forced[rows2].copy()
        child_const = const[rows2].copy()
        k = len(keep)
        off = np.arange(k)
        child.ub_kw[off, col] = 0.0
        on = np.arange(k, 2 * k)
        kw = cmin_kw[owner[keep]]
        _force_on(child, on, col, kw)
        lam_kw = lam[child.group[on], child.ptu[on, col]]
        child_const[on] += (child.price_kw[on, col] + lam_kw) * kw
        child_forced[on, col] = True
        nodes, forced, const, owner = child, child_forced, child_const, owner[rows2]
