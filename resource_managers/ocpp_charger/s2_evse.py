"""Each EVSE as one S2 resource manager of the CEM (FRBC), on the shared RM base.

The OCPP side calls back on every change (status, session, meter value); a per-EVSE task turns
that into S2: a new FRBC.SystemDescription (+ fill level target) when the shape of the
flexibility changed (EV arrived or left, charger on/offline, maximum current, departure, need),
else FRBC.StorageStatus / ActuatorStatus / PowerMeasurement. FRBC.Instructions become a current
limit (TxProfile) at their execution time; the charger's answer becomes InstructionStatusUpdate
ACCEPTED + STARTED, or REJECTED (the CEM replans).

Losing the CEM: the session's TxProfile is cleared, so the charger falls back to its
TxDefaultProfile (the site's safe limit), and the RM reconnects (with back-off, in the base).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import datetime
from typing import Any

from s2python.common import (
    Commodity,
    Duration,
    InstructionStatus,
    InstructionStatusUpdate,
    RevokeObject,
    Role,
    RoleType,
)
from s2python.connection.asset_details import AssetDetails
from s2python.connection.async_.connection import S2AsyncConnection
from s2python.connection.types import S2ConnectionEventsAndMessages, SendOkayRunAsync
from s2python.frbc import FRBCInstruction
from s2python.message import S2Message

from resource_managers.base import FRBCControlType, S2ResourceManager
from resource_managers.ocpp_charger import frbc
from resource_managers.ocpp_charger.evse import CentralSystem, Evse
from sitekit import clock

logger = logging.getLogger("resource_managers.ocpp.s2")

MEASUREMENT_INTERVAL_S = 15.0


def _now() -> datetime:
    """The process clock (`sitekit.clock`: real time, or the demo's simulated time)."""
    return clock.now()


class EvseFrbcControl(FRBCControlType):
    """s2-python FRBC control type of one EVSE: activation and instructions."""

    def __init__(self, resource: EvseResource) -> None:
        self.resource = resource

    async def activate(self, connection: S2AsyncConnection) -> None:
        self.resource.activated()

    async def deactivate(self, connection: S2AsyncConnection) -> None:
        self.resource.active = False

    async def handle_instruction(self, connection: S2AsyncConnection,
                                 msg: S2ConnectionEventsAndMessages,
                                 send_okay: SendOkayRunAsync) -> None:
        if self.resource.answer_delay_s > 0:  # fault injection (`cem bench faults`)
            await asyncio.sleep(self.resource.answer_delay_s)
        if send_okay is not None:  # s2-python always gives one to a handler
            await send_okay()
        if isinstance(msg, FRBCInstruction):
            self.resource.instruction(msg)


class EvseResource:
    """The S2 side of one EVSE: its RM session and what it has told the CEM."""

    def __init__(self, csms: CentralSystem, evse: Evse, cem_url: str, token: str | None) -> None:
        self.csms = csms
        self.evse = evse
        self.ids = frbc.FrbcIds.for_resource(evse.resource_id)
        self.control = EvseFrbcControl(self)
        self.rm = S2ResourceManager(
            cem_url=cem_url, token=token, control_types=[self.control],
            on_revoke=self._revoked,
            asset_details=AssetDetails(
                resource_id=evse.resource_id, name=f"EV charger {evse.name}",
                provides_forecast=False,
                provides_power_measurements=frbc.measured_quantities(evse.config.phases,
                                                                     evse.config.phase),
                instruction_processing_delay=Duration.from_milliseconds(2000),
                roles=[Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY)]),
        )
        self.refresh_details()
        self.active = False
        self.changed = asyncio.Event()
        self._shape: tuple[Any, ...] | None = None
        self._target_due: datetime | None = None  # when the target sent runs out
        self._sent_level: float | None = None
        self._sent_limit: float | None = None
        self._sent_power: tuple[float, ...] | None = None
        self._measured_at = 0.0
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.instructions_done: list[tuple[str, InstructionStatus]] = []
        self.answer_delay_s = 0.0  # fault injection: answer the CEM's instructions this late

    # --- state -----------------------------------------------------------------------------

    def flex(self) -> frbc.EvseFlex:
        evse = self.evse
        session = evse.session
        defaults = self.csms.config.ev_defaults
        min_a = defaults.min_current_a
        if session is not None and session.ev_min_current_a:
            min_a = max(min_a, session.ev_min_current_a)
        return frbc.EvseFlex(
            name=evse.name, online=evse.online, has_session=session is not None,
            phases=evse.phases, phase=evse.phase, min_current_a=min_a,
            max_current_a=evse.max_current_a,
            energy_kwh=session.energy_wh / 1000 if session else 0.0,
            need_kwh=session.energy_need_wh / 1000 if session else None,
            departure=session.departure if session else None,
            soc=session.soc if session else None,
            capacity_kwh=session.capacity_kwh if session else None,
            power_w=evse.power_w, limit_a=session.limit_a if session else None,
            priority=session.priority if session else defaults.priority,
            ev_full=session.ev_full if session else False,
            driver=(session.card.name or session.id_tag) if session and session.card else (
                session.id_tag if session else None),
            needs_source=session.needs_source if session else "")

    def refresh_details(self) -> None:
        """Manufacturer and model as the charger told in its BootNotification (until it has
        booted: the charge point id); an S2 session keeps the details it started with."""
        details = self.rm.asset_details
        details.manufacturer = self.evse.vendor
        details.model = self.evse.model or f"OCPP charge point {self.evse.cp_id}"

    def activated(self) -> None:
        self.active = True
        self._shape = None  # a new S2 session: tell everything again
        self.changed.set()

    # --- run -------------------------------------------------------------------------------

    def start(self, stop: asyncio.Event) -> None:
        for coro, what in ((self.rm.run(stop), "S2 session"), (self._updates(stop), "S2 updates")):
            task = asyncio.get_running_loop().create_task(coro, name=f"{what} {self.evse.name}")
            self._tasks.add(task)

    async def stop(self) -> None:
        """Let the S2 session close cleanly (the stop event is set), then cancel what is left."""
        for task in self._pending.values():
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=3.0)
        # an instruction that came in meanwhile waits for its execution time: cancelled too
        left = [*self._tasks, *self._pending.values()]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    async def _updates(self, stop: asyncio.Event) -> None:
        was_connected = False
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=1.0)  # also: CEM lost?
            self.changed.clear()
            if stop.is_set():
                break
            connected = self.rm.connected.is_set()
            if was_connected and not connected:
                await self._cem_lost()
            was_connected = connected
            if not connected or not self.active:
                continue
            try:
                self.csms.offer_again(self.evse, _now())  # an EV that only paused
                await self._tell_cem()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad update must not end the RM
                level = logging.WARNING if self.rm.connected.is_set() else logging.DEBUG
                logger.log(level, "%s: could not update the CEM: %r", self.evse.name, exc)

    async def _cem_lost(self) -> None:
        session = self.evse.session
        logger.warning("%s: lost the CEM; the charger falls back to its default profile "
                       "(safe limit) until the CEM is back", self.evse.name)
        for task in self._pending.values():
            task.cancel()
        if session is not None and session.limit_a is not None and self.evse.online:
            session.limit_a = None
            await self.csms.clear_tx_profile(self.evse)

    async def _send(self, message: S2Message, wait: bool = False) -> None:
        if wait:
            status = await self.rm.send(message)
            if status is not None and status.status.value != "OK":
                logger.warning("%s: CEM answered %s to %s (%s)", self.evse.name,
                               status.status.value, message.message_type,
                               status.diagnostic_label or "no reason")
        else:
            await self.rm.send_and_forget(message)

    async def _tell_cem(self) -> None:
        flex = self.flex()
        now = _now()
        session = self.evse.session
        shape = (flex.online, flex.has_session, session.transaction_id if session else None,
                 flex.priority,
                 flex.phases, flex.min_current_a, round(flex.max_current_a, 1), flex.departure,
                 flex.need_kwh, flex.uses_soc, flex.ev_full, flex.needs_source)
        if shape != self._shape:
            self._shape = shape
            await self._send(frbc.system_description(flex, self.ids, now), wait=True)
            await self._send_target(flex, now)
            self._sent_level = self._sent_limit = self._sent_power = None
            if flex.flexible:
                logger.info("%s: told the CEM %.1f-%.1f kW, %.1f of %.1f kWh, departure %s",
                            self.evse.name, flex.min_power_w / 1000, flex.max_power_w / 1000,
                            flex.energy_kwh, flex.need_kwh or 0,
                            flex.departure.strftime("%H:%M UTC") if flex.departure else "?")
            else:
                why = "offline" if not flex.online else (
                    "the EV is full: it stopped drawing while offered current" if flex.ev_full
                    else "no EV")
                logger.info("%s: told the CEM it has no flexibility (%s)", self.evse.name, why)
        elif self._target_due is not None and now >= self._target_due:
            # still plugged in at the departure: the driver is late, not gone
            await self._send_target(flex, now)
            logger.info("%s: still plugged in after the departure; told the CEM its need of "
                        "%.1f kWh again, for the next hour", self.evse.name, flex.need_kwh or 0)
        level = round(flex.fill_level(), 3)
        if level != self._sent_level:
            self._sent_level = level
            await self._send(frbc.storage_status(flex))
        if flex.limit_a != self._sent_limit or self._sent_limit is None:
            self._sent_limit = flex.limit_a
            await self._send(frbc.actuator_status(flex, self.ids))
        power = tuple(round(p) for p in flex.power_w) if flex.online else (0, 0, 0)
        loop_time = asyncio.get_running_loop().time()
        if power != self._sent_power or loop_time - self._measured_at >= MEASUREMENT_INTERVAL_S:
            self._sent_power = power
            self._measured_at = loop_time
            await self._send(frbc.power_measurement(flex, now))

    async def _send_target(self, flex: frbc.EvseFlex, now: datetime) -> None:
        target = frbc.fill_level_target(flex, now)
        self._target_due = None if target is None else frbc.target_runs_out(target)
        if target is not None:
            await self._send(target, wait=True)

    # --- instructions ----------------------------------------------------------------------

    def instruction(self, instruction: FRBCInstruction) -> None:
        task = asyncio.get_running_loop().create_task(self._carry_out(instruction))
        key = str(instruction.id)
        self._pending[key] = task
        task.add_done_callback(lambda _: self._pending.pop(key, None))

    async def _status(self, instruction: FRBCInstruction, status: InstructionStatus) -> None:
        self.instructions_done.append((str(instruction.id), status))
        await self._send(InstructionStatusUpdate(
            message_id=uuid.uuid4(), instruction_id=instruction.id, status_type=status,
            timestamp=_now()))

    async def _carry_out(self, instruction: FRBCInstruction) -> None:
        name = self.evse.name
        try:
            amps = frbc.instruction_current(self.flex(), self.ids, instruction)
        except frbc.InstructionProblem as exc:
            logger.warning("%s: instruction %s rejected: %s", name, instruction.id, exc)
            await self._status(instruction, InstructionStatus.REJECTED)
            return
        delay = (instruction.execution_time - _now()).total_seconds()
        if delay > 1:
            await self._status(instruction, InstructionStatus.ACCEPTED)
            logger.debug("%s: instruction %s (%.1f A) runs in %.0f s", name, instruction.id,
                         amps, delay)
            await clock.sleep(delay)
            try:  # the EV may have left or the charger gone offline meanwhile
                amps = frbc.instruction_current(self.flex(), self.ids, instruction)
            except frbc.InstructionProblem as exc:
                logger.info("%s: instruction %s no longer fits at its time (%s)", name,
                            instruction.id, exc)
                await self._status(instruction, InstructionStatus.ABORTED)
                return
        if amps == 0 and (self.evse.session is None or not self.evse.online):
            # idle with no EV (or an offline charger on its default profile): nothing to do
            if delay <= 1:
                await self._status(instruction, InstructionStatus.ACCEPTED)
            await self._status(instruction, InstructionStatus.STARTED)
            return
        result = await self.csms.set_current(self.evse.cp_id, self.evse.evse_id, amps)
        if result.accepted:
            if delay <= 1:
                await self._status(instruction, InstructionStatus.ACCEPTED)
            await self._status(instruction, InstructionStatus.STARTED)
            logger.info("%s: CEM instruction carried out: %s", name, result.detail)
        else:
            logger.warning("%s: CEM instruction %s rejected: %s; the CEM will replan", name,
                           instruction.id, result.detail)
            await self._status(instruction, InstructionStatus.REJECTED)
        self.changed.set()

    async def _revoked(self, revoke: RevokeObject) -> None:
        task = self._pending.get(str(revoke.object_id))
        if task is not None:
            task.cancel()
            logger.info("%s: CEM revoked instruction %s before it ran", self.evse.name,
                        revoke.object_id)


class EvseResources:
    """All EVSEs of the central system as S2 RMs of one CEM."""

    def __init__(self, csms: CentralSystem, cem_url: str, token: str | None = None) -> None:
        self.csms = csms
        self.cem_url = cem_url
        self.token = token
        self.resources: dict[tuple[str, int], EvseResource] = {}
        self._stop = asyncio.Event()
        csms.add_listener(self._on_change)

    def start(self) -> None:
        for evse in list(self.csms.evses.values()):
            self.add(evse)

    def add(self, evse: Evse) -> EvseResource:
        resource = self.resources.get(evse.key)
        if resource is None:
            resource = EvseResource(self.csms, evse, self.cem_url, self.token)
            self.resources[evse.key] = resource
            resource.start(self._stop)
            logger.info("%s: S2 resource manager for the CEM at %s", evse.name, self.cem_url)
        return resource

    def _on_change(self, evse: Evse) -> None:
        resource = self.resources.get(evse.key)
        if resource is not None:
            resource.refresh_details()
            resource.changed.set()

    async def stop(self) -> None:
        self._stop.set()
        for resource in self.resources.values():
            resource.changed.set()
        await asyncio.gather(*(r.stop() for r in self.resources.values()), return_exceptions=True)
