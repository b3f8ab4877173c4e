"""Register maps: one TOML file per device model says where every point lives.

A map names each point (address, table, data type, word order, scale or SunSpec-style scale
factor register, unit, access) and the device's limits (power, capacity, SoC band, revert
timeout ...). The resource managers and the simulators only ever address points by name, so a
different device model is a different TOML file, never a code change.

`load_register_map(path)` returns a validated `RegisterMap` or raises `RegisterMapError` whose
`problems` lists every mistake with its place (overlapping registers, registers beyond address
65535, unknown types, writable points in read-only tables, scale registers that do not exist,
points or limits a device class needs but the map lacks).
"""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DeviceClass = Literal["battery", "heat-pump", "pv", "meter"]
Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["int16", "uint16", "int32", "uint32", "float32", "bool"]
WordOrder = Literal["big", "little"]

#: registers a data type occupies
REGISTER_COUNT: dict[str, int] = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "bool": 1,
}
READ_ONLY_TABLES = ("input", "discrete")
BIT_TABLES = ("coil", "discrete")
WRITABLE_TABLES = ("holding", "coil")
LAST_ADDRESS = 65535  # Modbus addresses are 16 bits: a point's last register must fit too

#: points each device class cannot work without; a tuple means "one of these sets"
REQUIRED_POINTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "battery": (("soc", "power", "power_setpoint"),
                ("soc", "power", "storage_control_mode", "charge_rate_pct",
                 "discharge_rate_pct")),
    "heat-pump": (("sg_ready_state", "power", "buffer_temperature"),
                  ("sg_ready_relay_1", "sg_ready_relay_2", "power", "buffer_temperature")),
    "pv": (("power", "active_power_limit_pct"),),
    "meter": (("power_l1", "power_l2", "power_l3"),),
}
#: points the RM writes, so the map must make them writable when present
WRITTEN_POINTS = ("power_setpoint", "storage_control_mode", "charge_rate_pct",
                  "discharge_rate_pct", "revert_timeout", "sg_ready_state",
                  "sg_ready_relay_1", "sg_ready_relay_2",
                  "setpoint_temperature", "active_power_limit_pct", "limit_enabled",
                  "limit_revert_timeout")
