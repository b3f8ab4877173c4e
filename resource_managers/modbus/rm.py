"""S2 resource managers for Modbus TCP devices: battery, heat pump, PV inverter, grid meter.

Each RM is one S2 session to the CEM (through the shared `S2ResourceManager` of
`resource_managers/base.py`) and one Modbus TCP connection to the device (`ModbusLink`), and
runs two loops side by side:

- the **device loop** polls the device every `poll_interval_s`, reports PowerMeasurement and
  status messages to the CEM, refreshes setpoints before the device's revert timeout, and
  applies scheduled curtailment steps;
- the **S2 session** (base) reconnects on its own; whenever the CEM selects our control type
  the RM describes its flexibility afresh.

Faults (timeouts, exception responses, out-of-range readings, a vanished device) make the RM
withdraw its flexibility (RevokeObject of the system description / power constraints, no more
measurements), retry with exponential back-off, and describe itself again once the device
answers. A value outside the device's limits is never written: it is clamped, and the log says
so. Instructions arrive through s2-python handlers; they are executed in their own task at
their execution time and answered with InstructionStatusUpdates.

Use in-process (the demo): `rm = BatteryRM(regmap, host=..., port=..., cem_url=...)`,
`await rm.start()`, later `await rm.stop()`; or as a process: `cli.run_modbus_rm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, ClassVar

from s2python.common import (
    CommodityQuantity,
    ControlType,
    Duration,
    InstructionStatus,
    InstructionStatusUpdate,
    ReceptionStatusValues,
    RevokableObjects,
    RevokeObject,
    Role,
    RoleType,
)
from s2python.connection.async_.connection import S2AsyncConnection
from s2python.connection.types import S2ConnectionEventsAndMessages, SendOkayRunAsync
from s2python.frbc import (
    FRBCActuatorStatus,
    FRBCInstruction,
    FRBCStorageStatus,
    FRBCTimerStatus,
)
from s2python.generated.gen_s2 import Commodity
from s2python.message import S2Message
from s2python.pebc import PEBCInstruction

from resource_managers.base import (
    AssetDetails,
    FRBCControlType,
    NoControlControlType,
    PEBCControlType,
    S2ControlType,
    S2ResourceManager,
    reply_status,
)
from resource_managers.modbus import s2_mapping as s2m
from resource_managers.modbus.link import DeviceFault, DeviceUnreachable, ModbusLink
from resource_managers.modbus.register_map import RegisterMap
from resource_managers.modbus.simulator import load_pv_profile
from sitekit import clock

log = logging.getLogger("resource_managers.modbus")


def utc_now() -> datetime:
    """The process clock (`sitekit.clock`: real time, or the demo's simulated time)."""
    return clock.now()


class _ToDevice:
    """What every controlled Modbus RM does with its control type: instructions go to the RM."""

    def __init__(self, rm: ModbusRM) -> None:
        self.rm = rm

    async def handle_instruction(self, connection: S2AsyncConnection,
                                 msg: S2ConnectionEventsAndMessages,
                                 send_okay: SendOkayRunAsync) -> None:
        await self.rm._receive_instruction(connection, msg, send_okay)

    async def activate(self, connection: S2AsyncConnection) -> None:
        return None

    async def deactivate(self, connection: S2AsyncConnection) -> None:
        return None


class _Frbc(_ToDevice, FRBCControlType):
    pass


class _Pebc(_ToDevice, PEBCControlType):
    pass


class _NoControl(NoControlControlType):
    async def activate(self, connection: S2AsyncConnection) -> None:
        return None

    async def deactivate(self, connection: S2AsyncConnection) -> None:
        return None


class InstructionRejected(Exception):
    """The RM will not (or cannot) carry out an instruction; the message says why."""


class ModbusRM:
    """Common life cycle of a Modbus-backed S2 resource manager (see the module docstring)."""

    device_class: ClassVar[str] = ""
    role: ClassVar[RoleType] = RoleType.ENERGY_CONSUMER
    default_poll_s: ClassVar[float] = 1.0

    def __init__(self, regmap: RegisterMap, *, cem_url: str, host: str = "127.0.0.1",
                 port: int = 5020, device_id: int = 1, token: str | None = None,
                 name: str | None = None, resource_id: uuid.UUID | None = None,
                 poll_interval_s: float | None = None,
                 backoff_s: tuple[float, float] = (0.5, 30.0),
                 s2_backoff_s: tuple[float, float] = (0.5, 30.0),
                 timeout_s: float = 1.0, cem_grace_s: float = 60.0,
                 time_scale: float = 1.0) -> None:
        if regmap.device_class != self.device_class:
            raise ValueError(f"{type(self).__name__} needs a '{self.device_class}' register map; "
                             f"{regmap.source} describes a '{regmap.device_class}'")
        self.regmap = regmap
        self.limits = regmap.limits
        self.name = name or f"{self.device_class} {host}:{port}/{device_id}"
        self.link = ModbusLink(regmap, host, port, device_id, timeout_s=timeout_s)
        self.poll_interval_s = poll_interval_s or self.default_poll_s
        self.backoff_s = backoff_s
        self.quantity: CommodityQuantity = s2m.PHASE_QUANTITY[self.limits.phase]
        self.resource_id = resource_id or uuid.uuid5(
            uuid.NAMESPACE_URL, f"modbus://{host}:{port}/{device_id}/{self.device_class}")
        details = AssetDetails(
            resource_id=self.resource_id, name=self.name,
            manufacturer=regmap.device.manufacturer, model=regmap.device.model,
            provides_forecast=self.provides_forecast(),
            provides_power_measurements=self.measured_quantities(),
            instruction_processing_delay=Duration(root=1000),
            roles=[Role(role=self.role, commodity=Commodity.ELECTRICITY)])
        self.s2 = S2ResourceManager(cem_url=cem_url, asset_details=details,
                                    control_types=self.control_types(), token=token,
                                    backoff_s=s2_backoff_s,
                                    on_control_type=self._on_control_type,
                                    on_revoke=self._on_revoke)
        self.cem_grace_s = cem_grace_s
        self.time_scale = time_scale  # simulated s per wall s of the device behind us
        self.cem_seen = time.monotonic()
        self.device_ok = False
        self.fault: str | None = "not polled yet"
        self.readings: dict[str, float] = {}
        self.described_session = 0
        self.instructions_done: list[tuple[str, str]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._describe_lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Task[Any]] = {}  # instruction id -> waiting task
        self._describing: asyncio.Task[None] | None = None

    # --- what a device class says about itself ------------------------------------------------

    def control_types(self) -> list[S2ControlType]:
        return [_NoControl()]

    def provides_forecast(self) -> bool:
        return False

    def measured_quantities(self) -> list[CommodityQuantity]:
        return [s2m.PHASE_QUANTITY[self.regmap.limits.phase]]

    def points_to_poll(self) -> list[str]:
        return ["power"]

    async def prepare_device(self) -> None:
        """One-off writes after (re)connecting to the device (e.g. its revert timeout)."""

    def flexibility_messages(self, now: datetime) -> list[S2Message]:
        """What the CEM needs to plan this device (system description, forecasts, status)."""
        return []

    def withdraw_messages(self) -> list[S2Message]:
        """Messages that take our flexibility back from the CEM."""
        return []

    @staticmethod
    def _revoke(object_type: RevokableObjects, object_id: uuid.UUID | None) -> list[S2Message]:
        """A RevokeObject for what we told the CEM last (nothing if we told it nothing)."""
        if object_id is None:
            return []
        return [RevokeObject(message_id=uuid.uuid4(), object_type=object_type,
                             object_id=object_id)]

    def periodic_messages(self, now: datetime) -> list[S2Message]:
        """Measurements and status after a successful poll."""
        return [s2m.device_power_measurement(self.limits, self.readings["power"], now)]

    async def maintain(self) -> None:
        """Keep the device where the CEM wants it (refresh setpoints before they revert)."""

    async def apply(self, instruction: Any) -> str:
        """Carry out an instruction on the device; return a short note for the log."""
        raise InstructionRejected(f"{self.device_class} takes no instructions")

    async def on_shutdown(self) -> None:
        """Leave the device in a safe state when the RM is stopped on purpose."""

    # --- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Run in the background (in-process use, e.g. `cem demo`)."""
        if self._runner is not None:
            return
        self._stop = asyncio.Event()
        self._runner = asyncio.create_task(self.run(self._stop), name=f"rm-{self.name}")

    async def stop(self) -> None:
        """Stop both loops and close the connections."""
        if self._stop is not None:
            self._stop.set()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    async def run(self, stop: asyncio.Event) -> None:
        """Run the S2 session and the device loop until `stop` is set."""
        log.info("%s: Modbus %s:%s unit %s, map %s, CEM %s", self.name, self.link.host,
                 self.link.port, self.link.device_id, self.regmap.source, self.s2.cem_url)
        session = asyncio.create_task(self.s2.run(stop), name=f"s2-{self.name}")
        try:
            await self._device_loop(stop)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.on_shutdown(), timeout=3)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(asyncio.CancelledError):
                await session
            await self.link.close()
            log.info("%s: stopped", self.name)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))

    async def _device_loop(self, stop: asyncio.Event) -> None:
        low, high = self.backoff_s
        delay = low
        next_poll = time.monotonic()
        while not stop.is_set():
            try:
                if not self.link.connected:
                    await self.link.connect()
                    log.info("%s: connected to the device", self.name)
                    await self.prepare_device()
                values = await self.link.read_many(self.points_to_poll())
            except DeviceFault as exc:
                await self._device_failed(exc)
                log.info("%s: retrying the device in %.1f s", self.name, delay)
                await self._wait(stop, delay)
                delay = min(high, delay * 2)
                next_poll = time.monotonic()
                continue
            delay = low
            if self.s2.connected.is_set():
                self.cem_seen = time.monotonic()
            self.readings.update(values)
            if not self.device_ok:
                self.device_ok = True
                self.fault = None
                log.info("%s: device answers; offering its flexibility to the CEM", self.name)
                self.described_session = 0  # describe again, also within the same session
            self._schedule_describe()
            if self.s2.connected.is_set() and self.described_session:
                for message in self.periodic_messages(utc_now()):
                    await self.s2.send_and_forget(message)
            try:
                await self.maintain()
            except DeviceFault as exc:
                await self._device_failed(exc)
            next_poll += self.poll_interval_s
            now = time.monotonic()
            if next_poll < now:
                next_poll = now
            await self._wait(stop, next_poll - now)

    async def _device_failed(self, exc: DeviceFault) -> None:
        reason = str(exc)
        if self.device_ok:
            log.warning("%s: device fault: %s; withdrawing its flexibility from the CEM",
                        self.name, reason)
            self.device_ok = False
            if self.s2.connected.is_set():
                for message in self.withdraw_messages():
                    await self.s2.send_and_forget(message)
        elif reason != self.fault:
            log.warning("%s: device still unavailable: %s", self.name, reason)
        self.fault = reason
        if isinstance(exc, DeviceUnreachable):
            await self.link.close()

    async def _on_control_type(self, control_type: ControlType) -> None:
        # called inside the s2-python handler: do the sending in a task
        self.described_session = 0
        self._schedule_describe()

    def _schedule_describe(self) -> None:
        """Describe our flexibility in the background (the CEM's answers may take a while)."""
        if self.described_session == self.s2.sessions_started and self.described_session:
            return
        if self._describing is None or self._describing.done():
            self._describing = self._spawn(self._describe_if_needed(), f"describe-{self.name}")

    async def _describe_if_needed(self) -> None:
        async with self._describe_lock:
            session = self.s2.sessions_started
            if (not self.device_ok or not self.s2.connected.is_set()
                    or self.described_session == session):
                return
            self.described_session = session
            for message in self.flexibility_messages(utc_now()):
                label = getattr(message, "message_type", type(message).__name__)
                try:
                    status = await self.s2.send(message)
                except (asyncio.InvalidStateError, RuntimeError) as exc:  # session ending
                    log.warning("%s: sending %s failed: %r", self.name, label, exc)
                    return
                if status is None:
                    log.warning("%s: no ReceptionStatus for %s", self.name, label)
                elif status.status != ReceptionStatusValues.OK:
                    log.warning("%s: CEM answered %s to %s: %s", self.name, status.status.value,
                                label, status.diagnostic_label)
                else:
                    log.info("%s: CEM accepted %s", self.name, label)

    # --- instructions ------------------------------------------------------------------------

    async def _receive_instruction(self, connection: S2AsyncConnection,
                                   msg: S2ConnectionEventsAndMessages,
                                   send_okay: SendOkayRunAsync) -> None:
        if not isinstance(msg, FRBCInstruction | PEBCInstruction):
            return
        if not self.device_ok:
            await reply_status(connection, send_okay, msg.message_id,
                               ReceptionStatusValues.TEMPORARY_ERROR,
                               f"device unavailable: {self.fault}")
            return
        await send_okay()
        key = str(msg.id)
        task = self._spawn(self._execute(msg), f"instruction-{msg.id}")
        self._pending[key] = task
        task.add_done_callback(lambda _t, k=key: self._pending.pop(k, None))

    async def _on_revoke(self, message: RevokeObject) -> None:
        """The CEM takes back an instruction that has not started yet (a replan)."""
        if message.object_type not in (RevokableObjects.FRBC_Instruction,
                                       RevokableObjects.PEBC_Instruction):
            return
        task = self._pending.pop(str(message.object_id), None)
        if task is None or task.done():
            log.info("%s: CEM revoked instruction %s, which is not pending (any more)",
                     self.name, message.object_id)
            return
        task.cancel()
        log.info("%s: CEM revoked instruction %s before it started", self.name,
                 message.object_id)
        self.instructions_done.append((str(message.object_id), "revoked"))
        self._spawn(self._status(message.object_id, InstructionStatus.REVOKED),
                    f"revoked-{message.object_id}")

    async def _status(self, instruction_id: uuid.UUID, status: InstructionStatus) -> None:
        await self.s2.send_and_forget(InstructionStatusUpdate(
            message_id=uuid.uuid4(), instruction_id=instruction_id, status_type=status,
            timestamp=utc_now()))

    async def _execute(self, instruction: FRBCInstruction | PEBCInstruction) -> None:
        wait_s = (instruction.execution_time - utc_now()).total_seconds()
        try:
            self.check(instruction)
        except InstructionRejected as exc:
            log.warning("%s: rejected instruction %s: %s", self.name, instruction.id, exc)
            self.instructions_done.append((str(instruction.id), f"rejected: {exc}"))
            await self._status(instruction.id, InstructionStatus.REJECTED)
            return
        await self._status(instruction.id, InstructionStatus.ACCEPTED)
        if wait_s > 0:
            log.info("%s: instruction %s waits %.0f s for its execution time", self.name,
                     instruction.id, wait_s)
            await clock.sleep(wait_s)
        self._pending.pop(str(instruction.id), None)  # started: no longer revocable
        await self._status(instruction.id, InstructionStatus.STARTED)
        try:
            note = await self.apply(instruction)
        except (InstructionRejected, DeviceFault, PermissionError) as exc:
            log.warning("%s: instruction %s aborted: %s", self.name, instruction.id, exc)
            self.instructions_done.append((str(instruction.id), f"aborted: {exc}"))
            await self._status(instruction.id, InstructionStatus.ABORTED)
            if isinstance(exc, DeviceFault):
                await self._device_failed(exc)
            return
        log.info("%s: instruction %s carried out: %s", self.name, instruction.id, note)
        self.instructions_done.append((str(instruction.id), note))
        await self._status(instruction.id, InstructionStatus.SUCCEEDED)

    def check(self, instruction: Any) -> None:
        """Raise InstructionRejected when the instruction does not fit the description."""


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed: %r", task.get_name(), task.exception())


