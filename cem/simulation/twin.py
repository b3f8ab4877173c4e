"""Level 5 of the twin: the live control loop (`cem.control.mpc.SiteController`) in virtual time.

Nothing of the CEM is re-implemented here. What is simulated is what sits outside the CEM:

- per EVSE an S2 resource manager built from the OCPP charger RM's own FRBC functions
  (`resource_managers.ocpp_charger.frbc`, used as `s2_evse.EvseResource` uses them): Handshake,
  ResourceManagerDetails, an FRBC.SystemDescription and FillLevelTargetProfile when the shape of
  its flexibility changes (plug-in, unplug, SoC becoming known), FRBC.StorageStatus and
  ActuatorStatus when they change, a PowerMeasurement on change and at least every 15 s (so
  once a PTU here). An FRBC.Instruction becomes the EV's current
  with `instruction_current` at its execution time and is answered ACCEPTED / STARTED (or
  REJECTED / ABORTED) like the live RM does; a RevokeObject cancels a pending one;
- the EV reports its state of charge (finely) from its battery (`inputs.ev_battery`: the real
  need fills it to its final SoC): once the SoC has risen 3 points the RM knows the battery
  size and plans in SoC, as live; it draws what the shared physics gives it (`engine.taper_w`
  above 80 % SoC). Behind an OCPP 1.6 charger (`SimSession.ocpp16`) the EV reports no SoC and
  the RM knows no departure or need: it sends the site's defaults and says so in its storage
  label ("needs from site defaults"), as the OCPP RM does with no EV or card data; an EV
  that stops drawing while its charger offers current (its real need delivered) is taken as
  full, as the live RM learns from the charger's SuspendedEV (the live RM's offer again after
  30 minutes, for an EV that may only have paused, never applies: a twin EV stops at 100 %);
- an EV still plugged in at its stated departure gets the live RM's target for an overstayer
  (`fill_level_target`: its need within the next hour), again each hour it stays, as the live
  RM sends it when the previous target runs out (`target_runs_out`);
- a grid meter RM (NOT_CONTROLABLE) measuring the projected power per phase (EVs minus PV) at
  the start of each PTU, which runs the controller's guard as live, and a PV RM
  (NOT_CONTROLABLE) with its measurement and a perfect PowerForecast of the horizon;
- a registry offering what `SiteController` and its `Dispatcher` use: `rms()`, `sessions()`,
  `get()`, `subscribe()` / `unsubscribe()` and `send_instruction()`, each RM behind a real
  sans-I/O `cem.s2.session.S2Session` (every message is serialised, judged and answered with a
  ReceptionStatus, both ways).

Each PTU (virtual time, no sleeping): chargers carry out instructions whose time came, EVs arrive
and leave, every RM tells the CEM what changed, the server events go to
`SiteController.handle_event`, then `await controller.replan(reasons)`; the RMs and the meter
measure the result, which may make the guard act and ask for another replan (at most
`MAX_REPLANS_PER_PTU` per PTU). The setpoint of each EV is its EVSE's current.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from s2python.common import (
    Commodity,
    CommodityQuantity,
    ControlType,
    Duration,
    EnergyManagementRole,
    Handshake,
    InstructionStatus,
    InstructionStatusUpdate,
    PowerForecast,
    PowerForecastElement,
    PowerForecastValue,
    PowerMeasurement,
    PowerValue,
    ResourceManagerDetails,
    RevokeObject,
    Role,
    RoleType,
)
from s2python.frbc import FRBCInstruction
from s2python.message import S2Message
from s2python.s2_parser import S2Parser

from cem.control.mpc import SiteController
from cem.ports import InstructionResult, RegistryEvent, RmEvent
from cem.s2.session import S2_VERSION, S2Session
from cem.signals import price_update
from cem.simulation.engine import SimState, taper_w
from cem.simulation.inputs import Evse, SimInputs, SimSession, evse_rm_name
from cem.store import Store
from resource_managers.ocpp_charger import frbc, limits

PlanFunction = Callable[..., Any]

SOC_POINTS_FOR_CAPACITY = 3.0  # as the OCPP RM: battery size known after 3 SoC points of rise
MAX_REPLANS_PER_PTU = 3
MEASURE_S = 15.0  # as the OCPP RM: a PowerMeasurement on every change, else every 15 s
TWIN_NAMESPACE = uuid.UUID("5f0c6f2e-8a8e-4c43-9a53-2b1f1f0c7a11")
SYM = CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC
PHASES = (CommodityQuantity.ELECTRIC_POWER_L1, CommodityQuantity.ELECTRIC_POWER_L2,
          CommodityQuantity.ELECTRIC_POWER_L3)
QUIET_LOGGERS = ("cem.control", "cem.s2")


@dataclass
class TwinEntry:
    """One connected RM as the registry lists it (the server's LiveSession, without sockets)."""

    rm_id: str
    connection_id: str
    session: S2Session
    name: str

    @property
    def state(self) -> Any:
        return self.session.state


def _status_text(subject: str, status: str = "OK", label: str | None = None) -> str:
    data: dict[str, Any] = {"message_type": "ReceptionStatus", "subject_message_id": subject,
                            "status": status}
    if label:
        data["diagnostic_label"] = label[:400]
    return json.dumps(data, separators=(",", ":"))


class TwinRegistry:
    """The S2 server's registry API over in-process RMs: real sessions, no sockets."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self.entries: dict[str, TwinEntry] = {}
        self.devices: dict[str, TwinDevice] = {}
        self._queues: list[asyncio.Queue[RegistryEvent]] = []
        self.cem_refusals: list[str] = []  # RM messages the CEM did not answer OK
        self.rm_refusals: list[str] = []  # CEM messages the RM did not answer OK
        self.messages = 0

    # --- what SiteController and Dispatcher use -------------------------------------------------

    def rms(self) -> dict[str, TwinEntry]:
        return self.entries

    def get(self, rm_id: str) -> TwinEntry | None:
        return self.entries.get(rm_id)

    def sessions(self) -> list[TwinEntry]:
        return list(self.entries.values())

    def subscribe(self, maxsize: int = 0) -> asyncio.Queue[RegistryEvent]:
        queue: asyncio.Queue[RegistryEvent] = asyncio.Queue(maxsize=maxsize)
        self._queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[RegistryEvent]) -> None:
        with contextlib.suppress(ValueError):
            self._queues.remove(queue)

    async def send_instruction(self, rm_id: str, message: S2Message, *,
                               timeout_s: float | None = None,
                               plan_id: int | None = None) -> InstructionResult:
        """Send through the RM's session; the RM answers (ReceptionStatus) and acts on it."""
        entry = self.entries.get(rm_id)
        if entry is None:
            return InstructionResult(rm_id, None, "NOT_CONNECTED", "no live session for this RM")
        now = self.clock()
        try:
            out = entry.session.send(message, now)
        except ValueError as exc:
            return InstructionResult(rm_id, None, "NOT_SENT", str(exc))
        return self._deliver(entry, out.text, out.message_id)

    # --- the wire, in process ---------------------------------------------------------------------

    def connect(self, device: TwinDevice) -> None:
        """Open a session for the device and do the S2 handshake and details."""
        session = S2Session()
        entry = TwinEntry(device.rm_id, f"twin-{device.rm_id[:8]}", session, device.name)
        self.entries[device.rm_id] = entry
        self.devices[device.rm_id] = device
        for out in session.start(self.clock()):
            self._deliver(entry, out.text, out.message_id)
        self.feed(device.rm_id, Handshake(message_id=uuid.uuid4(), role=EnergyManagementRole.RM,
                                          supported_protocol_versions=[S2_VERSION]))
        self.feed(device.rm_id, device.details())

    def feed(self, rm_id: str, message: S2Message) -> None:
        """One message from the RM to the CEM; the CEM's answers go back to the RM."""
        entry = self.entries[rm_id]
        self.messages += 1
        for out in entry.session.receive(message.to_json(), self.clock()):
            if out.message_type == "ReceptionStatus":
                data = json.loads(out.text)
                if data["status"] != "OK":
                    self.cem_refusals.append(f"{entry.name}: {message.message_type} "
                                             f"{data['status']} ({data.get('diagnostic_label')})")
            elif out.awaits_status:
                self._deliver(entry, out.text, out.message_id)
        self._publish(entry)

    def _deliver(self, entry: TwinEntry, text: str,
                 message_id: str | None) -> InstructionResult:
        """A CEM message reaches the RM: it answers with a ReceptionStatus, then acts."""
        device = self.devices[entry.rm_id]
        self.messages += 1
        status, label, follow_up = device.receive(text, self.clock())
        if message_id is not None:
            entry.session.receive(_status_text(message_id, status, label), self.clock())
        if status != "OK":
            self.rm_refusals.append(f"{entry.name}: {status} ({label})")
        self._publish(entry)
        for message in follow_up:
            self.feed(entry.rm_id, message)
        return InstructionResult(entry.rm_id, message_id, status, label)

    def _publish(self, entry: TwinEntry) -> None:
        events = entry.session.drain_events()
        if not events:
            return
        now = self.clock()
        for event in events:
            for queue in self._queues:
                queue.put_nowait(RmEvent(entry.rm_id, entry.connection_id, event, now))


class TwinDevice:
    """An in-process S2 RM: its details, and its answer to each CEM message."""

    rm_id: str
    name: str

    def details(self) -> ResourceManagerDetails:
        raise NotImplementedError

    def receive(self, text: str, now: datetime) -> tuple[str, str | None, list[S2Message]]:
        """(ReceptionStatus, label, messages to send after it) for one CEM message."""
        try:
            S2Parser.parse_as_any_message(text)
        except Exception as exc:
            return "INVALID_MESSAGE", str(exc)[:200], []
        return "OK", None, []


def _resource_id(what: str) -> uuid.UUID:
    return uuid.uuid5(TWIN_NAMESPACE, what)


def evse_details(resource_id: uuid.UUID, name: str, phases: int,
                 phase: str) -> ResourceManagerDetails:
    """What an EVSE of the OCPP charger RM tells the CEM about itself (FRBC, per-phase power)."""
    return ResourceManagerDetails(
        message_id=uuid.uuid4(), resource_id=resource_id, name=name,
        roles=[Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY)],
        instruction_processing_delay=Duration.from_milliseconds(2000),
        available_control_types=[ControlType.FILL_RATE_BASED_CONTROL],
        provides_forecast=False,
        provides_power_measurement_types=frbc.measured_quantities(phases, phase),
        manufacturer="OCPP", model="simulated charge point")


