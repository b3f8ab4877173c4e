"""A plan from a fractional point of the LP: the EVs least laxity first, PTU by PTU.

The decomposition's master (`decompose.lagrangian_bound`, `point=True`) ends at a point of
the LP within a few hundredths of a percent of its optimum, but mixed from many answers: most
of its powers lie between 0 and an EV's minimum power. Rounding it EV by EV and repairing the
limits afterwards (`hint.round_and_repair`) loses 3-4 % on the bench's congestion replan,
because an EV at full power up to a milestone cannot make up for what rounding took from it.

This keeps what matters of the point and lets go of the rest:

- per phase group and PTU, the EVs together draw what the point draws there (at most; a
  group may use the room the limits leave only for EVs that would miss otherwise). The grid
  import, the fuse on every phase and the kW-max are then those of the point, so are the
  energy costs;
- per EV, what the point has delivered by each of its milestones (no more than the
  milestone asks) and by its departure are requirements; how the EV's energy is spread over
  the PTUs before them is free.

In each PTU and group the budget goes first to what cannot wait (the energy a requirement
asks beyond what full power after this PTU still gives), then to what each EV still needs,
in order of laxity (the energy an EV could still take at full power before a requirement,
less what it asks; the point's own choice counts for `FOLLOW_PTUS`), each at least its
minimum power, on its step grid, within its level maximum and the upper side of its
milestones. A rest below the minimum power later is taken now, or left at the minimum for a
later PTU when there is time for it. The result keeps every hard limit.

On a site with other flexible assets (batteries, heat pumps, PV to curtail, modes, profiles)
those take the point's powers rounded and repaired on their own (`hint.round_and_repair` with
the EVs idle), and the EVs share out what the point draws beside them, the rounding's
difference taken from (or given to) the EVs' room.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cem.planner.bound import lp_level_assets
from cem.planner.fallback import ev_only
from cem.planner.hint import round_and_repair
from cem.planner.layout import Dispatch, Layout, build_layout, empty_dispatch, grid_and_phases

NOISE_WH = 5.0  # energy an EV still needs below this is rounding, not a need
# the point's own choice counts too: an EV the point charges at full power in a PTU has this
# many PTUs less laxity there (car parks with a congestion window, LP optimum, seeds 0-4:
# 0.03-3.3 % above it with 3, 0.03-4.1 % with 0; the bench's 0.015 % either way)
FOLLOW_PTUS = 3.0


def _requirements(lay: Layout, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per EV, the PTUs (column 0: its departure) by which the point's energy is required,
    that energy (Wh since the start) and what a Wh missed there costs (EUR; the departure's:
    the target's weight): (S, M + 1) each. `cum` (S, n + 1) is the point's energy before
    each PTU."""
    S = lay.s
    sel = lay.ms_lo > lay.level0[lay.ms_asset] + 0.5
    a, ptu = lay.ms_asset[sel], lay.ms_ptu[sel]
    need = np.minimum(cum[a, ptu], lay.ms_lo[sel] - lay.level0[a])
    count = np.bincount(a, minlength=S) if len(a) else np.zeros(S, dtype=np.int64)
    M = int(count.max()) if S else 0
    at = np.zeros((S, M + 1), dtype=np.int64)
    wh = np.zeros((S, M + 1))
    eur = np.zeros((S, M + 1))
    at[:, 0] = lay.last
    wh[:, 0] = cum[np.arange(S), lay.last]
    eur[:, 0] = np.where(np.isnan(lay.target), 0.0, lay.weight)
    order = np.argsort(a, kind="stable")
    a, ptu, need, w = a[order], ptu[order], need[order], lay.ms_w_lo[sel][order]
    slot = np.arange(len(a)) - np.concatenate([[0], np.cumsum(count)])[a] + 1
    at[a, slot] = ptu
    wh[a, slot] = need
    eur[a, slot] = w
    return at, wh, eur


def _upper(lay: Layout) -> np.ndarray:
    """(S, n) the most energy (Wh since the start) an EV may have by the end of each PTU:
    its level maximum, and the upper side of each milestone before it."""
    cap = np.broadcast_to((lay.lmax - lay.level0)[:, None], (lay.s, lay.n)).copy()
    k = np.flatnonzero(np.isfinite(lay.ms_hi))
    if len(k):
        # each milestone's upper side at its PTU, then the least of those at or after each
        # PTU: the cap of every PTU before them (in numpy: 0.026 s a loop at 5000 EVs)
        at = np.full((lay.s, lay.n + 1), np.inf)
        i = lay.ms_asset[k]
        np.minimum.at(at, (i, lay.ms_ptu[k]), lay.ms_hi[k] - lay.level0[i])
        after = np.minimum.accumulate(at[:, ::-1], axis=1)[:, ::-1]
        cap = np.minimum(cap, after[:, 1:])
    return cap


