"""`plan_site`: the planner's entry point (LP bound -> repaired LP plan -> CP-SAT -> fallback).

1. `build_layout` turns the Problem into arrays (limits that the inputs alone break are raised
   to what is achievable and noted).
2. HiGHS solves the LP relaxation (`bound.py`): the lower bound `lp_bound_eur` and a fractional
   plan.
3. `hint.py` rounds and repairs it into a feasible plan (the candidate), then `polish`
   re-solves the LP warm with the candidate's on/off pattern fixed (every EV power either 0 or
   within [min, max]) and snaps that: on the benchmark this closes the gap to < 0.1 % at
   100-1000 EVs, so CP-SAT is rarely needed.
4. If the candidate's gap to the bound is above `gap_tol` and time is left, CP-SAT
   (`model.py`) improves it, starting from the candidate as a full hint; its answer replaces
   the candidate only if it is better on the same objective.
5. Without an LP answer the bound comes from row prices (`dual_bound.py`: the unsolved LP's
   and the last replan's duals) or, on EV-only sites and on any large site, from the EVs'
   own problems at site-row prices (`decompose.py`, within 0.01 % of the LP optimum in
   0.1-0.5 s at 2000 EVs), and the plan is the best of the last plan repaired, the plan from
   the decomposition's point, the rule-based fallback (`fallback.py`, status FALLBACK unless
   CP-SAT improves it; in numpy on EV-only sites; an asset at a time elsewhere, made only
   when nothing else exists or there is time for it) and the fallback polished. On EV-only
   sites at scale, after a replan whose LP was not solved or when a new limit cuts the last
   plan, and on any site with EVs planned without memory whose cold LP does not fit its
   time three times over (`COLD_LP_S`, `COLD_LP_MARGIN`; an LP that does not finish there
   leaves this too), that bound and a plan from its master's point (`laxity.least_laxity_plan`,
   0.01-0.05 % above the bound on the bench's EV-only 1000-5000 EVs, 0.8-1.3 % on its mixed
   site at 5000) come first, and the LP runs only when that plan is not within the
   tolerance (and its plan is kept when it beats the LP's); on other sites the fallback is
   made beside the LP (`_lp_beside_fallback`).
A plan no replan follows (no `memory`: the bench's, `cem plan`) shares its time out by a
`budget.Budget`: each stage that does not stop by itself is started only when its estimate
(its cost per storage-PTU measured on the 2-core machine, times the pace of the stages timed
so far) and those of what must follow it fit, the price steps stop when the next step and
what follows no longer fit, and what was skipped or cut short for time is said
(`Plan.skipped`, `Plan.stage_s`; docs/adr/0007 round 9).
Every returned plan is scored by `layout.evaluate` (`objective_eur`, comparable with the bound;
`cost_eur` is the money: energy at the true prices + peak) and keeps the hard limits
(`check_plan`). `level_wh` holds each storage level at the end of every PTU.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time

import highspy
import numpy as np

from cem.planner.assets import ModeAsset, Plan, Problem, ShiftableProfile, Shortfall, StorageAsset
from cem.planner.bound import BuiltLp, LpIndex, LpMemory, LpResult, solve_lp
from cem.planner.budget import SAFETY, Budget
from cem.planner.check import check_plan
from cem.planner.decompose import DecomposedBound, lagrangian_bound
from cem.planner.fallback import (
    deadline_first,
    ev_only,
    fallback_dispatch,
    fallback_until,
    idle_modes,
)
from cem.planner.hint import polish_plan, refill, round_and_repair, shave_peak
from cem.planner.laxity import laxity_assets, least_laxity_plan
from cem.planner.layout import (
    NOISE_WH,
    Dispatch,
    Evaluation,
    Layout,
    build_layout,
    empty_dispatch,
    evaluate,
    grid_and_phases,
    keep_last,
    per_ptu,
    profile_row,
    ptu_epoch,
)

__all__ = ["PlanMemory", "SitePlanner", "check_plan", "plan_site"]

log = logging.getLogger(__name__)

SHAVE_BEFORE_POLISH_COLUMNS = 5_000  # below this many storage-PTUs the kW-max shaving runs first
GAP_TOL = 0.01  # within this share of its cost above the LP bound a plan is good enough
# what follows the LP (rounding, polish, scoring, the check) takes about this long per
# storage-PTU (measured at 1000-5000 live EVs on the 2-core machine, with room for a busy
# machine): the LP gets the deadline minus this, so the plan is ready by the deadline
AFTER_LP_S_PER_CELL = 1e-5
AFTER_LP_S = 0.05
# the polish of the fallback plan, when the last LP was not solved either: about this much
# per storage-PTU (0.2-0.27 s of CPU at 1000 live EVs, ~34k storage-PTUs), kept from the
# LP's time so the anytime plan is ready by the deadline (the fallback itself is made beside
# the LP, which runs in a thread meanwhile: HiGHS releases the GIL)
ANYTIME_S_PER_CELL = 8e-6
# from this many storage-PTUs on, the fallback on EV-only sites is made in numpy
# (`fallback.deadline_first`, PTU by PTU; 0.02-0.1 s at 2000 EVs where the fallback's asset
# at a time took 0.7-2.3 s). Below, the fallback's own: it spreads an EV's last kWh below its
# minimum power over its PTUs before the next EV takes them, which the numpy one cannot.
NUMPY_FALLBACK_CELLS = 5_000
# the fallback an asset at a time takes about this long per storage-PTU on the bench's
# mixed site (3 s at 2000 EVs, 52k storage-PTUs; 8 s at 5000, load 6-9)
FALLBACK_S_PER_CELL = 6e-5
# an LP given less than this (after the numpy fallback and the bound) is not run at all
MIN_LP_S = 0.05
# the plan from the decomposition's point (`laxity.least_laxity_plan`), its scoring and the
# plan's check take about this long per storage-PTU (0.1 s for the plan at 2000 EVs, ~57k
# storage-PTUs, the check 0.3 s at 5000 EVs): kept from the decomposition's time
GUIDED_S_PER_CELL = 4e-6
# making the plan sent from a dispatch and checking it: about this long per storage-PTU
# (0.07 s at 5000 EVs, load 10; twice that kept): a refill of the plan from the EVs'
# problems starts no asset later
CHECK_S_PER_CELL = 2e-6
# a live replan's price steps (from the last replan's prices) stop where what followed them
# last time is left (`_live_after_steps_s`), but get at least this share of the time limit,
# past the deadline if need be (round 4: with 0-0.25 s of a 1 s replan, one or two answers
# after a congestion window left the fallback, 43 % above the bound; three gave 0.16 %;
# until round 10 the share was 0.4, which at a 0.5 s limit at 5000 EVs overran it by 0.1 s)
DECOMPOSE_MIN_SHARE = 0.15
# what follows the price steps in a plan no replan follows (`Budget`'s stages)
AFTER_PRICE_STEPS = ("min power", "plan from the point", "plan and check")
# a plan no replan follows keeps this many price steps' time from its LP (`Budget`: 0.24 s at
# 1000 EVs, load ~2), for the plan from the EVs' problems should the LP not finish
RESCUE_STEPS = 5
# the last plan keeps a limit of the next problem within this (W): rounding, not a new limit
LIMIT_FIT_W = 1.0
# a cold LP (no basis to start from) takes about COLD_LP_S x cells ** COLD_LP_POWER seconds
# (dual simplex on the bench's car park with live milestones, 2-core machine at load 3-8:
# 0.9 s at 1000 EVs, 26k storage-PTUs; 3.6 s at 2000; 7-11 s at 5000, 129k): when that is
# more than the time there is, the bound and the plan come from the EVs' own problems first
COLD_LP_S = 2.8e-8
COLD_LP_POWER = 1.7
# and at least this long: the other assets' columns and rows (the bench's car park at 10-100
# EVs: 0.02-0.065 s at load ~5, where the power law alone says 0.001-0.02 s)
COLD_LP_FIXED_S = 0.02
# a large plan no replan follows goes to the EVs' own problems first unless its LP fits this
# many times over: with a core taken the LP at 1000 EVs took 2.4-2.6 s of its 3 s and did
# not finish (the plan then 2.3-5.7 % above the bound after 4 price steps); first, the EVs'
# problems take 0.3-0.6 s there and the LP still finishes after them on a quiet machine.
# (Not below NUMPY_FALLBACK_CELLS: at 10 EVs with 0.1 s their four first answers took
# 0.31-0.34 s where the LP, repaired and polished, took 0.07-0.08 s)
COLD_LP_MARGIN = 3.0


def _gap(objective: float, bound: float | None) -> float | None:
    """Relative gap as MIP solvers report it: (objective - bound) / |objective|.

    Divided by the plan's own objective (not the bound), so a weak bound near zero shows as
    a gap below 100 % rather than thousands of percent; objectives under 1 EUR count as 1 EUR,
    so cents on an almost free plan do not look like a bad plan.
    """
    if bound is None:
        return None
    return max(objective - bound, 0.0) / max(abs(objective), 1.0)


def _good_enough_eur(best: Evaluation, gap_tol: float) -> float:
    """How far above the LP bound a plan may stay (EUR): `gap_tol` of what the plan costs.

    Of its cost, not of its whole objective: an unavoidable shortfall's penalty (hundreds of
    EUR) would otherwise let a higher-priority EV end short by what is a mere 1 % of it.
    """
    return gap_tol * max(abs(best.cost_part), 1.0)


def _within_tolerance(plan: Evaluation, bound: float | None, gap_tol: float) -> bool:
    """Whether a plan is known to be within the tolerance of the bound (False without one)."""
    return bound is not None and plan.objective - bound <= _good_enough_eur(plan, gap_tol)


class PlanMemory:
    """What a site's planner keeps from one replan for the next: the LP's basis (`LpMemory`)
    and the powers of the plan it returned, per asset and PTU (by id and PTU number, so they
    still fit when assets came or went or a PTU passed)."""

    def __init__(self) -> None:
        self.lp = LpMemory()
        self.lp_solved = True  # whether the last replan's LP was solved (in time)
        # wall seconds per storage-PTU the last fallback took here (0: not known yet); one
        # that was cut short at the deadline counts as twice what it had taken by then, and
        # each replan that leaves it out for this lowers it by a fifth (tried again later)
        self.fallback_s_per_cell = 0.0
        # wall seconds per storage-PTU from the end of the last live price steps to the plan
        # checked (0: not known yet): what the next replan's steps leave (`plan_site`)
        self.after_steps_s_per_cell = 0.0
        # the site rows' prices of the last bound from the EVs' own problems (or of the last
        # LP solved), with the PTU number of their column 0: the next one starts from them
        self._lam: tuple[int, np.ndarray] | None = None
        self._plan: tuple[list[str], int, np.ndarray, np.ndarray, list[str], np.ndarray] | None = None

    def keep(self, lay: Layout, disp: Dispatch) -> None:
        self._plan = (list(lay.ids), ptu_epoch(lay.problem), disp.charge.copy(),
                      disp.discharge.copy(), list(lay.pv_ids), disp.curtail.copy())

    def keep_prices(self, lay: Layout, lam: np.ndarray) -> None:
        self._lam = (ptu_epoch(lay.problem), lam.copy())

    def prices(self, lay: Layout) -> np.ndarray | None:
        """The kept site-row prices laid onto this layout's PTUs (a PTU past their horizon
        takes the last one's), or None."""
        if self._lam is None:
            return None
        t0, lam = self._lam
        shift = ptu_epoch(lay.problem) - t0
        if shift < 0 or shift >= lam.shape[1]:
            return None
        out = np.empty((lam.shape[0], lay.n))
        span = min(lay.n, lam.shape[1] - shift)
        out[:, :span] = lam[:, shift:shift + span]
        out[:, span:] = lam[:, shift + span - 1:shift + span]
        return out

    def last_plan_fits(self, lay: Layout) -> bool:
        """Whether the last plan, laid onto this layout, keeps its import limit and every
        phase's fuse (True without one). A plan a new limit cuts (a congestion window) leaves
        a basis far from the new optimum: that LP does not finish in a replan's time."""
        last = self.last_plan(lay)
        if last is None:
            return True
        g, ph = grid_and_phases(lay, last)
        return bool(np.all(g <= lay.import_lim + LIMIT_FIT_W)
                    and np.all(ph <= lay.fuse_up + LIMIT_FIT_W))

    def last_plan(self, lay: Layout) -> Dispatch | None:
        """The last plan's powers laid onto this layout (assets it did not have: idle; PTUs
        past its horizon: 0), or None when there is none."""
        if self._plan is None:
            return None
        ids, t0, charge, discharge, pv_ids, curtail = self._plan
        shift = ptu_epoch(lay.problem) - t0  # PTUs passed since
        disp = empty_dispatch(lay)
        idle_modes(lay, disp)
        span = min(lay.n, charge.shape[1] - shift) if shift >= 0 else 0
        if span <= 0:
            return None
        for names, old_names, new, old in ((lay.ids, ids, disp.charge, charge),
                                           (lay.ids, ids, disp.discharge, discharge),
                                           (lay.pv_ids, pv_ids, disp.curtail, curtail)):
            where = {name: k for k, name in enumerate(old_names)}
            mine = [i for i, name in enumerate(names) if name in where]
            if mine:
                theirs = [where[names[i]] for i in mine]
                new[mine, :span] = old[theirs, shift:shift + span]
        disp.charge *= lay.avail
        disp.discharge *= lay.avail
        return disp


