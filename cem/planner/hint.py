"""Round a fractional (LP) dispatch and repair it into a plan that keeps every hard limit.

Steps: snap powers to each asset's domain ({0} U [min, max] on its step grid: an EV below half
its minimum current goes to 0, otherwise at least to the minimum); keep fill levels inside their
bounds; cut charging where the fuse, the import limit or congestion is exceeded (lowest priority
and most slack first, PV curtailment undone first); curtail PV / cut discharge where export is
exceeded; then re-fill unmet energy into spare capacity, highest priority first, cheapest PTUs
first. The result is a complete feasible plan: the hint for CP-SAT and, if CP-SAT finds nothing
better in time, the plan itself. `refill` from an empty dispatch is also the rule-based fallback.
"""

from __future__ import annotations

import time

import numpy as np

from cem.planner.bound import LpResult, lp_level_assets, polish
from cem.planner.layout import (
    Dispatch,
    Layout,
    grid_and_phases,
    levels,
    phase_sum,
    profile_row,
    share_vector,
)

EPS = 1e-6
LIMIT_TOL_W = 1e-3  # a hard limit counts as kept within a milliwatt (float noise only)


def snap(lay: Layout, disp: Dispatch) -> Dispatch:
    """Powers on each asset's domain and step grid (outside its window: 0)."""
    out = disp.copy()
    net = out.charge - out.discharge
    c = np.maximum(net, 0) * lay.avail
    d = np.maximum(-net, 0) * lay.avail
    step = lay.step[:, None].astype(float)
    # round the running sum, so each asset keeps its energy to within one step
    cum = np.floor(np.cumsum(c / step, axis=1) + 1e-6)
    c = np.minimum(np.diff(cum, axis=1, prepend=0.0) * step, lay.cmax[:, None])
    d = np.minimum(np.rint(d / step) * step, lay.dmax[:, None])
    cmin = lay.cmin[:, None]
    dmin = lay.dmin[:, None]
    # charge-only assets that only fill up (an EV, also with milestones): running-sum
    # rounding keeps every prefix of their energy within a step, so their milestones too
    mono = ~lp_level_assets(lay)
    g_frac, _ = grid_and_phases(lay, disp)
    peak = max(lay.peak_so_far, float(g_frac.max())) if lay.n else 0.0
    busy = (g_frac >= peak - 1.0) if lay.peak_price > 0 else np.zeros(lay.n, dtype=bool)
    # room under the import limit and the fuse, as the rounded powers stand (pieces below the
    # minimum taken out), so moving them does not overload a PTU
    g_now, ph_now = grid_and_phases(lay, Dispatch(np.where(c >= cmin, c, 0.0), d, out.curtail,
                                                   out.mode_index, out.mode_power, out.profile_start,
                                                   out.profile_choice))
    head_imp = lay.import_lim - g_now
    head_ph = lay.fuse_up - ph_now
    _move_below_min(lay, c, np.where(mono, cmin[:, 0], 0.0), busy, head_imp, head_ph)
    rows = np.flatnonzero(~mono & ((lay.cmin > 0) | (lay.dmin > 0)))
    if len(rows):
        # from the fractional powers, not the step-rounded ones above (their running sum,
        # floored, is up to a step below: a heat pump's buffer a few Wh under its minimum)
        c[rows], d[rows] = _sigma_delta(lay, rows, (net * lay.avail)[rows])
    c = np.where(c < cmin / 2, 0.0, np.maximum(c, cmin))
    d = np.where(d < dmin / 2, 0.0, np.maximum(d, dmin))
    c = np.where(c > 0, np.maximum(c, cmin), 0.0)
    out.charge, out.discharge = c, d
    out.curtail = np.clip(np.ceil(out.curtail - 1e-6), 0, lay.pv) * lay.pv_curtailable[:, None]
    pr = lay.problem
    if out.mode_power is not None:
        for j, m in enumerate(pr.modes):
            out.mode_index[j] = hold_min_on(out.mode_index[j], m.min_on_ptus)
            mi = out.mode_index[j]
            lo = np.array([pm.min_w for pm in m.modes], dtype=float)[mi]
            hi = np.array([pm.max_w for pm in m.modes], dtype=float)[mi]
            out.mode_power[j] = np.rint(np.clip(out.mode_power[j], lo, hi))
    return out


def hold_min_on(mode_index: np.ndarray, min_on: int) -> np.ndarray:
    """Modes per PTU where every switch to a mode holds it for at least `min_on` PTUs."""
    out = np.asarray(mode_index).copy()
    if min_on <= 1:
        return out
    t = 1
    while t < len(out):
        if out[t] != out[t - 1]:
            out[t:t + min_on] = out[t]
            t += min_on
        else:
            t += 1
    return out


