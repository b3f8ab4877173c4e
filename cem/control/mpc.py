"""The MPC loop: when to replan, a deadline-bounded solve, dispatch, and the fast guard.

`SiteController` listens to the S2 server's events and replans when something the plan rests
on changes: an RM connects (control type selected) or disconnects, sends a new system
description, target, power constraints or profile, revokes something, or rejects/aborts an
instruction; a grid-signal source (`cem.signals`: the config's and the store's congestion
windows, day-ahead price feeds, an OpenADR VEN) publishes limits or prices that change the plan's
inputs (`publish`, with the source's reason); an RM's measured power deviates from its planned power by more than
`planner.deviation_threshold_w`; and at every PTU boundary. Bursts are merged: at most one
replan per `planner.replan_min_interval_s`, with every reason in its log line.

A replan builds the problem from the live RM states (`cem.flex.site_problem`), runs `plan_site`
in a worker thread with `planner.time_limit_s`, falls back to the rule-based `safe_plan` if the
optimiser is missing, fails, times out or finds nothing, records the plan, and dispatches the
instructions for the next `dispatch_ptus` PTUs (superseding earlier ones, see
`cem.control.dispatch`). An RM whose instructions would be made of the same as those it took
last time (the same plan rows, system description, fill level and active modes, within the
same PTU) is left as it is: they are neither built nor sent again.

A new congestion limit that applies now or from the next PTU does not wait for its replan:
`keep_new_limits` cuts the plan in force to it at once (`cem.control.congestion_cut`) and
sends the RMs whose instructions change, then the replan runs (`planner.congestion_fast_path`,
ADR 0011). Dispatches of the fast path, of a replan and of held raises never interleave, and a
replan made before the limits changed is cut to them before it is sent.

The guard (`cem.control.guard`) runs on every measurement of grid power (the grid meter RM, or
the sum of all RMs' measurements when there is none) and caps flexible loads at once when a
phase nears the fuse or the import nears the GTV/congestion limit.

Wiring (see `cem.app.service`): `CemService(config, controller_factory=site_controller_for)`.
Driven from outside instead of `run` (the digital twin, `cem.simulation.twin`): feed it the
server events with `handle_event`, then `await replan(take_reasons() + ...)`; its `clock` and
`monotonic` are injectable, so it runs in virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, TypeVar

import numpy as np

from cem.control.congestion_cut import Cut, cut_to_limit
from cem.control.departures import DepartureLearning, commit_started
from cem.control.dispatch import Dispatcher, DispatchReport
from cem.control.ev_modes import EvModes
from cem.control.grid_signals import SignalBoard
from cem.control.guard import FlexibleLoad, GuardDecision, GuardLimits, decide_caps, phase_power_w
from cem.control.safe_plan import safe_plan
from cem.flex.ptu import floor_to_ptu
from cem.flex.site_problem import (
    SiteMapping,
    build_problem,
    instruction_keys,
    instructions_for_plan,
    live_limits,
    measured_w,
    settled_keys,
)
from cem.planner.assets import Plan, Prices, Problem, SiteLimits
from cem.planner.layout import ptu_hours
from cem.ports import (
    CongestionLimit,
    ControlTypeSelected,
    Disconnected,
    GridSignalSource,
    InstructionStatusChanged,
    RegistryEvent,
    RmEvent,
    RmRegistry,
    SignalUpdate,
    StateChanged,
)
from cem.site.config import SiteConfig
from sitekit import clock as process_clock

logger = logging.getLogger("cem.control")

Solver = Callable[..., Plan]
NOTHING_FLEXIBLE = "nothing flexible to plan"

SHORT = {"FILL_RATE_BASED_CONTROL": "FRBC", "POWER_ENVELOPE_BASED_CONTROL": "PEBC",
         "POWER_PROFILE_BASED_CONTROL": "PPBC", "OPERATION_MODE_BASED_CONTROL": "OMBC",
         "DEMAND_DRIVEN_BASED_CONTROL": "DDBC", "NOT_CONTROLABLE": "not controllable",
         "NO_SELECTION": "no control type"}
REPLAN_KINDS = {
    "system_description": "sent a new system description",
    "target": "sent a new target",
    "power_constraints": "sent new power constraints",
    "energy_constraint": "sent a new energy constraint",
    "power_profile": "sent a new power profile",
    "revoked": "revoked an object",
}

T = TypeVar("T")


# a replan asked for because the last plan was far above its bound (`SiteController._follow_up`)
FOLLOW_UP = "the LP goes on"
FOLLOW_UP_GAP = 0.01
# a follow-up alone gives the planner this many times its time limit: the plan in force keeps
# every limit meanwhile (the congestion fast path saw to that), and the LP needs the time
FOLLOW_UP_TIME_FACTOR = 3
# a replan's deadline is its planner's time limit; the planner gets the deadline less the work
# around it in the replan once that work is at least this share of it, and never less than
# `PLANNER_MIN_SHARE` of it (`SiteController.planner_time_s`)
RESERVE_MIN_SHARE = 0.05
PLANNER_MIN_SHARE = 0.5


def utc_now() -> datetime:
    """The process clock (`sitekit.clock`: real time, or the demo's simulated time)."""
    return process_clock.now()


def default_solver() -> Solver | None:
    """A `cem.planner.solve.SitePlanner` (`plan_site`, each LP warm-started from the last
    replan's basis) when the optimiser is installed, else None."""
    try:
        from cem.planner.solve import SitePlanner
    except ImportError:
        return None
    return SitePlanner()


class SiteController:
    """Plans the site and steers the RMs; construct, then `await run(stop)` (or start/stop)."""

    def __init__(self, config: SiteConfig, registry: RmRegistry, store: Any = None, *,
                 signals: Sequence[GridSignalSource] = (), solver: Solver | bool | None = True,
                 clock: Callable[[], datetime] = utc_now,
                 monotonic: Callable[[], float] = time.monotonic, dispatch_ptus: int = 4,
                 signal_wait_s: float = 2.0,
                 guard_hold_s: float = 5.0, guard_interval_s: float = 0.25,
                 event_batch_s: float = 0.02) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        # grid signals: sources run beside the loop (`run`); a driver may also `publish` itself
        self.signals = list(signals)
        self.run_sources = True  # False: someone else runs them (`cem run`'s supervisor)
        self.board = SignalBoard(config, [s.name for s in self.signals])
        self.signal_wait_s = signal_wait_s  # at start, how long the first plan waits for them
        self._signals_heard = asyncio.Event()
        self.solver: Solver | None = default_solver() if solver is True else (solver or None)
        self.clock = clock
        self.monotonic = monotonic  # seconds for the guard's hold and the replan interval
        self.dispatch_ptus = dispatch_ptus
        self.guard_hold_s = guard_hold_s
        self.guard_interval_s = guard_interval_s
        self.event_batch_s = event_batch_s  # events read at most this often (see `_events`)
        self._last_guard = -math.inf
        self.dispatcher = Dispatcher(registry, clock=clock)
        self.problem: Problem | None = None
        self.mapping: SiteMapping | None = None
        self.plan: Plan | None = None
        self.plan_id: int | None = None
        self.replans = 0
        self.guard_actions: deque[GuardDecision] = deque(maxlen=100)  # the latest ones
        self.guard_count = 0  # how often the guard acted
        self._reasons: list[str] = []
        self._wake = asyncio.Event()
        self._last_replan = -math.inf
        self._deviating: set[str] = set()
        self._guard_caps: dict[str, tuple[float, float]] = {}  # asset -> (cap, monotonic time)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cem-plan")
        self._stop_event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.ev_modes: EvModes | None = None  # the operator's EV modes (cem.control.ev_modes)
        # finished EV visits recorded, departures learned, plans to a safe departure
        self.departures = DepartureLearning(config, store)
        self._departures_loaded = False
        self.committed = 0  # EVs kept charging in the running PTU (commit_started), summed
        self.last_replan_s: float | None = None  # how long the last replan took (wall s)
        # the congestion fast path (`keep_new_limits`): one dispatch at a time, so a cut and a
        # replan's plan never interleave; a replan built before a limit changed is cut too
        self._dispatch_lock = asyncio.Lock()
        self._congestion_version = 0
        self._fast_paths: set[asyncio.Task[Any]] = set()
        self.limit_cuts: deque[str] = deque(maxlen=100)  # the fast path's decisions, in words
        self.limit_cut_count = 0
        self.limit_cut_rms = 0  # RMs whose plan the last fast path changed (sent or revoked)
        self.follow_ups = 0  # replans asked for in a row because the last plan was far from its bound
        # wall seconds from the plan to its instructions taken, in the last replans (the
        # planner's time limit leaves room for them: `planner_time_s`)
        self._after_solve_s: deque[float] = deque(maxlen=3)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Run in the background (the service's Controller interface)."""
        self._stop_event = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self.run(self._stop_event),
                                                            name="cem-control")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The running loop's task (started by `start`), e.g. for a supervisor to watch."""
        return self._task

    async def stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for fast_path in list(self._fast_paths):
            fast_path.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fast_path
        self._executor.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.solver, "close", None)  # a SitePlanner's LP going on between replans
        if callable(close):
            close()

    async def run(self, stop: asyncio.Event) -> None:
        """Replan and guard until `stop` is set."""
        queue = self.registry.subscribe()
        self.request_replan("the CEM started")
        tasks = [asyncio.create_task(self._run_source(s), name=f"cem-signal-{s.name}")
                 for s in self.signals if self.run_sources]
        await self._first_signals()
        tasks += [asyncio.create_task(self._events(queue), name="cem-control-events"),
                  asyncio.create_task(self._replans(stop), name="cem-control-replans")]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                self.registry.unsubscribe(queue)
            logger.info("control loop stopped after %d replan(s)", self.replans)

    def request_replan(self, reason: str) -> None:
        """Ask for a replan (merged with others within the minimum interval)."""
        if reason not in self._reasons:
            self._reasons.append(reason)
        self._wake.set()

    # --- when -----------------------------------------------------------------------------

    def _seconds_to_next_ptu(self) -> float:
        now = self.clock()
        start = floor_to_ptu(now, self.config.planner.ptu_minutes)
        boundary = start + timedelta(minutes=self.config.planner.ptu_minutes)
        return max(0.05, (boundary - now).total_seconds())

    async def _replans(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self._reasons:
                self._wake.clear()
                ahead = self._seconds_to_next_ptu()
                boundary = self.clock() + timedelta(seconds=ahead)
                try:
                    await asyncio.wait_for(self._wake.wait(),
                                           timeout=process_clock.to_wall(ahead))
                except TimeoutError:
                    await self._release_raises(boundary)
                    self.request_replan("a new PTU started")
            wait = self._last_replan + self.config.planner.replan_min_interval_s - self.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            reasons, self._reasons = self._reasons, []
            if not reasons:
                continue
            try:
                await self.replan(reasons)
            except Exception:
                logger.exception("replan failed (%s); keeping the previous plan",
                                 "; ".join(reasons))
            finally:
                self._last_replan = self.monotonic()

    async def _release_raises(self, boundary: datetime) -> None:
        """A PTU started and nothing new came in: send the raises of the plan in force that
        were held for it, once the cuts due at the boundary have started. Had anything come
        in, the next plan decides instead (the dispatcher never sends raises ahead)."""
        lag = (boundary - self.clock()).total_seconds()
        if lag > 0:  # the timer woke a moment early
            await asyncio.sleep(process_clock.to_wall(lag))
        if self._reasons:
            return
        async with self._dispatch_lock:  # a fast path's cut comes first, its raises are void
            now = self.clock()
            due = self.dispatcher.due_raises(now)
            if not due:
                return
            await self.dispatcher.until_started(now)
            report = await self.dispatcher.dispatch(due, now, plan_id=self.plan_id)
        logger.info("PTU %s: the plan's raises for it: %s", now.strftime("%H:%M"),
                    report.describe())
        for line in report.failed:
            logger.warning("%s", line)

    async def _events(self, queue: asyncio.Queue[RegistryEvent]) -> None:
        """Handle the server's events in order, a burst at a time: after the first event the
        loop waits `event_batch_s` and then takes everything queued, so at 5000 measurements/s
        it wakes ~50 times a second instead of once per measurement; of one RM's measurements
        in a burst only the last is handled (each reads the RM's present state anyway)."""
        while True:
            burst = [await queue.get()]
            if self.event_batch_s > 0:
                await asyncio.sleep(self.event_batch_s)
            while not queue.empty():
                burst.append(queue.get_nowait())
            for server_event in coalesce_measurements(burst) if len(burst) > 1 else burst:
                rm_id = _measured_rm(server_event)
                if rm_id is not None and not self._guard_due(rm_id):
                    self._measured_quietly(rm_id)   # (nearly every event: no await for it)
                else:
                    await self.handle_event(server_event)

    def _measured_quietly(self, rm_id: str) -> None:
        """What `handle_event` does for a measurement that does not call for the guard."""
        try:
            entry = self.registry.get(rm_id)
            if entry is not None:
                self._check_deviation(rm_id, entry)
        except Exception:
            logger.exception("handling RmEvent failed")

    async def handle_event(self, server_event: RegistryEvent) -> None:
        """React to one server event as the running loop does (replan requests, the guard)."""
        try:
            await self._on_server_event(server_event)
        except Exception:
            logger.exception("handling %s failed", type(server_event).__name__)

    def take_reasons(self) -> list[str]:
        """The replan reasons requested since the last replan, handed over (and forgotten)."""
        reasons, self._reasons = self._reasons, []
        return reasons

    async def _on_server_event(self, server_event: RegistryEvent) -> None:
        if isinstance(server_event, Disconnected):
            rm_id = server_event.rm_id
            if rm_id is not None:
                self.dispatcher.forget(rm_id)
                self.departures.disconnected(rm_id)
                self._deviating.discard(rm_id)
                self.request_replan(f"RM {self._label(rm_id)} disconnected "
                                    f"({server_event.reason})")
            return
        if not isinstance(server_event, RmEvent) or server_event.rm_id is None:
            return
        rm_id = server_event.rm_id
        event = server_event.event
        if isinstance(event, ControlTypeSelected):
            control = SHORT.get(event.control_type, event.control_type)
            self.request_replan(f"RM {self._label(rm_id)} connected ({control})")
        elif isinstance(event, StateChanged):
            if event.kind == "system_description":
                self.dispatcher.forget_in_force(rm_id, self.clock())
                entry = self.registry.get(rm_id)
                if entry is not None:
                    self.departures.described(rm_id, entry.state, self.clock())
            if event.kind in REPLAN_KINDS:
                self.request_replan(f"RM {self._label(rm_id)} {REPLAN_KINDS[event.kind]}")
            elif event.kind == "measurement":
                await self._on_measurement(rm_id)
        elif isinstance(event, InstructionStatusChanged):
            if event.status in ("REJECTED", "ABORTED"):
                self.dispatcher.forget_key(rm_id)
                self.request_replan(f"RM {self._label(rm_id)} {event.status.lower()} "
                                    f"instruction {event.instruction_id}")

    def _label(self, rm_id: str) -> str:
        entry = self.registry.get(rm_id)
        name = entry.name if entry is not None else None
        return f"{name} ({rm_id[:8]})" if name else rm_id

    # --- grid signals ---------------------------------------------------------------------

    @property
    def congestion(self) -> list[CongestionLimit]:
        """The congestion limits of every grid-signal source, as the next plan uses them."""
        return self.board.congestion

    def publish(self, update: SignalUpdate) -> None:
        """Take a source's update (the `Publish` callback of `GridSignalSource.run`).

        Replans with the update's reason when the congestion limits changed, or when new prices
        change those of the plan's horizon (before the first plan: when there are any)."""
        congestion_changed, new_prices = self.board.take(update)
        if {s.name for s in self.signals} <= set(self.board.updates):
            self._signals_heard.set()
        if congestion_changed:
            self._congestion_version += 1
            self._start_fast_path(update.reason)
        replan = congestion_changed
        if new_prices and update.prices is not None:
            if self.problem is None:
                replan = replan or bool(update.prices.points)
            else:
                fresh = self.board.prices(self.problem.start, self.problem.n_ptus)
                old = self.problem.prices
                replan = replan or len(fresh.import_eur_per_kwh) != len(old.import_eur_per_kwh) \
                    or not np.allclose(fresh.import_eur_per_kwh, old.import_eur_per_kwh) \
                    or not np.allclose(fresh.export_eur_per_kwh, old.export_eur_per_kwh)
        if replan:
            self.request_replan(update.reason)

    def _start_fast_path(self, reason: str) -> None:
        """Run `keep_new_limits` now, beside whatever else runs (a replan in progress waits
        for it before it dispatches); not without a plan, an event loop or with the switch off."""
        if not self.config.planner.congestion_fast_path or self.plan is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self.keep_new_limits(reason), name="cem-congestion-fast-path")
        self._fast_paths.add(task)
        task.add_done_callback(self._fast_paths.discard)

    async def fast_path_done(self) -> None:
        """Wait until the congestion fast paths started so far have dispatched."""
        while self._fast_paths:
            await asyncio.gather(*list(self._fast_paths), return_exceptions=True)

    async def keep_new_limits(self, reason: str = "the congestion limits changed") -> Cut | None:
        """The congestion fast path: when the import limit in force now or in the next PTU
        fell below the plan's, cut the plan in force to the new limits at once (`cut_to_limit`:
        least urgent loads first) and dispatch the RMs whose instructions change; the replan
        the new limits asked for follows and refines it. None when it does not apply (no plan,
        or the limit falls later: the replan has the time)."""
        try:
            async with self._dispatch_lock:
                problem, plan, mapping = self.problem, self.plan, self.mapping
                if problem is None or plan is None or mapping is None:
                    return None
                limits = self._limits_now(problem)
                t0 = self._ptu_of(problem, self.clock())
                soon = slice(t0, min(problem.n_ptus, t0 + 2))
                if not np.any(limits.import_limit_w[soon] < problem.limits.import_limit_w[soon]):
                    return None
                return await self._cut_and_send(problem, plan, mapping, limits, t0, reason)
        except Exception:
            logger.exception("the congestion fast path failed; the replan follows")
            return None

    def _limits_now(self, problem: Problem) -> SiteLimits:
        """The site's limits over `problem`'s PTUs with the congestion windows known now."""
        return live_limits(self.config, problem.start, problem.n_ptus, self.congestion)

    @staticmethod
    def _ptu_of(problem: Problem, moment: datetime) -> int:
        seconds = (moment - problem.start).total_seconds()
        return max(0, min(problem.n_ptus - 1, int(seconds // (problem.ptu_minutes * 60))))

    async def _cut_and_send(self, problem: Problem, plan: Plan, mapping: SiteMapping,
                            limits: SiteLimits, t0: int, reason: str) -> Cut:
        """Cut `plan` to `limits` from PTU t0, make it the plan in force, send the changes."""
        began = time.monotonic()
        cut = cut_to_limit(problem, plan, limits.planned_import_limit_w, from_ptu=t0)
        cut_s = time.monotonic() - began
        problem = dataclasses.replace(problem, limits=limits)
        self.problem, self.plan = problem, cut.plan
        now = self.clock()
        until = min(problem.n_ptus, t0 + self.dispatch_ptus)
        live = set(self.registry.rms())
        changed_rms = {mapping.bindings[a].rm_id for a, first in cut.changed.items()
                       if first < until and a in mapping.bindings} & live
        # those cut in the running PTU first: they keep the limit now; the others' cuts start
        # at a later PTU boundary
        now_rms = {mapping.bindings[a].rm_id for a, first in cut.changed.items()
                   if first <= t0 and a in mapping.bindings} & live
        report = DispatchReport()
        built = began
        if changed_rms:
            skip = {b.rm_id for b in mapping.bindings.values()} - changed_rms
            instructions = await self._off_loop(instructions_for_plan, cut.plan, problem,
                                                mapping, now, until_ptu=until, skip=skip)
            built = time.monotonic()
            for group in (now_rms, changed_rms - now_rms):
                if not group:
                    continue
                part = await self.dispatcher.dispatch(
                    {rm: instructions.get(rm, []) for rm in group}, now,
                    plan_id=self.plan_id, replace_all_of=group)
                report.sent += part.sent
                report.kept += part.kept
                report.revoked += part.revoked
                report.rms |= part.rms
                report.failed += part.failed
                report.failed_rms |= part.failed_rms
        text = self._describe_cut(problem, cut, limits, changed_rms, reason)
        self.limit_cuts.append(text)
        self.limit_cut_count += 1
        self.limit_cut_rms = len(changed_rms)
        logger.warning("%s; %s (cut %.3f s, instructions %.3f s, sent in %.3f s)", text,
                       report.describe(), cut_s, max(0.0, built - began - cut_s),
                       time.monotonic() - max(built, began))
        for failure in report.failed:
            logger.warning("  %s", failure)
        return cut

    def _describe_cut(self, problem: Problem, cut: Cut, limits: SiteLimits, rms: set[str],
                      reason: str) -> str:
        """'congestion window 14:00-16:00 120 kW: 190 EVs capped at once, replan follows'."""
        if cut.ptus:
            first, last = cut.ptus[0], cut.ptus[-1]
            kw = float(limits.import_limit_w[first]) / 1000
            what = (f"import limit {kw:g} kW from {problem.ptu_start(first):%H:%M} to "
                    f"{problem.ptu_start(last + 1):%H:%M}")
            for window in self.congestion:
                if window.import_limit_kw is not None and \
                        abs(window.import_limit_kw - kw) < 1e-6 and \
                        window.start < problem.ptu_start(first + 1) and \
                        window.end > problem.ptu_start(first):
                    what = (f"congestion window {window.start:%H:%M}-{window.end:%H:%M} "
                            f"{kw:g} kW (from {window.source})")
                    break
        else:
            what = "new import limit"
        kinds: dict[str, int] = {}
        storage = {s.id: s.kind for s in problem.storage}
        for asset_id in cut.changed:
            kind = storage.get(asset_id, "storage")
            kinds[kind] = kinds.get(kind, 0) + 1
        names = {"ev": "EV", "battery": "battery", "heat_pump": "heat pump"}
        done = ", ".join(f"{count} {names.get(kind, kind)}{'s' if count != 1 else ''}"
                         for kind, count in sorted(kinds.items())) or "nothing"
        text = f"{what} ({reason}): {done} capped at once on {len(rms)} RM(s)"
        if cut.discharged:
            text += f", {len(cut.discharged)} discharging more"
        if cut.below_milestones:
            text += f", {len(cut.below_milestones)} below what their departure needs"
        if cut.excess_w > 1:
            text += f", still {cut.excess_w / 1000:.1f} kW over (not flexible)"
        if not cut.ptus:
            text += " (the plan kept it already)"
        return text + ", replan follows"

    async def _run_source(self, source: GridSignalSource) -> None:
        """Run one source; one that ends or fails is restarted (it should retry by itself)."""
        while True:
            try:
                await source.run(self.publish)
                logger.warning("grid-signal source %s ended; restarting it in 5 s", source.name)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("grid-signal source %s failed; restarting it in 5 s",
                                 source.name)
            await asyncio.sleep(5.0)

    async def _first_signals(self) -> None:
        """Give every source up to `signal_wait_s` to publish before the first plan."""
        if {s.name for s in self.signals} <= set(self.board.updates):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._signals_heard.wait(), timeout=self.signal_wait_s)

    def _prices(self, start: datetime, n_ptus: int) -> Prices:
        return self.board.prices(start, n_ptus)

    # --- the replan -------------------------------------------------------------------------

    async def replan(self, reasons: list[str]) -> Plan:
        """Build, solve (deadline-bounded, with fallback), record and dispatch one plan.

        A congestion fast path under way goes first (its cut is what the RMs need now; the
        replan beside it would only take its CPU)."""
        await self.fast_path_done()
        began = time.monotonic()
        now = self.clock()
        limits_seen = self._congestion_version
        rms = dict(self.registry.rms())  # the RMs this plan is for, whatever happens meanwhile
        states = {rm_id: entry.state for rm_id, entry in rms.items()}
        start = floor_to_ptu(now, self.config.planner.ptu_minutes)
        prices = self._prices(start, self.config.planner.horizon_ptus)
        problem, mapping = await self._off_loop(
            build_problem, states, self.config, prices, self.congestion, now)
        if self.ev_modes is not None:
            await self.ev_modes.forget(self.ev_modes.apply(problem, mapping.rm_assets))
        await self._learn_departures(problem, mapping, rms, states, now)
        follow_up = bool(reasons) and all(r.startswith(FOLLOW_UP) for r in reasons)
        deadline_s = self.config.planner.time_limit_s * (FOLLOW_UP_TIME_FACTOR if follow_up else 1)
        plan = await self._solve(problem, deadline_s if self.plan is None  # (the first plan)
                                 else self.planner_time_s(deadline_s, time.monotonic() - began))
        solved = time.monotonic()
        async with self._dispatch_lock:  # after a fast path dispatching now, never beside it
            taken = await self._take_plan(problem, mapping, plan, reasons, rms, now, start,
                                          began, limits_seen)
        self._after_solve_s.append(time.monotonic() - solved)
        return taken

    def planner_time_s(self, deadline_s: float, spent_s: float) -> float:
        """The planner's time limit in a replan that must end within `deadline_s` (wall s from
        its start) and has spent `spent_s` before the planner: the deadline less that and
        what the replan took after its plan lately (the least of the last three: the cold
        start's dispatch to every RM is not the usual), when those are at least
        `RESERVE_MIN_SHARE` of it (a small site plans to the full limit, as before), and at
        least `PLANNER_MIN_SHARE` of it. At 5000 EVs the work around the planner is 0.3-0.6 s
        of a 1 s deadline: a planner given the whole second ended every replan past it. (The
        first plan, with nothing in force before it, has the whole limit: its dispatch to
        every RM misses the deadline whatever the planner does.)"""
        after_s = min(self._after_solve_s) if self._after_solve_s else 0.0
        reserve_s = spent_s + after_s
        if reserve_s < RESERVE_MIN_SHARE * deadline_s:
            return deadline_s
        return max(PLANNER_MIN_SHARE * deadline_s, deadline_s - reserve_s)

    async def _take_plan(self, problem: Problem, mapping: SiteMapping, plan: Plan,
                         reasons: list[str], rms: dict[str, Any], now: datetime, start: datetime,
                         began: float, limits_seen: int) -> Plan:
        """Make the solved plan the one in force, record it and dispatch its instructions."""
        if limits_seen != self._congestion_version:
            # the limits changed while it was made: it keeps the new ones before it is sent
            limits = self._limits_now(problem)
            cut = cut_to_limit(problem, plan, limits.planned_import_limit_w,
                               from_ptu=self._ptu_of(problem, self.clock()))
            problem, plan = dataclasses.replace(problem, limits=limits), cut.plan
            if cut.changed:
                logger.info("the plan made before the new limits cut to them: %d asset(s)",
                            len(cut.changed))
        self.problem, self.mapping, self.plan = problem, mapping, plan
        self._deviating.clear()
        plan_id = await self._record(problem, plan, reasons)
        self.plan_id = plan_id
        # the solve took time: instructions start from the moment they are sent, not from
        # when the replan began (at 1440x a 0.4 s solve is ten minutes of a PTU)
        sent_at = self.clock()
        until = min(self.dispatch_ptus, problem.n_ptus)
        keys: dict[str, Hashable | None] = {}
        if floor_to_ptu(sent_at, self.config.planner.ptu_minutes) != start:
            self.request_replan("a new PTU started while the plan was being made")
        else:  # an RM whose instructions would be made of the same as last time keeps them
            keys = instruction_keys(plan, problem, mapping, until)
        unchanged = self.dispatcher.unchanged_among(keys, rms)
        instructions = await self._off_loop(
            instructions_for_plan, plan, problem, mapping, max(now, sent_at),
            until_ptu=until, skip=unchanged)
        controlled = ({b.rm_id for b in mapping.bindings.values()} & set(rms)) - unchanged
        report = await self.dispatcher.dispatch(
            {rm: msgs for rm, msgs in instructions.items() if rm in rms}, max(now, sent_at),
            plan_id=plan_id, replace_all_of=controlled, keys=keys,
            settled=settled_keys(keys, instructions, mapping, max(now, sent_at)))
        report.unchanged_rms = len(unchanged)
        self._log_plan(reasons, mapping, plan, report, time.monotonic() - began)
        self.replans += 1
        self.last_replan_s = time.monotonic() - began
        self._follow_up(plan, reasons)
        return plan

    def _follow_up(self, plan: Plan, reasons: list[str]) -> None:
        """After a plan more than 1 % above its bound whose LP ran out of time (a congestion
        window that moved the optimum far, a cold start), ask for the next replan now: the LP
        goes on from its basis (with `FOLLOW_UP_TIME_FACTOR` times the time limit when nothing
        else asked for the replan), so a few replans reach the optimum where waiting for the
        next event could leave the poor plan in force for minutes. At most
        `planner.follow_up_replans` in a row; any other reason to replan starts the count anew."""
        if not any(r.startswith(FOLLOW_UP) for r in reasons):
            self.follow_ups = 0
        gap = plan.gap
        limit = self.config.planner.follow_up_replans
        if gap is None or gap <= FOLLOW_UP_GAP or plan.lp_solved or self.follow_ups >= limit:
            return
        self.follow_ups += 1
        self.request_replan(f"{FOLLOW_UP} ({self.follow_ups} of {limit}): the plan is "
                            f"{gap:.1%} above its bound")

    async def _learn_departures(self, problem: Problem, mapping: SiteMapping, rms: dict[str, Any],
                                states: dict[str, Any], now: datetime) -> None:
        """Record the EV visits that ended, then plan the others to their safe departure."""
        learning = self.departures
        if not self._departures_loaded:
            self._departures_loaded = True
            try:
                await learning.load(now)
            except Exception:
                logger.exception("reading the finished EV visits failed")
        closed = learning.observe(problem, mapping.rm_assets, states, _Names(rms), now,
                                  mapping.bindings, mapping.evs)
        await learning.record(closed)
        learning.apply(problem, mapping.rm_assets, mapping.evs)
        if self.config.planner.commit_started_charging:
            self.committed += commit_started(problem, self.problem, self.plan,
                                             learning.value_eur_per_wh)

    async def _off_loop(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `work` in the planning thread so S2 sessions stay answered meanwhile.

        Building a 1000-RM problem or its instructions takes 50-100 ms of Python; on the event
        loop that would hold every ReceptionStatus back as long. RM states change only by
        replacing objects or C-level dict copies, so a thread can read them; should a state
        still change under it (RuntimeError), the work is redone on the loop.
        """
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: work(*args, **kwargs))
        except RuntimeError as exc:
            logger.debug("%s raced with an RM update (%s); redone on the event loop",
                         getattr(work, "__name__", work), exc)
            return work(*args, **kwargs)

    async def _solve(self, problem: Problem, time_limit: float | None = None) -> Plan:
        time_limit = time_limit or self.config.planner.time_limit_s
        if not (problem.storage or problem.modes or problem.profiles or problem.curtailable):
            return await self._off_loop(safe_plan, problem, NOTHING_FLEXIBLE)
        if self.solver is None:
            return await self._off_loop(safe_plan, problem, "the optimiser is not available")
        solver = self.solver
        loop = asyncio.get_running_loop()
        try:
            plan = await asyncio.wait_for(
                loop.run_in_executor(self._executor,
                                     lambda: solver(problem, time_limit_s=time_limit, workers=2)),
                timeout=time_limit * 2 + 2.0)
        except TimeoutError:
            return await self._off_loop(safe_plan, problem, f"the optimiser gave no plan within {time_limit * 2 + 2:g} s")
        except Exception as exc:
            logger.exception("the optimiser failed")
            return await self._off_loop(safe_plan, problem, f"the optimiser failed ({type(exc).__name__}: {exc})")
        if plan.status == "INFEASIBLE" or (not plan.power_w and problem.storage):
            return await self._off_loop(safe_plan, problem, f"the optimiser found no plan ({plan.status})")
        return plan

    async def _record(self, problem: Problem, plan: Plan, reasons: list[str]) -> int | None:
        if self.store is None:
            return None
        keep = min(problem.n_ptus, 8)
        payload = {
            "reasons": reasons,
            "grid_import_w": [int(x) for x in plan.grid_import_w],
            "power_w_next": {k: [int(x) for x in v[:keep]] for k, v in plan.power_w.items()},
            "shortfall": {k: {"energy_wh": s.energy_wh, "reason": s.reason}
                          for k, s in plan.shortfall.items()},
            "notes": plan.notes,
        }
        try:
            return int(await self.store.record_plan(
                horizon_start=problem.start, ptu_minutes=problem.ptu_minutes, status=plan.status,
                reason=summarise(reasons, 20), objective=plan.cost_eur, bound=plan.lp_bound_eur,
                gap=plan.gap, solve_s=plan.solve_s, payload=payload))
        except Exception:
            logger.exception("recording the plan failed")
            return None

    def _log_plan(self, reasons: list[str], mapping: SiteMapping, plan: Plan,
                  report: DispatchReport, took_s: float) -> None:
        gap = f", gap {plan.gap * 100:.1f}%" if plan.gap is not None else ""
        if plan.notes and plan.notes[0].endswith(NOTHING_FLEXIBLE):
            outcome = NOTHING_FLEXIBLE
        else:
            fallback = f" ({plan.notes[0]})" if plan.status == "FALLBACK" and plan.notes else ""
            outcome = f"{plan.status.lower()} plan{fallback}, cost {plan.cost_eur:.2f} EUR{gap}"
        logger.info("replan: %s; %s; %s, %.2f s; %s", summarise(reasons), mapping.summary(),
                    outcome, took_s, report.describe())
        for shortfall_id, shortfall in plan.shortfall.items():
            logger.info("  %s will miss %.1f kWh: %s", shortfall_id, shortfall.energy_wh / 1000,
                        shortfall.reason)
        for note in mapping.notes:
            logger.debug("  %s", note)
        for failure in report.failed:
            logger.warning("  %s", failure)

    # --- measurements: deviation and the guard --------------------------------------------

    def _current_ptu(self) -> int:
        if self.problem is None:
            return 0
        seconds = (self.clock() - self.problem.start).total_seconds()
        return max(0, min(self.problem.n_ptus - 1, int(seconds // (self.problem.ptu_minutes * 60))))

    def planned_w(self, rm_id: str) -> float | None:
        """The power the plan has for this RM in the current PTU (None: not planned)."""
        if self.plan is None or self.mapping is None:
            return None
        assets = self.mapping.rm_assets.get(rm_id)
        if not assets:
            return None   # (asked for every measurement: no clock read for an RM not planned)
        t = self._current_ptu()
        total, found = 0.0, False
        for asset_id in assets:
            row = self.plan.power_w.get(asset_id)
            if row is not None and t < len(row):
                total += float(row[t])
                found = True
            # what a running timer holds it at is planned as a fixed load, not in its row
            held = getattr(self.mapping.bindings.get(asset_id), "held_load", None)
            if held is not None and t < len(held.power_w):
                total += float(held.power_w[t])
        return total if found else None

    async def _on_measurement(self, rm_id: str) -> None:
        entry = self.registry.get(rm_id)
        if entry is None:
            return
        if self._guard_due(rm_id):
            if rm_id != self._meter_rm():
                # no meter: the sum of all RMs, checked at most every guard_interval_s (1000
                # RMs measuring every second must not cost 1000 sums a second)
                self._last_guard = self.monotonic()
            await self.guard_check()
        self._check_deviation(rm_id, entry)

    def _meter_rm(self) -> str | None:
        return self.mapping.meter_rm if self.mapping is not None else None

    def _guard_due(self, rm_id: str) -> bool:
        """Whether this RM's measurement calls for the guard now: the meter's every time,
        without a meter any RM's once guard_interval_s has passed since the last check."""
        meter = self._meter_rm()
        if rm_id == meter:
            return True
        return meter is None and self.monotonic() - self._last_guard >= self.guard_interval_s

    def _check_deviation(self, rm_id: str, entry: Any) -> None:
        """Ask for a replan when an RM's measured power left its plan (once, until it is back
        within `planner.deviation_threshold_w`)."""
        if rm_id == self._meter_rm():
            return
        planned = self.planned_w(rm_id)   # first: most RMs have nothing planned to deviate from
        if planned is None:
            return
        measured = measured_w(entry.state)
        if measured is None:
            return
        deviation = measured - planned
        if abs(deviation) > self.config.planner.deviation_threshold_w:
            if rm_id not in self._deviating:
                self._deviating.add(rm_id)
                self.request_replan(f"RM {self._label(rm_id)} draws {measured / 1000:.1f} kW "
                                    f"instead of the planned {planned / 1000:.1f} kW")
        else:
            self._deviating.discard(rm_id)

    def grid_phase_w(self) -> tuple[float, float, float] | None:
        """Grid power per phase now: the meter RM, else the sum of every RM's measurement."""
        rms = self.registry.rms()
        meter = self.mapping.meter_rm if self.mapping is not None else None
        if meter is not None and meter in rms:
            return phase_power_w(rms[meter].state.measured_power())
        l1 = l2 = l3 = 0.0
        found = False
        for entry in rms.values():   # (1000 RMs, every guard_interval_s: kept lean)
            phases = phase_power_w(entry.state.measured_power())
            if phases is not None:
                found = True
                l1 += phases[0]
                l2 += phases[1]
                l3 += phases[2]
        return (l1, l2, l3) if found else None

    def flexible_loads(self) -> list[FlexibleLoad]:
        """What the guard may turn down, with the present power of each."""
        if self.mapping is None or self.problem is None:
            return []
        rms = self.registry.rms()
        storage = {s.id: s for s in self.problem.storage}
        t = self._current_ptu()
        loads = []
        now_mono = self.monotonic()
        now = self.clock()
        taken_h = self._taken_h(now)  # once for all loads
        for asset_id, binding in self.mapping.bindings.items():
            entry = rms.get(binding.rm_id)
            if entry is None or not can_cap(binding):
                continue
            assets_of_rm = self.mapping.rm_assets.get(binding.rm_id, [])
            power = measured_w(entry.state) if len(assets_of_rm) == 1 else None
            if power is None and self.plan is not None and asset_id in self.plan.power_w:
                power = float(self.plan.power_w[asset_id][t])
            cap = self._guard_caps.get(asset_id)
            if cap is not None and now_mono - cap[1] < self.guard_hold_s:
                power = min(power or 0.0, cap[0])  # the RM is still carrying it out
            s = storage.get(asset_id)
            loads.append(FlexibleLoad(asset_id=asset_id, rm_id=binding.rm_id,
                                      power_w=float(power or 0.0), priority=binding.priority,
                                      min_w=float(s.charge_min_w) if s is not None else 0.0,
                                      phase_share=binding.phase_share,
                                      slack_h=self._slack_h(s, taken_h, now)))
        return loads

    def _taken_h(self, now: datetime) -> np.ndarray:
        """Hours of each PTU that have passed since the plan was made (part-way through PTU 0),
        until `now`: what of its power the plan has had each asset take so far."""
        if self.problem is None:
            return np.zeros(0)
        problem = self.problem
        hours = ptu_hours(problem)
        ends = np.cumsum(hours)  # end of each PTU, hours after the plan was made
        made = problem.ptu_start(0) + timedelta(hours=problem.ptu_minutes / 60 - float(hours[0]))
        elapsed_h = max(0.0, (now - made).total_seconds() / 3600)
        return np.clip(elapsed_h - (ends - hours), 0.0, hours)

    def _slack_h(self, asset: Any, taken_h: np.ndarray, now: datetime) -> float:
        """Hours a storage asset could still wait at `now` and reach its target at full power.

        From the plan's levels (at the moment it was made) plus what the plan had it take
        since (`taken_h`), to its departure: the minutes of the current PTU that are gone
        count as gone.
        """
        if asset is None or asset.target_wh is None or asset.available_until is None \
                or asset.charge_max_w <= 0 or self.problem is None:
            return math.inf
        planned = self.plan.power_w.get(asset.id) if self.plan is not None else None
        done_wh = float(np.sum(np.asarray(planned, dtype=float) * taken_h)) \
            if planned is not None else 0.0
        missing_wh = max(0.0, asset.target_wh - asset.level_wh - done_wh)
        left_h = (self.problem.ptu_start(asset.available_until) - now).total_seconds() / 3600
        return left_h - missing_wh / asset.charge_max_w

    def guard_limits(self) -> GuardLimits:
        """The hard limits now: the fuse, and the GTV or the congestion window in force (the
        plan used `planner.limit_share` of them; the guard protects the limits themselves)."""
        if self.problem is None:
            grid = self.config.grid
            return GuardLimits(fuse_w_per_phase=grid.fuse_a * grid.voltage_v,
                               import_limit_w=grid.import_limit_kw * 1000,
                               margin=self.config.planner.guard_margin)
        limits = self.problem.limits
        return GuardLimits(fuse_w_per_phase=limits.fuse_w_per_phase,
                           import_limit_w=float(limits.import_limit_w[self._current_ptu()]),
                           margin=self.config.planner.guard_margin)

    async def guard_check(self) -> GuardDecision:
        """Cap flexible loads now if the grid power is too close to a limit; then replan."""
        phases = self.grid_phase_w()
        if phases is None or self.mapping is None:
            return GuardDecision()
        decision = decide_caps(phases, self.guard_limits(), self.flexible_loads())
        if not decision.acts:
            return decision
        now = self.clock()
        now_mono = self.monotonic()
        messages: dict[str, list[Any]] = {}
        capped = []
        for asset_id, cap in decision.caps.items():
            binding = self.mapping.bindings[asset_id]
            instructions = binding.capped_instructions(cap, now)
            if not instructions:
                continue
            self._guard_caps[asset_id] = (cap, now_mono)
            messages.setdefault(binding.rm_id, []).extend(instructions)
            capped.append(f"{self._label(binding.rm_id)} to {cap / 1000:.1f} kW")
        report = await self.dispatcher.dispatch(messages, now, plan_id=self.plan_id)
        self.guard_actions.append(decision)
        self.guard_count += 1
        logger.warning("guard: %s; capped %s%s; %s", decision.reason, ", ".join(capped) or
                       "nothing it could cap",
                       f"; still {decision.excess_w:.0f} W over" if decision.excess_w > 1 else "",
                       report.describe())
        self.request_replan(f"the guard acted ({decision.reason})")
        return decision


class _Names(Mapping[str, str]):
    """The RMs' names for the log, each read only when asked for (a visit opens): a replan
    asks for a few of 5000."""

    def __init__(self, rms: Mapping[str, Any]) -> None:
        self._rms = rms

    def __getitem__(self, rm_id: str) -> str:
        return str(getattr(self._rms[rm_id], "name", None) or rm_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rms)

    def __len__(self) -> int:
        return len(self._rms)


def coalesce_measurements(events: list[RegistryEvent]) -> list[RegistryEvent]:
    """`events` in order without the measurements of an RM that measures again later in
    them (what the control loop does for a measurement reads the RM's latest state)."""
    measured = [_measured_rm(e) for e in events]
    last = {rm_id: at for at, rm_id in enumerate(measured) if rm_id is not None}
    if len(last) == sum(1 for rm_id in measured if rm_id is not None):
        return events
    return [e for at, (e, rm_id) in enumerate(zip(events, measured, strict=True))
            if rm_id is None or last[rm_id] == at]


def _measured_rm(server_event: RegistryEvent) -> str | None:
    """The RM whose measurement this event reports (None: another event)."""
    if isinstance(server_event, RmEvent) and isinstance(server_event.event, StateChanged) \
            and server_event.event.kind == "measurement":
        return server_event.rm_id
    return None


def summarise(reasons: list[str], keep: int = 3) -> str:
    """Reasons for a log line: all of a few, the first `keep` and a count of many."""
    if len(reasons) <= keep + 1:
        return "; ".join(reasons)
    return "; ".join(reasons[:keep]) + f"; and {len(reasons) - keep} more"


def can_cap(binding: Any) -> bool:
    """Whether the guard can turn this RM down (the binding says: PV producers and PPBC
    profiles that are not running interruptibly cannot)."""
    return bool(binding.can_cap())


def site_controller_for(service: Any) -> SiteController:
    """Controller factory for `CemService(config, controller_factory=site_controller_for)`:
    the grid-signal sources are those the service built from the config (`service.signals`)."""
    return SiteController(service.config, service.server, service.store,
                          signals=getattr(service, "signals", ()))
