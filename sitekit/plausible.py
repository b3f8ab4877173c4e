"""What a number from outside must be before the site uses or stores it.

Shared by the CEM (S2 values an RM sends) and the RMs (OCPP meter values, Modbus registers),
so every edge answers the same question the same way: a value is usable when it is a finite
number no larger than `MAX_MAGNITUDE` (the size of no quantity at one site: 10^12 W is a
terawatt, 10^12 Wh a terawatt-hour, 10^12 ms thirty years). What a device itself declared
(its fuse, its power ranges, a register's valid range) is checked where that is known.
"""

from __future__ import annotations

import math

MAX_MAGNITUDE = 1e12


def number_problem(value: object) -> str | None:
    """Why `value` is not a usable number (None: it is one). Strings are read as JSON numbers
    are by lax parsers ("NaN", "-Infinity", "1e400"): those are refused too."""
    if isinstance(value, bool):
        return None  # a bool is not a measured quantity; its own type check judges it
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None  # not a number at all: the schema's type check says so
    elif isinstance(value, int):
        number = float(value) if abs(value) <= 10**15 else math.inf
    elif isinstance(value, float):
        number = value
    else:
        return None
    if math.isnan(number):
        return "is not a number (NaN)"
    if math.isinf(number):
        return f"is {'-' if number < 0 else ''}infinite"
    if abs(number) > MAX_MAGNITUDE:
        return f"is {number:g}, beyond any plausible value (±{MAX_MAGNITUDE:g})"
    return None


def finite(value: float | None) -> bool:
    """True for a finite number within ±`MAX_MAGNITUDE`."""
    return value is not None and number_problem(value) is None