class TwinEvse(TwinDevice):
    """One EVSE as the OCPP charger RM presents it over S2 (FRBC), with the EV it charges."""

    def __init__(self, registry: TwinRegistry, evse: Evse, inputs: SimInputs) -> None:
        config = inputs.config
        self.registry = registry
        self.inputs = inputs
        self.evse = evse
        self.resource_id = _resource_id(f"evse {evse.id}")
        self.rm_id = str(self.resource_id)
        self.name = evse_rm_name(evse.id)
        self.ids = frbc.FrbcIds.for_resource(self.resource_id)
        self.voltage = float(config.grid.voltage_v)
        self.phase = evse.phase if evse.phases == 1 else "L1"
        self.max_current_a = evse.max_w / (self.voltage * evse.phases)
        self.min_current_a = float(config.ev_defaults.min_current_a)
        self.safe_limit_a = float(inputs.ocpp.safe_limit_a)
        self.priority = int(config.ev_defaults.priority)
        self.session: SimSession | None = None
        self.energy_wh = 0.0
        self.capacity_wh = 0.0
        self.soc0 = 0.0
        self.soc: float | None = None
        self.soc_first: tuple[float, float] | None = None
        self.limit_a: float | None = None
        self.ev_full = False  # stopped drawing while offered current (the charger's SuspendedEV)
        self.pending: dict[str, FRBCInstruction] = {}
        self.received: list[FRBCInstruction] = []  # every FRBC.Instruction, as parsed
        self.statuses: list[tuple[str, str]] = []  # (instruction id, status) as reported
        self.targets: list[datetime] = []  # when a FillLevelTargetProfile was sent
        self._shape: tuple[Any, ...] | None = None
        self._sent_level: float | None = None
        self._sent_limit: float | None = None
        self._limit_told = False
        self._sent_power: tuple[float, ...] | None = None
        self._target_due: datetime | None = None
        self._measured_at = datetime.min.replace(tzinfo=inputs.t0.tzinfo)

    def details(self) -> ResourceManagerDetails:
        return evse_details(self.resource_id, self.name, self.evse.phases, self.phase)

    # --- the EV ---------------------------------------------------------------------------------

    def plug_in(self, session: SimSession) -> None:
        self.session = session
        self.capacity_wh = float(session.battery_wh)
        self.soc0 = float(session.arrival_soc)
        self.energy_wh = 0.0
        self.soc = self.soc_first = None
        self.limit_a = None  # a new transaction runs on the charger's default profile
        self.ev_full = False
        self._target_due = None
        self.meter(0.0)

    def unplug(self) -> None:
        self.session = None
        self.energy_wh = 0.0
        self.soc = self.soc_first = None
        self.limit_a = None
        self.ev_full = False
        self._target_due = None

    def meter(self, energy_wh: float) -> None:
        """The charger's meter reading and the EV's SoC (to 1e-4 %: integer SoC readings would
        make the RM's battery-size estimate, and so its targets in SoC, a few % off)."""
        self.energy_wh = energy_wh
        if self.session is None or self.session.ocpp16:  # OCPP 1.6: no SoC reaches the RM
            return
        self.soc = min(100.0, round(self.true_soc(), 4))
        if self.soc_first is None:
            self.soc_first = (self.soc, energy_wh)

    @property
    def capacity_kwh(self) -> float | None:
        """Battery size from energy per SoC point, once the SoC rose 3 points (as the OCPP RM)."""
        if self.soc is None or self.soc_first is None:
            return None
        soc0, energy0 = self.soc_first
        if self.soc - soc0 < SOC_POINTS_FOR_CAPACITY:
            return None
        return (self.energy_wh - energy0) / (self.soc - soc0) / 10

    def true_soc(self) -> float:
        """The EV's SoC (%), whether or not its charger reports it."""
        return self.soc0 + self.energy_wh / self.capacity_wh * 100.0 if self.capacity_wh else 0.0

    def remaining_wh(self) -> float:
        if self.session is None:
            return 0.0
        return max(0.0, self.session.real_need_wh - self.energy_wh)

    def setpoint_w(self) -> float:
        """What the charger allows now (its limit, or the default profile's safe limit)."""
        if self.session is None:
            return 0.0
        amps = self.safe_limit_a if self.limit_a is None else self.limit_a
        return limits.amps_to_watts(amps, self.evse.phases, self.voltage)

    def power_w(self) -> tuple[float, float, float]:
        """Per-phase power the EV draws at this moment (nothing once full)."""
        watts = min(self.setpoint_w(), float(self.evse.max_w)) if self.remaining_wh() > 0.5 else 0.0
        if watts + 1e-6 < self.evse.min_w:
            watts = 0.0
        elif self.inputs.ev_taper:
            watts = min(watts, float(taper_w(self.evse.max_w, self.true_soc())))
        if self.evse.phases == 3:
            return (watts / 3, watts / 3, watts / 3)
        index = int(self.phase[-1]) - 1
        out = [0.0, 0.0, 0.0]
        out[index] = watts
        return (out[0], out[1], out[2])

    def flex(self) -> frbc.EvseFlex:
        session = self.session
        departure = self.inputs.ptu_start(session.believed_departure_ptu) if session else None
        return frbc.EvseFlex(
            name=self.evse.id, online=True, has_session=session is not None,
            phases=self.evse.phases, phase=self.phase, min_current_a=self.min_current_a,
            max_current_a=self.max_current_a, energy_kwh=self.energy_wh / 1000,
            need_kwh=session.believed_need_wh / 1000 if session else None,
            departure=departure, soc=self.soc if session else None,
            capacity_kwh=self.capacity_kwh if session else None,
            power_w=self.power_w(), limit_a=self.limit_a if session else None,
            voltage_v=self.voltage, priority=self.priority, ev_full=self.ev_full,
            needs_source="site defaults" if session is not None and session.ocpp16 else "")

    # --- S2, as resource_managers.ocpp_charger.s2_evse.EvseResource._tell_cem -------------------

    def tell(self, now: datetime) -> None:
        """Send what changed: description and target, storage and actuator status, power."""
        if self.session is not None and not self.ev_full and self.remaining_wh() <= 0.5 \
                and self.setpoint_w() + 1e-6 >= self.evse.min_w:
            self.ev_full = True  # as the OCPP RM learns from SuspendedEV
        flex = self.flex()
        session = self.session
        shape = (flex.has_session, session.index if session else None, flex.priority,
                 flex.phases, flex.min_current_a, round(flex.max_current_a, 1), flex.departure,
                 flex.need_kwh, flex.uses_soc, flex.ev_full)
        feed = self.registry.feed
        if shape != self._shape:
            self._shape = shape
            feed(self.rm_id, frbc.system_description(flex, self.ids, now))
            self._send_target(flex, now)
            self._sent_level = self._sent_power = None
            self._limit_told = False
        elif self._target_due is not None and now >= self._target_due:
            self._send_target(flex, now)  # overstaying: the live RM's next-hour target again
        level = round(flex.fill_level(), 3)
        if level != self._sent_level:
            self._sent_level = level
            feed(self.rm_id, frbc.storage_status(flex))
        if flex.limit_a != self._sent_limit or not self._limit_told:
            self._sent_limit = flex.limit_a
            self._limit_told = True
            feed(self.rm_id, frbc.actuator_status(flex, self.ids))
        power = tuple(round(p) for p in flex.power_w)
        if power != self._sent_power or (now - self._measured_at).total_seconds() >= MEASURE_S:
            self._sent_power = power
            self._measured_at = now
            feed(self.rm_id, frbc.power_measurement(flex, now))

    def _send_target(self, flex: frbc.EvseFlex, now: datetime) -> None:
        target = frbc.fill_level_target(flex, now)
        self._target_due = None
        if target is None:
            return
        self.registry.feed(self.rm_id, target)
        self.targets.append(now)
        self._target_due = frbc.target_runs_out(target)

    # --- instructions, as EvseResource._carry_out ----------------------------------------------

    def receive(self, text: str, now: datetime) -> tuple[str, str | None, list[S2Message]]:
        try:
            message = S2Parser.parse_as_any_message(text)
        except Exception as exc:
            return "INVALID_MESSAGE", str(exc)[:200], []
        if isinstance(message, FRBCInstruction):
            self.received.append(message)
            return "OK", None, self._carry_out(message, now)
        if isinstance(message, RevokeObject):
            self.pending.pop(str(message.object_id), None)
        return "OK", None, []

    def _status(self, instruction: FRBCInstruction, status: InstructionStatus,
                now: datetime) -> InstructionStatusUpdate:
        self.statuses.append((str(instruction.id), status.value))
        return InstructionStatusUpdate(message_id=uuid.uuid4(), instruction_id=instruction.id,
                                       status_type=status, timestamp=now)

    def _carry_out(self, instruction: FRBCInstruction, now: datetime) -> list[S2Message]:
        try:
            amps = frbc.instruction_current(self.flex(), self.ids, instruction)
        except frbc.InstructionProblem:
            return [self._status(instruction, InstructionStatus.REJECTED, now)]
        if (instruction.execution_time - now).total_seconds() > 1:
            self.pending[str(instruction.id)] = instruction
            return [self._status(instruction, InstructionStatus.ACCEPTED, now)]
        if self.session is not None:
            self.limit_a = amps
        return [self._status(instruction, InstructionStatus.ACCEPTED, now),
                self._status(instruction, InstructionStatus.STARTED, now)]

    def tick(self, now: datetime) -> None:
        """Carry out the accepted instructions whose execution time has come."""
        due = sorted((i for i in self.pending.values() if i.execution_time <= now),
                     key=lambda i: i.execution_time)
        for instruction in due:
            del self.pending[str(instruction.id)]
            try:
                amps = frbc.instruction_current(self.flex(), self.ids, instruction)
            except frbc.InstructionProblem:  # the EV left meanwhile
                self.registry.feed(self.rm_id, self._status(instruction, InstructionStatus.ABORTED,
                                                            now))
                continue
            if self.session is not None:
                self.limit_a = amps
            self.registry.feed(self.rm_id, self._status(instruction, InstructionStatus.STARTED, now))


