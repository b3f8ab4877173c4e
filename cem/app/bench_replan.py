"""`cem bench replan`: live replans of N EV chargers, beside the planner alone on the same problems.

A replan builds the site problem from every RM's S2 state, solves it and sends each RM its
instructions. With 1000 RMs that is a lot of Python next to the S2 server on the same event
loop: this bench measures the replans (`SiteController.replan` with its default planner,
which keeps the LP's basis from one replan to the next), the event loop's lag while they run
(how long a ReceptionStatus could be held back), and, in the same run, the planner alone on
the very problems the replans solved (a fresh planner, the same sequence, in a worker thread
beside the same 1 ms lag ticker: the instrument weighs on both sides), so the cost outside
the planner shows as `replan_p50_s` against `solve_p50_s` (`solve_bare_p50_s`: the same
without the ticker; ADR 0007, round 8, has both).

The site moves between replans as a live one does: a minute passes and 5 % of the EVs report
what they charged meanwhile (StorageStatus, PowerMeasurement); `revokes_per_replan` and
`instructions_per_replan` count the RevokeObject and FRBC.Instruction messages each timed
replan sends the RMs (ADR 0007, round 10 second part). After the timed replans a
congestion window arrives (import capped at half of what the plan drew, from now for two
hours), and the replan it asks for runs as a live one would. Every instruction the CEM sends
after the limit keeps it (the congestion fast path caps the plan in force at once, ADR 0011);
over the RMs whose instruction changed after the limit (p99):

- `limit_to_ack_p99_s`: from the new limit to each RM's FIRST ReceptionStatus OK of an
  instruction sent after it (the fast path's cut, or the replan's for an RM the cut left
  alone): when the RM has its share of the limit;
- `limit_to_replan_ack_p99_s`: from the new limit to each RM's LAST OK, the full replan's
  instruction (what `limit_to_ack_p99_s` measured before the fast path);
- `limit_kept_s`: from the new limit to the moment the power the RMs were instructed to draw
  now (the last instruction each acknowledged, as its charger reads it) summed over the site
  is at most the limit, for good; `instructed_max_over_limit_kw` is the most it was above the
  limit after that moment (0: every later instruction kept it);
- `limit_gap` is the congestion replan's gap; when it is above 1 % and its LP was not solved
  (`limit_lp_solved`: a solved LP has nothing more to give) the controller asks for
  follow-up replans at once (`planner.follow_up_replans`, each with three times the time
  limit: the LP goes on from its basis), which the bench runs: `limit_follow_ups`,
  `limit_gap_final` (the last one's) and `limit_within_1pct_s`, from the limit to a plan
  within 1 % of its bound, each follow-up's wait of the site's `replan_min_interval_s`
  counted (None: not within 1 % after them).

The RMs are the OCPP charger RM's own FRBC messages (`resource_managers.ocpp_charger.frbc`)
through real sans-I/O S2 sessions in process (`cem.simulation.twin.TwinRegistry`): no
sockets, so the figure is the CEM's own work. `gc_freeze` mirrors `cem run`'s collector:
its settings at start (`cem.app.service.tune_garbage_collector`: what is alive frozen, young
collections every 5000 allocations) and its tenure (`tenure_long_lived` freezes what lived
5 s: live replans are at least `planner.replan_min_interval_s` apart, so before each replan
and the congestion window the bench freezes what is alive). Without it, Python's defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import json
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from s2python.common import InstructionStatus, InstructionStatusUpdate, ResourceManagerDetails
from s2python.frbc import FRBCInstruction
from s2python.message import S2Message
from s2python.s2_parser import S2Parser

from cem.app.service import tune_garbage_collector
from cem.planner.assets import Plan, Problem
from cem.planner.solve import SitePlanner
from cem.ports import CongestionLimit, InstructionResult, SignalUpdate
from cem.simulation.twin import TwinDevice, TwinRegistry, evse_details
from cem.site.config import SiteConfig
from resource_managers.ocpp_charger import frbc

VOLTAGE_V = 230.0
NAMESPACE = uuid.UUID("7d3f8a52-4c1e-4a8e-9a51-0b6f3c2d9e10")
STEP_S = 60  # between two replans
MOVED_SHARE = 0.05  # of the EVs report new levels before each replan


class BenchCharger(TwinDevice):
    """A 3-phase 16 A EVSE with an EV plugged in, as the OCPP charger RM presents it."""

    def __init__(self, index: int, now: datetime, rng: random.Random) -> None:
        self.resource_id = uuid.uuid5(NAMESPACE, f"evse {index}")
        self.rm_id = str(self.resource_id)
        self.name = f"EV charger {index}"
        self.ids = frbc.FrbcIds.for_resource(self.resource_id)
        self.flex = frbc.EvseFlex(
            name=self.name, online=True, has_session=True, phases=3, phase="L1",
            min_current_a=6.0, max_current_a=16.0, energy_kwh=rng.uniform(0, 5),
            need_kwh=rng.uniform(8, 40), departure=now + timedelta(hours=rng.uniform(3, 11)),
            power_w=(3680.0, 3680.0, 3680.0), limit_a=16.0, voltage_v=VOLTAGE_V)

    def details(self) -> ResourceManagerDetails:
        return evse_details(self.resource_id, self.name, 3, "L1")

    def receive(self, text: str, now: datetime) -> tuple[str, str | None, list[S2Message]]:
        """As the OCPP charger RM: an FRBC.Instruction is ACCEPTED, and STARTED when its time
        has come (the dispatcher's raises wait for the cuts to have started)."""
        try:
            message = S2Parser.parse_as_any_message(text)
        except Exception as exc:
            return "INVALID_MESSAGE", str(exc)[:200], []
        if not isinstance(message, FRBCInstruction):
            return "OK", None, []
        try:
            frbc.instruction_current(self.flex, self.ids, message)
            statuses = [InstructionStatus.ACCEPTED]
            if (message.execution_time - now).total_seconds() <= 1:
                statuses.append(InstructionStatus.STARTED)
        except frbc.InstructionProblem:
            statuses = [InstructionStatus.REJECTED]
        return "OK", None, [InstructionStatusUpdate(message_id=uuid.uuid4(), instruction_id=message.id,
                                                    status_type=status, timestamp=now)
                            for status in statuses]

    def tell(self, registry: TwinRegistry, now: datetime) -> None:
        feed = registry.feed
        feed(self.rm_id, frbc.system_description(self.flex, self.ids, now))
        target = frbc.fill_level_target(self.flex, now)
        if target is not None:
            feed(self.rm_id, target)
        feed(self.rm_id, frbc.storage_status(self.flex))
        feed(self.rm_id, frbc.actuator_status(self.flex, self.ids))
        feed(self.rm_id, frbc.power_measurement(self.flex, now))

    def charged(self, registry: TwinRegistry, now: datetime, kwh: float) -> None:
        """The EV took `kwh` more: the RM tells its new level and power."""
        self.flex = dataclasses.replace(self.flex, energy_kwh=self.flex.energy_kwh + kwh)
        registry.feed(self.rm_id, frbc.storage_status(self.flex))
        registry.feed(self.rm_id, frbc.power_measurement(self.flex, now))


class TimedRegistry(TwinRegistry):
    """The twin's registry, noting when each RM acknowledged an FRBC.Instruction, and the
    power each RM was instructed to draw now (its charger's reading of the instruction)."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.acked: dict[str, list[float]] = {}  # RM -> perf_counter of each OK, in order
        self.instructed_w: dict[str, float] = {}  # RM -> power of its instruction for now
        self.total_w: list[tuple[float, float]] = []  # (perf_counter, site total) per OK
        self.revokes = 0  # RevokeObject messages delivered to the RMs
        self.instructions = 0  # FRBC.Instruction messages delivered to the RMs

    def _deliver(self, entry: Any, text: str, message_id: str | None) -> InstructionResult:
        if '"RevokeObject"' in text:
            self.revokes += 1
        elif '"FRBC.Instruction"' in text:
            self.instructions += 1
        return super()._deliver(entry, text, message_id)

    async def send_instruction(self, rm_id: str, message: S2Message, *,
                               timeout_s: float | None = None,
                               plan_id: int | None = None) -> InstructionResult:
        result = await super().send_instruction(rm_id, message, timeout_s=timeout_s,
                                                plan_id=plan_id)
        if result.ok and isinstance(message, FRBCInstruction):
            at = time.perf_counter()
            self.acked.setdefault(rm_id, []).append(at)
            device = self.devices.get(rm_id)
            if isinstance(device, BenchCharger) and message.execution_time <= self.clock():
                with contextlib.suppress(frbc.InstructionProblem):
                    amps = frbc.instruction_current(device.flex, device.ids, message)
                    self.instructed_w[rm_id] = amps * VOLTAGE_V * device.flex.phases
                    self.total_w.append((at, sum(self.instructed_w.values())))
        return result


class RecordingPlanner:
    """The controller's planner, keeping each problem it was given and each plan."""

    def __init__(self) -> None:
        self.planner = SitePlanner()
        self.problems: list[Problem] = []
        self.plans: list[Plan] = []
        self.seconds: list[float] = []  # each call's wall time
        self.limits: list[float | None] = []  # each call's time limit (the controller's)

    def __call__(self, problem: Problem, **kwargs: Any) -> Plan:
        began = time.perf_counter()
        plan = self.planner(problem, **kwargs)
        self.seconds.append(time.perf_counter() - began)
        self.limits.append(kwargs.get("time_limit_s"))
        self.problems.append(problem)
        self.plans.append(plan)
        return plan


def site_for(evs: int, time_limit_s: float | None = None) -> SiteConfig:
    """A car park whose fuse carries 40 % of its chargers at full current: the limit binds.

    From 625 EVSEs on that fuse is above the 4000 A a site file may give (a low-voltage
    connection): the bench sets it past the check, so every size is the same problem."""
    fuse_a = max(25.0, round(evs * 16 * 0.4))
    config = SiteConfig.model_validate({
        "site": {"name": f"bench car park, {evs} EVSEs"},
        "grid": {"fuse_a": min(fuse_a, 4000),
                 "import_limit_kw": round(fuse_a * 3 * VOLTAGE_V / 1000 * 0.9),
                 "export_limit_kw": round(fuse_a * 3 * VOLTAGE_V / 1000 * 0.9)},
        **({"planner": {"time_limit_s": time_limit_s}} if time_limit_s else {}),
    })
    config.grid = config.grid.model_copy(update={"fuse_a": float(fuse_a)})
    return config



async def _time_alone(problems: list[Any], time_limit_s: float, warmup: int, *,
                      beside_ticker: bool) -> list[float]:
    """Wall seconds of a fresh planner on `problems` in order, each after the warm-up (the
    first is the cold one), in a worker thread; with `beside_ticker` the event loop wakes every
    millisecond meanwhile, as it does in the timed replans."""
    from concurrent.futures import ThreadPoolExecutor

    alone = SitePlanner()
    stop = asyncio.Event()
    if not beside_ticker:
        stop.set()
    tick = asyncio.create_task(_lag_ticker([], stop))
    loop = asyncio.get_running_loop()
    seconds: list[float] = []
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="bench-alone") as pool:
            for k, problem in enumerate(problems):
                began = time.perf_counter()
                await loop.run_in_executor(
                    pool, functools.partial(alone, problem, time_limit_s=time_limit_s, workers=2))
                if k > warmup:  # the cold one is reported apart and the warm-up not
                    seconds.append(time.perf_counter() - began)
    finally:
        stop.set()
        await tick
    return seconds