class SitePlanner:
    """`plan_site` for the replans of one site: keeps the LP's basis and the last plan from
    one replan to the next (`PlanMemory`), so each LP starts where the last one ended and an
    LP that cannot finish in time leaves the last plan, repaired, rather than the fallback.

    With `background_s` > 0 an LP whose time ran out goes on in a thread until the next
    replan (`LpMemory.finish`: slices of 0.2 s, at most `background_s`), so a site's LP too
    big for one deadline converges over a few replans instead of never. Off by default: on
    the shared 2-core machine that thread took the CPU the replan's own work needed (1000
    EVs: replan p50 1.6-5.5 s with it, 0.9-1.4 s without; docs/adr/0007). Call it as
    `plan_site`; one replan at a time; `close` stops the thread.
    """

    def __init__(self, gap_tol: float = GAP_TOL, background_s: float = 0.0) -> None:
        self.memory = PlanMemory()
        self.gap_tol = gap_tol
        self.background_s = background_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __call__(self, problem: Problem, *, time_limit_s: float = 1.0, workers: int = 2,
                 use_lp: bool = True, use_cpsat: bool = True) -> Plan:
        self.close()
        plan = plan_site(problem, time_limit_s=time_limit_s, workers=workers, use_lp=use_lp,
                         use_cpsat=use_cpsat, gap_tol=self.gap_tol, memory=self.memory)
        if self.background_s > 0 and self.memory.lp.unfinished is not None:
            self._stop = threading.Event()
            thread = threading.Thread(
                target=self.memory.lp.finish, args=(self._stop,),
                kwargs={"cap_s": self.background_s}, name="cem-plan-lp", daemon=True)
            thread.start()
            self._threads.append(thread)
            _BACKGROUND.append((self._stop, thread))
        return plan

    def close(self, wait: bool = False) -> None:
        """Stop going on with an unfinished LP (it stops within a slice, 0.2 s; `wait`: until
        it has)."""
        self._stop.set()
        if wait:
            for thread in self._threads:
                thread.join()
        self._threads = [t for t in self._threads if t.is_alive()]


