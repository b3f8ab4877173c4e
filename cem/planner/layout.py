"""The Problem as arrays, a dispatch (powers per asset per PTU) and its evaluation.

Every stage of the planner (LP bound, rounding and repair, CP-SAT, fallback, the plan checker)
works on the same arrays and scores a dispatch with the same objective, so the LP bound and a
plan's objective are comparable:

    objective = energy cost (import at the import price, export at the export price, the
    export price clamped to the import price where it is higher, which keeps the cost convex)
    + peak cost (peak_price x max(peak_so_far, max import), the 15-minute kW-max)
    + unmet-target penalties (EUR per Wh, x3 per priority step, in four rising segments of a
    quarter of the need each, so equal-priority EVs share a shortfall)
    + level_min deficits (per Wh per PTU) + a tiny tie-break that prefers earlier charging.

The penalties (>= 200 EUR/kWh) are far above any price and peak cost a kWh can carry, so the
weighted sum is lexicographic: targets first, money second, tie-breaks last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cem.planner.assets import MIN_FIRST_PTU_SHARE, Problem, ShiftableProfile, StorageAsset

UNMET_EUR_PER_WH = 0.2  # 200 EUR/kWh for priority 1
PRIORITY_FACTOR = 3.0
SEGMENT_FACTORS = (1.0, 1.15, 1.3, 1.5)  # rising cost per quarter of the need missed
TOL_EUR_PER_WH = 0.002  # 2 EUR/kWh: above any price, so met when the limits allow it
TIE_EUR_PER_KWH = 1e-4  # at the horizon end; 0 at its start
# a replan's reward for charging where the last plan charged (the same at any power there):
# among equally good plans the LP and the EVs' price steps keep the last one
KEEP_EUR_PER_KWH = 1e-4
STEP_FLOOR_W = 10  # power resolution used when an asset allows finer steps
# a target missed by less than this is rounding, not a shortfall worth a log line: about a
# second of an EV charger, and the room CP-SAT's gap-based early stop leaves when the
# objective carries large unmet penalties of other assets
NOISE_WH = 10.0


def per_ptu(values: object, n: int) -> np.ndarray:
    """A float array of exactly n PTUs: longer input is cut, shorter input is padded with its
    last value (0 when empty), so a wrong-length forecast never stops the planner."""
    v = np.asarray(values if values is not None else [], dtype=float).reshape(-1)[:n]
    if len(v) < n:
        v = np.concatenate([v, np.full(n - len(v), v[-1] if len(v) else 0.0)])
    return v


def first_ptu_share(problem: Problem) -> float:
    """The share of PTU 0 the plan still has (`Problem.first_ptu_share`, kept in
    [MIN_FIRST_PTU_SHARE, 1])."""
    return min(max(float(problem.first_ptu_share), MIN_FIRST_PTU_SHARE), 1.0)


def ptu_hours(problem: Problem) -> np.ndarray:
    """Hours each PTU lasts from the plan's start (n,): PTU 0 only the share still ahead.

    Every power-to-energy step (levels, energy cost) uses these; power limits do not.
    """
    hours = np.full(problem.n_ptus, problem.ptu_minutes / 60)
    if len(hours):
        hours[0] *= first_ptu_share(problem)
    return hours


def ptu_epoch(problem: Problem) -> int:
    """The number of the problem's PTU 0 counted from the Unix epoch (the same PTU has the
    same number in every replan)."""
    return int(problem.start.timestamp() // (problem.ptu_minutes * 60))


def priority_weight(priority: np.ndarray) -> np.ndarray:
    """EUR per Wh of unmet energy for assets of these priorities (1-4)."""
    return UNMET_EUR_PER_WH * PRIORITY_FACTOR ** (np.clip(priority, 1, 4) - 1)


@dataclass
class Layout:
    """The planning problem as numpy arrays (W, Wh, per PTU)."""

    problem: Problem
    n: int
    dt_h: float  # the nominal PTU length (h)
    ptu_h: np.ndarray  # (n,) hours each PTU lasts from the plan's start: PTU 0 only its share
    ids: list[str]
    kind: list[str]
    avail: np.ndarray  # (S, n) bool
    first: np.ndarray  # (S,) int, available_from clipped
    last: np.ndarray  # (S,) int, available_until clipped (exclusive)
    cmax: np.ndarray  # (S,) W, on the step grid
    cmin: np.ndarray
    dmax: np.ndarray
    dmin: np.ndarray
    step: np.ndarray  # (S,) int W
    eta_c: np.ndarray
    eta_d: np.ndarray
    level0: np.ndarray  # (S,) Wh
    lmin: np.ndarray
    lmax: np.ndarray
    usage: np.ndarray  # (S, n) Wh, zero outside the window; PTU 0's scaled by its share
    target: np.ndarray  # (S,) Wh, nan where none
    needs_levels: np.ndarray  # (S,) bool: level variables per PTU (else one energy sum)
    weight: np.ndarray  # (S,) EUR per Wh unmet
    tol_wh: np.ndarray  # (S,) the last Wh of a target (one power step for one PTU) is cheap to miss
    blocked: np.ndarray  # (S,) bool: cannot charge (minimum power overfills level_max)
    share: np.ndarray  # (S, 3)
    fixed_w: np.ndarray  # (n,)
    fixed_phase: np.ndarray  # (3, n)
    pv_ids: list[str]
    pv: np.ndarray  # (K, n) production W
    pv_curtailable: np.ndarray  # (K,) bool
    pv_share: np.ndarray  # (K, 3)
    p_imp: np.ndarray  # EUR/kWh
    p_exp: np.ndarray  # EUR/kWh, true
    p_exp_eff: np.ndarray  # min(p_exp, p_imp)
    tie: np.ndarray  # EUR/kWh per PTU on charging
    import_lim: np.ndarray  # (n,) W, effective (raised where nothing can meet it)
    export_lim: np.ndarray
    fuse_up: np.ndarray  # (3, n) W
    fuse_dn: np.ndarray  # (3, n) W (as a positive bound on -phase load)
    peak_price: float  # EUR per W
    peak_so_far: float
    notes: list[str] = field(default_factory=list)
    # every milestone (target_profile entry) inside its asset's window, as arrays: its
    # asset, its PTU (the level at the end of PTU ptu - 1) and its bounds (Wh)
    ms_asset: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ms_ptu: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ms_lo: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ms_hi: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ms_w_lo: np.ndarray = field(default_factory=lambda: np.zeros(0))  # EUR per Wh below lo
    # (S, n) EUR/kWh taken off charging where the last plan charged (`keep_last`), or None:
    # in the LP's and the price steps' costs only, never in `evaluate` (what a plan costs)
    keep: np.ndarray | None = None

    @property
    def s(self) -> int:
        return len(self.ids)

    @property
    def part(self) -> np.ndarray:
        """(n,) share of each PTU the plan has (ptu_h / dt_h): 1 but for a partial PTU 0."""
        return self.ptu_h / self.dt_h

    @property
    def k(self) -> int:
        return len(self.pv_ids)


def keep_last(lay: Layout, last_charge: np.ndarray) -> None:
    """Reward charging where the last plan charged (`last_charge`, (S, n) W laid onto this
    layout) by `KEEP_EUR_PER_KWH`, the same at any power there (a reward in proportion to
    the last power moved energy to an EV's fuller PTUs: more churn, not less). An LP or
    price-step bound with it is a bound still (no cost rises), at most `KEEP_EUR_PER_KWH` x
    the energy charged in those cells below the one without it."""
    lay.keep = KEEP_EUR_PER_KWH * ((last_charge > 0) & lay.avail)


def charge_price(lay: Layout) -> np.ndarray:
    """(S, n) EUR/kWh the LP and the EVs' price steps put on charging beside the grid's:
    the tie-break towards earlier PTUs, less the reward for keeping the last plan."""
    tie = np.broadcast_to(lay.tie, (lay.s, lay.n))
    return tie - lay.keep if lay.keep is not None else tie


def share_vector(phase_share: tuple[float, float, float]) -> np.ndarray:
    v = np.asarray(phase_share, dtype=float)
    total = v.sum()
    return v / total if total > 0 else np.full(3, 1 / 3)


def fixed_draw_w(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """What the problem's fixed loads draw per PTU, W: in all (n,) and per phase (3, n)."""
    n = problem.n_ptus
    total = np.zeros(n)
    phase = np.zeros((3, n))
    for load in problem.fixed:
        p = per_ptu(load.power_w, n)
        total += p
        phase += np.outer(share_vector(load.phase_share), p)
    return total, phase


def build_layout(problem: Problem) -> Layout:
    """Turn a Problem into arrays; note where the inputs alone break a hard limit."""
    n = problem.n_ptus
    dt = problem.ptu_minutes / 60
    ptu_h = ptu_hours(problem)
    st = problem.storage
    S = len(st)
    notes: list[str] = []
    # one pass over the assets into columns, the rest in numpy (5000 EVs: ~10 us an asset
    # as per-asset numpy writes, ~2 us so)
    cols = _columns(st)
    first = np.clip(cols["available_from"], 0, n).astype(np.int64)
    until = cols["available_until"]
    last = np.where(np.isnan(until), n, np.clip(np.nan_to_num(until), first, n)).astype(np.int64)
    ptus = np.arange(n)
    avail = (ptus >= first[:, None]) & (ptus < last[:, None])
    biggest = np.maximum(cols["charge_max_w"], cols["discharge_max_w"])
    step = np.maximum(cols["step_w"], 1).astype(np.int64)
    step = np.where((step < STEP_FLOOR_W) & (biggest >= 100 * STEP_FLOOR_W), STEP_FLOOR_W, step)
    cmax = (np.maximum(cols["charge_max_w"], 0) // step * step).astype(float)
    cmin = np.minimum(-(-np.maximum(cols["charge_min_w"], 0) // step) * step, cmax).astype(float)
    cmin = np.where((cmin > cmax) | (cmax <= 0), 0.0, cmin)
    dmax = (np.maximum(cols["discharge_max_w"], 0) // step * step).astype(float)
    dmin = np.minimum(-(-np.maximum(cols["discharge_min_w"], 0) // step) * step, dmax).astype(float)
    usage = np.zeros((S, n))
    for i, a in enumerate(st):
        if a.usage_wh is not None:
            f, e = int(first[i]), int(last[i])
            u = per_ptu(a.usage_wh, n)
            usage[i, f:e] = u[f:e]
    target = cols["target_wh"]
    eta_c = np.maximum(cols["charge_efficiency"], 1e-6)
    eta_d = np.maximum(cols["discharge_efficiency"], 1e-6)
    level0 = cols["level_wh"]
    lmin = cols["level_min_wh"]
    lmax = np.maximum(cols["level_max_wh"], level0)
    needs = ((dmax > 0) | np.any(usage != 0, axis=1) | cols["has_profile"].astype(bool)
             | (level0 < lmin))
    if n:
        usage[:, 0] *= first_ptu_share(problem)  # given per whole PTU
    for a in st:
        if a.level_wh > a.level_max_wh:
            notes.append(f"{a.id}: level {a.level_wh} Wh starts above its maximum {a.level_max_wh} Wh")
    weight = priority_weight(cols["priority"])
    tol_wh = np.ceil(dt * eta_c * step) if S else np.zeros(0)
    # a charge-only asset whose room to level_max is less than one PTU at its minimum power
    # cannot charge at all without overfilling; nor can one that only fills up (no discharge,
    # no usage) whatever its milestones: its room never grows (left chargeable, the LP gave
    # such EVs energy no plan can, 24 % of the bench's gap at 1000 EVs with live milestones)
    only_fills = (dmax <= 0) & ~np.any(usage != 0, axis=1)
    blocked = (~needs | only_fills) & (cmin > 0) & (cmin * dt * eta_c > (lmax - level0) + 1e-9)
    for i in np.flatnonzero(blocked & (cmax > 0)).tolist():
        notes.append(f"{st[i].id}: needs less than one PTU at its minimum power "
                     f"({cmin[i]:.0f} W): it cannot charge without passing its maximum level")
    cmax = np.where(blocked, 0.0, cmax)
    cmin = np.where(blocked, 0.0, cmin)
    share = _shares([a.phase_share for a in st])

    fixed_w, fixed_phase = fixed_draw_w(problem)
    pv_ids = [c.id for c in problem.curtailable]
    K = len(pv_ids)
    pv = np.zeros((K, n))
    for j, c in enumerate(problem.curtailable):
        pv[j] = np.maximum(per_ptu(c.production_w, n), 0)
    pv_curt = np.array([c.curtailable for c in problem.curtailable], dtype=bool)
    pv_share = np.array([share_vector(c.phase_share) for c in problem.curtailable]).reshape(K, 3)
    # modes and shiftable profiles contribute their minimum as fixed in the limit check below
    p_imp = per_ptu(problem.prices.import_eur_per_kwh, n)
    p_exp = per_ptu(problem.prices.export_eur_per_kwh, n)
    if np.any(p_exp > p_imp + 1e-12):
        notes.append("export price above import price in some PTUs: planned at the import price "
                     "there (no simultaneous import and export)")
    p_exp_eff = np.minimum(p_exp, p_imp)
    tie = TIE_EUR_PER_KWH * np.arange(n) / max(n, 1)

    lim = problem.limits
    fuse = float(lim.planned_fuse_w_per_phase)
    import_lim = per_ptu(lim.planned_import_limit_w, n).copy()
    export_lim = np.maximum(per_ptu(lim.export_limit_w, n), 0).copy()
    # the least load the site can have in each PTU: flexible loads off, batteries idle, PV
    # fully on; the most: storage idle (or discharging when it must), PV curtailed where allowed
    min_ch = np.where(avail, 0.0, 0.0)
    mode_min = np.zeros((3, n))
    mode_max = np.zeros((3, n))
    mode_min_total = np.zeros(n)
    mode_max_total = np.zeros(n)
    for m in problem.modes:
        lo = min(pm.min_w for pm in m.modes) if m.modes else 0
        hi = max(pm.max_w for pm in m.modes) if m.modes else 0
        mode_min += np.outer(share_vector(m.phase_share), np.full(n, float(lo)))
        mode_max += np.outer(share_vector(m.phase_share), np.full(n, float(hi)))
        mode_min_total += lo
        mode_max_total += hi
    del min_ch
    pv_phase = pv_share.T @ pv if K else np.zeros((3, n))
    pv_fixed_phase = (pv_share.T @ (pv * ~pv_curt[:, None])) if K else np.zeros((3, n))
    g_min = fixed_w + mode_min_total - pv.sum(axis=0)
    g_max_forced = fixed_w + mode_max_total - ((pv * ~pv_curt[:, None]).sum(axis=0) if K else 0.0)
    raised = g_min > import_lim
    if np.any(raised):
        notes.append(f"base and fixed loads alone exceed the import limit in {int(raised.sum())} PTUs "
                     "(first PTU " + str(int(np.argmax(raised))) + "): planned with every flexible load "
                     "off there; the limit is broken by the inputs, not the plan")
        import_lim = np.maximum(import_lim, g_min)
    raised = -g_max_forced > export_lim
    if np.any(raised):
        notes.append(f"uncurtailable production exceeds the export limit in {int(raised.sum())} PTUs: "
                     "planned with every flexible load on there; the limit may still be broken")
        export_lim = np.maximum(export_lim, -g_max_forced)
    phase_min = fixed_phase + mode_min - pv_phase
    credit = min(1.0, max(0.0, float(lim.fuse_production_credit)))
    fuse_up = np.full((3, n), fuse) - (1.0 - credit) * pv_phase
    fuse_dn = np.full((3, n), fuse)
    if np.any(phase_min > fuse_up):
        notes.append("base and fixed loads alone exceed the fuse on a phase: planned with every "
                     "flexible load off there")
        fuse_up = np.maximum(fuse_up, phase_min)
    phase_low = fixed_phase + mode_max - pv_fixed_phase
    if np.any(-phase_low > fuse):
        notes.append("uncurtailable production alone exceeds the fuse on a phase")
        fuse_dn = np.maximum(fuse_dn, -phase_low)
    return Layout(
        problem=problem, n=n, dt_h=dt, ptu_h=ptu_h, ids=[a.id for a in st], kind=[a.kind for a in st],
        avail=avail, first=first, last=last, cmax=cmax, cmin=cmin, dmax=dmax, dmin=dmin,
        step=step, eta_c=eta_c, eta_d=eta_d, level0=level0, lmin=lmin, lmax=lmax, usage=usage,
        target=target, needs_levels=needs, weight=weight, tol_wh=tol_wh, blocked=blocked, share=share, fixed_w=fixed_w,
        fixed_phase=fixed_phase, pv_ids=pv_ids, pv=pv, pv_curtailable=pv_curt, pv_share=pv_share,
        p_imp=p_imp, p_exp=p_exp, p_exp_eff=p_exp_eff, tie=tie, import_lim=import_lim,
        export_lim=export_lim, fuse_up=fuse_up, fuse_dn=fuse_dn,
        peak_price=float(lim.peak_price_eur_per_kw) / 1000, peak_so_far=float(lim.peak_so_far_w),
        notes=notes, **_milestones(st, first, last, weight),
    )


_COLUMNS = ("available_from", "available_until", "charge_max_w", "charge_min_w",
            "discharge_max_w", "discharge_min_w", "step_w", "charge_efficiency",
            "discharge_efficiency", "level_wh", "level_min_wh", "level_max_wh", "target_wh",
            "priority", "has_profile")


def _columns(storage: list[StorageAsset]) -> dict[str, np.ndarray]:
    """The assets' scalars as float columns (S,); None (no departure, no target) is nan."""
    rows = [(a.available_from, a.available_until, a.charge_max_w, a.charge_min_w,
             a.discharge_max_w, a.discharge_min_w, a.step_w, a.charge_efficiency,
             a.discharge_efficiency, a.level_wh, a.level_min_wh, a.level_max_wh, a.target_wh,
             a.priority, bool(a.target_profile)) for a in storage]
    data = np.array(rows, dtype=float).reshape(len(rows), len(_COLUMNS))
    return {name: data[:, j] for j, name in enumerate(_COLUMNS)}


def _shares(phase_shares: list[tuple[float, float, float]]) -> np.ndarray:
    """(S, 3) of `share_vector` per asset, each distinct share made once."""
    made: dict[tuple[float, ...], np.ndarray] = {}
    rows = []
    for share in phase_shares:
        key = tuple(share)
        row = made.get(key)
        if row is None:
            row = made[key] = share_vector(share)
        rows.append(row)
    return np.array(rows).reshape(len(rows), 3)


def _milestones(storage: list[StorageAsset], first: np.ndarray, last: np.ndarray,
                weight: np.ndarray) -> dict[str, np.ndarray]:
    """The milestones inside their asset's window (first < ptu <= last) as Layout arrays."""
    rows = [(i, int(ptu), float(lo), float(hi),
             float(a.milestone_eur_per_wh.get(int(ptu), weight[i])))
            for i, a in enumerate(storage)
            for ptu, lo, hi in a.target_profile if first[i] < ptu <= last[i]]
    data = np.array(rows, dtype=float).reshape(len(rows), 5)
    return {"ms_asset": data[:, 0].astype(np.int64), "ms_ptu": data[:, 1].astype(np.int64),
            "ms_lo": data[:, 2], "ms_hi": data[:, 3], "ms_w_lo": data[:, 4]}


@dataclass
class Dispatch:
    """Powers of every controllable asset per PTU (W); a candidate plan."""

    charge: np.ndarray  # (S, n) >= 0
    discharge: np.ndarray  # (S, n) >= 0
    curtail: np.ndarray  # (K, n) >= 0
    mode_index: list[np.ndarray] = field(default_factory=list)  # per ModeAsset: mode per PTU
    mode_power: np.ndarray | None = None  # (M, n)
    profile_start: list[int] = field(default_factory=list)
    profile_choice: list[int] = field(default_factory=list)  # per profile: option index

    def copy(self) -> Dispatch:
        return Dispatch(self.charge.copy(), self.discharge.copy(), self.curtail.copy(),
                        [m.copy() for m in self.mode_index],
                        None if self.mode_power is None else self.mode_power.copy(),
                        list(self.profile_start), list(self.profile_choice))


def empty_dispatch(lay: Layout) -> Dispatch:
    M = len(lay.problem.modes)
    return Dispatch(np.zeros((lay.s, lay.n)), np.zeros((lay.s, lay.n)), np.zeros((lay.k, lay.n)),
                    [np.zeros(lay.n, dtype=np.int64) for _ in range(M)], np.zeros((M, lay.n)),
                    [int(p.earliest_start) for p in lay.problem.profiles],
                    [0 for _ in lay.problem.profiles])


def start_options(profile: ShiftableProfile, n: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(option index, shape W, allowed starts) of each shape a profile may run.

    An alternative whose window is empty is left out (it can never run in time); option 0
    keeps its earliest start even then, so every profile has at least one way to run.
    """
    out = []
    for k, opt in enumerate(profile.options()):
        starts = np.arange(max(0, int(opt.earliest_start)), min(n - 1, int(opt.latest_start)) + 1)
        if len(starts) == 0:
            if k > 0:
                continue
            starts = np.array([min(max(0, int(opt.earliest_start)), n - 1)])
        out.append((k, np.asarray(opt.profile_w, dtype=float), starts))
    return out


def chosen_shape(profile: ShiftableProfile, choice: int) -> np.ndarray:
    """The shape (W per PTU) of option `choice` of a profile (0: its own profile_w)."""
    if choice <= 0 or choice > len(profile.alternatives):
        return np.asarray(profile.profile_w, dtype=float)
    return np.asarray(profile.alternatives[choice - 1].profile_w, dtype=float)


def profile_row(lay: Layout, disp: Dispatch, j: int) -> np.ndarray:
    """Power per PTU (W) of profile j as the dispatch runs it (its chosen shape and start)."""
    p = lay.problem.profiles[j]
    choice = disp.profile_choice[j] if j < len(disp.profile_choice) else 0
    return profile_power(chosen_shape(p, choice), disp.profile_start[j], lay.n)


def other_power(lay: Layout, disp: Dispatch) -> tuple[np.ndarray, np.ndarray]:
    """Total and per-phase power of modes and shiftable profiles (W)."""
    n = lay.n
    total = np.zeros(n)
    phase = np.zeros((3, n))
    pr = lay.problem
    if disp.mode_power is not None:
        for j, m in enumerate(pr.modes):
            total += disp.mode_power[j]
            phase += np.outer(share_vector(m.phase_share), disp.mode_power[j])
    for j, p in enumerate(pr.profiles):
        prof = profile_row(lay, disp, j)
        total += prof
        phase += np.outer(share_vector(p.phase_share), prof)
    return total, phase


def profile_power(profile_w: np.ndarray, start: int, n: int) -> np.ndarray:
    out = np.zeros(n)
    prof = np.asarray(profile_w, dtype=float)
    if 0 <= start < n:
        k = min(len(prof), n - start)
        out[start:start + k] = prof[:k]
    return out


def phase_sum(share: np.ndarray, power: np.ndarray) -> np.ndarray:
    """Per phase, the powers (S, ...) weighed by their phase shares (S, 3): (3, ...).

    `np.einsum`, not `share.T @ power`: OpenBLAS's threaded matrix product took 0.01-0.1 s
    a call for (3, 2000) x (2000, 96) on the shared 2-core machine, einsum 0.2 ms."""
    return np.einsum("sp,s...->p...", share, power)


def grid_and_phases(lay: Layout, disp: Dispatch) -> tuple[np.ndarray, np.ndarray]:
    """Grid import per PTU and load per phase (3, n), W."""
    net = disp.charge - disp.discharge
    pv_out = lay.pv - disp.curtail
    o_total, o_phase = other_power(lay, disp)
    g = lay.fixed_w + net.sum(axis=0) - pv_out.sum(axis=0) + o_total
    ph = lay.fixed_phase + phase_sum(lay.share, net) - phase_sum(lay.pv_share, pv_out) + o_phase
    return g, ph


def levels(lay: Layout, disp: Dispatch) -> np.ndarray:
    """Level per storage asset at the start of each PTU and at the end: (S, n+1), Wh."""
    delta = lay.ptu_h * (lay.eta_c[:, None] * disp.charge - disp.discharge / lay.eta_d[:, None]) - lay.usage
    out = np.empty((lay.s, lay.n + 1))
    out[:, 0] = lay.level0
    out[:, 1:] = lay.level0[:, None] + np.cumsum(delta, axis=1)
    return out


def unmet_penalty(unmet: np.ndarray, need: np.ndarray, weight: np.ndarray,
                  tol: np.ndarray) -> np.ndarray:
    """Penalty (EUR) of unmet Wh per asset: the last `tol` Wh (a rounding step) at
    TOL_EUR_PER_WH, the rest in rising segments (SEGMENT_FACTORS, one per share of the need)."""
    k = len(SEGMENT_FACTORS)
    seg = np.maximum(need, 0) / k
    u0 = np.minimum(np.maximum(unmet, 0), tol)
    u = np.maximum(unmet - tol, 0)
    total = TOL_EUR_PER_WH * u0
    for j, f in enumerate(SEGMENT_FACTORS):
        part = np.maximum(u - j * seg, 0)
        total = total + weight * f * (part if j == k - 1 else np.minimum(part, seg))
    return total


@dataclass
class Evaluation:
    g: np.ndarray
    phase: np.ndarray
    level: np.ndarray  # (S, n+1)
    unmet_wh: np.ndarray  # (S,) at the target
    deficit_wh: np.ndarray  # (S,) max below level_min
    profile_miss_wh: np.ndarray  # (S,) sum over target_profile entries
    energy_cost: float  # true prices
    peak_w: float
    peak_cost: float
    objective: float  # the comparable objective (see module docstring)
    penalty: float = 0.0  # the part of the objective that is unmet targets and levels

    @property
    def cost_part(self) -> float:
        """The objective without its penalties: what the plan costs (EUR, with tie-breaks)."""
        return self.objective - self.penalty


def evaluate(lay: Layout, disp: Dispatch) -> Evaluation:
    """Costs and the comparable objective of a dispatch."""
    g, ph = grid_and_phases(lay, disp)
    lv = levels(lay, disp)
    hours = lay.ptu_h
    imp = np.maximum(g, 0)
    exp = np.maximum(-g, 0)
    energy_true = float(np.sum((lay.p_imp * imp - lay.p_exp * exp) * hours) / 1000)
    energy_eff = float(np.sum((lay.p_imp * imp - lay.p_exp_eff * exp) * hours) / 1000)
    peak_w = float(max(lay.peak_so_far, g.max() if lay.n else 0.0))
    peak_cost = lay.peak_price * peak_w
    S = lay.s
    idx = np.arange(S)
    end_level = lv[idx, lay.last] if S else np.zeros(0)
    has_t = ~np.isnan(lay.target)
    unmet = np.where(has_t, np.maximum(np.nan_to_num(lay.target) - end_level, 0), 0.0)
    need = np.where(has_t, np.nan_to_num(lay.target) - lay.level0, 0.0)
    pen = float(unmet_penalty(unmet, need, lay.weight, lay.tol_wh).sum()) if S else 0.0
    # below level_min after any PTU of the window (assets with levels)
    low = np.where(lay.avail & lay.needs_levels[:, None],
                   np.maximum(lay.lmin[:, None] - lv[:, 1:], 0), 0.0)
    deficit = low.max(axis=1) if lay.n else np.zeros(S)
    pen += float((lay.weight * low.sum(axis=1)).sum()) if S else 0.0
    # milestones missed (below lo or above hi at their PTU)
    at = lv[lay.ms_asset, lay.ms_ptu]
    below = np.maximum(lay.ms_lo - at, 0)
    above = np.maximum(at - lay.ms_hi, 0)
    miss = np.bincount(lay.ms_asset, weights=below + above, minlength=S).astype(float)
    pen += float((lay.ms_w_lo * below).sum() + (lay.weight[lay.ms_asset] * above).sum()) \
        if S else 0.0
    tie = float(np.sum(disp.charge * lay.tie * lay.part) * lay.dt_h / 1000)
    objective = energy_eff + peak_cost + pen + tie
    return Evaluation(g, ph, lv, unmet, deficit, miss, energy_true, peak_w, peak_cost, objective,
                      pen)