async def _lag_ticker(lags: list[float], stop: asyncio.Event) -> None:
    """Wake every millisecond until `stop`, noting how late each wake-up was (ms): the event
    loop's lag, and the bench's instrument."""
    while not stop.is_set():
        began = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append((time.perf_counter() - began - 0.001) * 1000)


async def measure(evs: int, replans: int, gc_freeze: bool, time_limit_s: float | None = None,
                  seed: int = 1, warmup: int = 0) -> dict[str, Any]:
    from cem.control.mpc import FOLLOW_UP, SiteController

    # two minutes into a PTU, so the replans (a minute apart) stay in one PTU
    start = datetime.now(UTC).replace(second=0, microsecond=0)
    start -= timedelta(minutes=start.minute % 15)
    clock = {"now": start + timedelta(minutes=2)}
    registry = TimedRegistry(clock=lambda: clock["now"])
    rng = random.Random(seed)
    chargers = []
    for index in range(evs):
        charger = BenchCharger(index, clock["now"], rng)
        registry.connect(charger)
        charger.tell(registry, clock["now"])
        chargers.append(charger)
    refused = len(registry.cem_refusals)
    config = site_for(evs, time_limit_s)
    planner = RecordingPlanner()
    controller = SiteController(config, registry, clock=lambda: clock["now"], solver=planner)
    threshold = gc.get_threshold()
    if gc_freeze:  # as `cem run` starts: frozen, and young collections every 5000 allocations
        tune_garbage_collector()
    lags: list[float] = []
    replan_s: list[float] = []
    stop_ticker = asyncio.Event()
    full_gc = FullCollections()
    gc.callbacks.append(full_gc)

    # the CEM starts: its first replan is a cold one (no basis to start from yet)
    began = time.perf_counter()
    await controller.replan(["the CEM started"])
    cold_s = time.perf_counter() - began
    sent_before = registry.messages  # set again before the first timed replan
    revokes_before, instructions_before = 0, 0
    tick = asyncio.create_task(_lag_ticker(lags, stop_ticker))
    try:
        for number in range(warmup + replans):
            if number == warmup:  # the timed replans' messages, not the cold start's or warm-up's
                sent_before = registry.messages
                revokes_before, instructions_before = registry.revokes, registry.instructions
            # a minute later, some EVs say what they took meanwhile
            clock["now"] += timedelta(seconds=STEP_S)
            for charger in rng.sample(chargers, max(1, round(MOVED_SHARE * evs))):
                charger.charged(registry, clock["now"], rng.uniform(0.05, 0.25))
            controller.take_reasons()
            if gc_freeze:  # `cem run` freezes what lived 5 s (the replans are >= 5 s apart)
                gc.freeze()
            began = time.perf_counter()
            await controller.replan([f"bench replan {number + 1}"])
            if number >= warmup:
                replan_s.append(time.perf_counter() - began)
                full_gc.windows.append((began, time.perf_counter()))
        messages = registry.messages - sent_before
        revokes = registry.revokes - revokes_before
        instructions = registry.instructions - instructions_before
        # a new congestion limit: from now for two hours, half of what the plan imports now
        plan = planner.plans[-1]
        clock["now"] += timedelta(seconds=STEP_S)
        cap_kw = max(1.0, float(plan.grid_import_w[0]) / 2000)
        controller.take_reasons()
        registry.acked.clear()
        registry.total_w.clear()
        before_w = sum(registry.instructed_w.values())
        if gc_freeze:
            gc.freeze()
        limit_at = time.perf_counter()
        controller.publish(SignalUpdate(
            source="bench", reason="bench: a congestion window was added",
            congestion=(CongestionLimit(start=clock["now"], end=clock["now"] + timedelta(hours=2),
                                        import_limit_kw=round(cap_kw, 1), source="bench"),)))
        await controller.replan(controller.take_reasons())
        await controller.fast_path_done()
        limit_replan_s = time.perf_counter() - limit_at
        first_acks = sorted(times[0] - limit_at for times in registry.acked.values())
        acks = sorted(times[-1] - limit_at for times in registry.acked.values())
        kept_s, over_kw = limit_kept(registry.total_w, limit_at, round(cap_kw, 1) * 1000,
                                     before_w)
        fast_path_rms = controller.limit_cut_rms
        limit_plan = planner.plans[-1]
        # the replans the controller asks for at once while its plan is more than 1 % above
        # its bound (`planner.follow_up_replans`: the LP goes on from its basis); a live site
        # waits its minimum interval before each, which the clock and `limit_within_1pct_s` add
        follow_up_s: list[float] = []
        while not _within_1pct(planner.plans[-1]):
            reasons = controller.take_reasons()
            if not any(r.startswith(FOLLOW_UP) for r in reasons):
                break
            clock["now"] += timedelta(seconds=config.planner.replan_min_interval_s)
            if gc_freeze:
                gc.freeze()
            began = time.perf_counter()
            await controller.replan(reasons)
            follow_up_s.append(time.perf_counter() - began)
        final = planner.plans[-1]
        within_s = (limit_replan_s + sum(follow_up_s)
                    + len(follow_up_s) * config.planner.replan_min_interval_s
                    if _within_1pct(final) else None)
    finally:
        gc.callbacks.remove(full_gc)
        stop_ticker.set()
        await tick
        await controller.stop()
        if gc_freeze:
            gc.unfreeze()
            gc.set_threshold(*threshold)
    # the planner alone on the same problems, in the same order, from a fresh memory: in a
    # worker thread beside the same 1 ms lag ticker, as in the replans (the ticker takes the GIL
    # from the planning thread a thousand times a second; it is the bench's instrument, so it
    # weighs on both sides of `replan_over_solve`), and bare, as before (`solve_bare_p50_s`)
    problems = planner.problems[:warmup + replans + 1]
    solve_s = await _time_alone(problems, config.planner.time_limit_s, warmup, beside_ticker=True)
    solve_bare_s = await _time_alone(problems, config.planner.time_limit_s, warmup,
                                     beside_ticker=False)
    lags.sort()
    cold = planner.plans[0]
    timed = planner.plans[warmup + 1:warmup + replans + 1]
    gaps = [p.gap for p in timed if p.gap is not None]
    return {
        "evs": evs, "replans": replans, "warmup_replans": warmup, "gc_freeze": gc_freeze,
        "time_limit_s": config.planner.time_limit_s,
        "cem_refused_rm_messages": refused,
        "cold_replan_s": round(cold_s, 3), "cold_plan_status": cold.status,
        "cold_gap": None if cold.gap is None else round(cold.gap, 5),
        "replan_p50_s": round(statistics.median(replan_s), 3),
        "replan_max_s": round(max(replan_s), 3),
        # each timed replan (wall s), the planner's part of it, and how many ended (plan
        # made, instructions acknowledged) within the planner's time limit: the live deadline
        "replans_s": [round(x, 3) for x in replan_s],
        "replan_solves_s": [round(x, 3) for x in planner.seconds[warmup + 1:warmup + replans + 1]],
        # the time limit the controller gave the planner in each: the deadline less the work
        # around the planner in the replan (`SiteController.planner_time_s`)
        "replan_planner_limits_s": [None if x is None else round(x, 3)
                                    for x in planner.limits[warmup + 1:warmup + replans + 1]],
        "deadlines_kept": sum(1 for x in replan_s if x <= config.planner.time_limit_s),
        # full collections (generation 2) inside the timed replans: how many, their seconds
        "full_gcs_in_replans": len(full_gc.inside()),
        "full_gcs_in_replans_s": round(sum(full_gc.inside()), 3),
        "solve_p50_s": round(statistics.median(solve_s), 3),
        "solve_bare_p50_s": round(statistics.median(solve_bare_s), 3),
        "replan_over_solve": round(statistics.median(replan_s) / max(statistics.median(solve_s), 1e-9), 2),
        "gap_max": round(max(gaps), 5) if len(gaps) == len(timed) else None,  # None: one had no bound
        "plan_status": sorted({p.status for p in timed}),
        "gaps": [None if p.gap is None else round(p.gap, 5) for p in timed],  # None: no bound
        # what each gap is measured against: the LP optimum, or a bound from row prices (an LP
        # not solved in time: `cem.planner.dual_bound`) or from the EVs' own problems
        # (`cem.planner.decompose`), or nothing
        "bounds": [_bound(p) for p in timed],
        "gaps_within_1pct": sum(1 for p in timed if p.gap is not None and p.gap <= 0.01),
        "lp_warm_starts": sum(1 for p in timed if p.lp_warm),
        "lp_iterations": [p.lp_iterations for p in timed],
        "loop_lag_p99_ms": round(lags[int(0.99 * (len(lags) - 1))], 1) if lags else None,
        "loop_lag_max_ms": round(lags[-1], 1) if lags else None,
        "s2_messages_during_replans": messages,
        # what the timed replans sent the RMs, per replan (the clock moves STEP_S between them)
        "revokes_per_replan": round(revokes / max(replans, 1), 1),
        "instructions_per_replan": round(instructions / max(replans, 1), 1),
        "limit_kw": round(cap_kw, 1),
        "limit_to_ack_p99_s": p99(first_acks),
        "limit_to_replan_ack_p99_s": p99(acks),
        "limit_kept_s": kept_s,
        "instructed_max_over_limit_kw": over_kw,
        "limit_fast_path_rms": fast_path_rms,  # RMs whose plan the cut changed
        "instructed_kw_before_limit": round(before_w / 1000, 1),
        "limit_replan_s": round(limit_replan_s, 3),
        "limit_plan_status": limit_plan.status,
        "limit_lp_solved": limit_plan.lp_solved,  # then no follow-up: the LP has nothing to add
        "limit_gap": None if limit_plan.gap is None else round(limit_plan.gap, 5),
        "limit_bound": _bound(limit_plan),
        # the follow-up replans after it, the last one's gap, and from the limit to a plan
        # within 1 % of its bound (each follow-up's wait of the site's minimum interval counted)
        "limit_follow_ups": len(follow_up_s),
        "limit_gap_final": None if final.gap is None else round(final.gap, 5),
        "limit_within_1pct_s": None if within_s is None else round(within_s, 3),
        "cold_bound": _bound(cold),
        "rms_acked_new_limit": len(acks),
        "rm_refusals": len(registry.rm_refusals),
    }