class TwinMeter(TwinDevice):
    """A NOT_CONTROLABLE RM measuring power per phase: the grid meter, or the PV inverter."""

    def __init__(self, registry: TwinRegistry, name: str, quantities: list[CommodityQuantity]) -> None:
        self.registry = registry
        self.name = name
        self.resource_id = _resource_id(name)
        self.rm_id = str(self.resource_id)
        self.quantities = quantities

    def details(self) -> ResourceManagerDetails:
        # PV only produces; the grid meter imports and exports: the CEM knows it by these roles
        roles = [RoleType.ENERGY_PRODUCER] if "PV" in self.name else [
            RoleType.ENERGY_CONSUMER, RoleType.ENERGY_PRODUCER]
        return ResourceManagerDetails(
            message_id=uuid.uuid4(), resource_id=self.resource_id, name=self.name,
            roles=[Role(role=role, commodity=Commodity.ELECTRICITY) for role in roles],
            instruction_processing_delay=Duration.from_milliseconds(1000),
            available_control_types=[ControlType.NOT_CONTROLABLE],
            provides_forecast="PV" in self.name, provides_power_measurement_types=self.quantities,
            manufacturer="twin", model=self.name)

    def measure(self, values: list[float], now: datetime) -> None:
        self.registry.feed(self.rm_id, PowerMeasurement(
            message_id=uuid.uuid4(), measurement_timestamp=now,
            values=[PowerValue(commodity_quantity=q, value=round(v, 1))
                    for q, v in zip(self.quantities, values, strict=True)]))

    def forecast(self, power_w: np.ndarray, start: datetime, ptu_minutes: int) -> None:
        step = Duration.from_timedelta(timedelta(minutes=ptu_minutes))
        self.registry.feed(self.rm_id, PowerForecast(
            message_id=uuid.uuid4(), start_time=start,
            elements=[PowerForecastElement(duration=step, power_values=[
                PowerForecastValue(value_expected=float(w), commodity_quantity=self.quantities[0])])
                for w in power_w]))


