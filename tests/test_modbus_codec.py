"""Codec: engineering values survive encode -> registers -> decode for every type and order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resource_managers.modbus.codec import ValueNotRepresentable, decode, encode
from resource_managers.modbus.register_map import Point

RANGES = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
          "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1)}


@given(type_=st.sampled_from(sorted(RANGES)), order=st.sampled_from(["big", "little"]),
       scale=st.sampled_from([1.0, 0.1, 10.0, 0.01]), exponent=st.integers(-3, 3),
       invert=st.booleans(), data=st.data())
def test_integer_points_round_trip(type_: str, order: str, scale: float, exponent: int,
                                   invert: bool, data: st.DataObject) -> None:
    low, high = RANGES[type_]
    raw = data.draw(st.integers(low, high))
    point = Point(name="p", address=0, table="holding", type=type_, scale=scale, invert=invert)
    value = decode(point, encode(point, (-1 if invert else 1) * raw * scale * 10.0**exponent,
                                 order, exponent), order, exponent)  # type: ignore[arg-type]
    assert value == pytest.approx((-1 if invert else 1) * raw * scale * 10.0**exponent,
                                  rel=1e-9, abs=1e-9)


@given(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from(["big", "little"]))
def test_float_points_round_trip(value: float, order: str) -> None:
    point = Point(name="p", address=0, table="input", type="float32")
    assert decode(point, encode(point, value, order), order) == pytest.approx(  # type: ignore[arg-type]
        value, rel=1e-6, abs=1e-3)


def test_values_that_do_not_fit_are_refused() -> None:
    point = Point(name="p", address=0, table="holding", type="uint16", unit="W")
    with pytest.raises(ValueNotRepresentable, match="outside uint16"):
        encode(point, -1, "big")
    with pytest.raises(ValueNotRepresentable):
        encode(point, 70000, "big")


def test_word_order_swaps_registers() -> None:
    point = Point(name="p", address=0, table="holding", type="uint32")
    assert encode(point, 0x00010002, "big") == [1, 2]
    assert encode(point, 0x00010002, "little") == [2, 1]