class FullCollections:
    """A `gc.callbacks` entry noting each full collection (generation 2): when, how long."""

    def __init__(self) -> None:
        self.full: list[tuple[float, float]] = []  # (perf_counter at start, seconds)
        self.windows: list[tuple[float, float]] = []  # the timed replans (start, end)
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.full.append((self._began, time.perf_counter() - self._began))

    def inside(self) -> list[float]:
        """The seconds of each full collection that began inside a timed replan."""
        return [s for at, s in self.full if any(a <= at <= b for a, b in self.windows)]


def _within_1pct(plan: Plan) -> bool:
    """Whether `plan` is within 1 % of its bound (False without one), as the controller's
    follow-up replans judge it."""
    from cem.control.mpc import FOLLOW_UP_GAP
    return plan.gap is not None and plan.gap <= FOLLOW_UP_GAP


def p99(values: list[float]) -> float | None:
    """The 99th percentile of sorted `values` (nearest rank below), None for none."""
    return round(values[int(0.99 * (len(values) - 1))], 3) if values else None


def limit_kept(totals: list[tuple[float, float]], limit_at: float, limit_w: float,
               before_w: float) -> tuple[float | None, float]:
    """From the site's instructed power before the limit (`before_w`) and after each OK:
    seconds from the limit until it was at most `limit_w` for good (None: it ended above),
    and the most it went above the limit again after first keeping it (kW)."""
    kept: float | None = 0.0 if before_w <= limit_w + 1.0 else None
    first_kept = kept is not None
    over_w = 0.0
    for at, total in totals:
        if total > limit_w + 1.0:
            if first_kept:
                over_w = max(over_w, total - limit_w)
            kept = None
        elif kept is None:
            kept = at - limit_at
            first_kept = True
    return (None if kept is None else round(kept, 3)), round(over_w / 1000, 1)