class TwinPrices:
    """The run's day-ahead prices as a price source for the controller (`sitekit.prices`)."""

    def __init__(self, inputs: SimInputs) -> None:
        self.inputs = inputs
        self.resolution = timedelta(minutes=inputs.ptu_minutes)
        if inputs.wholesale_eur_per_mwh is None:
            raise ValueError("the inputs carry no day-ahead prices")
        self.wholesale = inputs.wholesale_eur_per_mwh

    def day_ahead_eur_per_mwh(self, start: datetime, end: datetime) -> list[tuple[datetime, float]]:
        step = self.resolution.total_seconds()
        first = max(0, math.floor((start - self.inputs.t0).total_seconds() / step))
        last = min(len(self.wholesale), math.ceil((end - self.inputs.t0).total_seconds() / step))
        return [(self.inputs.ptu_start(i), float(self.wholesale[i])) for i in range(first, last)]


@contextlib.contextmanager
def quiet_control_logs() -> Iterator[None]:
    """The loop's per-replan, guard and planner-failure lines would flood the progress bar; the
    twin reports fallbacks in its notes and the guard in its KPIs instead."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in QUIET_LOGGERS]
    for logger, _ in saved:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


class LiveControlLoop:
    """Level 5: the CEM's SiteController steering simulated S2 RMs in virtual time."""

    name = "5"

    def __init__(self, inputs: SimInputs, plan_site: PlanFunction, time_limit_s: float,
                 workers: int) -> None:
        self.inputs = inputs
        self.plan_site = plan_site
        self.workers = workers
        self.replan_s: list[float] = []
        self.statuses: dict[str, int] = {}
        self.notes: list[str] = []
        self.now = inputs.t0
        self.loop = asyncio.new_event_loop()
        self.registry = TwinRegistry(lambda: self.now)
        self.evses = {e.id: TwinEvse(self.registry, e, inputs) for e in inputs.evses}
        self.meter = TwinMeter(self.registry, "grid meter", list(PHASES))
        self.pv = TwinMeter(self.registry, "PV inverter", [SYM]) if inputs.pv_w.any() else None
        config = inputs.config
        if config.planner.time_limit_s != time_limit_s:
            config = config.model_copy(update={"planner": config.planner.model_copy(
                update={"time_limit_s": time_limit_s})})
        # the CEM's store (a temporary SQLite file): the loop records each EV visit there as it
        # ends and learns departures from it; it starts with the visits before the run
        self._store_dir = tempfile.TemporaryDirectory(prefix="cem-twin-")
        self.store = self.loop.run_until_complete(self._open_store(inputs))
        self.controller = SiteController(
            config, self.registry, self.store, solver=self._solve,
            clock=lambda: self.now, monotonic=self._virtual_seconds)
        # the run's prices, known from the start (the twin drives the loop: no sources run)
        prices = TwinPrices(inputs)
        self.controller.publish(price_update(prices, inputs.t0,
                                             inputs.ptu_start(len(prices.wholesale)), name="twin"))
        self.queue = self.registry.subscribe()
        for device in [*self.evses.values(), self.meter, *([self.pv] if self.pv else [])]:
            self.registry.connect(device)
        # as the live charger RM, each EVSE describes itself once its session is up (no EV
        # yet): the CEM sees every charger empty before its first EV, also before its first plan
        for evse in self.evses.values():
            evse.tell(self.now)
        self.loop.run_until_complete(self._pump())
        self.guard_actions = 0
        self.replans = 0
        self._closed = False

    async def _open_store(self, inputs: SimInputs) -> Store:
        store = await Store.open(Path(self._store_dir.name) / "cem.sqlite")
        await store.record_visits([(v.evse, v.driver, v.arrival, v.departure, v.typed_departure,
                                    v.need_wh, v.delivered_wh) for v in inputs.history])
        return store

    def _virtual_seconds(self) -> float:
        return (self.now - self.inputs.t0).total_seconds()

    def _solve(self, problem: Any, *, time_limit_s: float, workers: int) -> Any:
        started = time.perf_counter()
        try:
            return self.plan_site(problem, time_limit_s=time_limit_s, workers=self.workers)
        finally:
            self.replan_s.append(time.perf_counter() - started)

    def setpoints(self, t: int, present: np.ndarray, state: SimState) -> np.ndarray:
        with quiet_control_logs():
            return self.loop.run_until_complete(self._step(t, present, state))

    async def _pump(self) -> None:
        """Hand every server event to the controller, as its event task does live."""
        while not self.queue.empty():
            await self.controller.handle_event(self.queue.get_nowait())

    async def _step(self, t: int, present: np.ndarray, state: SimState) -> np.ndarray:
        inputs = self.inputs
        self.now = inputs.ptu_start(t)
        now = self.now
        for device in self.evses.values():
            device.tick(now)
        reasons: list[str] = []
        here = {inputs.sessions[i].evse.id: inputs.sessions[i] for i in np.flatnonzero(present)}
        for evse_id, device in self.evses.items():
            session = here.get(evse_id)
            if device.session is not None and device.session is not session:
                reasons.append(f"EV left {evse_id}")
                device.unplug()
            if session is not None and device.session is None:
                reasons.append(f"EV arrived at {evse_id}")
                device.plug_in(session)
            if session is not None:
                device.meter(float(state.delivered_wh[session.index]))
        for device in self.evses.values():
            device.tell(now)
        if self.pv is not None:
            n = inputs.config.planner.horizon_ptus
            self.pv.forecast(-self._pv_forecast(t, n), now, inputs.ptu_minutes)
            self.pv.measure([-float(inputs.pv_w[t])], now)
        self._measure_grid(t)
        await self._pump()
        reasons.append("a new PTU started")
        for _ in range(MAX_REPLANS_PER_PTU):
            plan = await self.controller.replan(self.controller.take_reasons() + reasons)
            self.statuses[plan.status] = self.statuses.get(plan.status, 0) + 1
            if plan.status == "FALLBACK" and plan.notes and len(self.notes) < 20:
                self.notes.append(f"{now:%Y-%m-%d %H:%M} UTC: the safe plan was used "
                                  f"({plan.notes[0]})")
            for device in self.evses.values():
                device.tell(now)
            self._measure_grid(t)
            await self._pump()
            reasons = self.controller.take_reasons()  # the guard acted, an EV deviated, ...
            if not reasons:
                break
        self.guard_actions = self.controller.guard_count
        out = np.zeros(len(inputs.sessions))
        for evse_id, session in here.items():
            out[session.index] = self.evses[evse_id].setpoint_w()
        return out

    def _pv_forecast(self, t: int, n: int) -> np.ndarray:
        """What the PV RM forecasts from PTU t: the actual PV, or with `--pv-forecast
        persistence` the day before's (the running PTU as it is measured)."""
        actual = self.inputs.pv_w[t:t + n]
        forecast = self.inputs.pv_forecast_w
        if forecast is None:
            return actual
        out = forecast[t:t + n].copy()
        out[:1] = actual[:1]
        return out

    def _measure_grid(self, t: int) -> None:
        """The grid meter's reading now: every EV's power minus PV, per phase."""
        phase_w = np.zeros(3)
        for device in self.evses.values():
            phase_w += device.power_w()
        self.meter.measure(list(phase_w - float(self.inputs.pv_w[t]) / 3.0), self.now)

    def close(self) -> None:
        """Stop the controller's planning threads and the event loop (once)."""
        if self._closed:
            return
        self._closed = True
        self.loop.run_until_complete(self.controller.stop())
        self.loop.run_until_complete(self.store.close())
        self.loop.close()
        self._store_dir.cleanup()
        learning = self.controller.departures
        self.notes.append(f"departure learning: {len(self.inputs.history)} "
                          f"visits before the run, {learning.recorded} recorded during it "
                          f"({learning.unseen_arrivals} not: the EV was there before the CEM "
                          f"saw its charger empty); safe "
                          f"departure at quantile {learning.quantile:g}, an undelivered kWh at "
                          f"{learning.value_eur_per_wh * 1000:g} EUR; "
                          f"{len(learning.by_stay)} EV(s) whose charger told only the site "
                          f"defaults planned by the stay of comparable visits, "
                          f"{len(learning.by_learned_energy)} to the energy those took")
        if learning.late_quantile > 0:  # (`planner.late_departure_quantile`, off by default)
            self.notes.append(f"departure learning: {len(learning.by_late)} typed EV(s) planned "
                              f"past a typed departure the site's history says is too early "
                              f"(late departure quantile {learning.late_quantile:g})")
        refusals = self.registry.cem_refusals + self.registry.rm_refusals
        self.notes[:0] = [f"the live control loop (SiteController) over "
                          f"{len(self.registry.entries)} S2 sessions: {self.registry.messages} "
                          f"messages, {len(refusals)} not answered OK", *refusals[:5]]