_BACKGROUND: list[tuple[threading.Event, threading.Thread]] = []  # every LP going on


@atexit.register
def _stop_background() -> None:
    """A thread still in HiGHS when the interpreter ends would abort the process: stop and
    wait for each (its planner may be long gone)."""
    for stop, _thread in _BACKGROUND:
        stop.set()
    for _stop, thread in _BACKGROUND:
        thread.join()
    _BACKGROUND.clear()


def plan_site(problem: Problem, *, time_limit_s: float = 1.0, workers: int = 2,
              use_lp: bool = True, use_cpsat: bool = True, gap_tol: float = GAP_TOL,
              memory: PlanMemory | None = None) -> Plan:
    """Plan the site by about `time_limit_s` (LP, repair and CP-SAT together).

    The deadline is kept with the best plan there is by then: the LP gets what is left of
    it after the work that follows (`AFTER_LP_S_PER_CELL`); an LP that does not finish in
    time leaves the last plan (from `memory`) repaired, or without one the rule-based
    fallback, as the plan (and its basis in `memory`, for the next replan to go on from). Never raises for infeasible inputs (unmeetable targets become
    shortfalls, limits the inputs alone break are noted) and never breaks a hard limit it
    can keep. Should the optimisation itself fail, the fallback plan is returned; should
    even that fail, a plan with every controllable asset off.
    """
    try:
        return _plan_site(problem, time_limit_s=time_limit_s, workers=workers, use_lp=use_lp,
                          use_cpsat=use_cpsat, gap_tol=gap_tol, memory=memory)
    except Exception as exc:  # the control loop must never be without a plan
        log.exception("planner failed; falling back")
        note = f"planner error ({type(exc).__name__}: {exc}): "
        try:
            lay = build_layout(problem)
            return to_plan(lay, fallback_dispatch(lay), "FALLBACK", [note + "fallback plan"])
        except Exception:
            log.exception("fallback failed too; everything controllable off")
            return _all_off(problem, note + "every controllable asset off")


def _all_off(problem: Problem, note: str) -> Plan:
    n = problem.n_ptus
    assets: list[StorageAsset | ModeAsset | ShiftableProfile] = [
        *problem.storage, *problem.modes, *problem.profiles]
    zeros = {a.id: np.zeros(n, dtype=np.int64) for a in assets}
    g = np.zeros(n)
    for f in problem.fixed:
        g += per_ptu(f.power_w, n)
    for c in problem.curtailable:
        g -= np.maximum(per_ptu(c.production_w, n), 0)
    return Plan(status="FALLBACK", power_w=zeros, grid_import_w=np.rint(g).astype(np.int64),
                curtailed_w={c.id: np.zeros(n, dtype=np.int64) for c in problem.curtailable}, notes=[note])