def laxity_assets(lay: Layout) -> np.ndarray:
    """(S,) bool: the assets this plan shares out (charge-only ones that only fill up: the
    EVs, `bound.lp_level_assets` false)."""
    return ~lp_level_assets(lay) & (lay.dmax <= 0)


def least_laxity_plan(lay: Layout, point: Dispatch, follow: float = FOLLOW_PTUS) -> Dispatch:
    """A plan that keeps every hard limit from a fractional `point` of the LP (see the
    module's docstring)."""
    S, n = lay.s, lay.n
    evs = laxity_assets(lay)
    x = np.maximum(point.charge, 0.0) * lay.avail * evs[:, None]
    mixed = not ev_only(lay)
    if not mixed:
        out = empty_dispatch(lay)
        frac = Dispatch(x, np.zeros_like(x), np.zeros((lay.k, n)))
    else:  # the other assets rounded on their own, the EVs idle meanwhile
        out = _others_rounded(lay, point, evs)
        frac = out.copy()
        frac.charge[evs] = x[evs]
    groups, grp = np.unique(np.round(lay.share, 9), axis=0, return_inverse=True)
    grp = np.asarray(grp).reshape(-1)
    g_frac, ph_frac = grid_and_phases(lay, frac)
    imp_lim = lay.import_lim.copy()
    if lay.peak_price > 0:  # no higher kW-max than the point's, the other assets rounded
        # (a heat pump's minimum power may raise it: capped at the point's own kW-max instead,
        # the bench's mixed site lost 2.6 % of its bound at 1000 EVs, 0.7 % at 5000)
        imp_lim = np.minimum(imp_lim, max(lay.peak_so_far, float(g_frac.max())))
    imp_head = imp_lim - g_frac  # room the limits leave beside the point (W)
    ph_head = lay.fuse_up - ph_frac
    wh_per_w = lay.ptu_h[None, :] * lay.eta_c[:, None]
    cum = np.concatenate([np.zeros((S, 1)), np.cumsum(x * wh_per_w, axis=1)], axis=1)
    req_at, req_wh, req_eur = _requirements(lay, cum)
    full = np.concatenate([np.zeros((S, 1)), np.cumsum(lay.cmax[:, None] * lay.avail * wh_per_w,
                                                       axis=1)], axis=1)
    upper = _upper(lay)
    got = np.zeros(S)
    cmin, cmax, step = lay.cmin, lay.cmax, lay.step.astype(float)
    members = [np.flatnonzero((grp == g) & evs & (cmax > 0) & ~lay.blocked)
               for g in range(len(groups))]
    for t in range(n):
        for g, share in enumerate(groups):
            m = members[g]
            m = m[lay.avail[m, t] & (req_wh[m, 0] - got[m] > NOISE_WH)]
            if len(m) == 0:
                continue
            frac_sum = float(x[members[g], t].sum())
            head = min([float(imp_head[t])] + [float(ph_head[q, t] / share[q])
                                               for q in range(3) if share[q] > 0])
            p = _share_out(lay, t, m, got, frac_sum, head, req_at, req_wh, req_eur, full, upper,
                           wh_per_w[m, t], cmin[m], cmax[m], step[m], follow * x[m, t] / cmax[m],
                           mixed)
            used = float(p.sum()) - frac_sum
            imp_head[t] -= used
            ph_head[:, t] -= share * used
            out.charge[m, t] = p
            got[m] += p * wh_per_w[m, t]
    return out


def _others_rounded(lay: Layout, point: Dispatch, evs: np.ndarray) -> Dispatch:
    """The point's powers of every asset but the EVs `evs` rounded and repaired on their own
    (`hint.round_and_repair`), the EVs idle. On a layout of those assets alone: the EVs, idle,
    change nothing there, and rounding a battery and a heat pump beside 5000 idle EVs took
    0.22 s, nearly all of it passes over the EVs' rows."""
    keep = np.flatnonzero(~evs)
    if len(keep) == 0 or len(keep) == lay.s:
        idle = point.copy()
        idle.charge = np.where(evs[:, None], 0.0, point.charge)
        out = round_and_repair(lay, idle)
        out.charge[evs] = 0.0
        return out
    pr = lay.problem
    sub = build_layout(dataclasses.replace(pr, storage=[pr.storage[i] for i in keep]))
    idle = point.copy()
    idle.charge, idle.discharge = point.charge[keep], point.discharge[keep]
    done = round_and_repair(sub, idle)
    out = done.copy()
    out.charge, out.discharge = np.zeros((lay.s, lay.n)), np.zeros((lay.s, lay.n))
    out.charge[keep], out.discharge[keep] = done.charge, done.discharge
    return out


