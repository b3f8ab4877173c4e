"""The five levels of smart charging as controllers of the twin, plus the perfect-foresight optimum.

Every controller sees only what a real CEM at that level would see at the start of a PTU:
sessions that have arrived (with their believed energy and departure, `inputs.py`), the energy
each EV has taken so far (metered), and prices and PV for the planning horizon (day-ahead
prices and a perfect PV forecast: the twin has no forecast error). None of them sees a
session's real departure or real need, except the optimum, which is the reference.

1. uncontrolled: every EV charges at its EVSE's maximum from plug-in; nothing protects the fuse
   but the chargers' own maximum.
2. scheduled: a fixed cheap-hours timer, the same every day, set once like an installer would:
   of the local hours in which the car park is in use (on the average day of the run at least a
   quarter of the busiest hour's EVs are plugged in: the installer knows the opening hours),
   the `TIMER_HOURS` with the lowest mean price over the simulated days. EVs charge at full
   power inside the timer window only. (A night timer, the classic cheap-hours setting, would
   give a workplace almost nothing.)
3. price-optimised per EV (like evcc's planner): at plug-in each EV picks the cheapest PTUs
   before its believed departure that deliver its believed energy at full power, on its own
   (no other EVs, no site limits); if it is still plugged in after the believed departure and
   wants more, it charges at full power.
4. grid-integrated: one joint day plan under every site limit (fuse per phase, GTV, congestion)
   made by the site planner; an EV that arrives is fitted into the capacity the day plan leaves
   (its schedule is planned jointly with the other arrivals of that moment, the schedules made
   before are kept as they are). Nothing is re-optimised later: an EV that leaves early or is
   full early leaves its reserved capacity unused.
5. autonomous: the CEM's own control loop, not a model of it. `cem.simulation.twin` puts one
   simulated S2 resource manager per EVSE (the OCPP charger RM's FRBC functions), a grid meter
   and a PV RM behind real `S2Session`s, and drives `cem.control.mpc.SiteController` in virtual
   time: each PTU it hands the controller the server events and calls `replan` (arrivals,
   departures, the new PTU); the plan goes out as FRBC.Instructions through the `Dispatcher`
   and the RMs turn them into each EV's current. The guard runs on the meter's measurement as
   live. So the live knobs apply: `planner.limit_share` of the fuse and import limit,
   `planner.ev_finish_margin_minutes` (the ACN sites aim an hour before the stated departure:
   one ACN driver in eight leaves more than an hour earlier than stated), the live RM's hour
   more for an overstaying EV, and "full" learned from the EV's SoC.

optimum: perfect foresight, every session's real arrival, departure and need known in advance,
solved as one problem over the whole run by the same planner (a longer time limit). The planner
has no model of the EV taper (`engine.taper_w`), so the plan is a relaxation: its energy
(`planned_wh`) bounds, up to the solver's gap, what any control delivers under the taper, and
per session it is the "achievable" of the KPIs. Its realised run goes through the same physics: an EV the
taper kept behind its plan is offered more where the other offers leave room under the fuse and
GTV (earliest departure first), a feasible dispatch that stays below the bound.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cem.planner.assets import FixedLoad, Plan, Problem, SiteLimits, StorageAsset
from cem.planner.assets import Prices as PlannerPrices
from cem.simulation.engine import SimState, taper_hours
from cem.simulation.inputs import SimInputs, SimSession, SimulationError

LEVEL_NAMES = {
    "1": "uncontrolled",
    "2": "scheduled (cheap-hours timer)",
    "3": "price-optimised per EV",
    "4": "grid-integrated day plan",
    "5": "autonomous (MPC + guard)",
    "optimum": "perfect foresight",
}


TIMER_HOURS = 8
PHASE_SHARES = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

PlanFunction = Callable[..., Plan]


MPC_GAP_TOL = 1e-4  # share of the plan's cost above the LP bound at which a replan stops early
OPTIMUM_GAP_TOL = 0.0


def site_planner(gap_tol: float | None = None) -> PlanFunction:
    """The site planner (`cem.planner.solve.plan_site`), or a clear error if it is missing.

    The planner stops within 1 % of a plan's cost of the LP bound; the twin, which compares
    levels on cost, asks for a tighter tolerance (`gap_tol`) within the same time limit.
    """
    try:
        from cem.planner.solve import plan_site
    except ImportError as exc:
        raise SimulationError(f"levels 4, 5 and the optimum need the site planner "
                              f"(cem.planner.solve.plan_site), which cannot be imported: {exc}; "
                              f"run only --levels 1,2,3") from None
    if gap_tol is None or "gap_tol" not in inspect.signature(plan_site).parameters:
        return plan_site
    return functools.partial(plan_site, gap_tol=gap_tol)


def never_without_plan(plan_site: PlanFunction, problem: Problem, time_limit_s: float, workers: int,
                       notes: list[str]) -> Plan:
    """The planner's plan, or the control loop's rule-based safe plan if the planner fails."""
    try:
        return plan_site(problem, time_limit_s=time_limit_s, workers=workers)
    except Exception as exc:  # a planner bug must not stop the site
        from cem.control.safe_plan import safe_plan

        if len(notes) < 20:
            notes.append(f"planner failed at {problem.start.isoformat()} ({type(exc).__name__}: "
                         f"{exc}); the safe plan was used")
        return safe_plan(problem, reason=f"planner failed: {exc}")


def ev_id(s: SimSession) -> str:
    return f"ev{s.index}"


def ev_asset(s: SimSession, *, level_wh: int, target_wh: int, available_from: int,
             available_until: int) -> StorageAsset:
    """An EV as the planner sees it: filled to `level_wh`, wants `target_wh` by `available_until`."""
    target = max(level_wh, target_wh)
    return StorageAsset(
        id=ev_id(s), kind="ev", charge_max_w=s.max_w, charge_min_w=s.evse.min_w,
        level_wh=level_wh, level_min_wh=0, level_max_wh=target, target_wh=target,
        available_from=available_from, available_until=available_until,
        phase_share=s.evse.phase_share)


def live_limit_share(inputs: SimInputs) -> float:
    """The share of the fuse and import limit live plans use (`planner.limit_share`, as cem run)."""
    return float(getattr(inputs.config.planner, "limit_share", 1.0))


def site_problem(inputs: SimInputs, t: int, n: int, storage: list[StorageAsset],
                 fixed: list[FixedLoad] | None = None, peak_so_far_w: int = 0,
                 limit_share: float = 1.0) -> Problem:
    """The planner's problem for PTUs t .. t+n of the run: limits, prices, PV, the given assets.

    `limit_share` < 1 plans inside the fuse and import limit as the live control loop does
    (level 4; level 5 plans through `cem.flex.site_problem` as `cem run` does); the optimum and
    the KPIs use the limits themselves.
    """
    grid = inputs.config.grid
    end = t + n
    limits = SiteLimits(
        fuse_a=grid.fuse_a, phases=grid.phases, voltage_v=grid.voltage_v,
        import_limit_w=inputs.import_limit_w[t:end].astype(np.int64),
        planning_share=limit_share,
        export_limit_w=inputs.export_limit_w[t:end].copy(),
        peak_price_eur_per_kw=grid.peak_price_eur_per_kw,
        peak_so_far_w=max(round(grid.peak_so_far_kw * 1000), peak_so_far_w))
    prices = PlannerPrices(import_eur_per_kwh=inputs.import_eur_per_kwh[t:end].copy(),
                           export_eur_per_kwh=inputs.export_eur_per_kwh[t:end].copy())
    loads = list(fixed or [])
    if inputs.pv_w[t:end].any():
        loads.append(FixedLoad(id="pv", power_w=-inputs.pv_w[t:end].astype(np.int64)))
    return Problem(start=inputs.ptu_start(t), ptu_minutes=inputs.ptu_minutes, n_ptus=n,
                   limits=limits, prices=prices, storage=storage, fixed=loads)


class Uncontrolled:
    """Level 1: full power from plug-in."""

    name = "1"

    def __init__(self, inputs: SimInputs) -> None:
        self.max_w = np.array([s.max_w for s in inputs.sessions], dtype=float)
        self.replan_s: list[float] = []
        self.notes: list[str] = ["every EV at its EVSE maximum from plug-in"]

    def setpoints(self, t: int, present: np.ndarray, state: SimState) -> np.ndarray:
        return self.max_w


def timer_hours(inputs: SimInputs, hours: int = TIMER_HOURS) -> list[int]:
    """The `hours` cheapest local hours (mean price over the run) among the car park's busy hours."""
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(inputs.config.site.timezone)
    n = inputs.n_day_ptus
    local_hour = np.array([inputs.ptu_start(i).astimezone(zone).hour for i in range(n)])
    prices = inputs.import_eur_per_kwh[:n]
    plugged = np.zeros(n)
    for s in inputs.sessions:
        plugged[s.arrival_ptu:min(s.departure_ptu, n)] += 1
    occupancy = np.array([plugged[local_hour == h].mean() if (local_hour == h).any() else 0.0
                          for h in range(24)])
    busy = [h for h in range(24) if occupancy[h] >= 0.25 * occupancy.max()] or list(range(24))
    means = {h: float(prices[local_hour == h].mean()) if (local_hour == h).any() else math.inf
             for h in busy}
    return sorted(sorted(busy, key=lambda h: (means[h], h))[:hours])