REQUIRED_LIMITS: dict[str, tuple[str, ...]] = {
    "battery": ("max_charge_w", "max_discharge_w", "capacity_wh", "soc_min_pct", "soc_max_pct"),
    "heat-pump": ("power_normal_w", "power_boost_w", "comfort_min_c", "comfort_max_c",
                  "buffer_heat_capacity_wh_per_k"),
    "pv": ("rated_power_w",),
    "meter": (),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Point(_Strict):
    """One named value on the device."""

    name: str = ""
    address: int = Field(..., ge=0, le=65535)
    table: Table
    type: DataType
    word_order: WordOrder | None = Field(None, description="default: the device's word_order")
    scale: float = Field(1.0, description="engineering value = raw x scale (x 10^sf)")
    scale_register: str | None = Field(None, description="point holding a SunSpec sunssf")
    unit: str = ""
    access: Literal["read", "write", "read-write"] = "read"
    invert: bool = Field(False, description="device counts the other way round than S2")
    valid_min: float | None = Field(None, description="readings below this (engineering value, S2 sign) are faults")
    valid_max: float | None = Field(None, description="readings above this are faults")
    description: str = ""

    @property
    def count(self) -> int:
        return REGISTER_COUNT[self.type]

    @property
    def writable(self) -> bool:
        return self.access in ("write", "read-write")

    @property
    def span(self) -> range:
        return range(self.address, self.address + self.count)


class DeviceInfo(_Strict):
    device_class: DeviceClass = Field(..., alias="class")
    manufacturer: str = "Unknown"
    model: str = "Unknown"
    word_order: WordOrder = "big"
    description: str = ""


class Limits(_Strict):
    """What the device can and may do; the RM never writes beyond these."""

    # battery
    max_charge_w: int | None = Field(None, gt=0)
    max_discharge_w: int | None = Field(None, gt=0)
    capacity_wh: int | None = Field(None, gt=0)
    soc_min_pct: float | None = Field(None, ge=0, le=100)
    soc_max_pct: float | None = Field(None, ge=0, le=100)
    charge_efficiency: float = Field(0.95, gt=0, le=1)
    discharge_efficiency: float = Field(0.95, gt=0, le=1)
    revert_timeout_s: float = Field(60.0, gt=0, description="device falls back to idle after")
    # heat pump
    power_normal_w: int | None = Field(None, gt=0)
    power_boost_w: int | None = Field(None, gt=0)
    cop: float = Field(3.5, gt=0)
    comfort_min_c: float | None = None
    comfort_max_c: float | None = None
    buffer_heat_capacity_wh_per_k: float | None = Field(None, gt=0)
    heat_loss_w_per_k: float = Field(15.0, ge=0)
    ambient_c: float = 15.0
    heat_demand_w: float = Field(1500.0, ge=0, description="mean heat drawn by the house")
    min_run_s: float = Field(600.0, ge=0)
    min_off_s: float = Field(600.0, ge=0)
    sg_ready_off: int = 1
    sg_ready_normal: int = 2
    sg_ready_boost: int = 3
    phase: Literal["L1", "L2", "L3", "3-phase"] = Field(
        "3-phase", description="where the device connects: one phase or all three")
    # pv
    rated_power_w: int | None = Field(None, gt=0)
    # meter
    phases: Literal[1, 3] = 3


class RegisterMap(_Strict):
    """A validated register map; look points up by name."""

    device: DeviceInfo
    limits: Limits = Field(default_factory=Limits)
    points: dict[str, Point]
    source: Path | None = None

    @property
    def device_class(self) -> str:
        return self.device.device_class

    def has(self, name: str) -> bool:
        return name in self.points

    def point(self, name: str) -> Point:
        try:
            return self.points[name]
        except KeyError:
            raise KeyError(f"the register map {self.source} has no point '{name}'") from None

    def word_order(self, point: Point) -> WordOrder:
        return point.word_order or self.device.word_order


class RegisterMapError(Exception):
    """The register map cannot be used; `problems` says why, one line each."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s) in the register map:\n"
                         + "\n".join(f"  - {p}" for p in problems))


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _pydantic_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        where = _dotted(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown setting")
        elif err["type"] == "literal_error":
            problems.append(f"{where}: got {err.get('input')!r}, expected "
                            f"{err.get('ctx', {}).get('expected', 'one of the listed values')}")
        elif err["type"] == "missing":
            problems.append(f"{where}: required setting is missing")
        else:
            problems.append(f"{where}: {err['msg']}")
    return problems


def check_register_map(regmap: RegisterMap) -> list[str]:
    """Problems a well-formed map can still have: overlaps, access, references, required."""
    problems: list[str] = []
    points = regmap.points
    for name, point in points.items():
        point.name = name
    for name, point in points.items():
        where = f"points.{name}"
        if point.table in BIT_TABLES and point.type != "bool":
            problems.append(f"{where}: a {point.table} holds one bit, so type must be 'bool' "
                            f"(got '{point.type}')")
        if point.table not in BIT_TABLES and point.type == "bool":
            problems.append(f"{where}: type 'bool' only fits coil or discrete tables")
        last = point.address + point.count - 1
        if last > LAST_ADDRESS:
            problems.append(f"{where}: a {point.type} at {point.address} takes registers "
                            f"{point.address}..{last}, beyond the last Modbus address "
                            f"{LAST_ADDRESS}; move it to {LAST_ADDRESS - point.count + 1} "
                            "or below")
        if point.writable and point.table not in WRITABLE_TABLES:
            problems.append(f"{where}: access '{point.access}' but the {point.table} table is "
                            "read-only in Modbus; use a holding register or coil")
        if name in WRITTEN_POINTS and not point.writable:
            problems.append(f"{where}: the resource manager writes this point, but its access "
                            "is 'read'; use 'read-write' or 'write'")
        if point.scale == 0:
            problems.append(f"{where}: scale 0 would turn every value into 0")
        if point.scale_register is not None:
            sf = points.get(point.scale_register)
            if sf is None:
                problems.append(f"{where}: scale_register '{point.scale_register}' is not a "
                                "point in this map")
            elif sf.type != "int16":
                problems.append(f"{where}: scale_register '{point.scale_register}' must be an "
                                f"int16 (SunSpec sunssf), not {sf.type}")
        if (point.valid_min is not None and point.valid_max is not None
                and point.valid_min > point.valid_max):
            problems.append(f"{where}: valid_min is above valid_max")
    by_table: dict[str, list[Point]] = {}
    for point in points.values():
        by_table.setdefault(point.table, []).append(point)
    for table, members in by_table.items():
        members.sort(key=lambda p: p.address)
        for first, second in itertools.pairwise(members):
            if second.address < first.address + first.count:
                problems.append(
                    f"points.{second.name}: {table} register {second.address} overlaps "
                    f"points.{first.name} ({first.type} at {first.address}.."
                    f"{first.address + first.count - 1})")
    options = REQUIRED_POINTS[regmap.device_class]
    if not any(all(p in points for p in option) for option in options):
        # the set the map is closest to: fewest missing, then most already there
        best = min(options, key=lambda o: (sum(p not in points for p in o),
                                           -sum(p in points for p in o)))
        missing = [p for p in best if p not in points]
        alternatives = " or ".join("{" + ", ".join(o) + "}" for o in options)
        problems.append(f"points: a {regmap.device_class} map needs the point(s) "
                        f"{', '.join(missing)} (required: {alternatives})")
    for limit in REQUIRED_LIMITS[regmap.device_class]:
        if getattr(regmap.limits, limit) is None:
            problems.append(f"limits.{limit}: a {regmap.device_class} map needs this limit")
    lim = regmap.limits
    if (lim.soc_min_pct is not None and lim.soc_max_pct is not None
            and lim.soc_min_pct >= lim.soc_max_pct):
        problems.append("limits.soc_min_pct: must be below soc_max_pct")
    if (lim.comfort_min_c is not None and lim.comfort_max_c is not None
            and lim.comfort_min_c >= lim.comfort_max_c):
        problems.append("limits.comfort_min_c: must be below comfort_max_c")
    if (lim.power_normal_w is not None and lim.power_boost_w is not None
            and lim.power_boost_w < lim.power_normal_w):
        problems.append("limits.power_boost_w: boost must draw at least the normal power")
    return problems


def parse_register_map(text: str, path: Path | str = "<string>") -> RegisterMap:
    """Parse and validate TOML text; raise RegisterMapError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegisterMapError(path, [f"not valid TOML: {exc}"]) from None
    try:
        regmap = RegisterMap.model_validate(raw)
    except ValidationError as exc:
        raise RegisterMapError(path, _pydantic_problems(exc)) from None
    problems = check_register_map(regmap)
    if problems:
        raise RegisterMapError(path, problems)
    regmap.source = Path(path)
    return regmap


def load_register_map(path: Path | str) -> RegisterMap:
    """Read a register map TOML file; raise RegisterMapError with every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegisterMapError(path, ["file not found (register maps live in specs/modbus/)"]) \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegisterMapError(path, [f"cannot read the file: {exc}"]) from None
    return parse_register_map(text, path)


def register_map_problems(path: Path, device_class: str | None = None) -> list[str]:
    """Every problem of a map file (empty when fine); also checks it fits the device class."""
    try:
        regmap = load_register_map(path)
    except RegisterMapError as exc:
        return exc.problems
    if device_class is not None and regmap.device_class != device_class:
        return [f"device.class is '{regmap.device_class}' but the site config uses this map "
                f"for a '{device_class}'"]
    return []