def _bound(plan: Plan) -> str | None:
    """What a plan's gap is against: "LP" (its optimum), "prices" (row prices), "EVs" (the
    EVs' own problems at site-row prices) or None (no bound)."""
    if plan.lp_bound_eur is None:
        return None
    return plan.bound_from or ("LP" if plan.lp_solved else "prices")


def bench_command(*, evs: int, replans: int, json_out: bool,
                  time_limit_s: float | None = None, warmup: int = 0) -> None:
    """Run with and without the garbage-collector freeze; print a table or JSON. `warmup`
    replans after the cold start are not timed (steady state: the LP has caught up)."""
    import logging

    logging.getLogger("cem").setLevel(logging.WARNING)
    results = [asyncio.run(measure(evs, replans, gc_freeze=freeze, time_limit_s=time_limit_s,
                                   warmup=warmup))
               for freeze in (True, False)]
    if json_out:
        print(json.dumps({"runs": results}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cem bench replan: {evs} EV chargers, {replans} replans, "
                        f"planner.time_limit_s {results[0]['time_limit_s']:g}")
    for column in ("gc freeze (as cem run)", "replan p50", "replan max", "planner alone p50",
                   "gap max", "loop lag p99", "loop lag max", "plan", "limit to ack p99",
                   "limit to replan ack p99", "limit kept"):
        table.add_column(column, justify="right")
    for r in results:
        gap = "-" if r["gap_max"] is None else f"{r['gap_max']:.2%}"
        ack = "-" if r["limit_to_ack_p99_s"] is None else f"{r['limit_to_ack_p99_s']:.2f} s"
        replan_ack = "-" if r["limit_to_replan_ack_p99_s"] is None \
            else f"{r['limit_to_replan_ack_p99_s']:.2f} s"
        kept = "-" if r["limit_kept_s"] is None else f"{r['limit_kept_s']:.2f} s"
        table.add_row("yes" if r["gc_freeze"] else "no", f"{r['replan_p50_s']:.2f} s",
                      f"{r['replan_max_s']:.2f} s", f"{r['solve_p50_s']:.2f} s", gap,
                      f"{r['loop_lag_p99_ms']} ms", f"{r['loop_lag_max_ms']} ms",
                      ", ".join(r["plan_status"]), ack, replan_ack, kept)
    Console().print(table)
