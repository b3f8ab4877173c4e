"""`cem rm modbus` and `cem sim modbus`: Modbus RMs or simulated devices as a process.

One device from the command line's flags, or every `[[modbus.devices]]` entry of a site file
(`ModbusDevice`), each its own S2 RM (or simulator) in one process. Both stop cleanly on Ctrl-C
or SIGTERM, log in plain words, and turn user mistakes (unknown device class, broken register
map, a map for another device class, a port in use) into a clear message and exit code 2,
never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from resource_managers.modbus.config import DEVICE_CLASSES, ModbusDevice
from resource_managers.modbus.register_map import RegisterMap, RegisterMapError, load_register_map
from sitekit import logs

console = Console(stderr=True)


def _fail(message: str, hint: str = "") -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if hint:
        console.print(f"  [dim]hint:[/] {hint}", highlight=False, soft_wrap=True)
    raise SystemExit(2)


def _load(device: str, map_file: Path) -> RegisterMap:
    if device not in DEVICE_CLASSES:
        _fail(f"unknown device '{device}'", f"use one of: {', '.join(DEVICE_CLASSES)}")
    try:
        regmap = load_register_map(map_file)
    except RegisterMapError as exc:
        console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    if regmap.device_class != device:
        _fail(f"{map_file} is a register map for a '{regmap.device_class}', not a '{device}'",
              f"use --device {regmap.device_class}, or a {device} map from specs/modbus/")
    return regmap


def _setup_logging(level: str = "INFO") -> None:
    logs.configure(level)
    logging.getLogger("pymodbus").setLevel(logging.ERROR)


async def _until_signal(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def flag_device(*, device: str, map_file: Path, host: str, port: int,
                device_id: int) -> ModbusDevice:
    """The one device the command line's flags describe (exit 2 on an unknown class)."""
    if device not in DEVICE_CLASSES:
        _fail(f"unknown device '{device}'", f"use one of: {', '.join(DEVICE_CLASSES)}")
    return ModbusDevice(name=f"{device} {host}:{port}/{device_id}", device=device,
                        map=map_file, host=host, port=port, device_id=device_id)


def run_modbus_rm(*, device: str, map_file: Path, host: str, port: int, device_id: int,
                  cem_url: str, token: str | None) -> None:
    """Run one Modbus TCP device as an S2 resource manager until Ctrl-C / SIGTERM."""
    run_modbus_rms([flag_device(device=device, map_file=map_file, host=host, port=port,
                                device_id=device_id)], cem_url=cem_url, token=token)


def run_modbus_rms(devices: Sequence[ModbusDevice], *, cem_url: str, token: str | None) -> None:
    """Run Modbus TCP devices, each as its own S2 resource manager, until Ctrl-C / SIGTERM."""
    maps = [_load(d.device, d.map) for d in devices]
    _setup_logging()
    from resource_managers.modbus.rm import resource_manager_for

    async def main() -> None:
        stop = asyncio.Event()
        await _until_signal(stop)
        rms = [resource_manager_for(regmap, cem_url=cem_url, host=d.host, port=d.port,
                                    device_id=d.device_id, token=token, name=d.name)
               for d, regmap in zip(devices, maps, strict=True)]
        await asyncio.gather(*(rm.run(stop) for rm in rms))

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def run_modbus_simulator(*, device: str, map_file: Path, host: str, port: int,
                         speed: float = 1.0, device_id: int = 0) -> None:
    """Serve one simulated device on Modbus TCP until Ctrl-C / SIGTERM."""
    run_modbus_simulators([flag_device(device=device, map_file=map_file, host=host, port=port,
                                       device_id=device_id)], speed=speed)


def run_modbus_simulators(devices: Sequence[ModbusDevice], *, speed: float = 1.0,
                          base_load_w: float = 500.0) -> None:
    """Serve simulated devices on Modbus TCP until Ctrl-C / SIGTERM; a grid meter among them
    measures the others plus a base load (alone: the base load, a house's)."""
    maps = [_load(d.device, d.map) for d in devices]
    if speed <= 0:
        _fail("--speed must be above 0")
    _setup_logging()
    from resource_managers.modbus.simulator import MeterSimulator, ModbusSimulator, simulator_for

    async def main() -> None:
        stop = asyncio.Event()
        await _until_signal(stop)
        sims: list[ModbusSimulator] = []
        try:
            made = [simulator_for(regmap, host=d.host, port=d.port, speed=speed,
                                  device_id=d.device_id)
                    for d, regmap in zip(devices, maps, strict=True)]
            # the meter follows before it serves: its first reading is the base load, not 0 W
            others = [s for s in made if not isinstance(s, MeterSimulator)]
            for sim in made:
                if isinstance(sim, MeterSimulator):
                    sim.follow(others, base_load_w=base_load_w)
            for d, sim in zip(devices, made, strict=True):
                try:
                    await sim.start()
                except (OSError, RuntimeError) as exc:
                    _fail(f"cannot listen on {d.host}:{d.port} for {d.name}: {exc}",
                          "is the port in use?")
                sims.append(sim)
                logging.getLogger(__name__).info("simulated %s (%s) on %s:%s (speed x%g)",
                                                 d.name, d.device, d.host, sim.port, speed)
            logging.getLogger(__name__).info("Ctrl-C stops the simulation")
            await stop.wait()
        finally:
            for sim in sims:
                with contextlib.suppress(Exception):
                    await sim.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