def _plan_site(problem: Problem, *, time_limit_s: float, workers: int, use_lp: bool,
               use_cpsat: bool, gap_tol: float, memory: PlanMemory | None = None) -> Plan:
    t_start = time.perf_counter()
    deadline = t_start + max(time_limit_s, 0.05)
    lay = build_layout(problem)
    # among equally good plans, the last one (fewer instructions); not when the last LP was
    # finished in the background (its basis is the optimum without the reward: the next LP
    # starts there and moves nothing, where the reward would cost it iterations)
    if memory is not None and not memory.lp.finished:
        kept = memory.last_plan(lay)
        if kept is not None:
            keep_last(lay, kept.charge)
    build_s = time.perf_counter() - t_start
    notes = list(lay.notes)
    bound: float | None = None
    bound_from: str | None = None
    lp_solve_s = 0.0
    lp_iterations, lp_warm = 0, False
    status = "FALLBACK"
    candidate: Dispatch | None = None
    best: Evaluation | None = None
    unpolished = False
    cells = int(lay.avail.sum())
    budget = Budget(deadline, cells)
    budget.took("layout", build_s)
    after_lp_s = AFTER_LP_S + AFTER_LP_S_PER_CELL * cells
    lp: LpResult | None = None
    rules: Dispatch | None = None  # the fallback plan, once made
    rules_polished: Dispatch | None = None  # and polished, when made beside the LP
    rules_whole = True  # False: made beside the LP and cut short at the deadline
    decomposed: DecomposedBound | None = None
    steps_ended: float | None = None  # when the live replan's price steps ended
    guided: tuple[Evaluation, Dispatch] | None = None  # the plan from the EVs' problems
    guided_good = False
    built: BuiltLp | None = None
    # no replan follows (the bench's plans, `cem plan`): the bound's minimum power is worth
    # its time only there (live replans are 0.02-0.06 % above their bound already, and at
    # 5000 EVs it took the planner's p50 in `cem bench replan` from 0.92-1.52 to 1.26-1.87 s)
    alone = memory is None
    # one large enough for the numpy fallback and the EVs' own problems (the bench's 1000+ EVs)
    large_alone = alone and cells >= NUMPY_FALLBACK_CELLS
    # one with EVs to share out, of any size: below NUMPY_FALLBACK_CELLS too the EVs' own
    # problems stand in for an LP that cannot finish in time (100 EVs with 0.1 s: the LP,
    # its bound from row prices and the asset-at-a-time fallback took 0.32-0.47 s, 99.7 %
    # above the bound)
    evs_alone = alone and bool(laxity_assets(lay).any())
    # what a cold LP likely takes now (its build and HiGHS)
    lp_estimate = (COLD_LP_S * cells ** COLD_LP_POWER + COLD_LP_FIXED_S) * budget.pace
    # the moment the plan sent must be chosen by: on a plan no replan follows, the deadline
    # less the time of making and checking it (`Budget`); a live replan's stages keep the
    # deadline itself, as before
    last_call = budget.until("plan and check") if alone else deadline
    if use_lp:
        # an LP that was not solved last time will likely not be now: keep the time the
        # anytime plan (the fallback, polished) needs
        lp_memory = memory.lp if memory is not None else None
        beside = memory is not None and not memory.lp_solved
        # a plan without memory (no replans to follow) whose LP cannot finish in time: at
        # 5000 EVs on the bench's mixed site it left the asset-at-a-time fallback, 99.5 %
        # above the bound, after 13-95 s. (A site's first replan still runs its LP: the
        # basis it leaves, solved or not, is where the next replans go on from; without it
        # the bench's timed replans at 1000 EVs were 0.45 % above their bound, not 0.05 %)
        # (below NUMPY_FALLBACK_CELLS the LP first: an LP without the time it needs is not
        # run below, and the EVs' problems follow it)
        cold = large_alone and COLD_LP_MARGIN * lp_estimate > time_limit_s - after_lp_s
        if cold:
            memory = PlanMemory()  # for this plan only: the decomposition keeps its prices
        if memory is not None and cells >= NUMPY_FALLBACK_CELLS and (
                cold or (ev_only(lay) and (beside or not memory.last_plan_fits(lay)))):
            # the LP will likely not finish (the last did not, or a new limit moved the
            # optimum far): first what needs no LP, the fallback's rule in numpy, a bound from
            # the EVs' own problems and a plan from its master's point (least laxity first);
            # the LP gets what is left only when that plan is not good enough (on a site
            # with other flexible assets there is no numpy fallback: None)
            # (a live replan makes the fallback only when nothing better is found, below: at
            # 5000 EVs its making and scoring took 0.03-0.1 s of a 0.5-0.8 s limit)
            rules = deadline_first(lay) if alone else None
            with budget.timed("LP arrays"):
                built = BuiltLp.of(lay)
            # a plan no replan follows: the price steps until what must follow them (the
            # minimum power's least, the plan from the point, the plan sent and its check)
            # is left; a live replan's until what followed them last time is left
            # (`PlanMemory.after_steps_s_per_cell`), and at least a share of the time limit
            decomposed = _decompose(
                lay, built, memory,
                deadline if alone
                else max(deadline - _live_after_steps_s(memory, budget, cells),
                         time.perf_counter() + DECOMPOSE_MIN_SHARE * time_limit_s),
                point=True, budget=budget, live=not alone)
            steps_ended = time.perf_counter()
            beside = False  # the fallback is made (or, live, made below when needed)
            if decomposed is not None:
                # (its time is the refill's below, which a plan within the tolerance of the
                # raised bound no longer needs; not the price steps': a decomposition cut
                # short leaves a point far from the optimum, at 5000 EVs once 57 % above)
                guided = _from_point(lay, built.index, decomposed, gap_tol, budget, alone,
                                     deadline - AFTER_LP_S - CHECK_S_PER_CELL * cells)
                guided_good = guided is not None \
                    and _within_tolerance(guided[0], decomposed.bound_eur, gap_tol)
        # only when it fits twice over: beside the LP it takes the LP a third of its
        # iterations on a busy machine, and one that does not fit delays the LP for nothing
        if memory is not None and beside \
                and 2 * memory.fallback_s_per_cell * cells > deadline - time.perf_counter():
            beside = False
            memory.fallback_s_per_cell *= 0.8  # tried again once the estimate fits (load drops)
        if memory is not None and beside:
            lp, rules, rules_polished, rules_whole = _lp_beside_fallback(lay, deadline, after_lp_s,
                                                                         memory)
        else:
            # with the fallback made first, its polish's time is kept from the LP's
            polish_s = ANYTIME_S_PER_CELL * cells if decomposed is not None else 0.0
            lp_s = deadline - time.perf_counter() - after_lp_s - polish_s
            if alone and decomposed is not None:  # its answer is repaired and sent, and checked
                lp_s = min(lp_s, budget.until("repair", "plan and check") - time.perf_counter())
            elif large_alone:
                # should it not finish, the plan comes from the EVs' problems: their price
                # steps need a few answers for a point worth planning from (one answer: 92 %
                # above the bound at 300 EVs). (Not on a small site: at 100 EVs with 0.3 s on
                # a busy machine the LP then got too little to finish, and the plan took 0.36 s
                # where the LP given all of it took 0.19-0.22)
                lp_s -= budget.cost(*["price step"] * RESCUE_STEPS, *AFTER_PRICE_STEPS)
            if guided_good:
                lp = LpResult("not run: the plan from the EVs' problems is good enough", None,
                              None, index=built.index if built is not None else None)
            elif (decomposed is not None and lp_s < MIN_LP_S) \
                    or (decomposed is None and evs_alone and lp_s < min(MIN_LP_S, lp_estimate)):
                # no time for it (at 5000 EVs on a busy machine): not even built for HiGHS
                # (its arrays are, for the plan from the EVs' problems after it)
                if built is None:
                    with budget.timed("LP arrays"):
                        built = BuiltLp.of(lay)
                after = "after the bound" if decomposed is not None else "for it"
                lp = LpResult(f"not run: no time left {after}", None, None, index=built.index,
                              built=built)
                budget.skip("LP", f"{max(lp_s, 0.0):.2f} s left for it" + (
                    " after the bound and the plan from the EVs' problems"
                    if decomposed is not None else ""))
            else:
                # (no bound from row prices on a large site no replan follows: should the LP
                # not finish, the EVs' problems give a better one, and the row prices' took
                # 1.4-1.5 s at 1000 EVs past the LP's time limit)
                with budget.timed("LP"):
                    lp = solve_lp(lay, time_limit_s=max(lp_s, 0.01), memory=lp_memory,
                                  built=built, price_bound=decomposed is None and not large_alone
                                  and not evs_alone)
        if memory is not None:
            memory.lp_solved = lp.dispatch is not None
        build_s += lp.build_s
        lp_solve_s = lp.solve_s
        lp_iterations, lp_warm = lp.iterations, lp.warm
        if lp.dispatch is not None:
            bound, bound_from = lp.bound_eur, "LP"
            if decomposed is not None and bound is not None \
                    and decomposed.bound_eur > bound + 1e-6 * max(abs(bound), 1.0):
                # the EVs' problems with their minimum power, made before the LP, bound every
                # plan too, and higher (the bench's 1000 EVs: 1.27 % above the LP optimum,
                # 0.27 % above this, when the minimum power at the LP's prices had no time)
                bound, bound_from = decomposed.bound_eur, "EVs"
                notes.append("bound: the EVs' own problems with their minimum power, above "
                             "the LP optimum")
            if memory is not None and lp.highs is not None and lp.index is not None \
                    and lp.index.agg_rows is not None:  # before the polish re-runs it
                memory.keep_prices(lay, np.asarray(lp.highs.getSolution().row_dual)[lp.index.agg_rows])
            with budget.timed("repair"):
                candidate = round_and_repair(lay, lp.dispatch)
            status = "FEASIBLE"
            small = int(lay.avail.sum()) <= SHAVE_BEFORE_POLISH_COLUMNS
            if small:  # cheap here, and a shaved on/off pattern polishes better
                shave_peak(lay, candidate, last_call)
            best = evaluate(lay, candidate)
            left = last_call - time.perf_counter()
            if large_alone:  # what the minimum power adds below
                left -= budget.cost("min power at the LP's prices")
            with budget.timed("polish"):
                polished = polish_plan(lay, lp, candidate, time_limit_s=left) if left > 0 else None
            unpolished = polished is None
            if unpolished:
                notes.append("the repaired LP plan was not polished ("
                             + ("no time left)" if left <= 0 else "HiGHS did not finish it)"))
                budget.skip("polish", "no time left" if left <= 0
                            else f"not finished in the {left:.2f} s left")
            if polished is not None:
                ev = evaluate(lay, polished)
                if ev.objective < best.objective:
                    candidate, best = polished, ev
            elif not small:  # no polish: at least take charging out of the kW-max PTUs
                shave_peak(lay, candidate, last_call)
                best = evaluate(lay, candidate)
            at_lp_prices = "min power at the LP's prices"
            # a large plan with no replan after it (the bench's, `cem plan`), not within the
            # tolerance of the LP optimum: how much of the gap is the EVs' minimum power
            if large_alone and not _within_tolerance(best, bound, gap_tol):
                if not budget.fits(at_lp_prices, "plan and check"):
                    budget.skip(at_lp_prices, f"{budget.cost(at_lp_prices):.2f} s estimated, "
                                f"{budget.left():.2f} s left")
                else:
                    with budget.timed(at_lp_prices):
                        raised = _lp_with_min_power(lay, lp, last_call)
                    if raised is not None and bound is not None and raised.bound_eur > bound:
                        bound = raised.bound_eur
                        notes.append(f"bound: the LP optimum and what the EVs' minimum power "
                                     f"adds at its prices, {raised.min_power_eur:.2f} EUR")
            # the plan from the EVs' problems made before the LP, when it is the better one
            # (the bench's 1000 EVs, seed 0: 0.37 % above the bound, the LP's repaired 5.7 %)
            if guided is not None and guided[0].objective < best.objective:
                candidate, best = guided[1], guided[0]
                notes.append("the plan from the EVs' problems: better than the repaired LP plan")
        else:
            notes.append(f"LP {lp.status}" if guided_good
                         else f"LP relaxation not solved ({lp.status})")
            if not guided_good:
                log.warning("LP relaxation not solved (%s)", lp.status)
            if decomposed is None and ((memory is not None and ev_only(lay))
                                       or cells >= NUMPY_FALLBACK_CELLS or evs_alone):
                # (a cold start) the bound from the EVs' own problems: late already, it gets
                # a quarter of the time limit past the deadline at most (on any large site,
                # with memory or without: the fallback there is an asset at a time, 6-8 s and
                # 98-99 % above the bound on the bench's mixed site at 1000-5000 EVs)
                # (a plan no replan follows: until what must follow is left, as above, with
                # at least `decompose.LOOK_AHEAD_AFTER` answers before the deadline itself)
                decomposed = _decompose(
                    lay, lp.built if alone else None, memory if memory is not None else PlanMemory(),
                    deadline if alone
                    else max(deadline, time.perf_counter() + 0.25 * time_limit_s),
                    point=True, budget=budget if alone else None)
                guided = _from_point(lay, lp.index, decomposed, gap_tol, budget, alone,
                                     deadline - AFTER_LP_S - CHECK_S_PER_CELL * cells)
            if lp.dual_bound_eur is not None:
                bound, bound_from = lp.dual_bound_eur, "prices"
                notes.append("bound from row prices (Lagrangian), not the LP optimum")
            if decomposed is not None and (bound is None or decomposed.bound_eur > bound):
                bound, bound_from = decomposed.bound_eur, "EVs"
                notes.append(f"bound from the EVs' own problems at site-row prices "
                             f"({decomposed.steps} price steps), not the LP optimum"
                             + (f"; their minimum power adds {decomposed.min_power_eur:.2f} EUR"
                                if decomposed.min_power_eur > 0 else ""))
    if candidate is None or (unpolished and best is not None and bound is not None
                             and not _within_tolerance(best, bound, gap_tol)):
        # no LP plan, or one that got no polish and is not good enough (its rounding leaves
        # most EVs a few Wh short of a milestone: 5 % above the bound at 1000 EVs): the best
        # of it, the fallback (deadline first within the limits: 0.6 % above the bound at
        # 1000 EVs, 0.3 s) and the last plan repaired (its PTU 0 a minute shorter now, the EVs
        # it charged then may fall short: 0.06 % a minute before, 65 % in the bench after).
        # Each is computed once; the fallback only when nothing else is within 1 % (or known
        # to be: no bound) and the deadline leaves time for it
        scored: list[tuple[Evaluation, str, str, Dispatch]] = []

        def score(label: str, st: str, d: Dispatch) -> bool:
            """Add an option; True when one is now known to be good enough."""
            scored.append((evaluate(lay, d), label, st, d))
            return any(_within_tolerance(ev, bound, gap_tol) for ev, *_ in scored)

        # a plan from the EVs' problems known to be within the tolerance of the bound
        guided_known = guided is not None and _within_tolerance(guided[0], bound, gap_tol)
        good = guided_known
        if guided is not None:
            scored.append((guided[0], "the plan from the EVs' problems", "FEASIBLE", guided[1]))
        if candidate is not None:
            good = score("the repaired LP plan", status, candidate) or good
        if rules_polished is not None:  # made beside the LP
            good = score("the fallback plan, polished", "FEASIBLE", rules_polished) or good
        if rules is not None:
            good = score("the fallback plan" if rules_whole
                         else "the fallback plan, cut short at the deadline", "FALLBACK", rules) or good
        # the better of the plan from the EVs' problems and the fallback made before the LP
        # (EV-only sites), to polish
        pattern = None if rules is None or not rules_whole else (scored[-1][0], rules)
        if guided is not None and (pattern is None or guided[0].objective < pattern[0].objective):
            pattern = guided
        # (not the plan from the EVs' problems on other sites: on the bench's mixed site its
        # polish was worse once snapped at 1000 EVs and did not finish in 14 s at 5000; its
        # HiGHS model is then not made either, 0.08 s at 5000 EVs)
        polish_it = pattern is not None and (pattern is not guided or ev_only(lay))
        # (read only for a polish that may run: `built.model` makes the whole LP for HiGHS,
        # 0.06-0.1 s at 5000 EVs, where a plan from the EVs' problems within the tolerance is
        # good already)
        model = None if good else lp.model if lp is not None and lp.model is not None \
            else built.model if built is not None and pattern is guided and polish_it else None
        if not good and polish_it and pattern is not None and rules_polished is None \
                and lp is not None and model is not None \
                and (bound is None or pattern[0].objective - bound
                     > 0.1 * _good_enough_eur(pattern[0], gap_tol)) \
                and last_call - time.perf_counter() >= ANYTIME_S_PER_CELL * cells:
            # polished while the deadline leaves time for it, unless it is within a tenth of
            # the tolerance already (0.2-0.27 s of CPU at 1000 EVs: the fallback from 0.6 %
            # above the bound to 0.003-0.014 %)
            with budget.timed("polish"):
                rules_polished = _polish_unsolved(lay, model, lp.index, pattern[1], last_call)
            if rules_polished is not None:
                good = score("the plan from the EVs' problems, polished" if pattern is guided
                             else "the fallback plan, polished", "FEASIBLE", rules_polished) or good
        # the last plan's repair (0.1-0.3 s of CPU at 1000 EVs) only while the deadline is
        # not past, or when there is nothing else
        # a fallback cut short at the deadline (assets left idle) is no plan to settle for
        # nor a plan from the EVs' problems not known to be good (a cold start's point after a
        # few price steps, the deadline past: it may be far worse than the fallback)
        # (on a site with other flexible assets the fallback is an asset at a time, 8 s at
        # 5000 EVs and 99 % above the bound: the plan from the EVs' problems is whole there)
        whole = len(scored) - (0 if rules is None or rules_whole else 1) \
            - (1 if guided is not None and not guided_known and ev_only(lay) else 0)
        last = memory.last_plan(lay) if memory is not None and not good and (
            not whole or deadline > time.perf_counter()) else None
        if last is not None:
            good = score("the last plan, repaired", "FEASIBLE",
                         round_and_repair(lay, last, earlier=True))
            whole += 1
        # the fallback costs about what the work after an LP does (0.4 s of CPU at 1000 EVs,
        # more than a polish), an asset at a time (sites with more than EVs) far more: only
        # when there is that much time left, or nothing else
        fallback_s = after_lp_s if ev_only(lay) and cells >= NUMPY_FALLBACK_CELLS \
            else max(after_lp_s, FALLBACK_S_PER_CELL * cells)
        if not good and (rules is None or not rules_whole) and whole \
                and last_call - time.perf_counter() < fallback_s:
            budget.skip("fallback", f"{fallback_s:.2f} s estimated, "
                        f"{max(last_call - time.perf_counter(), 0.0):.2f} s left")
        elif not good and (rules is None or not rules_whole):
            began = time.perf_counter()
            rules = deadline_first(lay) if cells >= NUMPY_FALLBACK_CELLS else None
            rules = fallback_dispatch(lay) if rules is None else rules
            budget.took("fallback", time.perf_counter() - began)
            if memory is not None:
                memory.fallback_s_per_cell = (time.perf_counter() - began) / max(cells, 1)
            good = score("the fallback plan", "FALLBACK", rules)
            polished = None if good or lp is None else _polish_unsolved(lay, lp.model, lp.index,
                                                                        rules, last_call)
            if polished is not None:
                score("the fallback plan, polished", "FEASIBLE", polished)
        best, label, status, candidate = min(scored, key=lambda x: x[0].objective)
        notes.append(f"{label}: the best of " + ", ".join(x[1] for x in scored)
                     if len(scored) > 1 else label)
    best = evaluate(lay, candidate) if best is None else best
    gap = _gap(best.objective, bound)
    if bound is not None and gap is not None and gap <= 1e-9:
        status = "OPTIMAL"
    slack = _good_enough_eur(best, gap_tol)
    solve_s = 0.0
    left = last_call - time.perf_counter()
    # CP-SAT's model build (`Budget`: 55 us per storage-PTU at load ~2, 1.5 s at 1000 EVs):
    # started only when it can also search as long
    cp_build_estimate = budget.cost("CP-SAT model")
    wanted = use_cpsat and (bound is None or best.objective - bound > slack)
    if wanted and left <= 0.05 + 2 * cp_build_estimate:
        budget.skip("CP-SAT", f"its model {cp_build_estimate:.2f} s estimated, "
                    f"{max(left, 0.0):.2f} s left")
    elif wanted:
        from cem.planner.model import improve

        start = "fallback" if status == "FALLBACK" else "repaired LP"
        t1 = time.perf_counter()
        found, cp_status, cp_build_s = improve(lay, candidate, time_limit_s=left, workers=workers,
                                                   bound_eur=bound, slack_eur=slack)
        solve_s = time.perf_counter() - t1 - cp_build_s
        budget.took("CP-SAT model", cp_build_s)
        budget.took("CP-SAT", solve_s)
        if cp_status == "NO_TIME":
            budget.skip("CP-SAT", f"no time left after its model ({cp_build_s:.2f} s)")
        build_s += cp_build_s
        if found is not None:
            ev = evaluate(lay, found)
            if ev.objective < best.objective - 1e-9:
                candidate, best = found, ev
                status = "OPTIMAL" if cp_status == "OPTIMAL" else "FEASIBLE"
                notes.append(f"CP-SAT improved the {start} plan ({cp_status})")
            else:
                notes.append(f"CP-SAT found nothing better than the {start} plan ({cp_status})")
        else:
            notes.append(f"CP-SAT returned no plan ({cp_status})")
    if status == "FALLBACK":
        notes.append("fallback plan: deadline first within the limits, battery idle")
    if memory is not None:
        memory.keep(lay, candidate)
    sending = time.perf_counter()
    plan = to_plan(lay, candidate, status, notes, best)
    plan.lp_bound_eur = bound
    plan.lp_solved = lp is not None and lp.bound_eur is not None
    plan.bound_from = bound_from if bound is not None else None
    plan.gap = _gap(plan.objective_eur, bound)
    plan.build_s, plan.lp_solve_s, plan.solve_s = build_s, lp_solve_s, solve_s
    plan.lp_iterations, plan.lp_warm = lp_iterations, lp_warm
    log.info("plan %s: cost %.2f EUR, objective %.2f EUR, LP bound %s, gap %s; %d shortfalls; "
             "build %.3f s, LP %.3f s (%d iterations%s), CP-SAT %.3f s", plan.status, plan.cost_eur,
             plan.objective_eur, "-" if bound is None else f"{bound:.2f}",
             "-" if plan.gap is None else f"{plan.gap:.2%}", len(plan.shortfall), build_s,
             lp_solve_s, lp_iterations, ", warm" if lp_warm else "", solve_s)
    plan.skipped, plan.stage_s = budget.skipped, budget.stage_s
    violations = check_plan(problem, plan)
    budget.took("plan and check", time.perf_counter() - sending)
    if steps_ended is not None and guided_good and memory is not None and not alone:
        # what followed the live price steps, the check included: the next replan's steps
        # leave that much (`_live_after_steps_s`)
        memory.after_steps_s_per_cell = (time.perf_counter() - steps_ended) / cells
    if violations and status != "FALLBACK":
        fb = to_plan(lay, fallback_dispatch(lay), "FALLBACK",
                     [*notes, "the optimised plan failed the check: fallback plan"])
        if len(check_plan(problem, fb)) < len(violations):
            log.error("plan breaks limits (%s); using the fallback", violations[:3])
            fb.lp_bound_eur, fb.gap = bound, _gap(fb.objective_eur, bound)
            fb.lp_solved, fb.bound_from = plan.lp_solved, plan.bound_from
            fb.build_s, fb.lp_solve_s, fb.solve_s = build_s, lp_solve_s, solve_s
            fb.lp_iterations, fb.lp_warm = lp_iterations, lp_warm
            fb.skipped, fb.stage_s = budget.skipped, budget.stage_s
            return fb
    return plan


