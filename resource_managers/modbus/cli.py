"""`cem rm modbus` and `cem sim modbus`: one Modbus RM or one simulated device as a process.

Both stop cleanly on Ctrl-C or SIGTERM, log in plain words, and turn user mistakes (unknown
device class, broken register map, a map for another device class) into a clear message and
exit code 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from resource_managers.modbus.register_map import RegisterMap, RegisterMapError, load_register_map

DEVICE_CLASSES = ("battery", "heat-pump", "pv", "meter")
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
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("pymodbus").setLevel(logging.ERROR)
    logging.getLogger("websockets").setLevel(logging.WARNING)


async def _until_signal(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def run_modbus_rm(*, device: str, map_file: Path, host: str, port: int, device_id: int,
                  cem_url: str, token: str | None) -> None:
    """Run one Modbus TCP device as an S2 resource manager until Ctrl-C / SIGTERM."""
    regmap = _load(device, map_file)
    _setup_logging()
    from resource_managers.modbus.rm import resource_manager_for

    async def main() -> None:
        stop = asyncio.Event()
        await _until_signal(stop)
        rm = resource_manager_for(regmap, cem_url=cem_url, host=host, port=port,
                                  device_id=device_id, token=token)
        await rm.run(stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def run_modbus_simulator(*, device: str, map_file: Path, host: str, port: int,
                         speed: float = 1.0, device_id: int = 0) -> None:
    """Serve one simulated device on Modbus TCP until Ctrl-C / SIGTERM."""
    regmap = _load(device, map_file)
    if speed <= 0:
        _fail("--speed must be above 0")
    _setup_logging()
    from resource_managers.modbus.simulator import MeterSimulator, simulator_for

    async def main() -> None:
        stop = asyncio.Event()
        await _until_signal(stop)
        sim = simulator_for(regmap, host=host, port=port, speed=speed, device_id=device_id)
        if isinstance(sim, MeterSimulator):
            sim.set_site_power(500.0)  # a house's base load until something feeds the meter
        try:
            await sim.start()
        except (OSError, RuntimeError) as exc:
            _fail(f"cannot listen on {host}:{port}: {exc}", "is the port in use?")
        logging.getLogger(__name__).info("simulated %s on %s:%s (speed x%g); Ctrl-C stops it",
                                         device, host, sim.port, speed)
        try:
            await stop.wait()
        finally:
            await sim.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
