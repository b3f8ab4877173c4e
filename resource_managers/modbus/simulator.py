"""Simulated Modbus TCP devices with physics, laid out by the same register maps as the RMs.

Each simulator is a real pymodbus TCP server on loopback (pymodbus 3.16 `SimDevice` API, one
block per table), so the resource managers talk to it exactly as to a real device:

- `BatterySimulator`: SoC integration with charge/discharge efficiency and SoC limits; rejects
  out-of-range setpoints with an exception response (ILLEGAL_VALUE); falls back to idle when
  the setpoint is not refreshed within the revert timeout. Understands both a plain W
  setpoint and SunSpec model 124 controls (StorCtl_Mod + InWRte/OutWRte percent).
- `HeatPumpSimulator`: a water buffer (heat capacity, losses to the room, heat demand of the
  house) heated with the SG-Ready state's power times the COP.
- `PvSimulator`: production from a real week of Dutch PV (2019, Renewables.ninja per kWp),
  curtailed by WMaxLimPct when enabled, reverting after its timeout.
- `MeterSimulator`: sums the site: `set_site_power(...)` or `follow(simulators, base_load_w)`.

Time: physics runs in simulated time (`speed` simulated seconds per wall-clock second, for the
demo); communication watchdogs (revert timeouts) run in wall-clock time, as on a real device.
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from resource_managers.modbus.codec import ValueNotRepresentable, decode, encode
from resource_managers.modbus.register_map import BIT_TABLES, Point, RegisterMap

log = logging.getLogger(__name__)

PV_PROFILE = Path(__file__).parent / "data" / "nl_pv_2019_week.csv"

#: values SunSpec devices hold in their identification registers
CONSTANTS: dict[str, float] = {
    "sunspec_id": 0x53756E53,
    "common_model_id": 1,
    "common_model_length": 66,
    "storage_model_id": 124,
    "battery_model_id": 802,
    "inverter_model_id": 103,
}
#: SunSpec scale factors the simulators publish (10^sf); unknown *_sf points get 0
SCALE_FACTORS: dict[str, int] = {
    "soc_sf": -1, "rate_pct_sf": -1, "limit_pct_sf": -1, "voltage_sf": -1, "current_sf": -2,
}
_WRITE_CODES = {5: "coil", 15: "coil", 6: "holding", 16: "holding", 22: "holding",
                23: "holding"}
_SET_CODE = {"holding": 16, "input": 4, "coil": 15, "discrete": 2}


class ModbusSimulator:
    """A pymodbus TCP server whose registers follow a map, plus a physics loop."""

    device_class: ClassVar[str] = ""

    def __init__(self, regmap: RegisterMap, *, host: str = "127.0.0.1", port: int = 0,
                 device_id: int = 0, speed: float = 1.0, tick_s: float = 0.2) -> None:
        if regmap.device_class != self.device_class:
            raise ValueError(f"{type(self).__name__} needs a '{self.device_class}' map, "
                             f"{regmap.source} is a '{regmap.device_class}' map")
        self.regmap = regmap
        self.host = host
        self._requested_port = port
        self.device_id = device_id
        self.speed = speed
        self.tick_s = tick_s
        self.values: dict[str, float] = {}
        self.overrides: dict[str, float] = {}
        self.writes: list[tuple[str, float]] = []
        #: fault injection: answer every request with this exception code / this late
        self.fail_with: ExcCodes | None = None
        self.answer_delay_s = 0.0
        self.rejected: list[tuple[str, float, str]] = []
        self.sim_time = 0.0
        self._server: ModbusTcpServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._internal = False
        self._pending_publish = False
        self._port: int | None = None
        self._last_step: float | None = None  # monotonic time the physics ran up to
        for name, point in regmap.points.items():
            if name in CONSTANTS:
                self.values[name] = CONSTANTS[name]
            elif name.endswith("_sf") and point.type == "int16":
                self.values[name] = SCALE_FACTORS.get(name, 0)
            else:
                self.values[name] = 0.0

    # -- server ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on (resolved after start when 0 was asked)."""
        return self._port if self._port is not None else self._requested_port

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def power_w(self) -> float:
        """Electrical power in S2 sign (consumption positive), for the site meter."""
        return self.values.get("power", 0.0)

    def _sim_blocks(self) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
        blocks: dict[str, list[SimData]] = {t: [] for t in ("coil", "discrete", "holding",
                                                            "input")}
        for name, point in self.regmap.points.items():
            # the registers hold the first state from the first request on (not zeros until
            # the physics publishes: a meter reading 0 W would look like headroom)
            try:
                words = self._encode(point, self.overrides.get(name, self.values.get(name, 0.0)))
            except ValueNotRepresentable:
                words = [False] if point.table in BIT_TABLES else [0] * point.count
            if point.table in BIT_TABLES:
                blocks[point.table].append(SimData(point.address, values=[bool(words[0])],
                                                   datatype=DataType.BITS))
            else:
                blocks[point.table].append(SimData(point.address, values=[int(w) for w in words],
                                                   datatype=DataType.REGISTERS))
        for table in BIT_TABLES:
            if not blocks[table]:
                blocks[table].append(SimData(0, values=[False] * 16, datatype=DataType.BITS))
        for table in ("holding", "input"):
            if not blocks[table]:
                blocks[table].append(SimData(0, datatype=DataType.INVALID))
        return blocks["coil"], blocks["discrete"], blocks["holding"], blocks["input"]

    async def start(self) -> None:
        """Listen on host:port (0 = a free port) and start the physics loop."""
        self.step(0.0, 0.0)  # readings consistent from the first request on
        device = SimDevice(self.device_id, simdata=self._sim_blocks(), action=self._on_access)
        server = ModbusTcpServer(device, address=(self.host, self._requested_port))
        await server.serve_forever(background=True)
        self._server = server
        sockets = getattr(server.transport, "sockets", None)
        self._port = sockets[0].getsockname()[1] if sockets else self._requested_port
        self._requested_port = self._port
        await self.publish(all_points=True)
        self._task = asyncio.create_task(self._physics_loop(), name=f"sim-{self.device_class}")
        log.info("%s simulator (%s) listening on %s:%s", self.device_class,
                 self.regmap.device.model, self.host, self.port)

    async def stop(self) -> None:
        """Stop serving: clients see the device vanish (connections closed)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
            log.info("%s simulator on port %s stopped", self.device_class, self.port)

    async def _physics_loop(self) -> None:
        self._last_step = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.advance()
                await self.publish()
            except Exception:  # a physics bug must not kill the server silently
                log.exception("%s simulator step failed", self.device_class)

    def advance(self) -> None:
        """Run the physics up to now (with the setpoints in force until now)."""
        now = time.monotonic()
        last = self._last_step if self._last_step is not None else now
        dt_wall = max(0.0, now - last)
        self._last_step = now
        self.sim_time += dt_wall * self.speed
        self.step(dt_wall * self.speed, dt_wall)

    # -- register access --------------------------------------------------------------------

    def _exponent(self, point: Point) -> int:
        if point.scale_register is None:
            return 0
        return int(self.values.get(point.scale_register, 0))

    def _encode(self, point: Point, value: float) -> list[int] | list[bool]:
        if point.type == "bool":
            return [bool(value)]
        return encode(point, value, self.regmap.word_order(point), self._exponent(point))

    async def _set_registers(self, point: Point, words: list[int] | list[bool]) -> None:
        if self._server is None:
            return
        self._internal = True
        try:
            await self._server.async_setValues(0 if self.device_id == 0 else self.device_id,
                                               _SET_CODE[point.table], point.address,
                                               list(words))
        finally:
            self._internal = False

    async def set_raw(self, name: str, words: list[int]) -> None:
        """Fault injection: put these register words into a point as they are (a broken
        device, a NaN float), until the physics publishes the point again."""
        point = self.regmap.point(name)
        if len(words) != point.count:
            raise ValueError(f"{name} takes {point.count} register(s), not {len(words)}")
        await self._set_registers(point, words)

    async def publish(self, all_points: bool = False, names: Iterable[str] = ()) -> None:
        """Copy engineering values into the registers (read-only points every tick)."""
        chosen = set(names)
        if self._pending_publish:  # the device changed a writable point itself (revert)
            self._pending_publish = False
            all_points = True
        for name, point in self.regmap.points.items():
            if not (all_points or name in chosen or not point.writable):
                continue
            value = self.overrides.get(name, self.values.get(name, 0.0))
            try:
                words = self._encode(point, value)
            except ValueNotRepresentable as exc:
                log.warning("simulator cannot show %s: %s", name, exc)
                continue
            await self._set_registers(point, words)

    async def _on_access(self, func_code: int, _start: int, address: int, _count: int,
                         _registers: list[int], set_values: Sequence[int] | Sequence[bool] | None
                         ) -> ExcCodes | None:
        """pymodbus calls this on every request; validate and apply client writes."""
        if self._internal:
            return None
        if self.answer_delay_s:
            await asyncio.sleep(self.answer_delay_s)
        if self.fail_with is not None:
            return self.fail_with
        if set_values is None:
            return None
        table = _WRITE_CODES.get(func_code)
        if table is None:
            return None
        written = list(set_values)
        end = address + len(written)
        changes: list[tuple[Point, float]] = []
        for point in self.regmap.points.values():
            if point.table != table or point.address >= end or point.address + point.count <= address:
                continue
            if point.address < address or point.address + point.count > end:
                log.warning("rejected a partial write of %s", point.name)
                return ExcCodes.ILLEGAL_ADDRESS
            if not point.writable:
                log.warning("rejected a write to read-only %s", point.name)
                return ExcCodes.ILLEGAL_ADDRESS
            chunk = written[point.address - address:point.address - address + point.count]
            if point.type == "bool":
                value = 1.0 if chunk[0] else 0.0
            else:
                value = decode(point, [int(w) for w in chunk], self.regmap.word_order(point),
                               self._exponent(point))
            changes.append((point, value))
        for point, value in changes:
            reason = self.check_write(point.name, value)
            if reason:
                log.warning("%s simulator rejected %s = %g %s: %s", self.device_class,
                            point.name, value, point.unit, reason)
                self.rejected.append((point.name, value, reason))
                return ExcCodes.ILLEGAL_VALUE
        # a device follows a new setpoint within a second or so: run the physics up to the
        # write with the old one, then at once with the new one (not at the next tick, which
        # is minutes of simulated time in `cem demo`)
        running = self._last_step is not None
        if running:
            self._advance_quietly()
        for point, value in changes:
            self.values[point.name] = value
            self.writes.append((point.name, value))
            self.on_write(point.name, value)
        if running:
            self._advance_quietly()
        return None

    def _advance_quietly(self) -> None:
        try:
            self.advance()
        except Exception:
            log.exception("%s simulator step failed", self.device_class)

    # -- device behaviour (override) ------------------------------------------------------------

    def check_write(self, name: str, value: float) -> str | None:
        """Why the device refuses this value (None: accepted)."""
        return None

    def on_write(self, name: str, value: float) -> None:
        """React to an accepted write."""

    def step(self, dt_s: float, dt_wall_s: float) -> None:
        """Advance the physics by dt_s simulated seconds."""


class BatterySimulator(ModbusSimulator):
    """A battery: SoC with efficiency and limits, setpoint watchdog to idle."""

    device_class = "battery"

    def __init__(self, regmap: RegisterMap, *, soc_pct: float = 50.0, **kwargs: object) -> None:
        super().__init__(regmap, **kwargs)  # type: ignore[arg-type]
        lim = regmap.limits
        self.soc_pct = soc_pct
        self.setpoint_w = 0.0
        self.revert_timeout_s = lim.revert_timeout_s
        self.last_command = time.monotonic()
        self.reverted = False
        self.values.update(soc=soc_pct, voltage=52.0)
        if regmap.has("revert_timeout"):
            self.values["revert_timeout"] = lim.revert_timeout_s
        if regmap.has("max_charge_w"):
            self.values["max_charge_w"] = float(lim.max_charge_w or 0)
        if regmap.has("min_reserve_pct"):
            self.values["min_reserve_pct"] = float(lim.soc_min_pct or 0)

    def check_write(self, name: str, value: float) -> str | None:
        lim = self.regmap.limits
        if name == "power_setpoint":
            if value > (lim.max_charge_w or 0) + 0.5:
                return f"above the maximum charge power {lim.max_charge_w} W"
            if value < -(lim.max_discharge_w or 0) - 0.5:
                return f"above the maximum discharge power {lim.max_discharge_w} W"
        if name in ("charge_rate_pct", "discharge_rate_pct") and not -0.05 <= value <= 100.05:
            return "rate must be 0..100 % of WChaMax"
        if name == "storage_control_mode" and value not in (0, 1, 2, 3):
            return "StorCtl_Mod accepts bits 0 (charge) and 1 (discharge) only"
        if name == "revert_timeout" and value < 0:
            return "timeout cannot be negative"
        return None

    def on_write(self, name: str, value: float) -> None:
        if name == "revert_timeout":
            self.revert_timeout_s = value if value > 0 else self.regmap.limits.revert_timeout_s
            return
        self.last_command = time.monotonic()
        self.reverted = False
        self.setpoint_w = self.commanded_w()

    def commanded_w(self) -> float:
        """The setpoint the registers ask for, in W (+ charge)."""
        if self.regmap.has("power_setpoint"):
            return self.values.get("power_setpoint", 0.0)
        lim = self.regmap.limits
        mode = int(self.values.get("storage_control_mode", 0))
        if mode == 1:
            return self.values.get("charge_rate_pct", 0.0) / 100 * (lim.max_charge_w or 0)
        if mode == 2:
            return -self.values.get("discharge_rate_pct", 0.0) / 100 * (lim.max_charge_w or 0)
        return 0.0

    def step(self, dt_s: float, dt_wall_s: float) -> None:
        lim = self.regmap.limits
        if (not self.reverted and self.setpoint_w != 0
                and time.monotonic() - self.last_command > self.revert_timeout_s):
            log.warning("battery simulator: no setpoint for %.0f s, falling back to idle",
                        self.revert_timeout_s)
            self.reverted = True
            self.setpoint_w = 0.0
            for name in ("power_setpoint", "storage_control_mode", "charge_rate_pct",
                         "discharge_rate_pct"):
                if self.regmap.has(name):
                    self.values[name] = 0.0
            self._pending_publish = True
        power = self.setpoint_w
        capacity = lim.capacity_wh or 1
        if power > 0 and self.soc_pct >= (lim.soc_max_pct or 100):
            power = 0.0
        if power < 0 and self.soc_pct <= (lim.soc_min_pct or 0):
            power = 0.0
        if power >= 0:
            energy_wh = power * lim.charge_efficiency * dt_s / 3600
        else:
            energy_wh = power / lim.discharge_efficiency * dt_s / 3600
        self.soc_pct = min(100.0, max(0.0, self.soc_pct + energy_wh / capacity * 100))
        self.values["soc"] = self.soc_pct
        self.values["power"] = power
        self.values["voltage"] = 48.0 + 8.0 * self.soc_pct / 100


class HeatPumpSimulator(ModbusSimulator):
    """A heat pump on a water buffer, steered by SG-Ready states."""

    device_class = "heat-pump"

    def __init__(self, regmap: RegisterMap, *, buffer_c: float | None = None,
                 **kwargs: object) -> None:
        super().__init__(regmap, **kwargs)  # type: ignore[arg-type]
        lim = regmap.limits
        low, high = lim.comfort_min_c or 40.0, lim.comfort_max_c or 55.0
        self.buffer_c = buffer_c if buffer_c is not None else (low + high) / 2
        self.values.update(sg_ready_state=lim.sg_ready_normal, setpoint_temperature=high,
                           buffer_temperature=self.buffer_c, outdoor_temperature=5.0)

    def check_write(self, name: str, value: float) -> str | None:
        lim = self.regmap.limits
        if name == "sg_ready_state" and value not in (1, 2, 3, 4):
            return "SG-Ready state must be 1..4"
        if name == "setpoint_temperature":
            low, high = (lim.comfort_min_c or 40) - 10, (lim.comfort_max_c or 55) + 10
            if not low <= value <= high:
                return f"setpoint outside {low:g}..{high:g} degC"
        return None

    def sg_state(self) -> int:
        """The SG-Ready state in force: the state register's, or the two relays' (1..4)."""
        lim = self.regmap.limits
        if not self.regmap.has("sg_ready_relay_1"):
            return int(self.values.get("sg_ready_state", lim.sg_ready_normal))
        relays = (bool(self.values.get("sg_ready_relay_1")),
                  bool(self.values.get("sg_ready_relay_2")))
        return {(True, False): lim.sg_ready_off, (False, False): lim.sg_ready_normal,
                (False, True): lim.sg_ready_boost}.get(relays, 4)  # both closed: forced on

    def step(self, dt_s: float, dt_wall_s: float) -> None:
        lim = self.regmap.limits
        state = self.sg_state()
        setpoint = self.values.get("setpoint_temperature", lim.comfort_max_c or 55)
        if state == lim.sg_ready_off:
            power = 0.0
        elif state == lim.sg_ready_normal:
            power = float(lim.power_normal_w or 0) if self.buffer_c < setpoint else 0.0
        else:  # boost: store extra heat up to 5 K above the setpoint
            power = float(lim.power_boost_w or 0) if self.buffer_c < setpoint + 5 else 0.0
        capacity_wh_per_k = lim.buffer_heat_capacity_wh_per_k or 1.0
        heat_w = power * lim.cop - lim.heat_loss_w_per_k * (self.buffer_c - lim.ambient_c) \
            - lim.heat_demand_w
        self.buffer_c += heat_w * dt_s / 3600 / capacity_wh_per_k
        self.values.update(power=power, buffer_temperature=self.buffer_c,
                           compressor_running=1.0 if power > 0 else 0.0)


def load_pv_profile(path: Path = PV_PROFILE) -> tuple[list[datetime], list[float]]:
    """Hourly PV output per kWp (timestamps UTC, kW/kWp): a real June week of Dutch PV.

    When the file is missing (an install without package data) a clear-sky week stands in,
    and the log says so.
    """
    times: list[datetime] = []
    values: list[float] = []
    try:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                times.append(datetime.fromisoformat(row["start_utc"].replace("Z", "+00:00")))
                values.append(float(row["pv_kw_per_kwp"]))
    except FileNotFoundError:
        log.error("PV profile %s is missing: using a clear-sky week instead", path)
        start = datetime(2019, 6, 10, tzinfo=UTC)
        for hour in range(7 * 24):
            times.append(start + timedelta(hours=hour))
            sun = math.sin(math.pi * ((hour % 24) - 4) / 16)  # 04:00..20:00 UTC
            values.append(round(max(0.0, 0.75 * sun), 3))
    return times, values


def profile_at(times: list[datetime], values: list[float], when: datetime) -> float:
    """Linear interpolation in the profile; the week repeats."""
    span = times[-1] - times[0] + timedelta(hours=1)
    offset = (when - times[0]) % span
    moment = times[0] + offset
    i = bisect.bisect_right(times, moment) - 1
    j = (i + 1) % len(times)
    frac = (moment - times[i]).total_seconds() / 3600
    return values[i] * (1 - frac) + values[j] * frac


class PvSimulator(ModbusSimulator):
    """A PV inverter following a real week of Dutch PV, curtailed by WMaxLimPct."""

    device_class = "pv"

    def __init__(self, regmap: RegisterMap, *, start: datetime | None = None,
                 kwp: float | None = None, **kwargs: object) -> None:
        super().__init__(regmap, **kwargs)  # type: ignore[arg-type]
        self.times, self.profile = load_pv_profile()
        if start is None:  # the profile's first day at today's UTC time of day
            now = datetime.now(UTC)
            start = self.times[0] + timedelta(hours=now.hour, minutes=now.minute)
        self.start_time = start
        rated = float(regmap.limits.rated_power_w or 0)
        self.kwp = kwp if kwp is not None else rated / 1000
        self.last_limit = time.monotonic()
        self.values.update(rated_power=rated, active_power_limit_pct=100.0, limit_enabled=0.0,
                           limit_revert_timeout=regmap.limits.revert_timeout_s)

    @property
    def now(self) -> datetime:
        return self.start_time + timedelta(seconds=self.sim_time)

    def available_w(self) -> float:
        """What the panels could produce now (W, positive)."""
        return profile_at(self.times, self.profile, self.now) * self.kwp * 1000

    def check_write(self, name: str, value: float) -> str | None:
        if name == "active_power_limit_pct" and not -0.05 <= value <= 100.05:
            return "WMaxLimPct must be 0..100 %"
        if name == "limit_enabled" and value not in (0, 1):
            return "WMaxLim_Ena is 0 or 1"
        return None

    def on_write(self, name: str, value: float) -> None:
        if name in ("active_power_limit_pct", "limit_enabled"):
            self.last_limit = time.monotonic()

    def step(self, dt_s: float, dt_wall_s: float) -> None:
        rated = float(self.regmap.limits.rated_power_w or 0)
        timeout = self.values.get("limit_revert_timeout") or self.regmap.limits.revert_timeout_s
        if self.values.get("limit_enabled") and time.monotonic() - self.last_limit > timeout:
            log.warning("pv simulator: curtailment not refreshed for %.0f s, back to 100 %%",
                        timeout)
            self.values["limit_enabled"] = 0.0
            self._pending_publish = True
        produced = min(self.available_w(), rated)
        if self.values.get("limit_enabled"):
            produced = min(produced, self.values.get("active_power_limit_pct", 100) / 100 * rated)
        self.values["power"] = -produced
        self.values["energy_total"] = self.values.get("energy_total", 0.0) \
            + produced * dt_s / 3600
        self.values["current"] = produced / 230 / 3


class MeterSimulator(ModbusSimulator):
    """The grid meter at the connection point: sums whatever the site draws, per phase."""

    device_class = "meter"

    def __init__(self, regmap: RegisterMap, *, base_load_w: float = 0.0,
                 **kwargs: object) -> None:
        super().__init__(regmap, **kwargs)  # type: ignore[arg-type]
        self.base_load_w = base_load_w
        self.phase_w = [0.0, 0.0, 0.0]
        self.sources: list[ModbusSimulator] = []
        self.extra: list[Callable[[], float | Sequence[float]]] = []
        self.following = False
        self.voltage_v = 230.0

    def set_site_power(self, power_w: float | Sequence[float]) -> None:
        """Set the site's power (S2 sign): one total split over the phases, or [L1, L2, L3].

        Stops following other simulators (see `follow`)."""
        self.following = False
        if isinstance(power_w, int | float):
            self.phase_w = [float(power_w) / 3] * 3
        else:
            if len(power_w) != 3:
                raise ValueError("give one total or three phase powers")
            self.phase_w = [float(p) for p in power_w]
        self._refresh_readings(0.0)

    def follow(self, sources: Iterable[ModbusSimulator], base_load_w: float = 0.0,
               extra: Iterable[Callable[[], float | Sequence[float]]] = ()) -> None:
        """Sum these simulated devices plus a base load each tick.

        A device on one phase (its map's `limits.phase`) counts on that phase, a three-phase
        device a third on each; `extra` callables add other loads (e.g. EV chargers), as a
        total W or [L1, L2, L3] W.
        """
        self.sources = list(sources)
        self.extra = list(extra)
        self.base_load_w = base_load_w
        self.following = True

    def step(self, dt_s: float, dt_wall_s: float) -> None:
        if self.following:
            phases = [self.base_load_w / 3] * 3
            for source in self.sources:
                _spread(phases, source.power_w, source.regmap.limits.phase)
            for feed in self.extra:
                value = feed()
                if isinstance(value, int | float):
                    _spread(phases, float(value), "3-phase")
                else:
                    for i, watts in enumerate(value):
                        phases[i] += float(watts)
            self.phase_w = phases
        self._refresh_readings(dt_s)

    def _refresh_readings(self, dt_s: float) -> None:
        for i, watts in enumerate(self.phase_w, start=1):
            wobble = 0.5 * math.sin(self.sim_time / 30 + i)
            volts = self.voltage_v + wobble
            self.values[f"power_l{i}"] = watts
            self.values[f"voltage_l{i}"] = volts
            self.values[f"current_l{i}"] = abs(watts) / volts
        total = sum(self.phase_w)
        self.values["power_total"] = total
        if total > 0:
            self.values["energy_import"] = self.values.get("energy_import", 0.0) \
                + total * dt_s / 3600
        else:
            self.values["energy_export"] = self.values.get("energy_export", 0.0) \
                - total * dt_s / 3600


def _spread(phases: list[float], watts: float, phase: str) -> None:
    if phase in ("L1", "L2", "L3"):
        phases[int(phase[1]) - 1] += watts
    else:
        for i in range(3):
            phases[i] += watts / 3


SIMULATORS: dict[str, type[ModbusSimulator]] = {
    "battery": BatterySimulator,
    "heat-pump": HeatPumpSimulator,
    "pv": PvSimulator,
    "meter": MeterSimulator,
}


def simulator_for(regmap: RegisterMap, **kwargs: object) -> ModbusSimulator:
    """The simulator class that fits the map's device class."""
    return SIMULATORS[regmap.device_class](regmap, **kwargs)  # type: ignore[arg-type]