def _decompose(lay: Layout, built: BuiltLp | None, memory: PlanMemory, deadline: float,
               point: bool = False, budget: Budget | None = None,
               live: bool = False) -> DecomposedBound | None:
    """`decompose.lagrangian_bound` from the last replan's site-row prices, until `deadline`
    (`point`: with its master's point); its prices are kept for the next. None when it gives
    no bound (or fails: logged). With a `budget` (a plan no replan follows) the price steps
    stop by `deadline` less the time of `AFTER_PRICE_STEPS`, counted in steps as long as
    their own (`lagrangian_bound`'s look-ahead); a `live` replan's `deadline` already leaves
    what follows, and from the fourth answer on a step is begun only when it and the point
    fit before it. The stage is timed into `budget`, and said when cut short."""
    began = time.perf_counter()
    # (what follows them, in price steps: 14.2 at 5000 EVs, 10.2 at 2000, 7.5 at 1000)
    look_ahead = 0.0 if live else None if budget is None \
        else budget.in_steps("price step", *AFTER_PRICE_STEPS)
    try:
        # to a tenth of the gap tolerance: more answers tighten it by less than they cost
        found = lagrangian_bound(lay, built, lam0=memory.prices(lay), deadline=deadline,
                                 tol=GAP_TOL / 10, point=point, look_ahead=look_ahead)
    except Exception:
        log.exception("bound from the EVs' own problems failed")
        return None
    if budget is not None:
        budget.took("price steps", time.perf_counter() - began)
        if found is not None and found.timed_out:
            budget.skip("price steps", f"stopped for time after {found.steps} answers, "
                        "not converged")
    if found is not None:
        memory.keep_prices(lay, found.lam)
    return found