# --- battery -------------------------------------------------------------------------------------


class BatteryRM(ModbusRM):
    """FRBC battery: SoC as fill level; writes a W setpoint and keeps it fresh."""

    device_class = "battery"
    role = RoleType.ENERGY_STORAGE

    def __init__(self, regmap: RegisterMap, **kwargs: Any) -> None:
        super().__init__(regmap, **kwargs)
        self.mode_id: uuid.UUID = s2m.BATTERY_IDLE
        self.factor = 0.0
        self.target_w: float | None = None  # None: the CEM has not asked anything yet
        self.written_w: float | None = None
        self.last_write = 0.0
        self.system_description_id: uuid.UUID | None = None
        self.last_soc_sent: float | None = None
        self.last_soc_time = 0.0

    def control_types(self) -> list[S2ControlType]:
        return [_Frbc(self)]

    def points_to_poll(self) -> list[str]:
        return ["soc", "power"]

    @property
    def refresh_interval_s(self) -> float:
        return min(20.0, max(0.1, self.limits.revert_timeout_s / 3))

    async def prepare_device(self) -> None:
        if self.regmap.has("revert_timeout"):
            await self.link.write("revert_timeout", self.limits.revert_timeout_s)
        self.written_w = None  # the device may have reverted while we were away

    def flexibility_messages(self, now: datetime) -> list[S2Message]:
        description = s2m.battery_system_description(self.limits, now, self.time_scale)
        self.system_description_id = description.message_id
        return [description, self._actuator_status(), self._storage_status()]

    def withdraw_messages(self) -> list[S2Message]:
        return self._revoke(RevokableObjects.FRBC_SystemDescription, self.system_description_id)

    def _actuator_status(self) -> FRBCActuatorStatus:
        return FRBCActuatorStatus(message_id=uuid.uuid4(), actuator_id=s2m.BATTERY_ACTUATOR,
                                  active_operation_mode_id=self.mode_id,
                                  operation_mode_factor=self.factor)

    def _storage_status(self) -> FRBCStorageStatus:
        self.last_soc_sent = self.readings.get("soc")
        self.last_soc_time = time.monotonic()
        return FRBCStorageStatus(message_id=uuid.uuid4(),
                                 present_fill_level=round(self.readings.get("soc", 0.0), 2))

    def periodic_messages(self, now: datetime) -> list[S2Message]:
        out = super().periodic_messages(now)
        soc = self.readings["soc"]
        if (self.last_soc_sent is None or abs(soc - self.last_soc_sent) >= 0.2
                or time.monotonic() - self.last_soc_time > 10):
            out.append(self._storage_status())
        return out

    def check(self, instruction: Any) -> None:
        if not isinstance(instruction, FRBCInstruction):
            raise InstructionRejected("not an FRBC instruction")
        if instruction.actuator_id != s2m.BATTERY_ACTUATOR:
            raise InstructionRejected(f"unknown actuator {instruction.actuator_id}")
        if instruction.operation_mode not in s2m.BATTERY_MODE_NAMES:
            raise InstructionRejected(f"unknown operation mode {instruction.operation_mode}")

    async def apply(self, instruction: Any) -> str:
        assert isinstance(instruction, FRBCInstruction)
        setpoint = s2m.battery_setpoint(self.limits, instruction.operation_mode,
                                        instruction.operation_mode_factor,
                                        self.readings.get("soc"))
        if setpoint.note:
            log.warning("%s: %s", self.name, setpoint.note)
        await self.write_power(setpoint.asked_w)
        self.mode_id = instruction.operation_mode
        self.factor = instruction.operation_mode_factor
        self.target_w = setpoint.asked_w
        await self.s2.send_and_forget(self._actuator_status())
        mode = s2m.BATTERY_MODE_NAMES[self.mode_id]
        return f"{mode} x {self.factor:.2f} -> setpoint {self.written_w:.0f} W"

    async def write_power(self, asked_w: float) -> None:
        """Write a power setpoint (+ charge) through the map, never beyond the limits."""
        setpoint = s2m.clamp_battery_power(self.limits, asked_w, self.readings.get("soc"))
        if setpoint.note and setpoint.power_w != self.written_w:
            log.info("%s: %s", self.name, setpoint.note)
        power = setpoint.power_w
        if self.regmap.has("power_setpoint"):
            await self.link.write("power_setpoint", power)
        else:  # SunSpec model 124: percent of WChaMax plus the charge/discharge bits
            base = float(self.limits.max_charge_w or 1)
            if power > 0:
                await self.link.write("charge_rate_pct", min(100.0, power / base * 100))
                await self.link.write("storage_control_mode", 1)
            elif power < 0:
                await self.link.write("discharge_rate_pct", min(100.0, -power / base * 100))
                await self.link.write("storage_control_mode", 2)
            else:
                await self.link.write("storage_control_mode", 0)
        self.written_w = power
        self.last_write = time.monotonic()

    async def maintain(self) -> None:
        if self.target_w is None:
            return
        if time.monotonic() - self.cem_seen > self.cem_grace_s:
            log.warning("%s: no CEM for %.0f s: no longer holding %.0f W, the battery goes "
                        "idle", self.name, self.cem_grace_s, self.target_w)
            self.target_w = None
            self.mode_id, self.factor = s2m.BATTERY_IDLE, 0.0
            await self.write_power(0.0)
            return
        clamped = s2m.clamp_battery_power(self.limits, self.target_w,
                                          self.readings.get("soc")).power_w
        if clamped != self.written_w or time.monotonic() - self.last_write > \
                self.refresh_interval_s:
            await self.write_power(self.target_w)

    async def on_shutdown(self) -> None:
        if self.target_w and self.link.connected:
            log.info("%s: stopping: setting the battery to idle (0 W)", self.name)
            await self.write_power(0.0)


