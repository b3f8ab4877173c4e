"""`cem bench faults`: a fault campaign, on the digital twin and on the demo site, with figures.

Each fault runs once on a site that is otherwise the same as a run without faults (the
baseline, measured in the same campaign), and is measured where it counts, never on a plan:

- **fuse minutes**: minutes any phase carried more than the fuse (the twin's per-minute
  physics; the demo's simulated grid meter);
- **PTUs over the GTV**: settled 15-minute averages of import above the GTV or congestion limit;
- **energy not delivered**: EV energy of the baseline minus that of the faulted run (kWh). The
  demo runs its baseline first and last and takes their mean: their difference is the demo's
  own run-to-run spread (EVs that find every EVSE busy drive on, and which do depends on
  timing), of the order of the faults' effect; the twin varies only with the solver's time
  limit (a kWh or two of 500);
- **back to a normal plan**: from the end of the fault to the first plan that is optimised (not
  the rule-based safe plan), covers every RM the site has and has the day-ahead prices (minutes
  of the site's clock; the twin replans at PTU starts, so 15-minute steps there). Faults of a
  moment on the demo (the S2 sessions dropped, the CEM restarted: the RMs come back by
  themselves) count from that moment. None: not within the run.

The faults (`FAULTS`): RMs that disconnect and come back, a grid meter that goes silent or
stale, a solver that times out, instructions acknowledged late or refused, prices missing, the
CEM restarted in the middle of a PTU.

**On the twin** (`cem.simulation.twin`: the live `SiteController` over in-process S2 sessions of
OCPP-charger RMs, one real day of ACN Caltech sessions on a site whose GTV and fuse bind) a
fault changes what the simulated RMs, meter, solver or price feed do for `TWIN_FAULT_PTUS` PTUs
from `TWIN_FAULT_AT_PTU`. **On the demo site** (`cem demo`: CEM, OCPP chargers and Modbus
devices over the real protocols on loopback, 1440x) a fault is made on the real parts: the
CEM drops the EV chargers' S2 sessions, the grid meter's Modbus simulator stops or freezes,
the control loop's solver raises a timeout, the chargers answer the CEM's instructions late or
refuse their charging profiles, the price feed publishes nothing, the CEM service is stopped
and started again on its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("cem.app.bench_faults")

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"

FAULTS: dict[str, str] = {
    "rm_disconnect": "EV charger RMs disconnect and come back",
    "meter_silent": "grid meter goes silent",
    "meter_stale": "grid meter reports stale values",
    "solver_timeout": "solver times out",
    "instructions_late": "instructions acknowledged late",
    "instructions_refused": "instructions refused",
    "prices_missing": "day-ahead prices missing",
    "cem_restart": "CEM restarted mid-PTU",
}

# --- the twin's run -------------------------------------------------------------------------------

TWIN_SITE = ROOT / "specs" / "sites" / "acn-caltech.toml"
TWIN_SESSIONS = DATA / "acn_caltech_2019-10-01_2019-10-21.csv"
TWIN_PRICES = DATA / "nl_day_ahead_2019-10.csv"
TWIN_PV = DATA / "nl_pv_per_kwp_2019-10.csv"
TWIN_DAY = date(2019, 10, 8)
TWIN_GTV_KW = 60.0      # the Caltech garage's 38 visits that day draw 73 kW uncontrolled
TWIN_FUSE_A = 100.0
TWIN_FAULT_AT_PTU = 32  # 08:00 local: the morning arrivals
TWIN_FAULT_PTUS = 8     # two hours
TWIN_RESTART_MINUTE = 7  # the CEM restarts 7 minutes into its PTU

# --- the demo's run ---------------------------------------------------------------------------

DEMO_SPEED = 1440.0
DEMO_HOURS = 10.0        # 06:00 - 16:00 simulated
DEMO_FAULT_AT_H = 3.0    # 09:00
DEMO_FAULT_H = 1.0
DEMO_LATE_WALL_S = 1.0   # instructions answered a wall second late: 24 simulated minutes


@dataclass
class PlanMark:
    """One plan the control loop made, as the campaign judges it."""

    at: datetime
    status: str
    rms: int
    prices: bool

    def normal(self, expected_rms: int) -> bool:
        return self.status != "FALLBACK" and self.rms >= expected_rms and self.prices


@dataclass
class FaultResult:
    """What one run measured."""

    where: str
    fault: str
    what: str
    fuse_minutes_over: float
    ptus_over_gtv: int
    ev_kwh: float
    energy_not_delivered_kwh: float | None = None
    back_to_normal_min: float | None = None
    fallback_plans: int = 0
    plans: int = 0
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def recovery_minutes(marks: list[PlanMark], after: datetime, expected_rms: int) -> float | None:
    """Minutes from `after` to the first normal plan at or after it (None: none in the run)."""
    for mark in marks:
        if mark.at >= after and mark.normal(expected_rms):
            return round((mark.at - after).total_seconds() / 60, 1)
    return None


def watch_plans(controller: Any, marks: list[PlanMark], rms: Callable[[], int],
                clock: Callable[[], datetime]) -> None:
    """Record every plan the controller makes (wraps its `replan`)."""
    original = controller.replan

    async def replan(reasons: list[str]) -> Any:
        plan = await original(reasons)
        marks.append(PlanMark(clock(), str(plan.status), rms(),
                              controller.board.price_curve() is not None))
        return plan

    controller.replan = replan


# =====================================================================================
# the twin
# =====================================================================================


def twin_inputs(ptus: int | None = None) -> Any:
    """The twin's day: Caltech's visits of 2019-10-08 on the Caltech site, limits that bind."""
    from cem.app.site_file import load_site_file
    from cem.simulation.inputs import load_inputs

    site = load_site_file(TWIN_SITE)
    site.grid.import_limit_kw = TWIN_GTV_KW
    site.grid.export_limit_kw = TWIN_GTV_KW
    site.grid.fuse_a = TWIN_FUSE_A
    inputs = load_inputs(site, TWIN_SESSIONS, TWIN_PRICES, TWIN_PV, TWIN_DAY, 1, 30.0,
                         ocpp=site.ocpp)
    if ptus is not None and ptus < inputs.n_ptus:
        inputs = dataclasses.replace(inputs, n_ptus=ptus)
    return inputs


class FaultyTwin:
    """The twin's level 5 (`LiveControlLoop`) with one fault injected between two PTUs."""

    def __init__(self, inputs: Any, fault: str | None, *, time_limit_s: float,
                 at_ptu: int = TWIN_FAULT_AT_PTU, ptus: int = TWIN_FAULT_PTUS) -> None:
        from cem.simulation.levels import MPC_GAP_TOL, site_planner
        from cem.simulation.twin import LiveControlLoop

        self.inputs = inputs
        self.fault = fault
        self.start = at_ptu
        self.end = at_ptu + (0 if fault == "cem_restart" else ptus)
        self.loop = LiveControlLoop(inputs, site_planner(MPC_GAP_TOL), time_limit_s, 2)
        self.name = self.loop.name
        self.replan_s = self.loop.replan_s
        self.notes = self.loop.notes
        self.marks: list[PlanMark] = []
        self._devices = [*self.loop.evses.values(), self.loop.meter,
                         *([self.loop.pv] if self.loop.pv else [])]
        self.expected_rms = len(self._devices)
        self._late: list[tuple[Any, str, str | None]] = []
        self._frozen: list[float] | None = None
        self._saved_solve = self.loop._solve
        self._watch()
        self.loop.registry.feed = self._feed  # type: ignore[method-assign]
        self.loop._measure_grid = self._measure_grid  # type: ignore[method-assign]
        self.loop._solve = self._solve  # type: ignore[method-assign]
        self.loop.controller.solver = self._solve

    # the engine's Controller interface ---------------------------------------------------------

    def setpoints(self, t: int, present: np.ndarray, state: Any) -> np.ndarray:
        if self.fault is not None:
            if t == self.start:
                self._begin(t)
            elif t == self.end and self.end != self.start:
                self._finish(t)
            elif self.start < t < self.end and self.fault == "instructions_late":
                self._deliver_late()
        return self.loop.setpoints(t, present, state)

    def close(self) -> None:
        self.loop.close()

    @property
    def statuses(self) -> dict[str, int]:
        return self.loop.statuses

    # faults ------------------------------------------------------------------------------------

    def _watch(self) -> None:
        loop = self.loop
        watch_plans(loop.controller, self.marks, lambda: len(loop.registry.rms()),
                    lambda: loop.now)

    def _in_window(self) -> bool:
        t = self._ptu()
        return self.start <= t < self.end

    def _ptu(self) -> int:
        return int((self.loop.now - self.inputs.t0).total_seconds()
                   // (self.inputs.ptu_minutes * 60))

    def _begin(self, t: int) -> None:
        loop, fault = self.loop, self.fault
        now = self.inputs.ptu_start(t)
        loop.now = now
        if fault == "rm_disconnect":
            for device in loop.evses.values():
                self._disconnect(device, "fault campaign: connection dropped")
        elif fault == "meter_stale":
            phase_w = np.zeros(3)
            for device in loop.evses.values():
                phase_w += device.power_w()
            self._frozen = list(phase_w - float(self.inputs.pv_w[max(0, t - 1)]) / 3.0)
        elif fault == "instructions_refused":
            for device in loop.evses.values():
                device.receive = _refusing(device.receive)  # type: ignore[method-assign]
        elif fault == "instructions_late":
            loop.registry._deliver = self._late_deliver  # type: ignore[method-assign]
        elif fault == "prices_missing":
            from cem.ports import PriceCurve, SignalUpdate

            loop.controller.publish(SignalUpdate(
                source="twin", reason="fault campaign: the price feed lost its prices",
                prices=PriceCurve(points=(), resolution=timedelta(minutes=15), source="twin")))
        elif fault == "cem_restart":
            self._restart(t)

    def _finish(self, t: int) -> None:
        loop, fault = self.loop, self.fault
        loop.now = self.inputs.ptu_start(t)
        if fault == "rm_disconnect":
            for device in loop.evses.values():
                self._reconnect(device)
        elif fault == "meter_stale":
            self._frozen = None
        elif fault == "instructions_refused":
            for device in loop.evses.values():
                with contextlib.suppress(AttributeError):
                    del device.receive
        elif fault == "instructions_late":
            self._deliver_late()
            with contextlib.suppress(AttributeError):
                del loop.registry._deliver
        elif fault == "prices_missing":
            self._publish_prices()

    def _measure_grid(self, t: int) -> None:
        if self.fault == "meter_silent" and self._in_window():
            return  # the meter says nothing: the guard only has the RMs' own measurements
        if self.fault == "meter_stale" and self._in_window() and self._frozen is not None:
            self.loop.meter.measure(list(self._frozen), self.loop.now)
            return
        type(self.loop)._measure_grid(self.loop, t)

    def _solve(self, problem: Any, *, time_limit_s: float, workers: int) -> Any:
        if self.fault == "solver_timeout" and self._in_window():
            self.loop.replan_s.append(time_limit_s)
            raise TimeoutError("fault campaign: the solver ran out of time")
        return self._saved_solve(problem, time_limit_s=time_limit_s, workers=workers)

    def _feed(self, rm_id: str, message: Any) -> None:
        """A message from an RM reaches the CEM only while the RM is connected."""
        registry = self.loop.registry
        if rm_id in registry.entries:
            type(registry).feed(registry, rm_id, message)

    def _disconnect(self, device: Any, reason: str) -> None:
        from cem.ports import Disconnected

        registry = self.loop.registry
        entry = registry.entries.pop(device.rm_id, None)
        if entry is None:
            return
        for queue in registry._queues:
            queue.put_nowait(Disconnected(entry.connection_id, device.rm_id, reason))
        # its messages go nowhere (`_feed`); the charger keeps the limit it has

    def _reconnect(self, device: Any) -> None:
        device._shape = device._sent_level = device._sent_power = None
        device._limit_told = False
        self.loop.registry.connect(device)

    def _late_deliver(self, entry: Any, text: str, message_id: str | None) -> Any:
        """Instructions reach the RM only at the next PTU start; meanwhile no ReceptionStatus
        (the dispatcher sees a timeout)."""
        from cem.ports import InstructionResult

        if '"FRBC.Instruction"' in text and message_id is not None:
            self._late.append((entry, text, message_id))
            return InstructionResult(entry.rm_id, message_id, "TIMEOUT",
                                     "no ReceptionStatus in time (fault campaign)")
        return type(self.loop.registry)._deliver(self.loop.registry, entry, text, message_id)

    def _deliver_late(self) -> None:
        late, self._late = self._late, []
        registry = self.loop.registry
        for entry, text, message_id in late:
            if entry.rm_id in registry.entries:
                type(registry)._deliver(registry, entry, text, message_id)

    def _publish_prices(self) -> None:
        from cem.signals import price_update
        from cem.simulation.twin import TwinPrices

        prices = TwinPrices(self.inputs)
        self.loop.controller.publish(price_update(
            prices, self.inputs.t0, self.inputs.ptu_start(len(prices.wholesale)), name="twin",
            reason="fault campaign: prices are back"))

    def _restart(self, t: int) -> None:
        """Stop the controller 7 minutes into PTU t-1; a new one starts with fresh sessions."""
        from cem.control.mpc import SiteController

        loop = self.loop
        old = loop.controller
        moment = self.inputs.ptu_start(max(0, t - 1)) + timedelta(minutes=TWIN_RESTART_MINUTE)
        loop.now = moment
        loop.loop.run_until_complete(old.stop())
        loop.registry.unsubscribe(loop.queue)
        for device in self._devices:  # every RM sees its session end and connects again
            loop.registry.entries.pop(device.rm_id, None)
        for evse in loop.evses.values():
            evse._shape = evse._sent_level = evse._sent_power = None
            evse._limit_told = False
        loop.controller = SiteController(old.config, loop.registry, solver=loop._solve,
                                         clock=lambda: loop.now, monotonic=loop._virtual_seconds)
        self._publish_prices()
        self._watch()
        loop.queue = loop.registry.subscribe()
        for device in self._devices:
            loop.registry.connect(device)
        self.restarted_at = moment
        # the restarted CEM plans at once, for the minutes left of this PTU
        for device in loop.evses.values():
            device.tell(moment)
        loop.loop.run_until_complete(self._first_plan())

    async def _first_plan(self) -> None:
        await self.loop._pump()
        await self.loop.controller.replan(["the CEM started", *self.loop.controller.take_reasons()])


def _refusing(receive: Callable[..., Any]) -> Callable[..., Any]:
    def refuse(text: str, now: datetime) -> Any:
        if '"FRBC.Instruction"' in text:
            return "TEMPORARY_ERROR", "charger busy (fault campaign)", []
        return receive(text, now)

    return refuse


def run_twin(faults: list[str], *, ptus: int | None = None, time_limit_s: float = 0.5,
             progress: Callable[[str], None] | None = None) -> list[FaultResult]:
    """The baseline and every fault on the twin; the baseline first."""
    from cem.simulation.engine import run_level
    from cem.simulation.kpis import level_kpis
    from cem.simulation.twin import quiet_control_logs

    inputs = twin_inputs(ptus)
    results: list[FaultResult] = []
    for fault in [None, *faults]:
        if progress is not None:
            progress(f"twin: {FAULTS.get(fault or '', 'baseline (no fault)')}")
        began = time.perf_counter()
        twin = FaultyTwin(inputs, fault, time_limit_s=time_limit_s)
        with quiet_control_logs():
            run = run_level(inputs, twin)
        kpis = level_kpis(inputs, run, None)
        result = FaultResult(
            where="twin", fault=fault or "none", what=FAULTS.get(fault or "", "no fault"),
            fuse_minutes_over=float(kpis["fuse_minutes_over"]),
            ptus_over_gtv=int(kpis["ptus_over_gtv"]), ev_kwh=float(kpis["delivered_kwh"]),
            fallback_plans=sum(1 for m in twin.marks if m.status == "FALLBACK"),
            plans=len(twin.marks), wall_s=round(time.perf_counter() - began, 1))
        if fault is not None:
            after = getattr(twin, "restarted_at", None) or inputs.ptu_start(twin.end)
            result.back_to_normal_min = recovery_minutes(twin.marks, after, twin.expected_rms)
        results.append(result)
    return _against_baseline(results)


def _against_baseline(results: list[FaultResult]) -> list[FaultResult]:
    """Energy not delivered: the baselines' mean EV energy minus each run's (a baseline run's
    own figure is its distance from that mean: the run-to-run spread)."""
    bases = [r.ev_kwh for r in results if r.fault == "none"]
    if bases:
        mean = sum(bases) / len(bases)
        for r in results:
            r.energy_not_delivered_kwh = round(mean - r.ev_kwh, 1)
    return results


# =====================================================================================
# the demo site
# =====================================================================================


class DemoFaults:
    """Makes one fault on the running demo site at its simulated time (`tick`, every 0.25 s
    of wall time from `run_demo`), and keeps the plans the control loop makes."""

    def __init__(self, fault: str | None, start: datetime, end: datetime) -> None:
        self.fault = fault
        self.start = start
        self.end = start if fault in INSTANT_DEMO_FAULTS else end
        self.marks: list[PlanMark] = []
        self.state = "before"
        self.began_at: datetime | None = None
        self.ended_at: datetime | None = None
        self.expected_rms = 0
        self.notes: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watched: set[int] = set()
        self._saved: dict[str, Any] = {}

    def tick(self, demo: Any) -> None:
        from sitekit import clock

        self._watch(demo)
        now = clock.now()
        self.expected_rms = max(self.expected_rms, len(demo.rm_rows()))
        if self.fault is None:
            return
        if self.state == "before" and now >= self.start:
            self.state = "on"
            self.began_at = now
            self._spawn(self._begin(demo))
        elif self.state == "on" and now >= self.end and not self._tasks:
            self.state = "after"
            self.ended_at = now
            self._spawn(self._finish(demo))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.notes.append(f"the fault action failed: {t.exception()!r}")

        task.add_done_callback(done)

    def _watch(self, demo: Any) -> None:
        from sitekit import clock

        controller = demo.controller
        server = demo.service.server if demo.service is not None else None
        if controller is None or server is None or id(controller) in self._watched:
            return
        self._watched.add(id(controller))
        watch_plans(controller, self.marks, lambda: len(server.rms()), clock.now)

    async def _begin(self, demo: Any) -> None:
        fault = self.fault
        server = demo.service.server
        if fault == "rm_disconnect":
            evse_rms = [rm_id for rm_id, entry in server.rms().items()
                        if (entry.name or "").startswith("EV charger")]
            await asyncio.gather(*(server.disconnect(rm_id, "fault campaign: connection dropped")
                                   for rm_id in evse_rms))
            self.notes.append(f"{len(evse_rms)} EV charger RMs disconnected; they reconnect "
                              "by themselves")
        elif fault == "meter_silent":  # no answers; its physics (the ground truth) goes on
            _meter(demo).simulator.answer_delay_s = 3600.0
        elif fault == "meter_stale":
            sim = _meter(demo).simulator
            sim.overrides = {name: value for name, value in sim.values.items()
                             if name.startswith(("power", "current", "voltage"))}
        elif fault == "solver_timeout":
            controller = demo.controller
            self._saved["solver"] = controller.solver

            def timeout(*_: Any, **__: Any) -> Any:
                raise TimeoutError("fault campaign: the solver ran out of time")

            controller.solver = timeout
        elif fault == "instructions_late":
            for resource in demo.csms.s2.resources.values():
                resource.answer_delay_s = DEMO_LATE_WALL_S
        elif fault == "instructions_refused":
            for station in demo.stations:
                station.reject_profiles = True
        elif fault == "prices_missing":
            from cem.ports import PriceCurve, SignalUpdate

            board = demo.controller.board
            curve = board.price_curve()
            source = curve.source if curve is not None else "prices"
            self._saved["prices"] = board.updates.get(source)
            demo.controller.publish(SignalUpdate(
                source=source, reason="fault campaign: the price feed lost its prices",
                prices=PriceCurve(points=(), resolution=timedelta(minutes=15), source=source)))
        elif fault == "cem_restart":
            await self._restart(demo)

    async def _finish(self, demo: Any) -> None:
        fault = self.fault
        if fault == "meter_silent":
            _meter(demo).simulator.answer_delay_s = 0.0
        elif fault == "meter_stale":
            _meter(demo).simulator.overrides = {}
        elif fault == "solver_timeout":
            demo.controller.solver = self._saved["solver"]
        elif fault == "instructions_late":
            for resource in demo.csms.s2.resources.values():
                resource.answer_delay_s = 0.0
        elif fault == "instructions_refused":
            for station in demo.stations:
                station.reject_profiles = False
        elif fault == "prices_missing" and self._saved.get("prices") is not None:
            demo.controller.publish(dataclasses.replace(
                self._saved["prices"], reason="fault campaign: prices are back"))

    async def _restart(self, demo: Any) -> None:
        from cem.app.service import CemService

        old = demo.service
        port = old.server.port
        factory = old._controller_factory
        await old.stop("fault campaign: CEM restarted")
        # a replan the old CEM finished while it stopped is no plan of the restarted one
        assert self.began_at is not None
        self.marks[:] = [m for m in self.marks if m.at < self.began_at]
        demo.site.server.port = port  # the RMs come back to the address they know
        service = CemService(demo.site, controller_factory=factory)
        await service.start()
        demo.service = service
        self._watch(demo)


INSTANT_DEMO_FAULTS = ("rm_disconnect", "cem_restart")
"""Faults that happen at one moment on the demo (the RMs come back by themselves): their
recovery is measured from that moment."""


def _meter(demo: Any) -> Any:
    return next(d for d in demo.modbus.devices if d.plan.device == "meter")


async def _demo_once(fault: str | None, site: Any, settings: Any, fault_at_h: float,
                     fault_h: float, folder: Path) -> FaultResult:
    from cem.app.demo import _prepare_report, run_demo

    _prepare_report(folder)
    site.store.path = folder / "cem-demo.db"
    site.ocpp.database = folder / "ocpp-demo.db"
    start = settings.start + timedelta(hours=fault_at_h)
    faults = DemoFaults(fault, start, start + timedelta(hours=fault_h))
    began = time.perf_counter()
    demo = await run_demo(site, settings, on_tick=faults.tick)
    recorder = demo.recorder
    totals = recorder.totals()
    result = FaultResult(
        where="demo", fault=fault or "none", what=FAULTS.get(fault or "", "no fault"),
        fuse_minutes_over=round(float(totals["over_fuse_minutes"]), 1),
        ptus_over_gtv=int(totals["ptus_over_limit"]),
        ev_kwh=round(float(recorder.energy_wh.get("EV chargers", np.zeros(1)).sum()) / 1000, 1),
        fallback_plans=sum(1 for m in faults.marks if m.status == "FALLBACK"),
        plans=len(faults.marks), notes=faults.notes,
        wall_s=round(time.perf_counter() - began, 1))
    if fault is not None:
        after = faults.began_at if fault in INSTANT_DEMO_FAULTS else faults.ended_at
        if after is not None:
            result.back_to_normal_min = recovery_minutes(faults.marks, after,
                                                         faults.expected_rms)
        else:
            result.notes.append("the fault's time was not reached")
    return result


def run_demo_campaign(faults: list[str], *, hours: float = DEMO_HOURS,
                      fault_at_h: float = DEMO_FAULT_AT_H, fault_h: float = DEMO_FAULT_H,
                      progress: Callable[[str], None] | None = None,
                      log_folder: Path | None = None,
                      repeat_baseline: bool = True) -> list[FaultResult]:
    """The baseline and every fault on the demo site (real protocols), each a fresh demo; the
    baseline once more at the end (the demo's own run-to-run spread shows in the two)."""
    from cem.app.demo import (
        SOURCE_DEMO,
        _configure_logging,
        process_clock,
        settings_for,
        with_demo_prices,
    )
    from cem.app.site_file import load_site_file

    results = []
    with tempfile.TemporaryDirectory(prefix="cem-faults-") as tmp:
        base = log_folder or Path(tmp)
        again = [None] if faults and repeat_baseline else []
        for number, fault in enumerate([None, *faults, *again]):
            if progress is not None:
                progress(f"demo: {FAULTS.get(fault or '', 'baseline (no fault)')}")
            folder = base / f"{number:02d}-{fault or 'baseline'}"
            folder.mkdir(parents=True, exist_ok=True)
            _configure_logging(folder)
            site = with_demo_prices(load_site_file(SOURCE_DEMO))
            settings = settings_for(site, duration=hours * 3600 / DEMO_SPEED, speed=DEMO_SPEED,
                                    report=folder)
            with process_clock(settings):
                results.append(asyncio.run(_demo_once(fault, site, settings, fault_at_h,
                                                      fault_h, folder)))
    return _against_baseline(results)


# =====================================================================================
# the command
# =====================================================================================


def parse_faults(text: str | None) -> list[str]:
    """`--faults a,b` -> the faults named (all when none are)."""
    if not text:
        return list(FAULTS)
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [w for w in wanted if w not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; use any of "
                         f"{', '.join(FAULTS)}")
    return wanted


def parse_where(text: str) -> list[str]:
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [w for w in wanted if w not in ("twin", "demo")]
    if unknown or not wanted:
        raise ValueError(f"--where {text!r}: use twin, demo or twin,demo")
    return wanted


def campaign(where: list[str], faults: list[str], *, twin_ptus: int | None = None,
             demo_hours: float = DEMO_HOURS,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the campaign; the figures as one JSON-ready dict."""
    results: list[FaultResult] = []
    if "twin" in where:
        results += run_twin(faults, ptus=twin_ptus, progress=progress)
    if "demo" in where:
        results += run_demo_campaign(faults, hours=demo_hours, progress=progress)
    return {
        "faults": {name: FAULTS[name] for name in faults},
        "twin": {"site": f"{TWIN_SITE.name}, GTV {TWIN_GTV_KW:g} kW, fuse {TWIN_FUSE_A:g} A",
                 "day": TWIN_DAY.isoformat(),
                 "fault_window": f"PTU {TWIN_FAULT_AT_PTU} for {TWIN_FAULT_PTUS} PTUs "
                                 "(a restart: 7 minutes into the PTU before)"}
        if "twin" in where else None,
        "demo": {"speed": DEMO_SPEED, "hours": demo_hours,
                 "fault_window": f"{DEMO_FAULT_AT_H:g} h after the start for {DEMO_FAULT_H:g} h"}
        if "demo" in where else None,
        "runs": [asdict(r) for r in results],
    }


def bench_command(*, where: str, faults: str | None, json_out: bool,
                  twin_ptus: int | None = None, demo_hours: float = DEMO_HOURS) -> None:
    """`cem bench faults`: print the table, or the JSON object with `--json`."""
    import typer
    from rich.console import Console
    from rich.table import Table

    from cem.app.json_stdout import prints_to_stderr

    err = Console(stderr=True)
    try:
        places, chosen = parse_where(where), parse_faults(faults)
    except ValueError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    logging.getLogger("cem").setLevel(logging.WARNING)
    with prints_to_stderr():
        figures = campaign(places, chosen, twin_ptus=twin_ptus, demo_hours=demo_hours,
                           progress=lambda text: err.print(f"[dim]{text}[/]"))
    if json_out:
        print(json.dumps(figures, indent=2, default=str))
        return
    table = Table(title="cem bench faults")
    for column in ("site", "fault", "fuse min over", "PTUs over GTV", "EV kWh",
                   "kWh not delivered", "back to normal plan", "safe plans"):
        table.add_column(column, justify="left" if column in ("site", "fault") else "right")
    for run in figures["runs"]:
        back = run["back_to_normal_min"]
        table.add_row(run["where"], run["what"], f"{run['fuse_minutes_over']:g}",
                      str(run["ptus_over_gtv"]), f"{run['ev_kwh']:.1f}",
                      "" if run["fault"] == "none" else f"{run['energy_not_delivered_kwh']:+.1f}",
                      "" if run["fault"] == "none" else
                      ("not in the run" if back is None else f"{back:g} min"),
                      f"{run['fallback_plans']} of {run['plans']}")
    Console().print(table)