class CheapHoursTimer:
    """Level 2: full power inside a fixed daily window of cheap hours, nothing outside it."""

    name = "2"

    def __init__(self, inputs: SimInputs) -> None:
        from zoneinfo import ZoneInfo

        zone = ZoneInfo(inputs.config.site.timezone)
        self.hours = timer_hours(inputs)
        self.on = np.array([inputs.ptu_start(i).astimezone(zone).hour in self.hours
                            for i in range(inputs.n_ptus)])
        self.max_w = np.array([s.max_w for s in inputs.sessions], dtype=float)
        self.replan_s: list[float] = []
        self.notes = [f"timer on in local hours {', '.join(f'{h:02d}' for h in self.hours)} "
                      f"(the {TIMER_HOURS} cheapest hours while the car park is in use)"]

    def setpoints(self, t: int, present: np.ndarray, state: SimState) -> np.ndarray:
        return self.max_w if self.on[t] else np.zeros_like(self.max_w)


class PerEvCheapest:
    """Level 3: each EV on its own takes the cheapest PTUs before its believed departure."""

    name = "3"

    def __init__(self, inputs: SimInputs) -> None:
        self.inputs = inputs
        n_s = len(inputs.sessions)
        self.schedule: dict[int, np.ndarray] = {}
        self.max_w = np.array([s.max_w for s in inputs.sessions], dtype=float)
        self.believed_dep = np.array([s.believed_departure_ptu for s in inputs.sessions])
        self.believed_need = np.array([s.believed_need_wh for s in inputs.sessions], dtype=float)
        self.arrival = np.array([s.arrival_ptu for s in inputs.sessions])
        self.on_now = np.zeros(n_s, dtype=bool)
        self.replan_s: list[float] = []
        self.notes: list[str] = ["cheapest PTUs per EV at plug-in, full power; no site limits"]

    def _plan(self, s: SimSession, t: int) -> None:
        started = time.perf_counter()
        end = min(max(s.believed_departure_ptu, t + 1), self.inputs.n_total)
        prices = self.inputs.import_eur_per_kwh[t:end]
        k = math.ceil(s.believed_need_wh / (s.max_w * self.inputs.dt_h) - 1e-9)
        chosen = np.argsort(prices, kind="stable")[:k] + t
        self.schedule[s.index] = chosen
        self.replan_s.append(time.perf_counter() - started)

    def setpoints(self, t: int, present: np.ndarray, state: SimState) -> np.ndarray:
        for i in np.flatnonzero(present & (self.arrival == t)):
            self._plan(self.inputs.sessions[i], t)
        out = np.zeros(len(self.max_w))
        for i in np.flatnonzero(present):
            chosen = self.schedule.get(int(i))
            wants_more = state.delivered_wh[i] < self.believed_need[i]
            if (chosen is not None and t in chosen) or (t >= self.believed_dep[i] and wants_more):
                out[i] = self.max_w[i]
        return out