def _live_after_steps_s(memory: PlanMemory, budget: Budget, cells: int) -> float:
    """What a live replan keeps after its price steps: what followed them in the last one
    (the plan from the point, the choice and the plan's check; `PlanMemory`), per storage-PTU
    at this size, times `budget.SAFETY`; before one was measured, the budget's estimate."""
    if memory.after_steps_s_per_cell > 0:
        return SAFETY * memory.after_steps_s_per_cell * cells
    return budget.cost("plan from the point", "plan and check")


def _with_min_power(lay: Layout, decomposed: DecomposedBound, deadline: float,
                    budget: Budget | None = None) -> None:
    """The bound from the EVs' own problems raised by their minimum power
    (`DecomposedBound.with_min_power`; the bench's mixed site at 5000 EVs: +0.6 %, 0.3 s);
    left as it is when that fails (logged). Timed into `budget` when given."""
    began = time.perf_counter()
    try:
        decomposed.with_min_power(lay, deadline)
    except Exception:
        log.exception("the EVs' minimum power in the bound failed")
    if budget is not None:
        budget.took("min power", time.perf_counter() - began)


def _lp_with_min_power(lay: Layout, lp: LpResult, deadline: float) -> DecomposedBound | None:
    """The bound from the EVs' own problems at a solved LP's prices of the phase groups'
    power (there it is the LP optimum) raised by their minimum power (`_with_min_power`);
    None without such EVs or when it fails (logged)."""
    if lp.built is None or lp.highs is None or lp.index is None or lp.index.agg_rows is None:
        return None
    try:
        lam = np.asarray(lp.highs.getSolution().row_dual)[lp.index.agg_rows]
        found = lagrangian_bound(lay, lp.built, lam0=lam, steps=1)
    except Exception:
        log.exception("bound from the EVs' own problems at the LP's prices failed")
        return None
    if found is not None:
        _with_min_power(lay, found, deadline)
    return found


