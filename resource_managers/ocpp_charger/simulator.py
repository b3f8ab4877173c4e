"""Simulated OCPP charge points (1.6J or 2.0.1) with simulated EVs, speaking the real protocol.

A `SimulatedChargePoint` connects to a central system, boots, reports its connectors, and runs
EV sessions (`plug_in` / `unplug`): Authorize, start of the transaction, meter values (energy,
power per phase, SoC), NotifyEVChargingNeeds in 2.0.1, stop. It obeys charging profiles the way
a charger does: per EVSE the TxProfile of the running transaction (highest stack level) wins,
else the TxDefaultProfile (EVSE's own, else EVSE 0's); limits in A or W with their number of
phases; below the 6 A minimum it pauses.

The EV (`SimulatedEv`) has a battery size, a SoC, a per-phase maximum current, 1 or 3 phases and
tapers above 80 % SoC. `speed` compresses time: energy and SoC move `speed` times faster than
the wall clock and dwell times shrink by the same factor; the timestamps and the departure time
sent to the CSMS are on the process clock (`sitekit.clock`): wall-clock times next to a real-time
CEM, simulated times in `cem demo`, whose clock runs at the same speed (docs/adr/0001-demo-clock.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import gzip
import io
import logging
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v16.enums import Action as Action16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from ocpp.v201.enums import Action as Action201

from resource_managers.ocpp_charger import limits
from resource_managers.ocpp_charger.config import ChargePoint
from resource_managers.ocpp_charger.csms import FrameLog
from sitekit import clock

logger = logging.getLogger("resource_managers.ocpp.simulator")

TICK_S = 0.1  # wall-clock physics step


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _now() -> datetime:
    """The process clock (`sitekit.clock`: real time, or the demo's simulated time)."""
    return clock.now()


@dataclass
class SimulatedEv:
    """An EV battery: charges at most `max_current_a` per phase on `phases`, tapering above 80 %."""

    capacity_kwh: float = 60.0
    soc: float = 30.0
    max_current_a: float = 32.0
    phases: int = 3
    min_current_a: float = 6.0
    paused: bool = False  # the car itself takes nothing for now (its timer, conditioning)

    def current_limit_a(self) -> float:
        """What the EV itself accepts now (its charger's taper above 80 % SoC)."""
        if self.soc >= 100 or self.paused:
            return 0.0
        if self.soc <= 80:
            return self.max_current_a
        return max(self.min_current_a, self.max_current_a * (100 - self.soc) / 20)

    def take(self, energy_wh: float) -> None:
        self.soc = min(100.0, self.soc + energy_wh / (self.capacity_kwh * 10))


@dataclass
class _Profile:
    purpose: str
    stack_level: int
    limit: float
    unit: str
    phases: int | None
    transaction_id: str | None

    def amps(self, phases: int) -> float:
        if self.unit == "W":
            return limits.watts_to_amps(self.limit, self.phases or phases)
        return self.limit


@dataclass
class SimulatedEvse:
    """One EVSE of a simulated charge point and the EV plugged into it."""

    evse_id: int
    max_current_a: float
    phases: int
    phase: str = "L1"
    meter_wh: float = 0.0
    ev: SimulatedEv | None = None
    id_tag: str | None = None
    transaction_id: str | None = None
    departure: datetime | None = None
    energy_request_wh: float | None = None
    current_a: float = 0.0
    phases_used: int = 0
    seq_no: int = 0
    meter_start_wh: float = 0.0
    profiles: dict[int, _Profile] = field(default_factory=dict)
    # what the charger offered the EV in this session (its profiles' limit, or 0 below the
    # 6 A minimum) and what of that the EV itself did not take (taper, full battery): who
    # limited the charging, measured on the physics
    offered_a: float = 0.0
    offered_wh: float = 0.0
    refused_wh: float = 0.0
    held_wh: float = 0.0  # after the first offer: below the EVSE's and EV's full current
    plugged_at: datetime | None = None
    first_offer_at: datetime | None = None  # when the charger first let the EV charge
    state_told: str = ""  # the charging state last reported to the central system

    def charging_state(self) -> str:
        """OCPP's charging state: Charging, SuspendedEV (offered current, the EV draws none:
        full), SuspendedEVSE (nothing offered); "" without a transaction."""
        if self.ev is None or self.transaction_id is None:
            return ""
        if self.current_a > 0:
            return "Charging"
        return "SuspendedEV" if self.offered_a > 0 else "SuspendedEVSE"

    @property
    def power_w(self) -> float:
        return limits.amps_to_watts(self.current_a, self.phases_used)

    def power_per_phase(self) -> tuple[float, float, float]:
        if self.phases_used == 0 or self.current_a == 0:
            return (0.0, 0.0, 0.0)
        per_phase = self.current_a * limits.VOLTAGE_V
        if self.phases_used == 3:
            return (per_phase, per_phase, per_phase)
        return {"L1": (per_phase, 0.0, 0.0), "L2": (0.0, per_phase, 0.0),
                "L3": (0.0, 0.0, per_phase)}[self.phase]


class SimulatedChargePoint:
    """One charge point: its EVSEs, its OCPP connection and the physics of its EVs."""

    def __init__(self, cp_id: str, csms_url: str, *, version: str = "1.6", evses: int = 1,
                 max_current_a: float = 32.0, phases: int = 3, phase: str = "L1",
                 password: str | None = None, speed: float = 1.0, meter_interval_s: float = 60.0,
                 reject_profiles: bool = False, subprotocol: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if version not in ("1.6", "2.0.1"):
            raise ValueError(f"OCPP version {version!r}: use 1.6 or 2.0.1")
        self.cp_id = cp_id
        self.csms_url = csms_url.rstrip("/")
        self.version = version
        self.password = password
        self.ssl_context = ssl_context  # whom to trust on wss:// (None: the system's CAs)
        self.speed = speed
        self.meter_interval_s = meter_interval_s
        self.reject_profiles = reject_profiles
        self.subprotocol = subprotocol or ("ocpp1.6" if version == "1.6" else "ocpp2.0.1")
        self.evses = {i: SimulatedEvse(i, max_current_a, phases, phase) for i in range(1, evses + 1)}
        self.station_profiles: dict[int, _Profile] = {}  # EVSE 0 / connector 0
        self.link: Any = None
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.booted = asyncio.Event()
        self.profile_log: list[dict[str, Any]] = []  # every SetChargingProfile received
        self._ws: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._telling: set[asyncio.Task[Any]] = set()  # charging state reports under way
        self._physics_task: asyncio.Task[None] | None = None
        self._last_tick: float | None = None  # loop time the physics ran up to
        self._tx_counter = 0

    # --- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the websocket, start answering the CSMS, boot and report the connectors."""
        headers = {}
        if self.password is not None:
            token = base64.b64encode(f"{self.cp_id}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        tls: dict[str, Any] = {"ssl": self.ssl_context} \
            if self.csms_url.startswith("wss://") and self.ssl_context is not None else {}
        self._ws = await websockets.connect(f"{self.csms_url}/{self.cp_id}",
                                            subprotocols=[self.subprotocol],  # type: ignore[list-item]
                                            additional_headers=headers, open_timeout=5, **tls)
        link_class = _Station16 if self.version == "1.6" else _Station201
        self.link = link_class(self.cp_id, self._ws, self)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._serve()), loop.create_task(self._meter_loop())]
        if self._physics_task is None or self._physics_task.done():
            self._physics_task = loop.create_task(self._physics())
        self.disconnected.clear()
        self.connected.set()
        await self._boot()

    async def _serve(self) -> None:
        try:
            await self.link.start()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.connected.clear()
            self.disconnected.set()

    async def disconnect(self) -> None:
        """Drop the connection (the EVs keep charging on the profiles the charger holds)."""
        if self._ws is not None:
            await self._ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.connected.clear()
        self.booted.clear()

    async def close(self) -> None:
        """Disconnect and stop the EVs' physics."""
        await self.disconnect()
        if self._physics_task is not None:
            self._physics_task.cancel()
            await asyncio.gather(self._physics_task, return_exceptions=True)
            self._physics_task = None

    async def _boot(self) -> None:
        if self.version == "1.6":
            await self.link.call(call16.BootNotification(
                charge_point_vendor="S2 CEM project", charge_point_model="SimCharger 16",
                firmware_version="sim-1"))
        else:
            await self.link.call(call201.BootNotification(
                charging_station={"vendor_name": "S2 CEM project", "model": "SimCharger 201"},
                reason="PowerUp"))
        self.booted.set()
        for evse in self.evses.values():
            await self._status(evse)
            if evse.transaction_id is not None:  # a session that ran while we were offline
                await self.send_meter_values(evse)

    async def _status(self, evse: SimulatedEvse) -> None:
        if self.version == "1.6":
            if evse.ev is None:
                status = "Available"
            elif evse.transaction_id is None:
                status = "Preparing"
            else:
                status = evse.charging_state()
                evse.state_told = status
            await self.link.call(call16.StatusNotification(
                connector_id=evse.evse_id, error_code="NoError", status=status,
                timestamp=_iso(_now())))
        else:
            await self.link.call(call201.StatusNotification(
                timestamp=_iso(_now()), connector_status="Occupied" if evse.ev else "Available",
                evse_id=evse.evse_id, connector_id=1))

    # --- sessions --------------------------------------------------------------------------

    async def plug_in(self, evse_id: int, ev: SimulatedEv, id_tag: str, *,
                      dwell_s: float | None = None, energy_kwh: float | None = None) -> bool:
        """An EV arrives: plug in, authorize, start a transaction. False if it was refused."""
        evse = self.evses[evse_id]
        evse.ev = ev
        evse.phases_used = min(ev.phases, evse.phases)
        evse.offered_wh = evse.refused_wh = evse.held_wh = 0.0
        evse.plugged_at, evse.first_offer_at = _now(), None
        evse.state_told = ""
        if dwell_s is not None:
            # our physics runs `speed` x the wall clock, the process clock `clock.speed()` x
            evse.departure = _now() + timedelta(seconds=dwell_s * clock.speed() / self.speed)
        evse.energy_request_wh = energy_kwh * 1000 if energy_kwh else None
        await self._status(evse)
        if self.version == "1.6":
            answer = await self.link.call(call16.Authorize(id_tag=id_tag))
            if answer is None or answer.id_tag_info["status"] != "Accepted":
                logger.info("%s/%d: card %s refused", self.cp_id, evse_id, id_tag)
                return False
            started = await self.link.call(call16.StartTransaction(
                connector_id=evse_id, id_tag=id_tag, meter_start=int(evse.meter_wh),
                timestamp=_iso(_now())))
            if started is None or started.id_tag_info["status"] != "Accepted":
                return False
            evse.transaction_id = str(started.transaction_id)
        else:
            answer = await self.link.call(call201.Authorize(
                id_token={"id_token": id_tag, "type": "ISO14443"}))
            if answer is None or answer.id_token_info["status"] != "Accepted":
                logger.info("%s/%d: card %s refused", self.cp_id, evse_id, id_tag)
                return False
            self._tx_counter += 1
            evse.transaction_id = f"{self.cp_id}-{evse_id}-{self._tx_counter}-{random.randrange(10**6)}"
            evse.seq_no = 0
            await self._transaction_event(evse, "Started", "Authorized", id_tag=id_tag)
        evse.id_tag = id_tag
        evse.meter_start_wh = evse.meter_wh
        self._follow_limits()  # the charger applies its profiles to the new session at once
        logger.info("%s/%d: EV plugged in (card %s, %.0f kWh battery at %.0f %%)", self.cp_id,
                    evse_id, id_tag, ev.capacity_kwh, ev.soc)
        if self.version == "2.0.1":
            await self._charging_needs(evse)
        await self._status(evse)
        return True

    async def _charging_needs(self, evse: SimulatedEvse) -> None:
        ev = evse.ev
        assert ev is not None
        need_wh = evse.energy_request_wh or ev.capacity_kwh * (100 - ev.soc) * 10
        needs: dict[str, Any] = {
            "requested_energy_transfer": "AC_three_phase" if evse.phases_used == 3 else "AC_single_phase",
            "ac_charging_parameters": {"energy_amount": int(need_wh),
                                       "ev_min_current": int(ev.min_current_a),
                                       "ev_max_current": int(ev.max_current_a),
                                       "ev_max_voltage": 400}}
        if evse.departure is not None:
            needs["departure_time"] = _iso(evse.departure)
        await self.link.call(call201.NotifyEVChargingNeeds(charging_needs=needs,
                                                            evse_id=evse.evse_id))

    async def _transaction_event(self, evse: SimulatedEvse, event_type: str, trigger: str,
                                 id_tag: str | None = None, stopped_reason: str | None = None,
                                 charging_state: str | None = None) -> Any:
        evse.seq_no += 1
        info: dict[str, Any] = {"transaction_id": evse.transaction_id}
        if stopped_reason:
            info["stopped_reason"] = stopped_reason
        if event_type == "Started":
            info["charging_state"] = "EVConnected"
        elif charging_state:
            info["charging_state"] = charging_state
        return await self.link.call(call201.TransactionEvent(
            event_type=event_type, timestamp=_iso(_now()), trigger_reason=trigger,
            seq_no=evse.seq_no, transaction_info=info, meter_value=[self._meter_value(evse)],
            evse={"id": evse.evse_id, "connector_id": 1},
            id_token={"id_token": id_tag, "type": "ISO14443"} if id_tag else None,
            number_of_phases_used=evse.phases_used or None))

    async def unplug(self, evse_id: int, reason: str = "EVDisconnected") -> None:
        """The EV leaves: stop the transaction and free the EVSE."""
        evse = self.evses[evse_id]
        if evse.transaction_id is not None:
            self._follow_limits()  # charged until now
            evse.current_a = evse.offered_a = 0.0
            if self.version == "1.6":
                await self.link.call(call16.StopTransaction(
                    meter_stop=int(evse.meter_wh), timestamp=_iso(_now()),
                    transaction_id=int(evse.transaction_id), reason=reason, id_tag=evse.id_tag))
            else:
                await self._transaction_event(evse, "Ended", "EVDeparted", stopped_reason=reason)
            logger.info("%s/%d: EV left with %.2f kWh", self.cp_id, evse_id,
                        (evse.meter_wh - evse.meter_start_wh) / 1000)
        for key in [k for k, p in evse.profiles.items() if p.purpose == "TxProfile"]:
            del evse.profiles[key]
        evse.ev = None
        evse.transaction_id = evse.id_tag = evse.departure = None
        evse.phases_used = 0
        await self._status(evse)

    # --- meter values ----------------------------------------------------------------------

    def _meter_value(self, evse: SimulatedEvse) -> dict[str, Any]:
        l1, l2, l3 = evse.power_per_phase()
        samples: list[tuple[str, str | None, float, str]] = [
            ("Energy.Active.Import.Register", None, round(evse.meter_wh, 1), "Wh"),
            ("Power.Active.Import", None, round(l1 + l2 + l3, 1), "W")]
        for phase, watts in (("L1", l1), ("L2", l2), ("L3", l3)):
            if evse.phases_used == 3 or (evse.phases_used == 1 and phase == evse.phase):
                samples.append(("Power.Active.Import", phase, round(watts, 1), "W"))
        if evse.ev is not None:
            samples.append(("SoC", None, round(evse.ev.soc, 1), "Percent"))
        sampled = []
        for measurand, on_phase, value, unit in samples:
            if self.version == "1.6":
                item: dict[str, Any] = {"value": f"{value}", "measurand": measurand, "unit": unit}
                if measurand == "SoC":
                    item["location"] = "EV"
            else:
                item = {"value": value, "measurand": measurand,
                        "unit_of_measure": {"unit": unit}}
                if measurand == "SoC":
                    item["location"] = "EV"
            if on_phase:
                item["phase"] = on_phase
            sampled.append(item)
        return {"timestamp": _iso(_now()), "sampled_value": sampled}

    async def send_meter_values(self, evse: SimulatedEvse) -> None:
        if self.version == "1.6":
            await self.link.call(call16.MeterValues(
                connector_id=evse.evse_id, meter_value=[self._meter_value(evse)],
                transaction_id=int(evse.transaction_id) if evse.transaction_id else None))
        elif evse.transaction_id is not None:
            await self._transaction_event(evse, "Updated", "MeterValuePeriodic")
        else:
            await self.link.call(call201.MeterValues(evse_id=evse.evse_id,
                                                     meter_value=[self._meter_value(evse)]))

    async def _meter_loop(self) -> None:
        while True:
            await asyncio.sleep(self.meter_interval_s / self.speed)
            if not self.booted.is_set():
                continue
            for evse in self.evses.values():
                if evse.transaction_id is not None:
                    with contextlib.suppress(Exception):
                        await self.send_meter_values(evse)

    # --- physics ---------------------------------------------------------------------------

    def limit_a(self, evse: SimulatedEvse) -> float:
        """The current the profiles allow on this EVSE now (TxProfile over TxDefaultProfile)."""
        phases = evse.phases_used or evse.phases
        tx = [p for p in evse.profiles.values() if p.purpose == "TxProfile"
              and (p.transaction_id is None or p.transaction_id == evse.transaction_id)]
        if tx and evse.transaction_id is not None:
            return max(tx, key=lambda p: p.stack_level).amps(phases)
        default = [p for p in evse.profiles.values() if p.purpose == "TxDefaultProfile"]
        if not default:
            default = [p for p in self.station_profiles.values() if p.purpose == "TxDefaultProfile"]
        if default:
            return max(default, key=lambda p: p.stack_level).amps(phases)
        return evse.max_current_a

    def step(self, evse: SimulatedEvse, dt_s: float) -> None:
        """Advance one EVSE by dt simulated seconds at the current drawn until now, then set
        the current for what follows from the limits and the EV (dt 0: only that)."""
        ev = evse.ev
        if ev is None or evse.transaction_id is None:
            evse.current_a = evse.offered_a = 0.0
            return
        energy = evse.power_w * dt_s / 3600
        offered_wh = limits.amps_to_watts(evse.offered_a, evse.phases_used) * dt_s / 3600
        evse.offered_wh += offered_wh
        evse.refused_wh += max(0.0, offered_wh - energy)
        if evse.first_offer_at is not None:
            full_a = min(evse.max_current_a, ev.max_current_a)
            evse.held_wh += max(0.0, limits.amps_to_watts(full_a, evse.phases_used) * dt_s
                                / 3600 - offered_wh)
        evse.meter_wh += energy
        ev.take(energy)
        offered = min(self.limit_a(evse), evse.max_current_a)
        evse.offered_a = round(offered, 1) if offered >= ev.min_current_a else 0.0
        amps = min(offered, ev.current_limit_a())
        evse.current_a = round(amps, 1) if amps >= ev.min_current_a else 0.0
        if evse.offered_a > 0 and evse.first_offer_at is None:
            evse.first_offer_at = _now()

    def advance(self) -> None:
        """Run every EVSE's physics up to now."""
        now = asyncio.get_running_loop().time()
        last = self._last_tick if self._last_tick is not None else now
        self._last_tick = now
        for evse in self.evses.values():
            self.step(evse, max(0.0, now - last) * self.speed)

    def _follow_limits(self) -> None:
        """A new or cleared profile: the EV follows within a second or so (IEC 61851 allows
        5 s), so up to now at the old limit, from now on at the new one: not at the next
        physics tick, which is minutes of simulated time in `cem demo`."""
        if self._last_tick is None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop (a unit test)
            self.advance()

    async def _physics(self) -> None:
        self._last_tick = asyncio.get_running_loop().time()
        try:
            while True:
                await asyncio.sleep(TICK_S)
                self.advance()
                if self.booted.is_set():
                    for evse in self.evses.values():
                        state = evse.charging_state()
                        if state and state != evse.state_told:
                            evse.state_told = state
                            task = asyncio.get_running_loop().create_task(
                                self._tell_state(evse, state))
                            self._telling.add(task)
                            task.add_done_callback(self._telling.discard)
        finally:
            self._last_tick = None

    async def _tell_state(self, evse: SimulatedEvse, state: str) -> None:
        """A charging state change, as a real charger reports it (1.6: StatusNotification;
        2.0.1: TransactionEvent Updated, ChargingStateChanged). Offline, it is lost: the
        next change or a reboot's StatusNotification tells the state again."""
        with contextlib.suppress(Exception):
            await self._send_state(evse, state)

    async def _send_state(self, evse: SimulatedEvse, state: str) -> None:
        if self.version == "1.6":
            await self.link.call(call16.StatusNotification(
                connector_id=evse.evse_id, error_code="NoError", status=state,
                timestamp=_iso(_now())))
        else:
            await self._transaction_event(evse, "Updated", "ChargingStateChanged",
                                          charging_state=state)

    # --- profiles from the CSMS ------------------------------------------------------------

    def store_profile(self, evse_id: int, profile: dict[str, Any], schedule: dict[str, Any],
                      profile_id: int, transaction_id: str | None) -> str:
        self._follow_limits()
        status = self._store_profile(evse_id, profile, schedule, profile_id, transaction_id)
        self._follow_limits()
        return status

    def _store_profile(self, evse_id: int, profile: dict[str, Any], schedule: dict[str, Any],
                       profile_id: int, transaction_id: str | None) -> str:
        period = schedule["charging_schedule_period"][0]
        stored = _Profile(purpose=profile["charging_profile_purpose"],
                          stack_level=int(profile["stack_level"]), limit=float(period["limit"]),
                          unit=schedule["charging_rate_unit"],
                          phases=int(period["number_phases"]) if period.get("number_phases") else None,
                          transaction_id=transaction_id)
        self.profile_log.append({"evse_id": evse_id, "purpose": stored.purpose,
                                 "limit": stored.limit, "unit": stored.unit,
                                 "phases": stored.phases, "transaction_id": transaction_id,
                                 "accepted": not self.reject_profiles or stored.purpose != "TxProfile"})
        if self.reject_profiles and stored.purpose == "TxProfile":
            return "Rejected"
        if stored.purpose == "TxProfile":
            evse = self.evses.get(evse_id)
            if evse is None or evse.transaction_id is None:
                return "Rejected"
            evse.profiles[profile_id] = stored
        elif evse_id == 0:
            self.station_profiles[profile_id] = stored
        elif evse_id in self.evses:
            self.evses[evse_id].profiles[profile_id] = stored
        else:
            return "Rejected"
        return "Accepted"

    def clear_profile(self, profile_id: int | None) -> str:
        self._follow_limits()
        found = False
        for holder in [self.station_profiles, *(e.profiles for e in self.evses.values())]:
            for key in list(holder):
                if profile_id is None or key == profile_id:
                    del holder[key]
                    found = True
        self._follow_limits()
        return "Accepted" if found else "Unknown"


class _Station16(ChargePoint16):
    def __init__(self, cp_id: str, ws: Any, sim: SimulatedChargePoint) -> None:
        super().__init__(cp_id, ws, response_timeout=10,
                         logger=FrameLog("resource_managers.ocpp.simulator.frames"))
        self.sim = sim

    @on(Action16.set_charging_profile)
    def on_set_profile(self, connector_id: int, cs_charging_profiles: dict[str, Any]) -> Any:
        profile = cs_charging_profiles
        tx = profile.get("transaction_id")
        status = self.sim.store_profile(connector_id, profile, profile["charging_schedule"],
                                        int(profile["charging_profile_id"]),
                                        str(tx) if tx is not None else None)
        return result16.SetChargingProfile(status=status)

    @on(Action16.clear_charging_profile)
    def on_clear_profile(self, id: int | None = None, **_: Any) -> Any:
        return result16.ClearChargingProfile(status=self.sim.clear_profile(id))


class _Station201(ChargePoint201):
    def __init__(self, cp_id: str, ws: Any, sim: SimulatedChargePoint) -> None:
        super().__init__(cp_id, ws, response_timeout=10,
                         logger=FrameLog("resource_managers.ocpp.simulator.frames"))
        self.sim = sim

    @on(Action201.set_charging_profile)
    def on_set_profile(self, evse_id: int, charging_profile: dict[str, Any], **_: Any) -> Any:
        profile = charging_profile
        status = self.sim.store_profile(evse_id, profile, profile["charging_schedule"][0],
                                        int(profile["id"]), profile.get("transaction_id"))
        return result201.SetChargingProfile(status=status)

    @on(Action201.clear_charging_profile)
    def on_clear_profile(self, charging_profile_id: int | None = None, **_: Any) -> Any:
        return result201.ClearChargingProfile(status=self.sim.clear_profile(charging_profile_id))


# --- a fleet of simulated chargers ---------------------------------------------------------------


@dataclass
class Arrival:
    """One EV visit: when (simulated seconds after the start), how long, how much, which station."""

    at_s: float
    dwell_s: float
    energy_kwh: float
    station: str
    id_tag: str


def built_in_arrivals(count: int) -> list[Arrival]:
    """A short day: one EV per charge point, arriving 10 minutes apart, staying 4 to 7 hours."""
    return [Arrival(at_s=600.0 * i, dwell_s=3600.0 * (4 + i % 4), energy_kwh=10.0 + 5 * (i % 5),
                    station=f"station-{i}", id_tag=f"CARD-{i + 1:03d}") for i in range(count)]


def load_acn_arrivals(path: Path, limit: int | None = None) -> list[Arrival]:
    """EV visits from an ACN sessions CSV (optionally .gz), times relative to the first arrival."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    missing = {"arrival", "departure", "requested_energy (kWh)", "station_id"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: not an ACN sessions file (missing {', '.join(sorted(missing))})")
    visits = []
    for row in rows:
        try:
            arrival = datetime.fromisoformat(row["arrival"])
            departure = datetime.fromisoformat(row["departure"])
            energy = float(row["requested_energy (kWh)"] or row.get("delivered_energy (kWh)") or 0)
        except ValueError:
            continue
        if departure > arrival and energy > 0:
            visits.append((arrival, departure, energy, row["station_id"],
                           row.get("session_id", "")))
    visits.sort()
    if limit is not None:
        visits = visits[:limit]
    if not visits:
        raise ValueError(f"{path}: no usable sessions")
    start = visits[0][0]
    return [Arrival(at_s=(a - start).total_seconds(), dwell_s=(d - a).total_seconds(),
                    energy_kwh=e, station=s, id_tag=f"ACN-{i + 1:05d}")
            for i, (a, d, e, s, _) in enumerate(visits)]


def ev_for(arrival: Arrival, seed: int) -> SimulatedEv:
    """An EV that can take the requested energy: battery size and SoC drawn per visit."""
    rng = random.Random(seed)
    capacity = rng.choice([40.0, 60.0, 75.0, 100.0])
    soc = max(5.0, min(80.0, 90.0 - arrival.energy_kwh / capacity * 100))
    phases = rng.choice([1, 3, 3, 3])
    return SimulatedEv(capacity_kwh=capacity, soc=soc, phases=phases,
                       max_current_a=rng.choice([16.0, 32.0]) if phases == 3 else 32.0)


def stations_for_site(charge_points: Sequence[ChargePoint], csms_url: str, *, speed: float = 1.0,
                      meter_interval_s: float = 60.0,
                      versions: tuple[str, ...] = ("1.6", "2.0.1"),
                      ssl_context: ssl.SSLContext | None = None) -> list[SimulatedChargePoint]:
    """One simulated charge point per configured charge point (`[[ocpp.charge_points]]`: EVSEs,
    phases, maximum current, password as configured), OCPP versions taken in turn from
    `versions`."""
    return [SimulatedChargePoint(cp.id, csms_url, version=versions[i % len(versions)],
                                 evses=cp.evses, max_current_a=cp.max_current_a, phases=cp.phases,
                                 phase=cp.phase, password=cp.password, speed=speed,
                                 meter_interval_s=meter_interval_s, ssl_context=ssl_context)
            for i, cp in enumerate(charge_points)]


async def keep_connected(station: SimulatedChargePoint, stop: asyncio.Event) -> None:
    """Connect, and reconnect whenever the CSMS drops us, until `stop` (like a real charger)."""
    while not stop.is_set():
        if not station.connected.is_set():
            await _connect_with_retry(station, stop)
        waiter = asyncio.ensure_future(stop.wait())
        lost = asyncio.ensure_future(_until_disconnected(station))
        await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        lost.cancel()
        if not stop.is_set():
            logger.warning("charger %s lost the CSMS; reconnecting", station.cp_id)
            await station.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def _until_disconnected(station: SimulatedChargePoint) -> None:
    await station.disconnected.wait()


async def run_fleet(stations: list[SimulatedChargePoint], arrivals: list[Arrival],
                    stop: asyncio.Event) -> None:
    """Play arrivals onto the charge points (a free EVSE of the station's charge point, else any).

    Returns when `stop` is set; the chargers reconnect by themselves when the CSMS restarts.
    """
    links = [asyncio.ensure_future(keep_connected(station, stop)) for station in stations]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(s.booted.wait() for s in stations)), 10)
    speed = stations[0].speed if stations else 1.0
    loop = asyncio.get_running_loop()
    began = loop.time()
    station_of: dict[str, int] = {}
    departures: list[asyncio.Task[None]] = []

    async def leave(cp: SimulatedChargePoint, evse_id: int, after_s: float) -> None:
        await asyncio.sleep(after_s / speed)
        await cp.booted.wait()  # a charger keeps its stop message until it is back
        try:
            await cp.unplug(evse_id)
        except Exception as exc:
            logger.warning("%s/%d: stop of the session failed: %r", cp.cp_id, evse_id, exc)

    for index, arrival in enumerate(arrivals):
        wait = began + arrival.at_s / speed - loop.time()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        if stop.is_set():
            break
        named = next((i for i, cp in enumerate(stations) if cp.cp_id == arrival.station), None)
        first = station_of.setdefault(arrival.station, named if named is not None
                                      else len(station_of) % len(stations))
        order = stations[first:] + stations[:first]
        free = next(((cp, e) for cp in order if cp.connected.is_set() for e in cp.evses.values()
                     if e.ev is None), None)
        if free is None:
            logger.info("visit %s: every EVSE is busy, the EV drives on", arrival.id_tag)
            continue
        cp, evse = free
        ev = ev_for(arrival, index)
        if not cp.booted.is_set():
            continue
        try:
            if await cp.plug_in(evse.evse_id, ev, arrival.id_tag, dwell_s=arrival.dwell_s,
                                energy_kwh=arrival.energy_kwh):
                departures.append(loop.create_task(leave(cp, evse.evse_id, arrival.dwell_s)))
        except Exception as exc:
            logger.warning("visit %s on %s failed: %r", arrival.id_tag, cp.cp_id, exc)
    await stop.wait()
    for task in [*departures, *links]:
        task.cancel()
    for station in stations:
        await station.close()


async def _connect_with_retry(station: SimulatedChargePoint, stop: asyncio.Event) -> None:
    delay = 0.5
    while not stop.is_set():
        try:
            await station.connect()
            logger.info("charger %s connected to %s (OCPP %s)", station.cp_id, station.csms_url,
                        station.version)
            return
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            logger.warning("charger %s cannot reach %s (%s); retrying in %.0f s",
                           station.cp_id, station.csms_url, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 30)