# --- heat pump ------------------------------------------------------------------------------------


class HeatPumpRM(ModbusRM):
    """FRBC heat pump: buffer temperature as fill level, SG-Ready states as modes."""

    device_class = "heat-pump"
    role = RoleType.ENERGY_CONSUMER

    def __init__(self, regmap: RegisterMap, **kwargs: Any) -> None:
        super().__init__(regmap, **kwargs)
        self.mode_id: uuid.UUID | None = None
        self.timer_ends: dict[uuid.UUID, datetime] = {}
        self.system_description_id: uuid.UUID | None = None
        self.last_forecast = 0.0
        self.last_temp_sent: float | None = None

    def control_types(self) -> list[S2ControlType]:
        return [_Frbc(self)]

    def provides_forecast(self) -> bool:
        return True

    @property
    def relays(self) -> bool:
        """SG-Ready as two relay inputs (coils) rather than one state register."""
        return not self.regmap.has("sg_ready_state")

    def points_to_poll(self) -> list[str]:
        names = ["buffer_temperature", "power"]
        names += ["sg_ready_relay_1", "sg_ready_relay_2"] if self.relays else ["sg_ready_state"]
        return names + (["outdoor_temperature"] if self.regmap.has("outdoor_temperature") else [])

    async def prepare_device(self) -> None:
        if self.regmap.has("setpoint_temperature"):
            await self.link.write("setpoint_temperature", float(self.limits.comfort_max_c or 55))

    def _current_mode(self) -> uuid.UUID:
        if self.mode_id is not None:
            return self.mode_id
        if self.relays:
            return s2m.heat_pump_mode_of_relays(bool(self.readings.get("sg_ready_relay_1")),
                                                bool(self.readings.get("sg_ready_relay_2")))
        return s2m.heat_pump_mode_of(self.limits, int(self.readings.get("sg_ready_state", 0)))

    def flexibility_messages(self, now: datetime) -> list[S2Message]:
        description = s2m.heat_pump_system_description(self.limits, now, self.time_scale)
        self.system_description_id = description.message_id
        self.last_forecast = clock.monotonic()
        return [description, s2m.heat_pump_leakage(self.limits, now, time_scale=self.time_scale),
                self._usage_forecast(now), self._actuator_status(), self._storage_status()]

    def _usage_forecast(self, now: datetime) -> S2Message:
        return s2m.heat_pump_usage_forecast(self.limits, now, time_scale=self.time_scale,
                                            outdoor_c=self.readings.get("outdoor_temperature"))

    def withdraw_messages(self) -> list[S2Message]:
        return self._revoke(RevokableObjects.FRBC_SystemDescription, self.system_description_id)

    def _actuator_status(self) -> FRBCActuatorStatus:
        return FRBCActuatorStatus(message_id=uuid.uuid4(), actuator_id=s2m.HEAT_PUMP_ACTUATOR,
                                  active_operation_mode_id=self._current_mode(),
                                  operation_mode_factor=1.0)

    def _storage_status(self) -> FRBCStorageStatus:
        self.last_temp_sent = self.readings.get("buffer_temperature")
        return FRBCStorageStatus(message_id=uuid.uuid4(), present_fill_level=round(
            self.readings.get("buffer_temperature", 0.0), 2))

    def periodic_messages(self, now: datetime) -> list[S2Message]:
        out = super().periodic_messages(now)
        temp = self.readings["buffer_temperature"]
        if self.last_temp_sent is None or abs(temp - self.last_temp_sent) >= 0.1:
            out.append(self._storage_status())
        if clock.monotonic() - self.last_forecast > 900:
            self.last_forecast = clock.monotonic()
            out.append(self._usage_forecast(now))
        return out

    def check(self, instruction: Any) -> None:
        if not isinstance(instruction, FRBCInstruction):
            raise InstructionRejected("not an FRBC instruction")
        if instruction.actuator_id != s2m.HEAT_PUMP_ACTUATOR:
            raise InstructionRejected(f"unknown actuator {instruction.actuator_id}")
        if instruction.operation_mode not in s2m.HEAT_PUMP_MODE_NAMES:
            raise InstructionRejected(f"unknown operation mode {instruction.operation_mode}")
        blocked = self._blocking_timer(instruction.operation_mode, instruction.execution_time)
        if blocked:
            raise InstructionRejected(blocked)

    def _blocking_timer(self, to_mode: uuid.UUID, at: datetime) -> str | None:
        """Which timer forbids switching to `to_mode` now (None: free to switch)."""
        current = self._current_mode()
        if current == to_mode:
            return None
        on = (s2m.HEAT_PUMP_NORMAL, s2m.HEAT_PUMP_BOOST)
        if current == s2m.HEAT_PUMP_OFF and to_mode in on:
            blocking = s2m.MIN_OFF_TIMER
        elif current in on and to_mode == s2m.HEAT_PUMP_OFF:
            blocking = s2m.MIN_RUN_TIMER
        else:
            return None
        end = self.timer_ends.get(blocking)
        if end is not None and end > at:
            label = "minimum run time" if blocking == s2m.MIN_RUN_TIMER else "minimum off time"
            return f"{label} runs until {end.isoformat(timespec='seconds')}"
        return None

    async def _switch_relays(self, wanted: tuple[bool, bool]) -> None:
        """Open before closing: between the two writes the pump sees normal (both open), never
        forced on (both closed)."""
        names = ("sg_ready_relay_1", "sg_ready_relay_2")
        for opening in (True, False):
            for name, closed in zip(names, wanted, strict=True):
                if closed != opening:
                    await self.link.write(name, 1.0 if closed else 0.0)

    async def apply(self, instruction: Any) -> str:
        assert isinstance(instruction, FRBCInstruction)
        now = utc_now()
        blocked = self._blocking_timer(instruction.operation_mode, now)
        if blocked:
            raise InstructionRejected(blocked)
        previous = self._current_mode()
        target = instruction.operation_mode
        if self.relays:
            await self._switch_relays(s2m.SG_READY_RELAYS[target])
        else:
            await self.link.write("sg_ready_state", s2m.heat_pump_sg_state(self.limits, target))
        self.mode_id = target
        started: list[uuid.UUID] = []
        if previous == s2m.HEAT_PUMP_OFF and target != s2m.HEAT_PUMP_OFF:
            started.append(s2m.MIN_RUN_TIMER)
        elif previous != s2m.HEAT_PUMP_OFF and target == s2m.HEAT_PUMP_OFF:
            started.append(s2m.MIN_OFF_TIMER)
        for timer in started:
            seconds = (self.limits.min_run_s if timer == s2m.MIN_RUN_TIMER
                       else self.limits.min_off_s) / self.time_scale
            self.timer_ends[timer] = now + timedelta(seconds=seconds)
            await self.s2.send_and_forget(FRBCTimerStatus(
                message_id=uuid.uuid4(), timer_id=timer, actuator_id=s2m.HEAT_PUMP_ACTUATOR,
                finished_at=self.timer_ends[timer]))
        await self.s2.send_and_forget(self._actuator_status())
        return (f"{s2m.HEAT_PUMP_MODE_NAMES[previous]} -> {s2m.HEAT_PUMP_MODE_NAMES[target]} "
                f"(SG-Ready {s2m.heat_pump_sg_state(self.limits, target)})")


