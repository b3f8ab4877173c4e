"""The rule-based safe plan: used when the solvers return nothing usable.

Deadline first within the limits: every asset starts idle (batteries stay idle, PV is not
curtailed), then EVs and other storage are filled in order of priority and earliest departure,
each into the earliest PTUs with spare capacity under the import limit, congestion and the fuse
on every phase; PV is curtailed only where the export limit (or the fuse on export) needs it.
It uses no solver, so it is always available and always keeps the hard limits.
"""

from __future__ import annotations

import numpy as np

from cem.planner.hint import refill, repair_limits
from cem.planner.layout import Dispatch, Layout, empty_dispatch


def fallback_dispatch(lay: Layout) -> Dispatch:
    """Deadline-first dispatch within the hard limits."""
    return fallback_until(lay, None)[0]


def fallback_until(lay: Layout, stop_at: float | None) -> tuple[Dispatch, bool]:
    """`fallback_dispatch`, no asset filled after `stop_at` (a `time.perf_counter` moment):
    the rest stay idle, the limits are kept. True when every asset had its turn."""
    disp = empty_dispatch(lay)
    idle_modes(lay, disp)
    repair_limits(lay, disp)
    whole = refill(lay, disp, by_price=False, deadline_first=True, stop_at=stop_at)
    repair_limits(lay, disp)
    return disp, whole


def idle_modes(lay: Layout, disp: Dispatch) -> None:
    """Mode devices held in the mode nearest to idle (0 W) all horizon; profiles at their
    earliest start (as `empty_dispatch` sets them)."""
    for j, m in enumerate(lay.problem.modes):
        if not m.modes:
            continue
        k = min(range(len(m.modes)), key=lambda x: max(m.modes[x].min_w, 0, -m.modes[x].max_w))
        disp.mode_index[j][:] = k
        if disp.mode_power is not None:
            disp.mode_power[j, :] = min(max(0, m.modes[k].min_w), m.modes[k].max_w)


def ev_only(lay: Layout) -> bool:
    """Whether the site's only flexible assets are charge-only ones that only fill up (no
    batteries, levels, modes, profiles) and its PV never has to be curtailed."""
    from cem.planner.bound import lp_level_assets

    pr = lay.problem
    if pr.modes or pr.profiles or np.any(lp_level_assets(lay) & (lay.cmax > 0)) \
            or np.any(lay.dmax > 0):
        return False
    return not np.any(lay.pv.sum(axis=0) - lay.fixed_w > lay.export_lim + 1e-6)


