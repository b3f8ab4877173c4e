"""The MPC loop against a fake registry holding real S2 sessions, and a real SQLite store.

The registry records every message the controller sends (after the real session accepted it)
and feeds session events to the controller as the S2 server would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from s2python.common import (
    CommodityQuantity,
    ControlType,
    EnergyManagementRole,
    Handshake,
    InstructionStatus,
    InstructionStatusUpdate,
    NumberRange,
    PowerMeasurement,
    PowerRange,
    PowerValue,
    ResourceManagerDetails,
    Role,
    RoleType,
)
from s2python.frbc import (
    FRBCActuatorDescription,
    FRBCActuatorStatus,
    FRBCOperationMode,
    FRBCOperationModeElement,
    FRBCStorageDescription,
    FRBCStorageStatus,
    FRBCSystemDescription,
)
from s2python.generated.gen_s2 import Commodity

from cem.app.congestion_cli import add_congestion_command
from cem.control.mpc import SiteController, coalesce_measurements
from cem.ports import (
    ControlTypeSelected,
    Disconnected,
    InstructionResult,
    RmEvent,
    StateChanged,
)
from cem.s2.session import S2Session
from cem.signals import PriceFeed, StoreCongestion
from cem.site.config import SiteConfig
from cem.store import Store
from sitekit import clock as process_clock

L = CommodityQuantity
SYM = L.ELECTRIC_POWER_3_PHASE_SYMMETRIC


def uid() -> str:
    return str(uuid.uuid4())


def now() -> datetime:
    """Now on the process clock, which the CEM also reads (a test may run it simulated)."""
    return process_clock.now()


@dataclass
class Entry:
    rm_id: str
    session: S2Session
    name: str

    @property
    def state(self) -> Any:
        return self.session.state


class FakeRegistry:
    """The S2 server's registry API with real sessions and no sockets."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.queue: asyncio.Queue[Any] | None = None
        self.sent: list[tuple[str, Any, float]] = []  # (rm_id, message, monotonic time)
        self.refuse: set[str] = set()

    def rms(self) -> dict[str, Entry]:
        return dict(self.entries)

    def get(self, rm_id: str) -> Entry | None:
        return self.entries.get(rm_id)

    def subscribe(self) -> asyncio.Queue[Any]:
        self.queue = asyncio.Queue()
        return self.queue

    def unsubscribe(self, queue: Any) -> None:
        self.queue = None

    async def send_instruction(self, rm_id: str, message: Any, *, plan_id: int | None = None,
                               timeout_s: float | None = None) -> InstructionResult:
        entry = self.entries.get(rm_id)
        if entry is None:
            return InstructionResult(rm_id, None, "NOT_CONNECTED")
        entry.session.send(message, now())  # raises if the session would not send it
        self.sent.append((rm_id, message, time.monotonic()))
        status = "INVALID_CONTENT" if rm_id in self.refuse else "OK"
        return InstructionResult(rm_id, str(message.message_id), status,
                                 "test refusal" if rm_id in self.refuse else None)

    def feed(self, rm_id: str, message: Any) -> None:
        entry = self.entries[rm_id]
        outs = entry.session.receive(message.to_json(), now())
        for out in outs:
            if out.message_type == "ReceptionStatus":
                assert json.loads(out.text)["status"] == "OK", out.text
        self.publish(rm_id, entry.session)

    def publish(self, rm_id: str, session: S2Session) -> None:
        for event in session.drain_events():
            if self.queue is not None:
                self.queue.put_nowait(RmEvent(rm_id, "c-" + rm_id, event, now()))

    def connect(self, rm_id: str, name: str, control_types: list[ControlType],
                measures: list[CommodityQuantity],
                roles: tuple[RoleType, ...] = (RoleType.ENERGY_CONSUMER,)) -> None:
        session = S2Session()
        session.start(now())
        self.entries[rm_id] = Entry(rm_id, session, name)
        self.feed(rm_id, Handshake(message_id=uid(), role=EnergyManagementRole.RM,
                                   supported_protocol_versions=["0.0.2-beta"]))
        self.feed(rm_id, ResourceManagerDetails(
            message_id=uid(), resource_id=uid(), name=name,
            roles=[Role(role=role, commodity=Commodity.ELECTRICITY) for role in roles],
            instruction_processing_delay=100, available_control_types=control_types,
            provides_forecast=False, provides_power_measurement_types=measures))

    def disconnect(self, rm_id: str) -> None:
        self.entries.pop(rm_id)
        assert self.queue is not None
        self.queue.put_nowait(Disconnected("c-" + rm_id, rm_id, "connection closed"))

    def sent_to(self, rm_id: str, message_type: str) -> list[Any]:
        return [m for r, m, _ in self.sent if r == rm_id and m.message_type == message_type]


