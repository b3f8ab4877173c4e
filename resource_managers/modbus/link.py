"""The Modbus TCP side of a resource manager: read and write named points of one device.

Everything goes through the register map: the RM asks for `soc` or `power_setpoint`, this
module finds the table, address, type, word order and scale (or SunSpec scale factor
register). Every failure becomes a `DeviceFault` with a plain reason, so the RM can decide
(withdraw flexibility, retry with back-off) without knowing Modbus. A reading that is no
number (a float32 NaN or infinity), or lies outside the point's `valid_min` .. `valid_max`, is
such a fault too (`ReadingOutOfRange`): the RM withdraws the device instead of passing it on.
"""

from __future__ import annotations

import asyncio
import logging

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from resource_managers.device import DeviceFault, DeviceUnreachable
from resource_managers.modbus.codec import (
    ValueNotRepresentable,
    decode,
    decode_sunssf,
    encode,
)
from resource_managers.modbus.register_map import Point, RegisterMap
from sitekit.plausible import number_problem

log = logging.getLogger(__name__)

__all__ = ["DeviceFault", "DeviceRejected", "DeviceUnreachable", "ModbusLink", "ReadingOutOfRange"]


class DeviceRejected(DeviceFault):
    """The device answered with a Modbus exception response."""


class ReadingOutOfRange(DeviceFault):
    """A reading lies outside the point's valid range: the device is not trusted."""


class ModbusLink:
    """One Modbus TCP connection to one device (unit id), addressed through its register map."""

    def __init__(self, regmap: RegisterMap, host: str, port: int, device_id: int = 1,
                 timeout_s: float = 1.0) -> None:
        self.regmap = regmap
        self.host = host
        self.port = port
        self.device_id = device_id
        self.timeout_s = timeout_s
        self._client: AsyncModbusTcpClient | None = None
        self._sunssf: dict[str, int] = {}

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        """Open the TCP connection (no automatic reconnect: the RM owns the back-off)."""
        await self.close()
        client = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.timeout_s,
                                      retries=0, reconnect_delay=0)
        try:
            ok = await asyncio.wait_for(client.connect(), self.timeout_s * 2)
        except (TimeoutError, OSError, ModbusException) as exc:
            client.close()
            raise DeviceUnreachable(f"cannot connect to {self.host}:{self.port}: {exc}") \
                from None
        if not ok:
            client.close()
            raise DeviceUnreachable(f"cannot connect to {self.host}:{self.port}")
        self._client = client
        self._sunssf.clear()

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _read_words(self, table: str, address: int, count: int) -> list[int] | list[bool]:
        if self._client is None or not self._client.connected:
            raise DeviceUnreachable(f"not connected to {self.host}:{self.port}")
        client = self._client
        calls = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }
        try:
            response = await asyncio.wait_for(
                calls[table](address, count=count, device_id=self.device_id),
                self.timeout_s * 2)
        except (TimeoutError, ModbusException, OSError) as exc:
            await self.close()
            raise DeviceUnreachable(f"no answer reading {table} {address}: "
                                    f"{exc or type(exc).__name__}") from None
        if response.isError():
            raise DeviceRejected(f"device refused to read {table} {address} (x{count}): "
                                 f"exception code {getattr(response, 'exception_code', '?')}")
        if table in ("coil", "discrete"):
            return list(response.bits[:count])
        return list(response.registers)

    async def _scale_exponent(self, point: Point) -> int:
        if point.scale_register is None:
            return 0
        if point.scale_register not in self._sunssf:
            sf_point = self.regmap.point(point.scale_register)
            words = await self._read_words(sf_point.table, sf_point.address, 1)
            value = decode_sunssf([int(w) for w in words])
            if value == -32768 or not -10 <= value <= 10:
                raise ReadingOutOfRange(f"scale factor {point.scale_register} = {value} is not "
                                        "implemented or implausible")
            self._sunssf[point.scale_register] = value
        return self._sunssf[point.scale_register]

    def _check_range(self, point: Point, value: float) -> None:
        """A reading the device cannot mean (NaN, infinite, absurd, or outside the map's
        valid range) makes the device untrusted: it never reaches the CEM."""
        problem = number_problem(value)
        if problem is not None:
            raise ReadingOutOfRange(f"{point.name} {problem} (registers of a "
                                    f"{point.type} at {point.table} {point.address})")
        if point.valid_min is not None and value < point.valid_min:
            raise ReadingOutOfRange(f"{point.name} = {value:g} {point.unit} is below "
                                    f"{point.valid_min:g}")
        if point.valid_max is not None and value > point.valid_max:
            raise ReadingOutOfRange(f"{point.name} = {value:g} {point.unit} is above "
                                    f"{point.valid_max:g}")

    async def read(self, name: str) -> float:
        """One point in engineering units, S2 sign; bools read as 0.0 / 1.0."""
        return (await self.read_many([name]))[name]

    async def read_many(self, names: list[str]) -> dict[str, float]:
        """Several points; adjacent points of one table are fetched in one request."""
        points = sorted((self.regmap.point(n) for n in names), key=lambda p: (p.table, p.address))
        groups: list[list[Point]] = []
        for point in points:
            last = groups[-1][-1] if groups else None
            if (last is not None and last.table == point.table
                    and last.address + last.count == point.address
                    and sum(p.count for p in groups[-1]) + point.count <= 120):
                groups[-1].append(point)
            else:
                groups.append([point])
        values: dict[str, float] = {}
        for group in groups:
            first = group[0]
            total = sum(p.count for p in group)
            words = await self._read_words(first.table, first.address, total)
            offset = 0
            for point in group:
                chunk = words[offset:offset + point.count]
                offset += point.count
                if point.type == "bool":
                    value = 1.0 if chunk[0] else 0.0
                else:
                    exponent = await self._scale_exponent(point)
                    value = decode(point, [int(w) for w in chunk],
                                   self.regmap.word_order(point), exponent)
                self._check_range(point, value)
                values[point.name] = value
        return values

    async def write(self, name: str, value: float) -> None:
        """Write one point; refuses points the map does not mark writable."""
        point = self.regmap.point(name)
        if not point.writable:
            raise PermissionError(f"{name} is read-only in {self.regmap.source}")
        if self._client is None or not self._client.connected:
            raise DeviceUnreachable(f"not connected to {self.host}:{self.port}")
        client = self._client
        if point.valid_min is not None and value < point.valid_min:
            log.warning("%s: %g %s is below the map's minimum %g: writing the minimum",
                        name, value, point.unit, point.valid_min)
            value = point.valid_min
        if point.valid_max is not None and value > point.valid_max:
            log.warning("%s: %g %s is above the map's maximum %g: writing the maximum",
                        name, value, point.unit, point.valid_max)
            value = point.valid_max
        try:
            if point.type == "bool":
                call = client.write_coil(point.address, bool(value), device_id=self.device_id)
            else:
                exponent = await self._scale_exponent(point)
                words = encode(point, value, self.regmap.word_order(point), exponent)
                call = client.write_registers(point.address, words, device_id=self.device_id)
            response = await asyncio.wait_for(call, self.timeout_s * 2)
        except ValueNotRepresentable:
            raise
        except (TimeoutError, ModbusException, OSError) as exc:
            await self.close()
            raise DeviceUnreachable(f"no answer writing {name}: "
                                    f"{exc or type(exc).__name__}") from None
        if response.isError():
            raise DeviceRejected(f"device refused {name} = {value:g} {point.unit}: exception "
                                 f"code {getattr(response, 'exception_code', '?')}")
        log.debug("wrote %s = %g %s", name, value, point.unit)