class DayPlan:
    """Level 4: one joint plan under the site limits, extended at each arrival, never revised."""

    name = "4"

    def __init__(self, inputs: SimInputs, plan_site: PlanFunction, time_limit_s: float,
                 workers: int) -> None:
        self.inputs = inputs
        self.plan_site = plan_site
        self.time_limit_s = time_limit_s
        self.workers = workers
        self.committed = np.zeros((len(inputs.sessions), inputs.n_total))
        self.share = np.array([s.evse.phase_share for s in inputs.sessions]).reshape(-1, 3)
        self.arrival = np.array([s.arrival_ptu for s in inputs.sessions])
        self.replan_s: list[float] = []
        self.statuses: dict[str, int] = {}
        self.notes: list[str] = []

    def setpoints(self, t: int, present: np.ndarray, state: SimState) -> np.ndarray:
        new = [self.inputs.sessions[i] for i in np.flatnonzero(present & (self.arrival == t))]
        new = [s for s in new if s.believed_need_wh > 0]
        if new:
            horizon = self.inputs.config.planner.horizon_ptus
            n = max(1, min(horizon, max(s.believed_departure_ptu for s in new) - t))
            phase_w = self.share.T @ self.committed[:, t:t + n]  # 3 x n
            fixed = [FixedLoad(id=f"day_plan_L{p + 1}", power_w=np.rint(phase_w[p]).astype(np.int64),
                               phase_share=PHASE_SHARES[p]) for p in range(3) if phase_w[p].any()]
            assets = [ev_asset(s, level_wh=0, target_wh=s.believed_need_wh, available_from=0,
                               available_until=min(n, s.believed_departure_ptu - t)) for s in new]
            problem = site_problem(self.inputs, t, n, assets, fixed,
                                   limit_share=live_limit_share(self.inputs))
            started = time.perf_counter()
            plan = never_without_plan(self.plan_site, problem, self.time_limit_s, self.workers, self.notes)
            self.replan_s.append(time.perf_counter() - started)
            self.statuses[plan.status] = self.statuses.get(plan.status, 0) + 1
            for s in new:
                power = plan.power_w.get(ev_id(s))
                if power is not None:
                    self.committed[s.index, t:t + n] = np.maximum(np.asarray(power, dtype=float), 0)
        return self.committed[:, t]