class EvRm:
    """An EV behind an FRBC RM: 6 A minimum (4140 W) to 32 A (22080 W) on 3 phases."""

    def __init__(self, registry: FakeRegistry, rm_id: str, soc: float = 20.0) -> None:
        self.registry, self.rm_id = registry, rm_id
        registry.connect(rm_id, f"EV charger {rm_id}", [ControlType.FILL_RATE_BASED_CONTROL],
                         [SYM])
        rate = 22080 / 60000 * 100 / 3600
        self.off = self._mode((0, 0), (0, 0))
        self.charge = self._mode((4140, 22080), (4140 / 22080 * rate, rate))
        self.actuator = FRBCActuatorDescription(
            id=uid(), supported_commodities=[Commodity.ELECTRICITY], transitions=[], timers=[],
            operation_modes=[self.off, self.charge])
        registry.feed(rm_id, FRBCSystemDescription(
            message_id=uid(), valid_from=now() - timedelta(seconds=1), actuators=[self.actuator],
            storage=FRBCStorageDescription(
                diagnostic_label="EV", fill_level_label="SoC %", provides_leakage_behaviour=False,
                provides_fill_level_target_profile=True, provides_usage_forecast=False,
                fill_level_range=NumberRange(start_of_range=0, end_of_range=100))))
        registry.feed(rm_id, FRBCStorageStatus(message_id=uid(), present_fill_level=soc))
        registry.feed(rm_id, FRBCActuatorStatus(message_id=uid(), actuator_id=str(self.actuator.id),
                                                active_operation_mode_id=str(self.off.id),
                                                operation_mode_factor=0))

    @staticmethod
    def _mode(power: tuple[float, float], rate: tuple[float, float]) -> FRBCOperationMode:
        return FRBCOperationMode(id=uid(), abnormal_condition_only=False, elements=[
            FRBCOperationModeElement(
                fill_level_range=NumberRange(start_of_range=0, end_of_range=100),
                fill_rate=NumberRange(start_of_range=rate[0], end_of_range=rate[1]),
                power_ranges=[PowerRange(start_of_range=power[0], end_of_range=power[1],
                                         commodity_quantity=SYM)])])

    def measure(self, watts: float) -> None:
        self.registry.feed(self.rm_id, PowerMeasurement(
            message_id=uid(), measurement_timestamp=now(),
            values=[PowerValue(commodity_quantity=SYM, value=watts)]))

    def power_of(self, instruction: Any) -> float:
        if str(instruction.operation_mode) == str(self.off.id):
            return 0.0
        return 4140 + instruction.operation_mode_factor * (22080 - 4140)

    def instructions(self) -> list[Any]:
        return self.registry.sent_to(self.rm_id, "FRBC.Instruction")


def config(**planner: Any) -> SiteConfig:
    settings = {"horizon_ptus": 12, "replan_min_interval_s": 0.05, "time_limit_s": 0.5,
                "deviation_threshold_w": 2000, **planner}
    return SiteConfig.model_validate({"planner": settings,
                                      "grid": {"fuse_a": 40, "import_limit_kw": 25}})