def _take_in_order(want: np.ndarray, order: np.ndarray, budget: float, cmin: np.ndarray,
                   step: np.ndarray, p: np.ndarray) -> float:
    """Give `want` to the EVs in `order` while `budget` lasts (the first that does not fit
    gets what is left if that is its minimum; smaller ones after it may still fit). In
    place in `p`; returns what is left of the budget."""
    if len(order) == 0 or budget <= 1e-6:
        return budget
    w = want[order]
    c = np.cumsum(w)
    k = int(np.searchsorted(c, budget + 1e-6, side="right"))
    p[order[:k]] = w[:k]
    left = budget - (float(c[k - 1]) if k > 0 else 0.0)
    if k < len(order):
        j = order[k]
        part = np.floor(left / step[j] + 1e-9) * step[j]
        if part >= cmin[j]:
            p[j] = min(part, w[k])
            left -= p[j]
        elif w[k] > 0:
            # the minimum from those given more than theirs, the most laxity first: the
            # budget is then used to the watt (on a few EVs a group's rest would be lost)
            given = order[:k][::-1]
            spare = np.floor(np.maximum(p[given] - cmin[given], 0.0) / step[given] + 1e-9) * step[given]
            short = float(cmin[j]) - max(part, 0.0)
            if spare.sum() >= short - 1e-9:
                cum = np.cumsum(spare)
                cut = np.clip(short - (cum - spare), 0.0, spare)
                cut = np.minimum(np.ceil(cut / step[given] - 1e-9) * step[given], spare)
                p[given] -= cut
                p[j] = float(cmin[j])
                left -= float(cmin[j]) - float(cut.sum())
        rest = order[k + 1:]
        if len(rest) and left >= float(cmin[rest].min()):
            w2 = np.where(want[rest] <= left, want[rest], 0.0)
            c2 = np.cumsum(w2)
            k2 = int(np.searchsorted(c2, left + 1e-6, side="right"))
            p[rest[:k2]] = w2[:k2]
            left -= float(c2[k2 - 1]) if k2 > 0 else 0.0
    return left


