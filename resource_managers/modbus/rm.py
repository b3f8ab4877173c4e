"""S2 resource managers for Modbus TCP devices: battery, heat pump, PV inverter, grid meter.

`ModbusRM` is the Modbus TCP adapter of the generic device loop (`resource_managers.device.
DeviceRM`: poll, describe, apply, revoke, fail safe, reconnect): the device's register map
(`specs/modbus/*.toml`) names its points and `ModbusLink` reads and writes them. Each device
class below is the S2 mapping of one kind of device (`s2_mapping.py` builds the messages); a
value outside the device's limits is never written: it is clamped, and the log says so.

Use in-process (the demo): `rm = BatteryRM(regmap, host=..., port=..., cem_url=...)`,
`await rm.start()`, later `await rm.stop()`; or as a process: `cli.run_modbus_rms`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, ClassVar

from s2python.common import (
    Commodity,
    CommodityQuantity,
    RevokableObjects,
    Role,
    RoleType,
)
from s2python.frbc import (
    FRBCActuatorStatus,
    FRBCInstruction,
    FRBCStorageStatus,
    FRBCTimerStatus,
)
from s2python.message import S2Message
from s2python.pebc import PEBCInstruction

from resource_managers.base import S2ControlType
from resource_managers.device import (
    DeviceRM,
    FrbcToDevice,
    InstructionRejected,
    PebcToDevice,
    utc_now,
)
from resource_managers.modbus import s2_mapping as s2m
from resource_managers.modbus.link import ModbusLink
from resource_managers.modbus.register_map import RegisterMap
from resource_managers.modbus.simulator import load_pv_profile
from sitekit import clock

log = logging.getLogger("resource_managers.modbus")

__all__ = ["RESOURCE_MANAGERS", "BatteryRM", "HeatPumpRM", "InstructionRejected", "MeterRM",
           "ModbusRM", "PvRM", "resource_manager_for", "utc_now"]


class ModbusRM(DeviceRM):
    """The Modbus TCP adapter: one register map, one `ModbusLink`, polled by the device loop."""

    log = log
    device_class: ClassVar[str] = ""
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
        self.link = ModbusLink(regmap, host, port, device_id, timeout_s=timeout_s)
        super().__init__(
            cem_url=cem_url, token=token,
            name=name or f"{self.device_class} {host}:{port}/{device_id}",
            resource_id=resource_id or uuid.uuid5(
                uuid.NAMESPACE_URL, f"modbus://{host}:{port}/{device_id}/{self.device_class}"),
            manufacturer=regmap.device.manufacturer, model=regmap.device.model,
            poll_interval_s=poll_interval_s, backoff_s=backoff_s, s2_backoff_s=s2_backoff_s,
            cem_grace_s=cem_grace_s, time_scale=time_scale)

    # --- the protocol I/O --------------------------------------------------------------------

    async def connect_device(self) -> None:
        await self.link.connect()

    def device_connected(self) -> bool:
        return self.link.connected

    async def read_device(self) -> dict[str, float]:
        return await self.link.read_many(self.points_to_poll())

    async def close_device(self) -> None:
        await self.link.close()

    def describe_link(self) -> str:
        return (f"Modbus {self.link.host}:{self.link.port} unit {self.link.device_id}, "
                f"map {self.regmap.source}")

    # --- what a device class says about itself ------------------------------------------------

    def roles(self) -> list[Role]:
        return [Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY)]

    def measured_quantities(self) -> list[CommodityQuantity]:
        return [s2m.PHASE_QUANTITY[self.regmap.limits.phase]]

    def points_to_poll(self) -> list[str]:
        return ["power"]

    def periodic_messages(self, now: datetime) -> list[S2Message]:
        return [s2m.device_power_measurement(self.limits, self.readings["power"], now)]


# --- battery -------------------------------------------------------------------------------------


class BatteryRM(ModbusRM):
    """FRBC battery: SoC as fill level; writes a W setpoint and keeps it fresh."""

    device_class = "battery"

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

    def roles(self) -> list[Role]:
        """A store of electricity (charges and discharges)."""
        return [Role(role=RoleType.ENERGY_STORAGE, commodity=Commodity.ELECTRICITY)]

    def control_types(self) -> list[S2ControlType]:
        return [FrbcToDevice(self)]

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

    def __init__(self, regmap: RegisterMap, **kwargs: Any) -> None:
        super().__init__(regmap, **kwargs)
        self.mode_id: uuid.UUID | None = None
        self.timer_ends: dict[uuid.UUID, datetime] = {}
        self.system_description_id: uuid.UUID | None = None
        self.last_forecast = 0.0
        self.last_temp_sent: float | None = None

    def roles(self) -> list[Role]:
        """Consumes electricity, delivers heat (into its buffer tank)."""
        return [Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY),
                Role(role=RoleType.ENERGY_PRODUCER, commodity=Commodity.HEAT)]

    def control_types(self) -> list[S2ControlType]:
        return [FrbcToDevice(self)]

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

    def roles(self) -> list[Role]:
        """Produces electricity, nothing else."""
        return [Role(role=RoleType.ENERGY_PRODUCER, commodity=Commodity.ELECTRICITY)]

    def control_types(self) -> list[S2ControlType]:
        return [PebcToDevice(self)]

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
    default_poll_s = 1.0

    def roles(self) -> list[Role]:
        """The connection point: the site imports (consumes) and exports (produces) electricity;
        with NOT_CONTROLABLE only and per-phase measurements this says "grid meter"."""
        return [Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY),
                Role(role=RoleType.ENERGY_PRODUCER, commodity=Commodity.ELECTRICITY)]

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
