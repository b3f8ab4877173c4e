"""A simulated Modbus side of a site in one process: simulators plus their S2 RMs (for the demo).

`SimulatedModbusSite` starts, for each device, a simulator on loopback and the matching RM
connected to the CEM. With `speed` above 1 the RMs describe the accelerated devices in
wall-clock time (`time_scale=speed`: rates x speed, durations / speed). The grid meter follows the other simulators (plus a base load and any
extra feeds such as EV chargers), so the CEM's fuse / kW-max guard sees the whole site.

    site = SimulatedModbusSite.from_config(modbus_config, cem_url=server.url, speed=60)
    await site.start()
    ...
    await site.stop()

Without Modbus devices in the config, `default_devices()` gives a battery, heat pump, PV
inverter and grid meter with the maps shipped in `specs/modbus/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from resource_managers.modbus.config import ModbusConfig
from resource_managers.modbus.register_map import RegisterMap, load_register_map
from resource_managers.modbus.rm import ModbusRM, resource_manager_for
from resource_managers.modbus.simulator import (
    MeterSimulator,
    ModbusSimulator,
    PvSimulator,
    simulator_for,
)

log = logging.getLogger(__name__)



def _specs_folder() -> Path:
    """specs/modbus beside the package (source tree), else in the working directory."""
    for candidate in (Path(__file__).resolve().parent.parent.parent / "specs" / "modbus",
                      Path.cwd() / "specs" / "modbus", Path("/app/specs/modbus")):
        if candidate.is_dir():
            return candidate
    return Path.cwd() / "specs" / "modbus"


SPECS = _specs_folder()


@dataclass
class DevicePlan:
    """One Modbus device to simulate: name, class, register map and where it listens."""

    name: str
    device: str
    map: Path
    host: str = "127.0.0.1"
    port: int = 0
    device_id: int = 1


@dataclass
class SimulatedDevice:
    plan: DevicePlan
    regmap: RegisterMap
    simulator: ModbusSimulator
    rm: ModbusRM


def default_devices() -> list[DevicePlan]:
    """Battery, heat pump, PV inverter and grid meter with the shipped maps, free ports."""
    return [
        DevicePlan("battery", "battery", SPECS / "battery_generic.toml"),
        DevicePlan("heat pump", "heat-pump", SPECS / "heat_pump_sg_ready.toml"),
        DevicePlan("pv", "pv", SPECS / "sunspec_pv_inverter.toml"),
        DevicePlan("grid meter", "meter", SPECS / "grid_meter.toml"),
    ]


class SimulatedModbusSite:
    """Simulators and RMs for several Modbus devices, started and stopped together."""

    def __init__(self, plans: Sequence[DevicePlan], *, cem_url: str, token: str | None = None,
                 speed: float = 1.0, base_load_w: float = 400.0,
                 pv_start: datetime | None = None,
                 extra_loads: Sequence[Callable[[], float | Sequence[float]]] = (),
                 rm_options: dict[str, Any] | None = None) -> None:
        self.plans = list(plans)
        self.cem_url = cem_url
        self.token = token
        self.speed = speed
        self.base_load_w = base_load_w
        self.pv_start = pv_start
        self.extra_loads = list(extra_loads)
        self.rm_options = rm_options or {}
        self.devices: list[SimulatedDevice] = []

    @classmethod
    def from_config(cls, config: ModbusConfig, *, cem_url: str, token: str | None = None,
                    **kwargs: Any) -> SimulatedModbusSite:
        """Devices of `[[modbus.devices]]`, or the default four when there are none."""
        plans = [DevicePlan(d.name, d.device, d.map, d.host, d.port, d.device_id)
                 for d in config.devices] or default_devices()
        return cls(plans, cem_url=cem_url, token=token, **kwargs)

    def simulator(self, device: str) -> ModbusSimulator | None:
        """The first simulator of a device class ("battery", "meter", ...)."""
        return next((d.simulator for d in self.devices if d.plan.device == device), None)

    @property
    def meter(self) -> MeterSimulator | None:
        sim = self.simulator("meter")
        return sim if isinstance(sim, MeterSimulator) else None

    async def start(self) -> None:
        """Start every simulator, then every RM (the meter follows the other devices)."""
        made = []
        for plan in self.plans:
            regmap = load_register_map(plan.map)
            kwargs: dict[str, Any] = {"host": plan.host, "port": plan.port, "speed": self.speed}
            if regmap.device_class == "pv" and self.pv_start is not None:
                kwargs["start"] = self.pv_start
            made.append((plan, regmap, simulator_for(regmap, **kwargs)))
        # the meter follows before it serves: its first reading is the base load, not 0 W
        for _, _, sim in made:
            if isinstance(sim, MeterSimulator):
                sim.follow([s for _, _, s in made if s is not sim],
                           base_load_w=self.base_load_w, extra=self.extra_loads)
        for plan, regmap, sim in made:
            await sim.start()
            options: dict[str, Any] = {"time_scale": self.speed}
            if isinstance(sim, PvSimulator):
                options["device_clock"] = lambda pv=sim: pv.now
            rm = resource_manager_for(regmap, cem_url=self.cem_url, host=plan.host,
                                      port=sim.port, device_id=plan.device_id,
                                      token=self.token, name=plan.name,
                                      **(options | self.rm_options))
            self.devices.append(SimulatedDevice(plan, regmap, sim, rm))
        for device in self.devices:
            await device.rm.start()
        pv = self.simulator("pv")
        log.info("simulated Modbus site: %s%s", ", ".join(
            f"{d.plan.name} on port {d.simulator.port}" for d in self.devices),
            f"; PV clock at {pv.now:%Y-%m-%d %H:%M} UTC" if isinstance(pv, PvSimulator) else "")

    async def stop(self) -> None:
        """Stop the RMs first (they leave devices safe), then the simulators."""
        await asyncio.gather(*(d.rm.stop() for d in self.devices), return_exceptions=True)
        for device in self.devices:
            with contextlib.suppress(Exception):
                await device.simulator.stop()
        self.devices.clear()