def deadline_first(lay: Layout) -> Dispatch | None:
    """The fallback's rule (deadline first, earliest PTUs, within the import limit and the
    fuse on every phase) for a site whose only flexible assets are charge-only ones that only
    fill up (EV chargers, `bound.lp_level_assets` false), PTU by PTU for all of them at once
    in numpy: at 2000 EVs ~20 ms where `fallback_dispatch` (an asset at a time) takes 1.5-2.3 s.

    In each PTU the EVs that still need energy for their target (or a milestone's level,
    whichever is higher) take it in order of departure, each at most its maximum power, at
    least its minimum (or nothing), on its step grid, within its level maximum, while the
    import limit and every phase's fuse have room. None for a site with other flexible
    assets (batteries, levels, modes, profiles, PV that must be curtailed): the fallback's
    own rule then.
    """
    if not ev_only(lay):
        return None
    n = lay.n
    flexible = lay.cmax > 0
    base_g = lay.fixed_w - lay.pv.sum(axis=0)
    base_ph = lay.fixed_phase - (np.einsum("kp,kn->pn", lay.pv_share, lay.pv) if lay.k else 0.0)
    head_imp = lay.import_lim - base_g
    head_ph = lay.fuse_up - base_ph
    disp = empty_dispatch(lay)
    ev = np.flatnonzero(flexible & np.isfinite(np.nan_to_num(lay.target, nan=np.inf)))
    if len(ev) == 0:
        return disp
    # energy wanted (Wh into the level) by the end of each PTU: the target, or the level of
    # a milestone still ahead if that is higher
    goal = np.broadcast_to((np.nan_to_num(lay.target[ev]) - lay.level0[ev])[:, None],
                           (len(ev), n)).copy()
    if len(lay.ms_asset):
        pos = np.full(lay.s, -1)
        pos[ev] = np.arange(len(ev))
        for k in np.flatnonzero(pos[lay.ms_asset] >= 0).tolist():
            e, ptu = pos[lay.ms_asset[k]], int(lay.ms_ptu[k])
            goal[e, :ptu] = np.maximum(goal[e, :ptu], lay.ms_lo[k] - lay.level0[lay.ms_asset[k]])
    room = lay.lmax[ev] - lay.level0[ev]
    goal = np.minimum(goal, room[:, None])
    order = np.argsort(lay.last[ev], kind="stable")  # ties as the fallback: by asset
    ev, goal, room = ev[order], goal[order], room[order]
    got_so_far = np.zeros(len(ev))
    stuck = np.zeros(len(ev), dtype=bool)  # left a rest below its minimum power somewhere
    cmin, cmax, step = lay.cmin[ev], lay.cmax[ev], lay.step[ev].astype(float)
    share = lay.share[ev]  # (E, 3)
    for t in range(n):
        want = goal[:, t] - got_so_far
        on = lay.avail[ev, t] & (want > 0.5)
        if not on.any():
            continue
        wh_per_w = lay.ptu_h[t] * lay.eta_c[ev]
        # what each EV would take: its need, at least its minimum, at most its maximum and
        # what fits under its level maximum, on its step grid
        p = np.ceil(want / wh_per_w / step - 1e-9) * step
        p = np.clip(np.maximum(p, cmin), 0.0, cmax)
        fits = np.floor(room / wh_per_w / step + 1e-9) * step
        small = on & (np.minimum(p, fits) < np.maximum(cmin, step))
        stuck |= small
        p = np.where(on & ~small, np.minimum(p, fits), 0.0)
        take = np.zeros(len(ev))
        imp, ph = float(head_imp[t]), head_ph[:, t].copy()
        while True:  # EVs cut short leave room that later, smaller ones may still take
            idx = np.flatnonzero((p > 0) & (take == 0) & (np.minimum(p, cmin) <= imp + 1e-6))
            if len(idx) == 0:
                break
            q = p[idx]
            cum = np.cumsum(q)
            cum_ph = np.cumsum(share[idx] * q[:, None], axis=0)
            ok = (cum <= imp + 1e-6) & np.all(cum_ph <= ph[None, :] + 1e-6, axis=1)
            first_bad = int(np.argmin(ok)) if not ok.all() else len(idx)
            got = idx[:first_bad]
            take[got] = q[:first_bad]
            imp -= float(q[:first_bad].sum())
            ph -= (share[got] * q[:first_bad, None]).sum(axis=0)
            if first_bad == len(idx):
                break
            # the first that does not fit takes what room is left, if that is its minimum
            k = idx[first_bad]
            lim = min([imp, *[ph[j] / share[k, j] for j in range(3) if share[k, j] > 0]])
            part = min(np.floor(max(lim, 0.0) / step[k] + 1e-9) * step[k], p[k])
            if part >= max(cmin[k], step[k]):
                take[k] = part
                imp -= part
                ph -= share[k] * part
            p[k] = 0.0  # no more room for it in this PTU
        disp.charge[ev, t] = take
        head_imp[t], head_ph[:, t] = imp, ph
        got_wh = take * wh_per_w
        got_so_far += got_wh
        room -= got_wh
    # what the minimum power left short (the last kWh below it, with no room for the minimum
    # in one PTU): the fallback's own refill, which spreads it, for those EVs only (0.3 s
    # for all of them at 5000 EVs, and nothing to add for the others)
    if stuck.any():
        mine = np.zeros(lay.s, dtype=bool)
        mine[ev[stuck]] = True
        refill(lay, disp, by_price=False, deadline_first=True,
               allowed_wh=np.where(mine, 0.0, np.inf),
               milestone_goal=np.where(mine[lay.ms_asset], lay.ms_lo, -np.inf))
    return disp