def _sigma_delta(lay: Layout, rows: np.ndarray, net: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round level assets' net power PTU by PTU into their domain, carrying the energy error.

    The rounded level then stays close to the fractional one all along (no early deficits),
    and within [level_min, level_max]: a power that would take it past either is cut to what
    fits, or to 0 where that is below the minimum power, and the energy is carried on (a heat
    pump whose LP plan sits at its buffer's top charges a few PTUs later, rather than a
    PTU that `fix_levels` then switches off for good, leaving the buffer short all day).
    `rows` are the assets, `net` their fractional net power (len(rows), n); all assets are
    rounded together, one PTU at a time.
    """
    k, n = len(rows), lay.n
    c = np.zeros((k, n))
    d = np.zeros((k, n))
    carry = np.zeros(k)  # W x (whole) PTU
    st = lay.step[rows].astype(float)
    cmin, cmax = lay.cmin[rows], lay.cmax[rows]
    dmin, dmax = lay.dmin[rows], lay.dmax[rows]
    first, last = lay.first[rows], lay.last[rows]
    part = lay.part
    level = lay.level0[rows].astype(float)
    lmin, lmax = lay.lmin[rows], lay.lmax[rows]
    eta_c, eta_d = lay.eta_c[rows], lay.eta_d[rows]
    levelled = lay.needs_levels[rows]
    for t in range(n):
        on = (first <= t) & (t < last)
        if not on.any():
            continue
        h, use = float(lay.ptu_h[t]), lay.usage[rows, t]
        want = net[:, t] + carry / part[t]
        # to the nearest step; levelled assets' towards charging (a level never a step below
        # the fractional one: under level_min each Wh is a penalty)
        half = np.where(levelled, 1.0 - EPS, 0.5)
        up = np.minimum(np.maximum(np.floor(want / st + half) * st, cmin), cmax)
        down = np.minimum(np.maximum(np.floor(-want / st + 1.0 - half) * st, dmin), dmax)
        if h > 0:  # what keeps the level within its bounds (levelled assets)
            fits_up = np.floor((lmax - level + use) / (h * eta_c) / st + EPS) * st
            fits_down = np.floor((level - use - lmin) * eta_d / h / st + EPS) * st
            up = np.where(levelled & (up > fits_up), np.where(fits_up >= cmin, fits_up, np.nan), up)
            down = np.where(levelled & (down > fits_down),
                            np.where(fits_down >= dmin, fits_down, np.nan), down)
        up = np.where(cmax > 0, up, np.nan)
        down = np.where(dmax > 0, -down, np.nan)
        options = np.stack([np.zeros(k), up, down])  # nan: not an option for that asset
        above = np.where(options >= want - 1e-6, options, np.inf)  # never below the fractional level
        pick = np.min(above, axis=0)
        fallback = np.nanmax(options, axis=0)
        pick = np.where(np.isfinite(pick), pick, fallback)
        carry = np.where(on, (want - pick) * part[t], carry)
        c[:, t] = np.where(on & (pick > 0), pick, 0.0)
        d[:, t] = np.where(on & (pick < 0), -pick, 0.0)
        level = level + h * (eta_c * c[:, t] - d[:, t] / eta_d) - use
    return c, d


def _donors(row: np.ndarray, amount: float, cmin: float, price: np.ndarray
            ) -> list[tuple[int, float]] | None:
    """Take `amount` W x PTU from the PTUs of `row` above `cmin`, dearest first (None: too little)."""
    on = np.flatnonzero(row > cmin + EPS)
    if len(on) == 0 or float((row[on] - cmin).sum()) < amount - EPS:
        return None
    out: list[tuple[int, float]] = []
    for u in on[np.argsort(-price[on], kind="stable")]:
        take = min(float(row[u] - cmin), amount)
        out.append((int(u), take))
        amount -= take
        if amount <= EPS:
            break
    return out


def _move_below_min(lay: Layout, c: np.ndarray, cmin: np.ndarray, busy: np.ndarray,
                    head_imp: np.ndarray, head_ph: np.ndarray) -> None:
    """Move charging that lies below an asset's minimum power into its other PTUs (in place).

    Keeps the asset's energy: the pieces below the minimum go into the headroom of PTUs that
    already charge (cheapest first, PTUs at the LP's peak last); a rest that does not fit becomes
    one PTU at the minimum, taken from PTUs that charge above it (at the peak first).
    """
    small = (c > 0) & (c < cmin[:, None] - EPS)
    rows = np.flatnonzero(small.any(axis=1))
    price = lay.p_imp + np.where(busy, 1e3, 0.0)
    part = lay.part
    partial = part < 1.0  # a partial PTU 0 gives no donors (its W are not whole-PTU energy)
    for i in rows:
        sm = np.flatnonzero(small[i])
        orig = c[i].copy()
        energy = float((c[i, sm] * part[sm]).sum())  # W x (whole) PTU
        best = int(sm[np.argmax(c[i, sm] - np.where(busy[sm], 1e9, 0.0))])
        c[i, sm] = 0.0
        on = np.flatnonzero(c[i] >= cmin[i] - EPS)
        if len(on):
            on = on[np.argsort(price[on], kind="stable")]
            share = lay.share[i]
            site = head_imp[on].copy()
            for p in range(3):
                if share[p] > 0:
                    site = np.minimum(site, head_ph[p, on] / share[p])
            room = np.maximum(np.minimum(lay.cmax[i] - c[i, on], np.floor(site / lay.step[i]) * lay.step[i]), 0)
            room_e = room * part[on]
            take = np.minimum(room_e, np.maximum(energy - np.concatenate([[0.0], np.cumsum(room_e)[:-1]]), 0))
            take = take / part[on]
            short = partial[on]
            st = float(lay.step[i])
            take[short] = np.minimum(np.ceil(take[short] / st - EPS) * st, room[short])
            c[i, on] += take
            head_imp[on] -= take
            head_ph[:, on] -= np.outer(share, take)
            energy -= float((take * part[on]).sum())
        if energy <= lay.step[i] / 2:
            continue
        at_min = cmin[i] * part[best]  # energy of the minimum in PTU `best`
        takes = _donors(np.where(partial, 0.0, c[i]), at_min - energy, cmin[i], price) \
            if energy < at_min else None
        if takes is not None:
            for u, amount in takes:
                c[i, u] -= amount
            c[i, best] = cmin[i]
        else:
            room = (lay.lmax[i] - lay.level0[i]) / (lay.dt_h * lay.eta_c[i]) - float((c[i] * part).sum())
            lift_ok = lay.needs_levels[i] or room >= cmin[i] - EPS
            # the usual rule decides (up to the minimum or off) unless the minimum overfills
            if lift_ok:  # put the rest back into the PTUs it came from, largest first
                for t in sorted(sm, key=lambda x: (busy[x], -orig[x])):
                    w = energy / part[t]
                    c[i, t] = min(_up(w, float(lay.step[i])) if partial[t] else w, lay.cmax[i])
                    energy -= c[i, t] * part[t]
                    if energy <= EPS:
                        break


def _down(value: float, step: float) -> float:
    return float(np.floor(value / step + EPS) * step)


def _up(value: float, step: float) -> float:
    """`value` rounded up to the step grid (W in a partial PTU that carry a whole-PTU amount)."""
    return float(np.ceil(value / step - EPS) * step)


def fix_levels(lay: Layout, disp: Dispatch) -> None:
    """Keep each asset's level <= level_max and >= level_min by trimming its power (in place).

    What a trim at level_max takes goes into the asset's next PTUs that charge, as far as
    their maximum power and level_max allow (a heat pump whose buffer the plan fills to the
    top: else it stays that much short until its next trough, under level_min there).
    """
    lv = levels(lay, disp)
    over = (lv[:, 1:] > lay.lmax[:, None] + 1e-6)
    under = (lv[:, 1:] < lay.lmin[:, None] - 1e-6) & (disp.discharge > 0)
    bad = np.flatnonzero(over.any(axis=1) | under.any(axis=1))
    for i in bad:
        if not lay.needs_levels[i]:
            _trim_energy(lay, disp, int(i))
            continue
        level = lay.level0[i]
        st = float(lay.step[i])
        owed = 0.0  # Wh (stored) trims at level_max took, for the next PTUs that charge
        for t in range(lay.first[i], lay.last[i]):
            dt = float(lay.ptu_h[t])
            c, d = disp.charge[i, t], disp.discharge[i, t]
            if owed > EPS and c > 0 and dt > 0:
                c = min(c + _up(owed / (dt * lay.eta_c[i]), st), float(lay.cmax[i]))
            nxt = level + dt * (lay.eta_c[i] * c - d / lay.eta_d[i]) - lay.usage[i, t]
            if nxt > lay.lmax[i] + 1e-6 and c > 0:
                room = lay.lmax[i] - (level - lay.usage[i, t] - dt * d / lay.eta_d[i])
                c = max(_down(room / (dt * lay.eta_c[i]), st), 0.0)
                if c < lay.cmin[i]:
                    c = 0.0
            elif nxt < lay.lmin[i] - 1e-6 and d > 0:
                room = (level - lay.usage[i, t] + dt * lay.eta_c[i] * c) - lay.lmin[i]
                d = max(_down(room * lay.eta_d[i] / dt, st), 0.0)
                if d < lay.dmin[i]:
                    d = 0.0
                disp.discharge[i, t] = d
            owed = max(owed - dt * lay.eta_c[i] * (c - disp.charge[i, t]), 0.0)
            disp.charge[i, t] = c
            level = level + dt * (lay.eta_c[i] * disp.charge[i, t] - disp.discharge[i, t] / lay.eta_d[i]) - lay.usage[i, t]


def _trim_energy(lay: Layout, disp: Dispatch, i: int) -> None:
    """Charge-only asset above its level_max: take the excess from its dearest PTUs."""
    k = lay.dt_h * lay.eta_c[i]
    st = float(lay.step[i])
    c = disp.charge[i]
    part = lay.part
    excess = float((c * part).sum()) - (lay.lmax[i] - lay.level0[i]) / k  # W x (whole) PTU
    on = np.flatnonzero(c > 0)
    for t in on[np.argsort(-lay.p_imp[on], kind="stable")]:
        if excess <= EPS:
            return
        cut = min(np.ceil(excess / part[t] / st - EPS) * st, c[t] - lay.cmin[i])
        if cut > 0:
            c[t] -= cut
            excess -= cut * part[t]
    for t in on[np.argsort(c[on], kind="stable")]:  # still too much: switch off the smallest
        if excess <= EPS:
            return
        excess -= c[t] * part[t]
        c[t] = 0.0


def _slack_order(lay: Layout, disp: Dispatch) -> np.ndarray:
    """Reduction order of assets: lowest priority first, then most room to catch up later."""
    room = ((lay.avail * lay.part).sum(axis=1) * lay.cmax * lay.dt_h * lay.eta_c)
    need = np.where(np.isnan(lay.target), 0.0, np.nan_to_num(lay.target) - lay.level0)
    slack = room - need
    is_hp = np.array([k == "heat_pump" for k in lay.kind], dtype=float)
    return np.lexsort((-slack, is_hp, lay.weight))


def _cut(values: np.ndarray, weights: np.ndarray, amount: float, mins: np.ndarray,
         steps: np.ndarray) -> np.ndarray:
    """Reduce `values` (in the given order) so that sum(weights * reduction) >= amount."""
    contrib = weights * values
    cum = np.cumsum(contrib)
    k = int(np.searchsorted(cum, amount - EPS))
    new = values.copy()
    new[:k] = 0.0
    if k < len(values):
        before = cum[k - 1] if k > 0 else 0.0
        rest = amount - before  # still to remove via asset k
        red = rest / weights[k]
        v = values[k] - red
        v = np.floor(v / steps[k] + EPS) * steps[k]
        new[k] = v if v >= mins[k] - EPS else 0.0
    return new


def repair_limits(lay: Layout, disp: Dispatch, import_cap: np.ndarray | None = None) -> None:
    """Bring import, export and per-phase fuse within limits (in place), by priority.

    `import_cap` (<= the import limit) is used instead of the import limit, e.g. the LP's
    peak, so that rounding up does not raise the kW-max.
    """
    order = _slack_order(lay, disp)
    imp_lim = lay.import_lim if import_cap is None else np.minimum(lay.import_lim, import_cap)
    for _ in range(4):
        g, ph = grid_and_phases(lay, disp)
        up = np.vstack([g - imp_lim, (ph - lay.fuse_up)])  # (4, n) excess load
        dn = np.vstack([-g - lay.export_lim, (-ph - lay.fuse_dn)])  # (4, n) excess production
        bad_up = np.flatnonzero((up > LIMIT_TOL_W).any(axis=0))
        bad_dn = np.flatnonzero((dn > LIMIT_TOL_W).any(axis=0))
        if len(bad_up) == 0 and len(bad_dn) == 0:
            return
        for t in bad_up.tolist():
            _repair_up(lay, disp, t, order, imp_lim)
        for t in bad_dn.tolist():
            _repair_down(lay, disp, t, order)
        fix_levels(lay, disp)


def _excess_up(lay: Layout, disp: Dispatch, t: int, imp_lim: np.ndarray) -> np.ndarray:
    g, ph = _grid_t(lay, disp, t)
    return np.concatenate([[g - imp_lim[t]], ph - lay.fuse_up[:, t]])


def _grid_t(lay: Layout, disp: Dispatch, t: int) -> tuple[float, np.ndarray]:
    net = disp.charge[:, t] - disp.discharge[:, t]
    pv_out = lay.pv[:, t] - disp.curtail[:, t]
    other = 0.0
    other_ph = np.zeros(3)
    if disp.mode_power is not None and len(lay.problem.modes):
        for j, m in enumerate(lay.problem.modes):
            other += disp.mode_power[j, t]
            other_ph += share_vector(m.phase_share) * disp.mode_power[j, t]
    for j, p in enumerate(lay.problem.profiles):
        v = profile_row(lay, disp, j)[t]
        other += v
        other_ph += share_vector(p.phase_share) * v
    g = lay.fixed_w[t] + net.sum() - pv_out.sum() + other
    ph = lay.fixed_phase[:, t] + phase_sum(lay.share, net) - phase_sum(lay.pv_share, pv_out) + other_ph
    return float(g), ph


def _repair_up(lay: Layout, disp: Dispatch, t: int, order: np.ndarray, imp_lim: np.ndarray) -> None:
    """Too much load in PTU t: undo curtailment (as much as needed), then cut charging by
    priority."""
    ex = _excess_up(lay, disp, t, imp_lim)
    for j in np.flatnonzero(disp.curtail[:, t] > 0) if lay.k else []:
        if np.max(ex) <= LIMIT_TOL_W:
            break
        w = np.concatenate([[1.0], lay.pv_share[j]])
        need = max(float(ex[k] / w[k]) for k in range(4) if ex[k] > LIMIT_TOL_W and w[k] > 0) \
            if any(ex[k] > LIMIT_TOL_W and w[k] > 0 for k in range(4)) else 0.0
        disp.curtail[j, t] -= min(disp.curtail[j, t], np.ceil(need))
        ex = _excess_up(lay, disp, t, imp_lim)
    for _ in range(5):
        worst = int(np.argmax(ex))
        if ex[worst] <= LIMIT_TOL_W:
            return
        w = np.ones(lay.s) if worst == 0 else lay.share[:, worst - 1]
        cand = order[(disp.charge[order, t] > 0) & (w[order] > 0)]
        if len(cand) == 0:
            break
        new = _cut(disp.charge[cand, t], w[cand], ex[worst], lay.cmin[cand], lay.step[cand].astype(float))
        disp.charge[cand, t] = new
        ex = _excess_up(lay, disp, t, imp_lim)
    if disp.mode_power is not None and len(lay.problem.modes) and np.max(ex) > LIMIT_TOL_W:
        _modes_to(lay, disp, t, lowest=True, switch=False)
        if np.max(_excess_up(lay, disp, t, imp_lim)) > LIMIT_TOL_W:
            _modes_to(lay, disp, t, lowest=True, switch=True)


def _modes_to(lay: Layout, disp: Dispatch, t: int, lowest: bool, switch: bool) -> None:
    """Every mode device in PTU t to its least (lowest) or most load: the chosen mode's end
    of its range first, another mode if that one reaches further (the limit beats min_on)."""
    if disp.mode_power is None:
        return
    for j, m in enumerate(lay.problem.modes):
        if not m.modes:
            continue
        cur = m.modes[int(disp.mode_index[j][t])]
        if lowest:
            k = min(range(len(m.modes)), key=lambda x: m.modes[x].min_w)
            if switch and m.modes[k].min_w < cur.min_w:
                disp.mode_index[j][t] = k
            disp.mode_power[j, t] = m.modes[int(disp.mode_index[j][t])].min_w
        else:
            k = max(range(len(m.modes)), key=lambda x: m.modes[x].max_w)
            if switch and m.modes[k].max_w > cur.max_w:
                disp.mode_index[j][t] = k
            disp.mode_power[j, t] = m.modes[int(disp.mode_index[j][t])].max_w


def _repair_down(lay: Layout, disp: Dispatch, t: int, order: np.ndarray) -> None:
    """Too much production in PTU t: curtail PV, then cut discharge."""
    g, ph = _grid_t(lay, disp, t)
    ex = np.concatenate([[-g - lay.export_lim[t]], -ph - lay.fuse_dn[:, t]])
    for _ in range(5):
        worst = int(np.argmax(ex))
        if ex[worst] <= LIMIT_TOL_W:
            return
        if lay.k:
            w = np.ones(lay.k) if worst == 0 else lay.pv_share[:, worst - 1]
            room = (lay.pv[:, t] - disp.curtail[:, t]) * lay.pv_curtailable * (w > 0)
            for j in np.flatnonzero(room > 0):
                add = min(room[j], np.ceil(ex[worst] / w[j]))
                disp.curtail[j, t] += add
                ex[worst] -= add * w[j]
                if ex[worst] <= LIMIT_TOL_W:
                    break
        g, ph = _grid_t(lay, disp, t)
        ex = np.concatenate([[-g - lay.export_lim[t]], -ph - lay.fuse_dn[:, t]])
        if ex[worst] <= LIMIT_TOL_W:
            continue
        w = np.ones(lay.s) if worst == 0 else lay.share[:, worst - 1]
        cand = order[(disp.discharge[order, t] > 0) & (w[order] > 0)]
        if len(cand) == 0:
            _modes_to(lay, disp, t, lowest=False, switch=False)
            g, ph = _grid_t(lay, disp, t)
            if max(-g - lay.export_lim[t], *(-ph - lay.fuse_dn[:, t])) > LIMIT_TOL_W:
                _modes_to(lay, disp, t, lowest=False, switch=True)
            return
        disp.discharge[cand, t] = _cut(disp.discharge[cand, t], w[cand], ex[worst], lay.dmin[cand],
                                       lay.step[cand].astype(float))
        g, ph = _grid_t(lay, disp, t)
        ex = np.concatenate([[-g - lay.export_lim[t]], -ph - lay.fuse_dn[:, t]])


def refill(lay: Layout, disp: Dispatch, *, by_price: bool = True, deadline_first: bool = False,
           peak_cap: float | None = None, allowed_wh: np.ndarray | None = None,
           milestone_goal: np.ndarray | None = None, stop_at: float | None = None) -> bool:
    """Add charging where targets, milestones or level minimums are missed, into spare
    capacity (in place).

    `allowed_wh` (per asset) is a shortfall to accept, e.g. what the LP itself could not meet;
    `milestone_goal` (per `Layout.ms_*` entry) the level wanted at each milestone (default:
    its lower bound).

    Assets in priority order (then earliest deadline); PTUs cheapest first (or earliest first
    for the fallback); never above the import limit, the fuse on any phase, or the asset's
    maximum level; first below the current peak, then up to the limits. With `stop_at` (a
    `time.perf_counter` moment) no asset is started after it. False when stopped so.
    """
    g, ph = grid_and_phases(lay, disp)
    lv = levels(lay, disp)
    S = lay.s
    idx = np.arange(S)
    has_t = ~np.isnan(lay.target)
    end_level = lv[idx, lay.last]
    goal = np.nan_to_num(lay.target) - (0.0 if allowed_wh is None else np.maximum(allowed_wh, 0.0))
    short_t = has_t & (end_level < goal - 0.01)
    short_min = np.zeros(S, dtype=bool)
    for i in np.flatnonzero(lay.needs_levels):
        a, b = lay.first[i], lay.last[i]
        short_min[i] = bool(np.any(lv[i, a + 1:b + 1] < lay.lmin[i] - 0.5))
    # milestones (an EV's target before its departure): the level wanted at their PTU, no
    # more than full power from the start of the window can reach by then
    reach = lay.level0[:, None] + np.cumsum(
        lay.avail * (lay.cmax * lay.eta_c)[:, None] * lay.ptu_h[None, :], axis=1)
    ms_goal = np.minimum(lay.ms_lo if milestone_goal is None else milestone_goal,
                         reach[lay.ms_asset, np.maximum(lay.ms_ptu - 1, 0)] - 0.5)
    ms_short = lv[lay.ms_asset, lay.ms_ptu] < ms_goal - 0.5
    short_min[lay.ms_asset[ms_short]] = True
    todo = np.flatnonzero((short_t | short_min) & (lay.cmax > 0))
    by_asset: dict[int, list[tuple[int, float]]] = {}
    for k in np.flatnonzero(np.isin(lay.ms_asset, todo)):
        by_asset.setdefault(int(lay.ms_asset[k]), []).append((int(lay.ms_ptu[k]), float(ms_goal[k])))
    if len(todo) == 0:
        return True
    deadline = lay.last[todo]
    if deadline_first:
        todo = todo[np.lexsort((deadline,))]
    else:
        todo = todo[np.lexsort((deadline, -lay.weight[todo]))]
    price = np.where(g > 0, lay.p_imp, lay.p_exp_eff) + lay.tie
    peak = max(lay.peak_so_far, float(g.max())) if lay.n else 0.0
    if peak_cap is not None:
        peak = max(min(peak, peak_cap), lay.peak_so_far)
    caps = []
    if lay.peak_price > 0:
        # water-filling: raise the allowed peak in steps, so a kW-max increase is spread out
        top = float(lay.import_lim.max()) if lay.n else peak
        for f in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4):
            caps.append(np.minimum(lay.import_lim, peak + f * max(top - peak, 0.0)))
    caps.append(lay.import_lim)
    active = np.asarray(todo)
    for cap in caps:
        if stop_at is not None and time.perf_counter() > stop_at:
            return False
        room = _can_take(lay, disp, active, g, ph, cap)
        done = np.zeros(len(active), dtype=bool)
        for k in np.flatnonzero(room):
            if stop_at is not None and time.perf_counter() > stop_at:
                return False
            done[k] = bool(_fill_asset(lay, disp, int(active[k]), g, ph, cap, price, by_price, goal,
                                       by_asset.get(int(active[k]))))
        active = active[~done]
        if len(active) == 0:
            return True
    return True


def _can_take(lay: Layout, disp: Dispatch, assets: np.ndarray, g: np.ndarray, ph: np.ndarray,
              cap: np.ndarray) -> np.ndarray:
    """Which of `assets` have a PTU in their window with room for at least one more step."""
    if len(assets) == 0:
        return np.zeros(0, dtype=bool)
    head = np.broadcast_to(cap - g, (len(assets), lay.n)).copy()
    sh = lay.share[assets]
    for p in range(3):
        with np.errstate(divide="ignore", invalid="ignore"):
            hp = np.where(sh[:, p:p + 1] > 0, (lay.fuse_up[p] - ph[p])[None, :] / sh[:, p:p + 1], np.inf)
        head = np.minimum(head, hp)
    c = disp.charge[assets]
    need = np.where(c > 0, lay.step[assets, None], np.maximum(lay.cmin[assets, None], lay.step[assets, None]))
    ok = lay.avail[assets] & (c < lay.cmax[assets, None]) & (disp.discharge[assets] <= 0) & (head >= need)
    return ok.any(axis=1)


def _fill_asset(lay: Layout, disp: Dispatch, i: int, g: np.ndarray, ph: np.ndarray,
                cap: np.ndarray, price: np.ndarray, by_price: bool, goal: np.ndarray,
                milestones: list[tuple[int, float]] | None = None) -> bool:
    """Fill asset i under `cap`; True when it is done (met, or no PTU can take more).

    The levels it must reach: level_min after every PTU (assets with levels), `goal` at the
    end of its window, and each (PTU, level) of `milestones` at that PTU. The first one
    missed is filled from the PTUs before it; one that cannot be (no room before it) leaves
    the next one missed its turn, so a milestone the limits block still lets the target at
    the departure take the PTUs after it.
    """
    a, b = int(lay.first[i]), int(lay.last[i])
    eta = lay.eta_c[i]
    hours = lay.ptu_h
    for _ in range(3):
        lvl = lay.level0[i] + np.concatenate([[0.0], np.cumsum(
            hours * (eta * disp.charge[i] - disp.discharge[i] / lay.eta_d[i]) - lay.usage[i])])
        # the first level index that misses: level_min (levels after a PTU), a milestone or
        # the target
        want = np.full(lay.n + 1, -np.inf)
        if lay.needs_levels[i]:
            want[a + 1:b + 1] = lay.lmin[i]
        for ptu, level in milestones or []:
            want[ptu] = max(want[ptu], level)
        if not np.isnan(lay.target[i]):
            want[b] = max(want[b], goal[i])
        miss = want - lvl
        bad = np.flatnonzero(miss > 0.01)
        if len(bad) == 0:
            return True
        later = sorted({ptu for ptu, _level in milestones or []} | {b})
        taus = [int(bad[0]), *(t for t in later if t > bad[0] and miss[t] > 0.01)]
        outcomes = [_fill_before(lay, disp, i, tau, float(miss[tau]), lvl, g, ph, cap, price,
                                 by_price) for tau in taus[:1]]
        for tau in taus[1:]:
            if outcomes[-1] == "changed":
                break
            outcomes.append(_fill_before(lay, disp, i, tau, float(miss[tau]), lvl, g, ph, cap,
                                         price, by_price))
        if outcomes[-1] != "changed":
            return all(o == "done" for o in outcomes)
    return False


def _fill_before(lay: Layout, disp: Dispatch, i: int, tau: int, gap: float, lvl: np.ndarray,
                 g: np.ndarray, ph: np.ndarray, cap: np.ndarray, price: np.ndarray,
                 by_price: bool) -> str:
    """Add charging to asset i in the PTUs before level index `tau` (`gap` Wh short there):
    "changed", "done" (no PTU before it can take more) or "stuck" (the limits leave no room)."""
    a, b = int(lay.first[i]), int(lay.last[i])
    eta = lay.eta_c[i]
    step = float(lay.step[i])
    share = lay.share[i]
    hours = lay.ptu_h
    part = lay.part
    donor_row = part >= 1.0  # a partial PTU 0 gives no donors (its W are not whole-PTU energy)
    ts = np.arange(a, tau)
    ts = ts[(disp.charge[i, ts] < lay.cmax[i]) & (disp.discharge[i, ts] <= 0)]
    if len(ts) == 0:
        return "done"
    head_v = cap[ts] - g[ts]
    for p in range(3):
        if share[p] > 0:
            head_v = np.minimum(head_v, (lay.fuse_up[p, ts] - ph[p, ts]) / share[p])
    on_v = disp.charge[i, ts] > 0
    ts = ts[(head_v >= step) & (on_v | (head_v >= lay.cmin[i]))]
    if len(ts) == 0:
        return "stuck"
    ts = ts[np.argsort(price[ts], kind="stable")] if by_price else ts
    changed = False
    for t in ts:
        c = disp.charge[i, t]
        if c >= lay.cmax[i] or disp.discharge[i, t] > 0:
            continue
        dt = float(hours[t])
        head = cap[t] - g[t]
        for p in range(3):
            if share[p] > 0:
                head = min(head, (lay.fuse_up[p, t] - ph[p, t]) / share[p])
        # never above level_max from t+1 on
        lvl_room = float(np.min(lay.lmax[i] - lvl[t + 1:b + 1])) if b > t else 0.0
        add = min(head, lay.cmax[i] - c, gap / (dt * eta), lvl_room / (dt * eta))
        if c == 0 and add < lay.cmin[i]:
            # lift to the minimum if the limits allow it even though it overshoots a little
            add = lay.cmin[i] if min(head, lvl_room / (dt * eta)) >= lay.cmin[i] else 0.0
            rest = gap / (dt * eta)
            if add == 0 and head >= lay.cmin[i] and 0 < rest < lay.cmin[i] and not lay.needs_levels[i]:
                # the rest is below the minimum power: run this PTU at the minimum and take
                # the difference from a PTU that charges well above it
                over = np.ceil((lay.cmin[i] - rest) * part[t] / step - EPS) * step
                takes = _donors(np.where(donor_row, disp.charge[i], 0.0), over, lay.cmin[i],
                                price)
                for u, amount in takes or []:
                    disp.charge[i, u] -= amount
                    g[u] -= amount
                    ph[:, u] -= share * amount
                    lvl[u + 1:] -= hours[u] * eta * amount
                    gap += hours[u] * eta * amount
                if takes:
                    add = lay.cmin[i]
        else:
            add = min(np.ceil(add / step - EPS) * step, _down(min(head, lay.cmax[i] - c, lvl_room / (dt * eta)), step))
        if add <= 0:
            continue
        disp.charge[i, t] = c + add
        g[t] += add
        ph[:, t] += share * add
        lvl[t + 1:] += dt * eta * add
        gap -= dt * eta * add
        changed = True
        if gap <= 0.5:
            break
    return "changed" if changed else "stuck"


def shave_peak(lay: Layout, disp: Dispatch, deadline: float, rounds: int = 60) -> None:
    """Lower the kW-max by moving charging out of the peak PTUs while that pays (in place).

    Each round tries to lower the peak by a step: every PTU above the new peak gives charging
    (of charge-only assets, keeping each in {0} U [min, max]) to other PTUs of the same asset's
    window with room under the new peak, the import limit and the fuse, cheapest first. A round
    is kept only if the peak cost saved exceeds the energy cost added.
    """
    if lay.peak_price <= 0 or lay.n == 0:
        return
    import time as _time

    mono = np.flatnonzero(~lay.needs_levels & (lay.cmax > 0))
    if len(mono) == 0:
        return
    for _ in range(rounds):
        if _time.perf_counter() > deadline:
            return
        g, ph = grid_and_phases(lay, disp)
        peak = float(g.max())
        if peak <= lay.peak_so_far + 1:
            return
        floor_ = max(lay.peak_so_far, float(np.sort(g)[-min(len(g), 3)]) - 1)
        for delta in (max(peak - floor_, 1.0), max(0.02 * peak, 50.0), max(0.005 * peak, 10.0)):
            new_peak = max(peak - delta, lay.peak_so_far)
            trial = disp.copy()
            ok, extra_cost = _move_out_of_peak(lay, trial, g.copy(), ph.copy(), new_peak, mono)
            gain = lay.peak_price * (peak - new_peak)
            if ok and extra_cost < gain - 1e-9:
                disp.charge[:] = trial.charge
                break
        else:
            return



def _move_out_of_peak(lay: Layout, disp: Dispatch, g: np.ndarray, ph: np.ndarray, cap: float,
                      mono: np.ndarray) -> tuple[bool, float]:
    hours = lay.ptu_h
    # charging moves between whole PTUs only: W in a partial PTU 0 carry less energy
    whole = lay.part >= 1.0
    extra = 0.0
    lim = np.minimum(lay.import_lim, cap)
    for t in np.flatnonzero(g > cap + 0.5):
        if not whole[t]:
            return False, extra
        excess = g[t] - cap
        users = mono[disp.charge[mono, t] > 0]
        users = users[np.argsort(-disp.charge[users, t], kind="stable")]
        for i in users:
            if excess <= 0.5:
                break
            a, b = int(lay.first[i]), int(lay.last[i])
            st = float(lay.step[i])
            c_t = disp.charge[i, t]
            share = lay.share[i]
            # how much t gives: down to the minimum, or all of it
            give = min(np.ceil(excess / st - EPS) * st, c_t - lay.cmin[i]) if c_t - lay.cmin[i] >= excess else c_t
            if give <= 0:
                give = c_t
            ss = np.arange(a, b)
            ss = ss[(ss != t) & whole[ss]]
            ss = ss[np.argsort(lay.p_imp[ss], kind="stable")]
            placed: list[tuple[int, float]] = []
            left = give
            for s in ss:
                head = lim[s] - g[s]
                for p in range(3):
                    if share[p] > 0:
                        head = min(head, (lay.fuse_up[p, s] - ph[p, s]) / share[p])
                c_s = disp.charge[i, s]
                room = min(head, lay.cmax[i] - c_s)
                room = np.floor(room / st + EPS) * st
                if room <= 0:
                    continue
                put = min(room, left)
                if c_s == 0 and put < lay.cmin[i]:
                    if room >= lay.cmin[i] and left >= lay.cmin[i]:
                        put = lay.cmin[i]
                    else:
                        continue
                placed.append((int(s), put))
                left -= put
                if left <= EPS:
                    break
            if left > EPS:
                continue  # this asset cannot move it; try the next one
            disp.charge[i, t] -= give
            g[t] -= give
            ph[:, t] -= share * give
            extra -= lay.p_imp[t] * give * hours[t] / 1000
            for s, put in placed:
                disp.charge[i, s] += put
                g[s] += put
                ph[:, s] += share * put
                extra += lay.p_imp[s] * put * hours[s] / 1000
            excess = g[t] - cap
        if excess > 0.5:
            return False, extra
    return True, extra


def round_and_repair(lay: Layout, frac: Dispatch, *, earlier: bool = False) -> Dispatch:
    """A feasible plan near the fractional one (see module docstring).

    What `frac` itself leaves unmet (an LP's shortfalls, optimal there) stays accepted. With
    `earlier`, `frac` is a plan made for an earlier moment (the last replan's, laid onto this
    layout): its shortfalls are not a measure (a minute less of PTU 0 leaves every EV it
    charged then short), so every target and milestone is refilled as far as the limits allow.
    """
    g_frac, _ = grid_and_phases(lay, frac)
    lp_peak = max(lay.peak_so_far, float(g_frac.max()) if lay.n else 0.0) + 0.5
    cap = np.full(lay.n, lp_peak) if lay.peak_price > 0 else None
    disp = snap(lay, frac)
    fix_levels(lay, disp)
    repair_limits(lay, disp, cap)
    if earlier:
        refill(lay, disp, by_price=True, peak_cap=lp_peak, allowed_wh=lay.tol_wh)
    else:
        lv_frac = levels(lay, frac)
        lp_unmet = np.where(np.isnan(lay.target), 0.0,
                            np.nan_to_num(lay.target) - lv_frac[np.arange(lay.s), lay.last])
        refill(lay, disp, by_price=True, peak_cap=lp_peak, allowed_wh=lp_unmet + lay.tol_wh,
               milestone_goal=milestones_reached(lay, lv_frac))
    repair_limits(lay, disp)
    return disp


def polish_plan(lay: Layout, lp: LpResult, disp: Dispatch,
                time_limit_s: float | None = None) -> Dispatch | None:
    """`bound.polish` (powers re-optimised with the on/off pattern fixed, within
    `time_limit_s` when given), snapped and checked."""
    frac = polish(lay, lp, disp, time_limit_s)
    if frac is None:
        return None
    out = frac.copy()
    step = lay.step[:, None].astype(float)
    # assets without a minimum power (batteries) were left free: their pattern is the LP's
    net = frac.charge - frac.discharge
    free_c = (lay.cmin[:, None] <= 0) & lay.avail
    free_d = (lay.dmin[:, None] <= 0) & lay.avail
    frac.charge = np.where(free_c & free_d, np.maximum(net, 0), frac.charge)
    frac.discharge = np.where(free_c & free_d, np.maximum(-net, 0), frac.discharge)
    on_c = np.where(free_c, frac.charge > 0.5, disp.charge > 0)
    on_d = np.where(free_d, frac.discharge > 0.5, disp.discharge > 0)
    # round the running sums (each asset keeps its energy to within one step), then the domain
    cum = np.cumsum(frac.charge / step * on_c, axis=1)  # off PTUs add nothing to the sums
    # level assets round up (their level stays at or above the LP's, so above level_min)
    cum = np.where(lay.needs_levels[:, None], np.ceil(cum - 1e-6), np.floor(cum + 1e-6))
    c = np.diff(cum, axis=1, prepend=0.0) * step
    d = np.diff(np.floor(np.cumsum(frac.discharge / step * on_d, axis=1) + 1e-6), axis=1, prepend=0.0) * step
    out.charge = np.where(on_c, np.clip(c, lay.cmin[:, None], lay.cmax[:, None]), 0.0)
    out.discharge = np.where(on_d & ~on_c, np.clip(d, lay.dmin[:, None], lay.dmax[:, None]), 0.0)
    out.curtail = np.clip(np.ceil(frac.curtail), 0, lay.pv) * lay.pv_curtailable[:, None]
    out.mode_index = [m.copy() for m in disp.mode_index]
    out.profile_start = list(disp.profile_start)
    out.profile_choice = list(disp.profile_choice)
    if out.mode_power is not None and disp.mode_power is not None:
        for j, m in enumerate(lay.problem.modes):
            mi = out.mode_index[j]
            lo = np.array([pm.min_w for pm in m.modes], dtype=float)[mi]
            hi = np.array([pm.max_w for pm in m.modes], dtype=float)[mi]
            out.mode_power[j] = np.clip(np.floor(out.mode_power[j]), lo, hi)
    fix_levels(lay, out)
    repair_limits(lay, out)
    # rounding can leave a level asset a few Wh under its minimum: top it up (EVs as they are)
    end = levels(lay, out)[np.arange(lay.s), lay.last]
    allowed = np.where(lay.needs_levels, 0.0, np.nan_to_num(lay.target) - end + lay.tol_wh)
    refill(lay, out, by_price=True, allowed_wh=allowed,
           milestone_goal=milestones_reached(lay, levels(lay, frac)))
    repair_limits(lay, out)
    return out


def milestones_reached(lay: Layout, lv: np.ndarray) -> np.ndarray:
    """The level each milestone asks for, but no more than the given levels (a fractional
    plan's) reach there, less a rounding step: what a repair should keep of it."""
    at = lv[lay.ms_asset, lay.ms_ptu] - lay.tol_wh[lay.ms_asset]
    return np.minimum(lay.ms_lo, at)