def _share_out(lay: Layout, t: int, m: np.ndarray, got: np.ndarray, frac_sum: float,
               head: float, req_at: np.ndarray, req_wh: np.ndarray, req_eur: np.ndarray,
               full: np.ndarray,
               upper: np.ndarray, h: np.ndarray, cmin: np.ndarray, cmax: np.ndarray,
               step: np.ndarray, bonus: np.ndarray, mixed: bool = False) -> np.ndarray:
    """The powers (W) of EVs `m` of one group in PTU t: the point's draw of the group (less
    what the limits lack, `head` < 0) by least laxity, then the room the limits leave to
    those that would miss a requirement otherwise."""
    need = req_wh[m, 0] - got[m]
    # laxity: the energy the EV could still take at full power before each requirement
    # ahead, less what that requirement still asks; in PTUs at its full power
    ask = req_wh[m] - got[m, None]
    at = req_at[m]
    spare = full[m[:, None], at] - full[m, t][:, None] - ask
    spare = np.where((ask > NOISE_WH) & (at > t), spare, np.inf)
    least = spare.min(axis=1)
    lax = least / (cmax * h)
    room = np.maximum(upper[m, t] - got[m], 0.0)
    cap = np.minimum(cmax, np.floor(room / h / step + 1e-9) * step)
    want = np.minimum(cap, np.ceil(need / h / step - 1e-9) * step)
    want = np.where(want < cmin, np.where(cap >= cmin, cmin, 0.0), want)
    # a rest below the minimum power later: all of it now if it fits, else the minimum left
    # for a later PTU when there is time for it
    t_next = min(t + 1, lay.n - 1)
    h_next = lay.ptu_h[t_next] * lay.eta_c[m]
    after = need - want * h
    small_rest = (want >= cmin) & (after > NOISE_WH) & (after < cmin * h_next)
    whole = np.ceil((want + after / h) / step - 1e-9) * step
    fits = small_rest & (whole <= cap)
    lower = np.floor((want - (cmin * h_next - after) / h) / step + 1e-9) * step
    # (when full power after this PTU still meets every requirement; on a site with other
    # flexible assets when it still meets the departure's: an EV at full power to its
    # departure whose last kWh are below its minimum then runs one PTU a little lower and the
    # last at its minimum, a milestone before the departure missing by less than the
    # departure would have. The bench's mixed site, the same points: 1000 EVs 3.0-4.0 ->
    # 1.6-2.5 % above the bound, 5000 EVs 2.3-3.0 -> 0.9-1.6 %; on the EV-only replan bench
    # the departure's alone took the first timed replan at 1000 EVs from 0.04 to 0.45 %)
    lax_end = spare[:, 0] / (cmax * h) if mixed else lax
    defer = small_rest & ~fits & (lower >= cmin) & (lax_end >= 1.0 - lower / cmax + 1e-6)
    # unless leaving the rest out costs less: deferring misses what is due at the end of this
    # PTU by what it lowers, leaving the rest out misses what is due later (the departure,
    # the target) by the rest (an EV whose level maximum is its target cannot take its
    # minimum power in its last PTU on top; the bench's mixed site at 5000 EVs, the same
    # point: 1.51 -> 1.30 % above the bound, at 2000 1.31 -> 1.20 %)
    due = ask > NOISE_WH
    more = np.maximum(ask - (lower * h)[:, None], 0.0) - np.maximum(ask - (want * h)[:, None], 0.0)
    cost_defer = (np.where(due & (at == t + 1), more, 0.0) * req_eur[m]).sum(axis=1)
    cost_drop = after * np.where(due & (at > t + 1), req_eur[m], 0.0).sum(axis=1)
    defer &= cost_drop >= cost_defer
    want = np.where(fits, whole, np.where(defer, lower, want))
    # what cannot wait: the energy a requirement asks beyond what full power after this PTU
    # still gives (at least the minimum power, at most what the EV wants now)
    must = np.maximum(cmax * h - least, 0.0) / h
    must = np.where(must > NOISE_WH / h, np.maximum(np.ceil(must / step - 1e-9) * step, cmin), 0.0)
    must = np.minimum(must, want)
    p = np.zeros(len(m))
    order = np.argsort(lax - bonus, kind="stable")
    budget = frac_sum + min(head, 0.0)
    # first every EV what cannot wait, then what each wants, least laxity first
    left = _take_in_order(must, order, budget, cmin, step, p)
    left = _top_up(want, order, left, step, cmin, p)
    if head > 1e-6:
        late = order[(p[order] < want[order]) & (lax[order] < 1.0)]
        _top_up(want, late, max(left, 0.0) + head, step, cmin, p)
    return p


def _top_up(want: np.ndarray, order: np.ndarray, budget: float, step: np.ndarray,
            cmin: np.ndarray, p: np.ndarray) -> float:
    """Raise the EVs in `order` towards `want` while `budget` lasts (one at 0 at least to
    its minimum power). In place in `p`; returns what is left of the budget."""
    if len(order) == 0 or budget <= 1e-6:
        return budget
    inc = np.maximum(want[order] - p[order], 0.0)
    low = np.where(p[order] > 0, 0.0, cmin[order])
    cum = np.cumsum(inc)
    k = int(np.searchsorted(cum, budget + 1e-6, side="right"))
    p[order[:k]] += inc[:k]
    left = budget - (float(cum[k - 1]) if k > 0 else 0.0)
    # the rest: partial raises while they fit, in order, until the budget is below an EV's
    # step. The budget only shrinks, so one that cannot take its least now never can: only
    # the others are walked, each after the largest step of those passed over before it
    rest = np.arange(k, len(order))
    st = step[order[rest]]
    first = np.minimum(np.floor(left / st + 1e-9) * st, inc[rest])
    may = np.flatnonzero((first >= low[rest]) & (first > 0))
    if len(may) == 0:
        return left
    passed = np.maximum.reduceat(st[:may[-1] + 1], np.concatenate([[0], may[:-1] + 1]))
    for j, largest in zip(rest[may], passed, strict=True):
        if left < float(largest):
            break
        part = min(np.floor(left / step[order[j]] + 1e-9) * step[order[j]], inc[j])
        if part >= low[j] and part > 0:
            p[order[j]] += part
            left -= part
    return left
