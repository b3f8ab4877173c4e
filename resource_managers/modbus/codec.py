"""Turn engineering values (W, %, degC) into register words and back, as the map says.

Shared by the resource managers (client side) and the simulators (server side), so both read
a map the same way: value = raw x scale x 10^sf, negated when the device counts the other way
round than S2 (`invert`), words in the map's order.
"""

from __future__ import annotations

import math

from pymodbus.client import ModbusTcpClient

from resource_managers.modbus.register_map import Point, WordOrder

_DATATYPE = {
    "int16": ModbusTcpClient.DATATYPE.INT16,
    "uint16": ModbusTcpClient.DATATYPE.UINT16,
    "int32": ModbusTcpClient.DATATYPE.INT32,
    "uint32": ModbusTcpClient.DATATYPE.UINT32,
    "float32": ModbusTcpClient.DATATYPE.FLOAT32,
}
_INT_RANGE = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


class ValueNotRepresentable(ValueError):
    """The value does not fit the point's data type (e.g. negative into a uint16)."""


def factor(point: Point, scale_exponent: int = 0) -> float:
    """Engineering units per raw count."""
    return point.scale * (10.0 ** scale_exponent)


def decode(point: Point, registers: list[int], word_order: WordOrder,
           scale_exponent: int = 0) -> float:
    """Registers of one point -> engineering value in S2 sign convention."""
    raw = ModbusTcpClient.convert_from_registers(registers, _DATATYPE[point.type], word_order)
    assert isinstance(raw, int | float)
    value = float(raw) * factor(point, scale_exponent)
    return -value if point.invert else value


def encode(point: Point, value: float, word_order: WordOrder, scale_exponent: int = 0
           ) -> list[int]:
    """Engineering value in S2 sign convention -> registers of one point."""
    device_value = -value if point.invert else value
    raw: float = device_value / factor(point, scale_exponent)
    if point.type == "float32":
        return ModbusTcpClient.convert_to_registers(float(raw), _DATATYPE[point.type], word_order)
    if not math.isfinite(raw):
        raise ValueNotRepresentable(f"{point.name}: {value} is not a number")
    whole = round(raw)
    low, high = _INT_RANGE[point.type]
    if not low <= whole <= high:
        raise ValueNotRepresentable(
            f"{point.name}: {value:g} {point.unit} is raw {whole}, outside {point.type} "
            f"({low}..{high})")
    return ModbusTcpClient.convert_to_registers(whole, _DATATYPE[point.type], word_order)


def decode_sunssf(registers: list[int]) -> int:
    """A SunSpec scale factor register (int16 power of ten)."""
    raw = ModbusTcpClient.convert_from_registers(registers, ModbusTcpClient.DATATYPE.INT16)
    assert isinstance(raw, int)
    return raw