class PerfectForesight:
    """Reference: every session known in advance, one plan for the whole run."""

    name = "optimum"

    def __init__(self, inputs: SimInputs, plan_site: PlanFunction, time_limit_s: float,
                 workers: int) -> None:
        assets = [ev_asset(s, level_wh=0, target_wh=s.real_need_wh, available_from=s.arrival_ptu,
                           available_until=s.departure_ptu) for s in inputs.sessions]
        self.problem = site_problem(inputs, 0, inputs.n_ptus, assets)
        started = time.perf_counter()
        self.plan = never_without_plan(plan_site, self.problem, time_limit_s, workers, [])
        self.replan_s = [time.perf_counter() - started]
        self.statuses = {self.plan.status: 1}
        self.power = np.zeros((len(inputs.sessions), inputs.n_ptus))
        for s in inputs.sessions:
            p = self.plan.power_w.get(ev_id(s))
            if p is not None:
                self.power[s.index] = np.maximum(np.asarray(p, dtype=float)[: inputs.n_ptus], 0)
        need = np.array([s.real_need_wh for s in inputs.sessions], dtype=float)
        # what the plan means each session to get: with the EV taper its setpoints may deliver
        # less (the plan cannot model the taper); the plan is then the upper bound
        self.planned_wh = np.minimum(self.power.sum(axis=1) * inputs.dt_h, need)
        # cumulative planned energy at the start of each PTU, and what the catch-up needs
        self.inputs = inputs
        self.planned_by = np.minimum(np.cumsum(self.power, axis=1) * inputs.dt_h - self.power
                                     * inputs.dt_h, need[:, None])
        self.share = np.array([s.evse.phase_share for s in inputs.sessions], dtype=float)
        self.max_w = np.array([s.max_w for s in inputs.sessions], dtype=float)
        self.min_w = np.array([s.evse.min_w for s in inputs.sessions], dtype=float)
        self.departure = np.array([s.departure_ptu for s in inputs.sessions])
        self.battery_wh = np.array([s.battery_wh for s in inputs.sessions], dtype=float)
        self.arrival_soc = np.array([s.arrival_soc for s in inputs.sessions], dtype=float)
        self.time_limit_s = time_limit_s
        self.notes = [f"one plan of {len(assets)} sessions x {inputs.n_ptus} PTUs: "
                      f"{self.plan.status}, {self.replan_s[0]:.1f} s (limit {time_limit_s:g} s)"
                      + self.gap_note()]

    def gap_note(self) -> str:
        """The plan's own objective against its bound: how far from optimal the reference is
        (the realised run's `objective_eur` lies further above the bound by what the EV taper
        keeps from the plan, which no solver time changes)."""
        plan = self.plan
        if plan.lp_bound_eur is None or plan.gap is None:
            return "; no bound"
        return (f"; plan objective {plan.objective_eur:.2f} EUR, {plan.bound_from} bound "
                f"{plan.lp_bound_eur:.2f} EUR, gap {100 * plan.gap:.4f} %")

    def setpoints(self, t: int, present: np.ndarray, state: SimState) -> np.ndarray:
        """The plan's setpoints; with the EV taper, an EV behind its plan (the taper gave it
        less than planned), or one whose planned rest needs, under the taper, all the time it
        has left, is offered more where the limits have room for it on the offers (which bound
        what the EVs draw), earliest departure first: it knows the taper exactly (perfect
        foresight), keeps the realised optimum close to its plan and never breaks a limit."""
        offer = self.power[:, t].copy()
        if not self.inputs.ev_taper:
            return offer
        inputs = self.inputs
        behind = np.where(present, self.planned_by[:, t] - state.delivered_wh, 0.0)
        rest = np.where(present, self.planned_wh - state.delivered_wh, 0.0)
        soc = self.arrival_soc + state.delivered_wh / self.battery_wh * 100.0
        left_h = (self.departure - t) * inputs.dt_h
        urgent = (rest > 1.0) & (taper_hours(np.maximum(rest, 0.0), soc, self.battery_wh,
                                             self.max_w) >= left_h - inputs.dt_h)
        want_w = np.where(urgent, self.max_w - offer,
                          np.minimum(np.maximum(behind, 0.0) / inputs.dt_h, self.max_w - offer))
        if not (want_w > 1.0).any():
            return offer
        pv = float(inputs.pv_w[t])
        phase_room = inputs.fuse_w_per_phase - (np.where(present, offer, 0.0) @ self.share
                                                - pv / 3.0)
        site_room = float(inputs.import_limit_w[t]) - (float(offer[present].sum()) - pv)
        for i in sorted(np.flatnonzero(want_w > 1.0), key=lambda k: self.departure[k]):
            want = float(want_w[i])
            share = self.share[i]
            room = min([site_room, *(phase_room[p] / share[p] for p in range(3) if share[p] > 0)])
            extra = min(want, room)
            if extra <= 0 or offer[i] + extra < self.min_w[i]:
                continue
            offer[i] += extra
            site_room -= extra
            phase_room -= extra * share
        return offer


def make_controller(level: str, inputs: SimInputs, *, time_limit_s: float, optimum_time_limit_s: float,
                    workers: int) -> Any:
    """The controller of a level name ('1'..'5' or 'optimum')."""
    if level == "1":
        return Uncontrolled(inputs)
    if level == "2":
        return CheapHoursTimer(inputs)
    if level == "3":
        return PerEvCheapest(inputs)
    if level == "4":
        return DayPlan(inputs, site_planner(MPC_GAP_TOL), time_limit_s, workers)
    if level == "5":
        from cem.simulation.twin import LiveControlLoop

        return LiveControlLoop(inputs, site_planner(MPC_GAP_TOL), time_limit_s, workers)
    if level == "optimum":
        return PerfectForesight(inputs, site_planner(OPTIMUM_GAP_TOL), optimum_time_limit_s, workers)
    raise SimulationError(f"unknown level {level!r}")