# --- PV -------------------------------------------------------------------------------------------


class PvRM(ModbusRM):
    """PEBC PV inverter: production cap through WMaxLimPct, only when the CEM asks."""

    device_class = "pv"
    role = RoleType.ENERGY_PRODUCER

    def __init__(self, regmap: RegisterMap, *,
                 device_clock: Callable[[], datetime] | None = None, **kwargs: Any) -> None:
        super().__init__(regmap, **kwargs)
        self.device_clock = device_clock  # a simulator replaying another day (demo)
        self.constraints_id: uuid.UUID | None = None
        self.constraints_message_id: uuid.UUID | None = None
        self.steps: list[s2m.Curtailment] = []
        self.limit_written: float | None = None  # WMaxLimPct in force, None: not curtailing
        self.last_write = 0.0
        self.last_forecast = 0.0
        times, values = load_pv_profile()
        by_hour: dict[int, list[float]] = {}
        for moment, value in zip(times, values, strict=True):
            by_hour.setdefault(moment.hour, []).append(value)
        self.per_kwp_by_hour = [sum(by_hour.get(h, [0.0])) / len(by_hour.get(h, [0.0]))
                                for h in range(24)]

    def control_types(self) -> list[S2ControlType]:
        return [_Pebc(self)]

    def provides_forecast(self) -> bool:
        return True

    @property
    def refresh_interval_s(self) -> float:
        return min(60.0, max(0.1, self.limits.revert_timeout_s / 3))

    async def prepare_device(self) -> None:
        if self.regmap.has("limit_revert_timeout"):
            await self.link.write("limit_revert_timeout", self.limits.revert_timeout_s)
        self.limit_written = None

    def flexibility_messages(self, now: datetime) -> list[S2Message]:
        constraints = s2m.pv_power_constraints(self.limits, now)
        self.constraints_id = constraints.id
        self.constraints_message_id = constraints.message_id
        self.last_forecast = clock.monotonic()
        return [constraints, self._forecast(now)]

    def _forecast(self, now: datetime) -> S2Message:
        return s2m.pv_forecast(self.limits, now, self.per_kwp_by_hour, time_scale=self.time_scale,
                               device_now=self.device_clock() if self.device_clock else None)

    def withdraw_messages(self) -> list[S2Message]:
        return self._revoke(RevokableObjects.PEBC_PowerConstraints, self.constraints_id)

    def periodic_messages(self, now: datetime) -> list[S2Message]:
        out = super().periodic_messages(now)
        if clock.monotonic() - self.last_forecast > 900:
            self.last_forecast = clock.monotonic()
            out.append(self._forecast(now))
        return out

    def check(self, instruction: Any) -> None:
        if not isinstance(instruction, PEBCInstruction):
            raise InstructionRejected("not a PEBC instruction")
        if instruction.power_constraints_id != self.constraints_id:
            raise InstructionRejected(f"refers to power constraints "
                                      f"{instruction.power_constraints_id}, ours are "
                                      f"{self.constraints_id}")

    async def apply(self, instruction: Any) -> str:
        assert isinstance(instruction, PEBCInstruction)
        self.steps = s2m.pv_curtailment_steps(self.limits, instruction)
        await self.maintain()
        caps = ", ".join(f"{s.max_production_w:.0f} W for "
                         f"{(s.end - s.start).total_seconds():.0f} s" for s in self.steps)
        return f"production caps: {caps or 'none'}"

    def cap_now(self, now: datetime) -> float | None:
        """The production cap in force now (W), None when not curtailing."""
        rated = float(self.limits.rated_power_w or 0)
        for step in self.steps:
            if step.start <= now < step.end:
                return None if step.max_production_w >= rated else step.max_production_w
        return None

    async def maintain(self) -> None:
        now = utc_now()
        self.steps = [s for s in self.steps if s.end > now]
        cap = self.cap_now(now)
        if cap is None:
            if self.limit_written is not None:
                log.info("%s: curtailment over, production free again", self.name)
                await self.link.write("limit_enabled", 0)
                self.limit_written = None
            return
        pct = s2m.pv_limit_pct(self.limits, cap)
        if pct != self.limit_written or time.monotonic() - self.last_write > \
                self.refresh_interval_s:
            await self.link.write("active_power_limit_pct", pct)
            if self.regmap.has("limit_enabled"):
                await self.link.write("limit_enabled", 1)
            if pct != self.limit_written:
                log.info("%s: curtailing production to %.0f W (WMaxLimPct %.1f %%)",
                         self.name, cap, pct)
            self.limit_written = pct
            self.last_write = time.monotonic()

    async def on_shutdown(self) -> None:
        if self.limit_written is not None and self.link.connected:
            log.info("%s: stopping: lifting the curtailment", self.name)
            await self.link.write("limit_enabled", 0)