def _from_point(lay: Layout, index: LpIndex | None, decomposed: DecomposedBound | None,
                gap_tol: float, budget: Budget, alone: bool,
                stop_at: float) -> tuple[Evaluation, Dispatch] | None:
    """The plan from the decomposition's point (`_guided`). A plan no replan follows (`alone`)
    first raises the bound by the EVs' minimum power, in the time its `budget` gives that (its
    first rounds give nearly all of it), and refills until the budget's time for it; a live
    replan refills until `stop_at`."""
    if decomposed is not None and alone:
        _with_min_power(lay, decomposed, min(
            budget.until("plan from the point", "plan and check"),
            time.perf_counter() + budget.cost("min power")), budget)
    return _guided(lay, index, decomposed, gap_tol,
                   budget.until("refill", "plan and check") if alone else stop_at, budget)


def _guided(lay: Layout, index: LpIndex | None, decomposed: DecomposedBound | None,
            gap_tol: float = GAP_TOL, stop_at: float | None = None,
            budget: Budget | None = None) -> tuple[Evaluation, Dispatch] | None:
    """The plan from the decomposition's master point (`laxity.least_laxity_plan`), scored;
    None when there is none (or making it failed: logged). On a site with other flexible
    assets one not within `gap_tol` of the bound gets what is short refilled where the limits
    leave room (`hint.refill`, started for no asset after `stop_at`), when that is better.
    The stages are timed into `budget`, and a refill skipped or cut short for time said."""
    if index is None or decomposed is None:
        return None
    try:
        began = time.perf_counter()
        point = decomposed.dispatch(lay, index)
        plan = least_laxity_plan(lay, point) if point is not None else None
        if plan is None:
            return None
        best = evaluate(lay, plan)
        if budget is not None:
            budget.took("plan from the point", time.perf_counter() - began)
        wanted = not ev_only(lay) and not _within_tolerance(best, decomposed.bound_eur, gap_tol)
        least = budget.cost("refill") if budget is not None else 0.0
        if wanted and stop_at is not None and time.perf_counter() + least >= stop_at:
            if budget is not None:
                budget.skip("refill", "no time left after the plan from the point")
        elif wanted:
            # every target and milestone as far as the limits allow, the kW-max raised only
            # in steps (the bench's mixed site: 1.6-2.5 -> 0.9-1.4 % above the bound at 1000
            # EVs, 1.2-1.6 -> 1.1-1.3 % at 5000 in 0.8-1.2 s)
            began = time.perf_counter()
            more = plan.copy()
            whole = refill(lay, more, by_price=True, peak_cap=best.peak_w + 0.5,
                           allowed_wh=lay.tol_wh, stop_at=stop_at)
            scored = evaluate(lay, more)
            if budget is not None:
                budget.took("refill", time.perf_counter() - began)
                if not whole:
                    budget.skip("refill", "cut short for time")
            if scored.objective < best.objective:
                plan, best = more, scored
    except Exception:
        log.exception("plan from the EVs' own problems failed")
        return None
    return best, plan


