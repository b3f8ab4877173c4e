"""The device loop every device RM shares: poll, describe, apply, revoke, fail safe, reconnect.

A `DeviceRM` is one S2 session to the CEM (the shared `S2ResourceManager` of `base.py`) and one
link to a device, and runs two loops side by side:

- the **device loop** connects to the device (and `prepare_device` after every connect), polls
  it every `poll_interval_s`, sends `periodic_messages` (measurements, status) to the CEM,
  and calls `maintain` (refresh setpoints before the device reverts them, scheduled steps);
- the **S2 session** (base) reconnects on its own; whenever the CEM selects our control type
  the RM describes its flexibility afresh (`flexibility_messages`).

Faults: a `DeviceFault` from the link (no connection, a refused request, a reading that makes
no sense) makes the RM withdraw its flexibility (`withdraw_messages`, e.g. a RevokeObject of the
system description), retry with exponential back-off (`DeviceUnreachable` also closes the link),
and describe itself again once the device answers. Instructions of the control types the RM
offers are answered at once (TEMPORARY_ERROR while the device is down), checked (`check`: a
REJECTED status when they do not fit), carried out at their execution time (`apply`) and
followed by InstructionStatusUpdates (ACCEPTED, STARTED, SUCCEEDED or ABORTED); the CEM may
revoke one that has not started. A CEM that is gone longer than `cem_grace_s` is the
subclass's business in `maintain` (`cem_seen`); a stop on purpose calls `on_shutdown`.

A new device family (MQTT, HTTP, ...) is an adapter, not a copy: subclass `DeviceRM` and

1. implement the protocol I/O: `connect_device`, `device_connected`, `read_device` (one poll:
   named readings; raise `DeviceFault` / `DeviceUnreachable`) and `close_device`;
2. say what the device is in S2: `roles` (ENERGY_CONSUMER / PRODUCER / STORAGE with commodity),
   `measured_quantities`, `provides_forecast`, `control_types` (`FrbcToDevice(self)`,
   `PebcToDevice(self)`, `OmbcToDevice(self)`, `DdbcToDevice(self)` or `NoControl()`);
3. map to S2: `flexibility_messages` (describe), `periodic_messages` (measure),
   `withdraw_messages` (take back), `check` / `apply` (instructions to the device), and where
   needed `prepare_device`, `maintain`, `on_shutdown`.

`resource_managers.modbus.rm.ModbusRM` is the Modbus TCP adapter (a register map and
`ModbusLink`); its battery, heat pump, PV and meter subclasses are the S2 mappings.
In-process use: `await rm.start()`, later `await rm.stop()`; as a process: `await rm.run(stop)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import datetime
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
)
from s2python.connection.async_.connection import S2AsyncConnection
from s2python.connection.types import S2ConnectionEventsAndMessages, SendOkayRunAsync
from s2python.ddbc import DDBCInstruction
from s2python.frbc import FRBCInstruction
from s2python.message import S2Message
from s2python.ombc import OMBCInstruction
from s2python.pebc import PEBCInstruction

from resource_managers.base import (
    AssetDetails,
    DDBCControlType,
    FRBCControlType,
    NoControlControlType,
    OMBCControlType,
    PEBCControlType,
    S2ControlType,
    S2ResourceManager,
    reply_status,
)
from sitekit import clock

__all__ = [
    "DdbcToDevice", "DeviceFault", "DeviceRM", "DeviceUnreachable", "FrbcToDevice",
    "Instruction", "InstructionRejected", "NoControl", "OmbcToDevice", "PebcToDevice",
]

Instruction = FRBCInstruction | PEBCInstruction | OMBCInstruction | DDBCInstruction
INSTRUCTION_TYPES = (FRBCInstruction, PEBCInstruction, OMBCInstruction, DDBCInstruction)
REVOKABLE_INSTRUCTIONS = (RevokableObjects.FRBC_Instruction, RevokableObjects.PEBC_Instruction,
                          RevokableObjects.OMBC_Instruction, RevokableObjects.DDBC_Instruction)


def utc_now() -> datetime:
    """The process clock (`sitekit.clock`: real time, or the demo's simulated time)."""
    return clock.now()


class DeviceFault(Exception):
    """The device did not give a usable answer."""


class DeviceUnreachable(DeviceFault):
    """No connection to the device, or no answer within the timeout."""


class InstructionRejected(Exception):
    """The RM will not (or cannot) carry out an instruction; the message says why."""


class _ToDevice:
    """A control type whose instructions go to the RM's `check` / `apply`."""

    def __init__(self, rm: DeviceRM) -> None:
        self.rm = rm

    async def handle_instruction(self, connection: S2AsyncConnection,
                                 msg: S2ConnectionEventsAndMessages,
                                 send_okay: SendOkayRunAsync) -> None:
        await self.rm._receive_instruction(connection, msg, send_okay)

    async def activate(self, connection: S2AsyncConnection) -> None:
        return None

    async def deactivate(self, connection: S2AsyncConnection) -> None:
        return None


class FrbcToDevice(_ToDevice, FRBCControlType):
    """FRBC, instructions to the device."""


class PebcToDevice(_ToDevice, PEBCControlType):
    """PEBC, instructions to the device."""


class OmbcToDevice(_ToDevice, OMBCControlType):
    """OMBC, instructions to the device."""


class DdbcToDevice(_ToDevice, DDBCControlType):
    """DDBC, instructions to the device."""


class NoControl(NoControlControlType):
    """NOT_CONTROLABLE: the device only reports (a meter)."""

    async def activate(self, connection: S2AsyncConnection) -> None:
        return None

    async def deactivate(self, connection: S2AsyncConnection) -> None:
        return None


class DeviceRM:
    """The life cycle of an S2 resource manager for one device (see the module docstring)."""

    log: ClassVar[logging.Logger] = logging.getLogger("resource_managers.device")
    default_poll_s: ClassVar[float] = 1.0
    instruction_processing_delay_ms: ClassVar[int] = 1000

    def __init__(self, *, cem_url: str, name: str, resource_id: uuid.UUID,
                 token: str | None = None, manufacturer: str | None = None,
                 model: str | None = None, poll_interval_s: float | None = None,
                 backoff_s: tuple[float, float] = (0.5, 30.0),
                 s2_backoff_s: tuple[float, float] = (0.5, 30.0),
                 cem_grace_s: float = 60.0, time_scale: float = 1.0) -> None:
        self.name = name
        self.resource_id = resource_id
        self.poll_interval_s = poll_interval_s or self.default_poll_s
        self.backoff_s = backoff_s
        self.time_scale = time_scale  # simulated s per wall s of the device behind us
        self.details = AssetDetails(
            resource_id=resource_id, name=name, manufacturer=manufacturer, model=model,
            provides_forecast=self.provides_forecast(),
            provides_power_measurements=self.measured_quantities(),
            instruction_processing_delay=Duration(root=self.instruction_processing_delay_ms),
            roles=self.roles())
        self.s2 = S2ResourceManager(cem_url=cem_url, asset_details=self.details,
                                    control_types=self.control_types(), token=token,
                                    backoff_s=s2_backoff_s,
                                    on_control_type=self._on_control_type,
                                    on_revoke=self._on_revoke)
        self.cem_grace_s = cem_grace_s
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

    # --- the protocol I/O: an adapter implements these -----------------------------------------

    async def connect_device(self) -> None:
        """Open the link to the device; raise DeviceUnreachable when it cannot be reached."""
        raise NotImplementedError

    def device_connected(self) -> bool:
        """Whether the link is open."""
        raise NotImplementedError

    async def read_device(self) -> dict[str, float]:
        """One poll: the readings by name; raise DeviceFault on an unusable answer."""
        raise NotImplementedError

    async def close_device(self) -> None:
        """Close the link (it is opened again by the next poll)."""
        raise NotImplementedError

    def describe_link(self) -> str:
        """Where the device is, for the log."""
        return ""

    # --- what a device says about itself in S2 ---------------------------------------------------

    def roles(self) -> list[Role]:
        """ResourceManagerDetails roles: what the device does with which commodity."""
        return []

    def control_types(self) -> list[S2ControlType]:
        return [NoControl()]

    def provides_forecast(self) -> bool:
        return False

    def measured_quantities(self) -> list[CommodityQuantity]:
        return []

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
        return []

    async def maintain(self) -> None:
        """Keep the device where the CEM wants it (refresh setpoints before they revert)."""

    def check(self, instruction: Any) -> None:
        """Raise InstructionRejected when the instruction does not fit the description."""

    async def apply(self, instruction: Any) -> str:
        """Carry out an instruction on the device; return a short note for the log."""
        raise InstructionRejected(f"{self.name} takes no instructions")

    async def on_shutdown(self) -> None:
        """Leave the device in a safe state when the RM is stopped on purpose."""

    # --- life cycle ------------------------------------------------------------------------------

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
        self.log.info("%s: %s, CEM %s", self.name, self.describe_link(), self.s2.cem_url)
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
            await self.close_device()
            self.log.info("%s: stopped", self.name)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._log_failure)
        return task

    def _log_failure(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task %s failed: %r", task.get_name(), task.exception())

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))

    async def _device_loop(self, stop: asyncio.Event) -> None:
        low, high = self.backoff_s
        delay = low
        next_poll = time.monotonic()
        while not stop.is_set():
            try:
                if not self.device_connected():
                    await self.connect_device()
                    self.log.info("%s: connected to the device", self.name)
                    await self.prepare_device()
                values = await self.read_device()
            except DeviceFault as exc:
                await self._device_failed(exc)
                self.log.info("%s: retrying the device in %.1f s", self.name, delay)
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
                self.log.info("%s: device answers; offering its flexibility to the CEM",
                              self.name)
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
            self.log.warning("%s: device fault: %s; withdrawing its flexibility from the CEM",
                             self.name, reason)
            self.device_ok = False
            if self.s2.connected.is_set():
                for message in self.withdraw_messages():
                    await self.s2.send_and_forget(message)
        elif reason != self.fault:
            self.log.warning("%s: device still unavailable: %s", self.name, reason)
        self.fault = reason
        if isinstance(exc, DeviceUnreachable):
            await self.close_device()

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
                    self.log.warning("%s: sending %s failed: %r", self.name, label, exc)
                    return
                if status is None:
                    self.log.warning("%s: no ReceptionStatus for %s", self.name, label)
                elif status.status != ReceptionStatusValues.OK:
                    self.log.warning("%s: CEM answered %s to %s: %s", self.name,
                                     status.status.value, label, status.diagnostic_label)
                else:
                    self.log.info("%s: CEM accepted %s", self.name, label)

    # --- instructions ----------------------------------------------------------------------------

    async def _receive_instruction(self, connection: S2AsyncConnection,
                                   msg: S2ConnectionEventsAndMessages,
                                   send_okay: SendOkayRunAsync) -> None:
        if not isinstance(msg, INSTRUCTION_TYPES):
            return
        if not self.device_ok:
            await reply_status(connection, send_okay, msg.message_id,
                               ReceptionStatusValues.TEMPORARY_ERROR,
                               f"device unavailable: {self.fault}")
            return
        if send_okay is not None:  # s2-python always gives one to a handler
            await send_okay()
        key = str(msg.id)
        task = self._spawn(self._execute(msg), f"instruction-{msg.id}")
        self._pending[key] = task

        def done(_: asyncio.Task[Any]) -> None:
            self._pending.pop(key, None)

        task.add_done_callback(done)

    async def _on_revoke(self, message: RevokeObject) -> None:
        """The CEM takes back an instruction that has not started yet (a replan)."""
        if message.object_type not in REVOKABLE_INSTRUCTIONS:
            return
        task = self._pending.pop(str(message.object_id), None)
        if task is None or task.done():
            self.log.info("%s: CEM revoked instruction %s, which is not pending (any more)",
                          self.name, message.object_id)
            return
        task.cancel()
        self.log.info("%s: CEM revoked instruction %s before it started", self.name,
                      message.object_id)
        self.instructions_done.append((str(message.object_id), "revoked"))
        self._spawn(self._status(message.object_id, InstructionStatus.REVOKED),
                    f"revoked-{message.object_id}")

    async def _status(self, instruction_id: uuid.UUID, status: InstructionStatus) -> None:
        await self.s2.send_and_forget(InstructionStatusUpdate(
            message_id=uuid.uuid4(), instruction_id=instruction_id, status_type=status,
            timestamp=utc_now()))

    async def _execute(self, instruction: Instruction) -> None:
        wait_s = (instruction.execution_time - utc_now()).total_seconds()
        try:
            self.check(instruction)
        except InstructionRejected as exc:
            self.log.warning("%s: rejected instruction %s: %s", self.name, instruction.id, exc)
            self.instructions_done.append((str(instruction.id), f"rejected: {exc}"))
            await self._status(instruction.id, InstructionStatus.REJECTED)
            return
        await self._status(instruction.id, InstructionStatus.ACCEPTED)
        if wait_s > 0:
            self.log.info("%s: instruction %s waits %.0f s for its execution time", self.name,
                          instruction.id, wait_s)
            await clock.sleep(wait_s)
        self._pending.pop(str(instruction.id), None)  # started: no longer revocable
        await self._status(instruction.id, InstructionStatus.STARTED)
        try:
            note = await self.apply(instruction)
        except (InstructionRejected, DeviceFault, PermissionError) as exc:
            self.log.warning("%s: instruction %s aborted: %s", self.name, instruction.id, exc)
            self.instructions_done.append((str(instruction.id), f"aborted: {exc}"))
            await self._status(instruction.id, InstructionStatus.ABORTED)
            if isinstance(exc, DeviceFault):
                await self._device_failed(exc)
            return
        self.log.info("%s: instruction %s carried out: %s", self.name, instruction.id, note)
        self.instructions_done.append((str(instruction.id), note))
        await self._status(instruction.id, InstructionStatus.SUCCEEDED)