async def until(predicate: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def loop_parts(tmp_path: Path) -> AsyncIterator[tuple[FakeRegistry, SiteController, Store]]:
    registry = FakeRegistry()
    store = await Store.open(tmp_path / "cem.db")
    controller = SiteController(config(), registry, store, solver=None,
                                signals=[StoreCongestion(store, poll_s=0.1)])
    controller.db_path = tmp_path / "cem.db"  # type: ignore[attr-defined]
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    await until(lambda: registry.queue is not None)
    yield registry, controller, store
    stop.set()
    await task
    await store.close()


async def test_ev_connects_and_gets_an_frbc_instruction_within_the_limits(
        loop_parts: tuple[FakeRegistry, SiteController, Store],
        caplog: pytest.LogCaptureFixture) -> None:
    registry, _controller, store = loop_parts
    caplog.set_level(logging.INFO, logger="cem.control")
    ev = EvRm(registry, "ev-3")
    await until(lambda: ev.instructions())
    first = ev.instructions()[0]
    assert str(first.actuator_id) == str(ev.actuator.id)
    assert str(first.operation_mode) == str(ev.charge.id)
    assert ev.power_of(first) <= 22080
    assert any("replan: " in r.getMessage() and "EV charger ev-3" in r.getMessage() and "connected (FRBC)"
               in r.getMessage() and "1 EV" in r.getMessage() for r in caplog.records)
    await store.flush()
    plans = await store.query("SELECT status, reason FROM plans")
    assert plans and plans[-1][0] == "FALLBACK"


async def test_congestion_added_with_the_cli_is_picked_up_and_revoked_when_removed(
        loop_parts: tuple[FakeRegistry, SiteController, Store],
        caplog: pytest.LogCaptureFixture) -> None:
    registry, controller, store = loop_parts
    caplog.set_level(logging.INFO, logger="cem.control")
    ev = EvRm(registry, "ev-1")
    await until(lambda: ev.instructions())
    assert ev.power_of(ev.instructions()[-1]) == 22080  # nothing limits it yet
    # the grid operator limits import to 10 kW from the next PTU for an hour
    start = controller.problem.start + timedelta(minutes=15)
    await asyncio.to_thread(add_congestion_command, controller.db_path, start.isoformat(),
                            (start + timedelta(hours=1)).isoformat(), 10.0, None)
    await until(lambda: any("congestion window" in r.getMessage() and "was added" in r.getMessage()
                            for r in caplog.records))
    await until(lambda: any(m.execution_time == start for m in ev.instructions()))
    capped = [m for m in ev.instructions() if m.execution_time == start][-1]
    assert ev.power_of(capped) <= 10000
    # the window is lifted again: the pending capped instruction is revoked
    (row,) = await store.list_congestion()
    await store.remove_congestion(row.window_id)
    await until(lambda: registry.sent_to("ev-1", "RevokeObject"))
    revoke = registry.sent_to("ev-1", "RevokeObject")[-1]
    assert str(revoke.object_id) == str(capped.id)
    assert revoke.object_type.value == "FRBC.Instruction"


async def test_rejected_instruction_and_disconnect_trigger_replans(
        loop_parts: tuple[FakeRegistry, SiteController, Store],
        caplog: pytest.LogCaptureFixture) -> None:
    registry, controller, _ = loop_parts
    caplog.set_level(logging.INFO, logger="cem.control")
    ev = EvRm(registry, "ev-2")
    await until(lambda: ev.instructions())
    before = controller.replans
    instruction = ev.instructions()[0]
    registry.feed("ev-2", InstructionStatusUpdate(
        message_id=uid(), instruction_id=str(instruction.id),
        status_type=InstructionStatus.REJECTED, timestamp=now()))
    await until(lambda: controller.replans > before)
    assert any("rejected instruction" in r.getMessage() for r in caplog.records)
    before = controller.replans
    registry.disconnect("ev-2")
    await until(lambda: controller.replans > before)
    assert any("disconnected" in r.getMessage() and "no devices" in r.getMessage() for r in caplog.records)
    assert "ev-2" not in controller.dispatcher.sent


async def test_guard_caps_an_ev_within_a_second_when_the_meter_nears_the_fuse(
        loop_parts: tuple[FakeRegistry, SiteController, Store],
        caplog: pytest.LogCaptureFixture) -> None:
    registry, controller, _ = loop_parts
    caplog.set_level(logging.INFO, logger="cem.control")
    ev = EvRm(registry, "ev-4")
    registry.connect("meter", "grid meter", [ControlType.NOT_CONTROLABLE],
                     [L.ELECTRIC_POWER_L1, L.ELECTRIC_POWER_L2, L.ELECTRIC_POWER_L3],
                     roles=(RoleType.ENERGY_CONSUMER, RoleType.ENERGY_PRODUCER))
    await until(lambda: ev.instructions() and controller.mapping is not None
                and controller.mapping.meter_rm == "meter")
    ev.measure(22080)
    sent_before = len(ev.instructions())
    began = time.monotonic()
    # an unexpected 6 kW kettle-and-oven on L1: L1 at 7360 + 6000 W > 0.95 * 40 A * 230 V
    registry.feed("meter", PowerMeasurement(message_id=uid(), measurement_timestamp=now(), values=[
        PowerValue(commodity_quantity=q, value=w) for q, w in (
            (L.ELECTRIC_POWER_L1, 13360), (L.ELECTRIC_POWER_L2, 7360),
            (L.ELECTRIC_POWER_L3, 7360))]))
    await until(lambda: len(ev.instructions()) > sent_before, within=1.0)
    capped = ev.instructions()[sent_before]
    took = registry.sent[-1][2] - began
    assert took < 1.0
    # L1 may carry 8740 W: the EV's share on L1 must drop by 4620 W, i.e. 13860 W in total
    assert ev.power_of(capped) <= 22080 - 3 * (13360 - 0.95 * 40 * 230) + 1
    assert any(r.getMessage().startswith("guard: L1 at") for r in caplog.records)
    await until(lambda: any("the guard acted" in r.getMessage() for r in caplog.records))


async def test_without_a_meter_the_guard_sums_the_rms_measurements_as_they_come(
        loop_parts: tuple[FakeRegistry, SiteController, Store],
        caplog: pytest.LogCaptureFixture) -> None:
    """No grid meter: the guard checks the sum of every RM's measurement (at most every
    guard_interval_s) while measurements stream in, and caps an EV within a second when the
    sum nears the fuse; measurements that come between its checks are still read for the
    plan's deviation."""
    registry, controller, _ = loop_parts
    caplog.set_level(logging.INFO, logger="cem.control")
    evs = [EvRm(registry, f"ev-g{i}") for i in range(2)]
    await until(lambda: all(ev.instructions() for ev in evs) and controller.mapping is not None
                and controller.mapping.meter_rm is None)
    for ev in evs:
        ev.measure(0)
    await asyncio.sleep(0.3)   # the guard's interval passes with nothing to do
    sent_before = [len(ev.instructions()) for ev in evs]
    began = time.monotonic()
    # both at full power: 2 x 7360 W a phase, against 0.95 x 40 A x 230 V = 8740 W
    for _ in range(5):
        for ev in evs:
            ev.measure(22080)
        await asyncio.sleep(0.01)
    await until(lambda: any(len(ev.instructions()) > n for ev, n in zip(evs, sent_before,
                                                                        strict=True)),
                within=1.0)
    assert time.monotonic() - began < 1.0
    assert any(r.message.startswith("guard: L1 at") for r in caplog.records)


async def test_deviation_from_the_plan_triggers_one_replan(
        loop_parts: tuple[FakeRegistry, SiteController, Store],
        caplog: pytest.LogCaptureFixture) -> None:
    registry, controller, _ = loop_parts
    caplog.set_level(logging.INFO, logger="cem.control")
    ev = EvRm(registry, "ev-5")
    await until(lambda: ev.instructions() and controller.planned_w("ev-5") == 22080)
    before = controller.replans
    ev.measure(7000)  # the car takes only 7 kW
    await until(lambda: controller.replans > before)
    assert any("draws 7.0 kW instead of the planned 22.1 kW" in r.getMessage()
               for r in caplog.records)


async def test_solver_failure_and_timeout_fall_back_to_the_safe_plan(tmp_path: Path) -> None:
    registry = FakeRegistry()

    def broken(problem: Any, **_: Any) -> Any:
        raise RuntimeError("boom")

    def slow(problem: Any, *, time_limit_s: float, workers: int) -> Any:
        time.sleep(time_limit_s * 2 + 2.4)

    for solver, words in ((broken, "the optimiser failed (RuntimeError: boom)"),
                          (slow, "gave no plan within")):
        controller = SiteController(config(time_limit_s=0.1), registry, None, solver=solver)
        registry.queue = controller.registry.subscribe()
        EvRm(registry, f"ev-{words[:3]}")
        began = time.monotonic()
        plan = await controller.replan(["test"])
        assert plan.status == "FALLBACK" and words in plan.notes[0]
        assert time.monotonic() - began < 3.0
        await controller.stop()


class ChangingPrices:
    """A day-ahead source whose prices the test can change (like a feed after the auction)."""

    resolution = timedelta(hours=1)

    def __init__(self) -> None:
        self.eur_per_mwh = 100.0

    def day_ahead_eur_per_mwh(self, start: datetime, end: datetime) -> list[tuple[datetime, float]]:
        hour = start.replace(minute=0, second=0, microsecond=0)
        out = []
        while hour < end:
            out.append((hour, self.eur_per_mwh))
            hour += self.resolution
        return out


async def test_price_update_triggers_a_replan(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cem.control")
    registry = FakeRegistry()
    prices = ChangingPrices()
    controller = SiteController(config(), registry, None, solver=None,
                                signals=[PriceFeed(prices, poll_s=0.1)])
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    try:
        await until(lambda: controller.problem is not None)
        assert abs(controller.problem.prices.import_eur_per_kwh[0] - 0.1) < 1e-9
        before = controller.replans
        prices.eur_per_mwh = 250.0
        await until(lambda: controller.replans > before)
        assert any("day-ahead prices changed" in r.getMessage() for r in caplog.records)
        assert abs(controller.problem.prices.import_eur_per_kwh[0] - 0.25) < 1e-9
    finally:
        stop.set()
        await task


def test_a_burst_of_events_keeps_only_each_rms_last_measurement_and_the_order() -> None:
    at = now()

    def measured(rm_id: str) -> RmEvent:
        return RmEvent(rm_id, f"c-{rm_id}", StateChanged("measurement", "PowerMeasurement"), at)

    selected = RmEvent("ev-1", "c-ev-1", ControlTypeSelected("FILL_RATE_BASED_CONTROL"), at)
    forecast = RmEvent("ev-2", "c-ev-2", StateChanged("forecast", "PowerForecast"), at)
    gone = Disconnected("c-ev-3", "ev-3", "connection closed")
    burst = [measured("ev-1"), selected, measured("ev-2"), measured("ev-1"), forecast,
             measured("ev-3"), gone, measured("ev-2")]
    assert coalesce_measurements(burst) == [selected, burst[3], forecast, burst[5], gone,
                                            burst[7]]
    once_each = [measured("ev-1"), selected, measured("ev-2")]
    assert coalesce_measurements(once_each) == once_each