def _lp_beside_fallback(lay: Layout, deadline: float, after_lp_s: float, memory: PlanMemory
                        ) -> tuple[LpResult, Dispatch | None, Dispatch | None, bool]:
    """The LP in a thread of its own while this one makes the fallback plan and polishes it
    (HiGHS releases the GIL while it solves): when the last LP was not solved, this one likely
    will not be either, and the anytime plan (the fallback, polished: `_polish_unsolved`) is
    then ready by the deadline. The LP keeps its whole time. Only when the last fallback
    made here took less than half the time there is (at 2000 EVs and load 7 it was cut short
    every time and took the LP three quarters of its iterations; at 1000 EVs and load 6-7,
    gated at the whole time, the LP converged later than main's and 3 of 12 timed replans
    were within 1 % against main's 6). Returns the LP's answer, the
    fallback and the polished fallback (None: not made in time, or making it failed), and
    whether the fallback is whole (not cut short at the deadline)."""
    built = BuiltLp.of(lay)
    box: dict[str, LpResult | BaseException] = {}

    def run() -> None:
        try:
            box["lp"] = solve_lp(lay, time_limit_s=max(deadline - time.perf_counter() - after_lp_s,
                                                        0.01), memory=memory.lp, built=built)
        except BaseException as exc:  # handed to the planning thread
            box["lp"] = exc

    thread = threading.Thread(target=run, name="cem-plan-lp-now", daemon=True)
    thread.start()
    rules: Dispatch | None = None
    polished: Dispatch | None = None
    whole = True
    try:
        # cut short at the deadline (5000 EVs: the whole fallback took longer than the LP's
        # 5 s at load 9, and the replan waited for it); the deadline itself, not the LP's end:
        # the work after an unsolved LP is mostly this (cut at the LP's end, at 1000 EVs and
        # load 7 most fallbacks were cut and the replans took the last plan, repaired)
        began = time.perf_counter()
        rules, whole = fallback_until(lay, deadline)
        memory.fallback_s_per_cell = (time.perf_counter() - began) * (1 if whole else 2) \
            / max(int(lay.avail.sum()), 1)
        if whole:
            polished = _polish_unsolved(lay, built.model, built.index, rules,
                                        deadline - AFTER_LP_S)
        else:
            log.info("fallback plan cut short at the deadline: some assets left idle")
    except Exception:
        log.exception("fallback plan failed beside the LP")
    thread.join()
    lp = box["lp"]
    if isinstance(lp, BaseException):
        raise lp
    lp.build_s += built.build_s
    return lp, rules, polished, whole


def _polish_unsolved(lay: Layout, model: highspy.HighsLp | None, index: LpIndex | None,
                     disp: Dispatch, deadline: float) -> Dispatch | None:
    """`disp` with its on/off pattern kept and its powers re-optimised (`polish_plan`) on an
    instance of its own of an LP that was not solved, within what is left of the deadline.

    The fallback's pattern (every EV from its earliest PTUs) polished so is 0.003-0.014 %
    above the LP optimum on the bench's live problems at 1000 EVs (the fallback itself 0.6 %).
    A fresh instance: the unsolved one keeps its basis for the next replan."""
    left = deadline - time.perf_counter()
    if model is None or index is None or left <= 0:
        return None
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("presolve", "off")
    h.setOptionValue("threads", 1)
    h.passModel(model)
    return polish_plan(lay, LpResult("POLISH", None, None, highs=h, index=index), disp,
                       time_limit_s=left)


def _reason(lay: Layout, i: int, status: str) -> str:
    a = lay.problem.storage[i]
    window = int(lay.avail[i].sum())
    whole_ptus = float((lay.avail[i] * lay.part).sum())  # a partial PTU 0 counts its share
    reachable = lay.level0[i] + whole_ptus * lay.cmax[i] * lay.dt_h * lay.eta_c[i] - lay.usage[i].sum()
    if lay.blocked[i]:
        return (f"needs less than one PTU at its minimum power ({a.charge_min_w} W): charging "
                "would pass its maximum level")
    if a.target_wh is not None and a.target_wh > a.level_max_wh:
        return f"target {a.target_wh} Wh above the maximum level {a.level_max_wh} Wh"
    if a.target_wh is not None and reachable < a.target_wh - 1:
        more = max(reachable - lay.level0[i], 0) / 1000  # not the level: an EV's may be its SoC
        return (f"window too short at max power: at most {more:.1f} kWh more in {window} PTUs "
                f"(needs {(a.target_wh - lay.level0[i]) / 1000:.1f})")
    if status == "FALLBACK":
        return "fallback plan (deadline first) within the site limits"
    return "site limits bind (fuse, import limit or congestion) or higher priorities come first"


def to_plan(lay: Layout, disp: Dispatch, status: str, notes: list[str],
            ev: Evaluation | None = None) -> Plan:
    """The Plan of a dispatch, with costs, levels and per-asset shortfalls (from `ev`, the
    dispatch's evaluation, when the caller has it)."""
    ev = evaluate(lay, disp) if ev is None else ev
    pr = lay.problem
    n = lay.n
    power: dict[str, np.ndarray] = {}
    level: dict[str, np.ndarray] = {}
    shortfall: dict[str, Shortfall] = {}
    net = np.rint(disp.charge - disp.discharge).astype(np.int64)
    for i, a in enumerate(pr.storage):
        power[a.id] = net[i]
        level[a.id] = np.rint(ev.level[i, 1:]).astype(np.int64)
        miss = float(ev.unmet_wh[i] + ev.profile_miss_wh[i])
        if miss > max(float(lay.tol_wh[i]), NOISE_WH):
            shortfall[a.id] = Shortfall(round(miss), _reason(lay, i, status))
        elif ev.deficit_wh[i] > max(float(lay.tol_wh[i]), 1.0):
            why = ("demand above what the device can deliver"
                   if a.kind == "heat_pump" else "usage above what the device can deliver")
            shortfall[a.id] = Shortfall(round(ev.deficit_wh[i]),
                                        f"level below level_min: {why} or site limits bind")
    curtailed = {pid: np.rint(disp.curtail[j]).astype(np.int64) for j, pid in enumerate(lay.pv_ids)}
    modes: dict[str, list[str | None]] = {}
    for j, m in enumerate(pr.modes):
        power[m.id] = np.rint(disp.mode_power[j]).astype(np.int64) if disp.mode_power is not None else np.zeros(n, dtype=np.int64)
        modes[m.id] = [m.modes[int(k)].id if m.modes else None for k in disp.mode_index[j]]
    starts: dict[str, int] = {}
    choices: dict[str, int] = {}
    for j, p in enumerate(pr.profiles):
        starts[p.id] = int(disp.profile_start[j])
        choices[p.id] = int(disp.profile_choice[j]) if j < len(disp.profile_choice) else 0
        power[p.id] = np.rint(profile_row(lay, disp, j)).astype(np.int64)
    # grid from the rounded powers, so the plan adds up exactly
    g = lay.fixed_w.copy()
    for a in pr.storage:
        g += power[a.id]
    for j in range(lay.k):
        g -= lay.pv[j] - curtailed[lay.pv_ids[j]]
    for m in pr.modes:
        g += power[m.id]
    for p in pr.profiles:
        g += power[p.id]
    plan = Plan(
        status=status, power_w=power, grid_import_w=np.rint(g).astype(np.int64),
        curtailed_w=curtailed, level_wh=level, mode=modes, profile_start=starts,
        profile_choice=choices,
        shortfall=shortfall, energy_cost_eur=ev.energy_cost, peak_cost_eur=ev.peak_cost,
        peak_w=round(ev.peak_w), cost_eur=ev.energy_cost + ev.peak_cost, notes=notes,
    )
    plan.objective_eur = ev.objective
    return plan