# --- meter --------------------------------------------------------------------------------------


class MeterRM(ModbusRM):
    """NOT_CONTROLABLE grid meter: per-phase power at the connection point, at 1 Hz."""

    device_class = "meter"
    role = RoleType.ENERGY_CONSUMER
    default_poll_s = 1.0

    def measured_quantities(self) -> list[CommodityQuantity]:
        return [CommodityQuantity.ELECTRIC_POWER_L1, CommodityQuantity.ELECTRIC_POWER_L2,
                CommodityQuantity.ELECTRIC_POWER_L3][:self.limits.phases]

    def _phase_points(self) -> list[str]:
        return [f"power_l{i}" for i in range(1, self.limits.phases + 1)]

    def points_to_poll(self) -> list[str]:
        phases = range(1, self.limits.phases + 1)
        extra = [f"{kind}_l{i}" for kind in ("voltage", "current") for i in phases]
        return self._phase_points() + [n for n in extra if self.regmap.has(n)]

    def flexibility_messages(self, now: datetime) -> list[S2Message]:
        return [self._measurement(now)]

    def _measurement(self, now: datetime) -> S2Message:
        return s2m.meter_measurement([self.readings[p] for p in self._phase_points()], now)

    def periodic_messages(self, now: datetime) -> list[S2Message]:
        return [self._measurement(now)]


RESOURCE_MANAGERS: dict[str, type[ModbusRM]] = {
    "battery": BatteryRM,
    "heat-pump": HeatPumpRM,
    "pv": PvRM,
    "meter": MeterRM,
}


def resource_manager_for(regmap: RegisterMap, **kwargs: Any) -> ModbusRM:
    """The RM class that fits the map's device class."""
    return RESOURCE_MANAGERS[regmap.device_class](regmap, **kwargs)


__all__ = ["RESOURCE_MANAGERS", "BatteryRM", "HeatPumpRM", "MeterRM", "ModbusRM", "PvRM",
           "resource_manager_for"]
