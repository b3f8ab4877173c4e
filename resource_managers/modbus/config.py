"""The Modbus resource managers' configuration: `[[modbus.devices]]` of the site file.

One entry per device: its name (shown by the CEM), device class, register map (TOML in
`specs/modbus/`), and where it answers Modbus TCP. The edge (`cem.app.site_file`) composes this
section with the CEM's into the one site file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from sitekit.config import ConfigProblem, Section, missing_files, resolve

DEVICE_CLASSES = ("battery", "heat-pump", "pv", "meter")
DeviceClass = Literal["battery", "heat-pump", "pv", "meter"]


class ModbusDevice(Section):
    """One Modbus TCP device and its register map."""

    name: str
    device: DeviceClass
    map: Path
    host: str = "127.0.0.1"
    port: int = Field(default=5020, ge=0, le=65535)
    device_id: int = Field(default=1, ge=0, le=247)


class ModbusConfig(Section):
    """`[modbus]`: the devices, each run as its own S2 resource manager."""

    devices: list[ModbusDevice] = Field(default_factory=list)

    def resolve_paths(self, base: Path) -> None:
        """Register maps are relative to the config file's folder."""
        for device in self.devices:
            device.map = resolve(base, device.map)

    def missing_files(self) -> list[ConfigProblem]:
        """A problem for each register map that does not exist."""
        return missing_files([(f"modbus.devices[{i}].map", d.map)
                              for i, d in enumerate(self.devices)],
                             hint="register maps live in specs/modbus/")

    def named(self, name: str) -> ModbusDevice | None:
        """The device with this name (None: no such device)."""
        return next((d for d in self.devices if d.name == name), None)
