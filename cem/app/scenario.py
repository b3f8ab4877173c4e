"""Scenario files: a whole site for one planning horizon in JSON, checked and turned into a Problem.

The format is defined by the pydantic models below; `specs/scenario.schema.json` is generated
from them (`python -m cem.app.scenario --schema`) and a test keeps the two equal. Examples
live in `specs/scenarios/`. Every user mistake becomes a `ScenarioError` listing each problem
with its JSON path (e.g. `evs[1].departure`), never a traceback.

Rules where the file and the horizon disagree (documented in the schema descriptions too):

- Per-PTU arrays (`prices.*`, `base_load_kw`, `pv_kw`, `heat_pumps[].demand_kw`): one value
  means "the same every PTU"; exactly `horizon_ptus` values are used as they are; more values
  are clipped to the horizon (with a note); fewer (but more than one) is an error.
- EV arrival before `start`: the EV is already plugged in; its `energy_kwh` is what it still
  needs. Arrival mid-PTU: it is planned from the next full PTU. Departure mid-PTU: it is planned
  up to the last full PTU before it (the EV must be able to take the whole PTU's power).
- EV departure after the horizon end: planned to the horizon end with a target that is the
  pro-rata share of its energy for the part of its stay inside the horizon (it may charge more,
  up to `energy_kwh`, when that is cheap); noted. Arrival at or after the horizon end: not
  planned, noted. Departure not after arrival or before `start`: error.
- A V2G EV (`v2g_max_discharge_kw`) discharges at most what it charged inside the horizon
  (its level starts at 0 and never goes below), with the same minimum power as charging.
- Battery `efficiency` is the round-trip efficiency, split evenly (sqrt) over charge and
  discharge. Heat pump `level_kwh` is thermal; electrical power x `cop` fills the buffer and
  `demand_kw` + `loss_kw` (thermal) empty it.
- Base load, PV, batteries and heat pumps are 3-phase symmetric; an EV is 3-phase or 1-phase
  on `phase`. `min_kw` of an EV defaults to 6 A at the grid voltage on its phases.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from cem.flex.limits import limits_from_grid
from cem.planner.assets import (
    THREE_PHASE,
    Curtailable,
    FixedLoad,
    Prices,
    Problem,
    StorageAsset,
    single_phase,
)
from cem.site.config import CongestionWindow, GridConfig, dotted_path

MIN_CURRENT_A = 6.0

PerPtu = Annotated[
    list[float],
    Field(min_length=1, description="one value per PTU; a single value means every PTU; "
                                    "more values than horizon_ptus are clipped, fewer is an error"),
]


class Part(BaseModel):
    """Base of every scenario object: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid")


class ScenarioPrices(Part):
    import_eur_per_kwh: PerPtu = Field(..., description="all-in import price per PTU, EUR/kWh (may be negative)")
    export_eur_per_kwh: PerPtu = Field([0.0], description="feed-in revenue per PTU, EUR/kWh (may be negative)")


class ScenarioEv(Part):
    id: str = Field(..., min_length=1)
    arrival: AwareDatetime = Field(..., description="plug-in time, ISO 8601 with offset")
    departure: AwareDatetime = Field(..., description="unplug time, ISO 8601 with offset")
    energy_kwh: float = Field(..., ge=0, description="energy still needed at departure, kWh")
    max_kw: float = Field(..., gt=0, description="maximum charging power, kW")
    min_kw: float | None = Field(None, ge=0, description="minimum charging power when charging; "
                                 "default 6 A x grid voltage x phases")
    phases: Literal[1, 3] = 3
    phase: Literal["L1", "L2", "L3"] | None = Field(None, description="phase of a 1-phase EV (default L1)")
    priority: int = Field(1, ge=0, le=10, description="higher is served first when limits bind")
    v2g_max_discharge_kw: float | None = Field(None, gt=0, description="bidirectional: max discharge, kW")

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioEv:
        if self.departure <= self.arrival:
            raise ValueError("departure: must be after arrival")
        if self.min_kw is not None and self.min_kw > self.max_kw:
            raise ValueError(f"min_kw: {self.min_kw} is above max_kw {self.max_kw}")
        if self.phases == 3 and self.phase is not None:
            raise ValueError("phase: only for 1-phase EVs (phases = 1)")
        return self


class ScenarioBattery(Part):
    id: str = Field(..., min_length=1)
    capacity_kwh: float = Field(..., gt=0)
    soc_kwh: float = Field(..., ge=0, description="energy stored at start, kWh")
    min_soc_kwh: float = Field(0.0, ge=0)
    max_soc_kwh: float | None = Field(None, gt=0, description="default: capacity_kwh")
    max_charge_kw: float = Field(..., gt=0)
    max_discharge_kw: float = Field(..., ge=0)
    efficiency: float = Field(0.9, gt=0, le=1, description="round-trip efficiency")

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioBattery:
        top = self.capacity_kwh if self.max_soc_kwh is None else self.max_soc_kwh
        if top > self.capacity_kwh:
            raise ValueError(f"max_soc_kwh: {top} is above capacity_kwh {self.capacity_kwh}")
        if not self.min_soc_kwh <= self.soc_kwh <= top:
            raise ValueError(f"soc_kwh: {self.soc_kwh} is outside [min_soc_kwh {self.min_soc_kwh}, "
                             f"max_soc_kwh {top}]")
        return self


class ScenarioHeatPump(Part):
    id: str = Field(..., min_length=1)
    max_kw: float = Field(..., gt=0, description="maximum electrical power, kW")
    min_kw: float = Field(0.0, ge=0, description="minimum electrical power when running, kW")
    buffer_kwh: float = Field(..., gt=0, description="thermal buffer size, kWh (thermal)")
    level_kwh: float = Field(..., ge=0, description="buffer content at start, kWh (thermal)")
    min_level_kwh: float = Field(0.0, ge=0, description="the buffer never goes below this")
    loss_kw: float = Field(0.0, ge=0, description="standing loss of the buffer, kW (thermal)")
    demand_kw: PerPtu = Field([0.0], description="heat demand per PTU, kW (thermal)")
    cop: float = Field(3.0, gt=0, description="heat out per electricity in")

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioHeatPump:
        if self.min_kw > self.max_kw:
            raise ValueError(f"min_kw: {self.min_kw} is above max_kw {self.max_kw}")
        if not self.min_level_kwh <= self.level_kwh <= self.buffer_kwh:
            raise ValueError(f"level_kwh: {self.level_kwh} is outside [min_level_kwh "
                             f"{self.min_level_kwh}, buffer_kwh {self.buffer_kwh}]")
        if any(d < 0 for d in self.demand_kw):
            raise ValueError("demand_kw: values must be >= 0")
        return self


class Scenario(Part):
    """One site over one planning horizon (S2 CEM scenario, `cem plan --scenario`).

    Power in kW, positive = consumption; PV production is given positive in `pv_kw`. Times are
    ISO 8601 with an offset. Per-PTU arrays: one value = every PTU, more than horizon_ptus are
    clipped, fewer is an error. EV arrival before start = already plugged in; arrival mid-PTU =
    planned from the next full PTU; departure mid-PTU = up to the last full PTU before it;
    departure after the horizon = pro-rata target for the stay inside it. Congestion windows
    apply to every PTU they overlap. A V2G EV discharges at most what it charged in the
    horizon. Battery efficiency is round-trip. Heat pump levels are
    thermal kWh, filled by electrical power x cop, emptied by demand_kw + loss_kw.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "$schema": "https://json-schema.org/draft/2020-12/schema"})

    name: str = ""
    description: str = ""
    start: AwareDatetime = Field(..., description="start of PTU 0, ISO 8601 with offset (UTC recommended)")
    ptu_minutes: int = Field(15, ge=1, le=60, description="PTU length; must divide 60")
    horizon_ptus: int = Field(96, ge=1, le=2000)
    grid: GridConfig = Field(default_factory=GridConfig)
    prices: ScenarioPrices
    congestion: list[CongestionWindow] = Field(default_factory=list)
    base_load_kw: PerPtu = Field([0.0], description="uncontrolled consumption per PTU, kW")
    pv_kw: PerPtu = Field([0.0], description="available PV production per PTU, kW (>= 0)")
    pv_curtailable: bool = Field(True, description="may the planner curtail PV (export limit, negative prices)")
    evs: list[ScenarioEv] = Field(default_factory=list)
    batteries: list[ScenarioBattery] = Field(default_factory=list)
    heat_pumps: list[ScenarioHeatPump] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if 60 % self.ptu_minutes:
            raise ValueError(f"ptu_minutes: {self.ptu_minutes} must divide 60 (e.g. 15, 30, 60)")
        if any(p < 0 for p in self.pv_kw):
            raise ValueError("pv_kw: values must be >= 0 (production is given as a positive number)")
        return self


# --- errors ------------------------------------------------------------------------------------


@dataclass
class ScenarioProblem:
    """One thing wrong with a scenario file: where (JSON path) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ScenarioError(Exception):
    """The scenario cannot be planned; `problems` lists each mistake with its JSON path."""

    def __init__(self, source: str, problems: list[ScenarioProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.report())

    def report(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


_MESSAGES = {
    "extra_forbidden": "unknown key (check the spelling against specs/scenario.schema.json)",
    "missing": "required",
    "timezone_aware": "needs a UTC offset, e.g. 2026-11-23T17:00:00Z",
}


_FIELD_MESSAGE = re.compile(r"^([a-z_]+): ")


def _problems_from(exc: ValidationError) -> list[ScenarioProblem]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = _MESSAGES.get(err["type"], err["msg"].removeprefix("Value error, "))
        field_first = _FIELD_MESSAGE.match(message)
        if err["type"] == "value_error" and field_first:
            # a check across fields names the field to change first: put it in the path
            loc = (*loc, field_first.group(1))
            message = message[field_first.end():]
        elif err["type"] not in ("missing", "extra_forbidden") and "input" in err:
            shown = json.dumps(err["input"], default=str)
            if len(shown) <= 60:
                message += f" (got {shown})"
        problems.append(ScenarioProblem(dotted_path(loc), message))
    return problems


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    """Parse scenario JSON text, or raise ScenarioError with every problem and its JSON path."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScenarioError(source, [ScenarioProblem(
            "(file)", f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}")]) from None
    if not isinstance(raw, dict):
        raise ScenarioError(source, [ScenarioProblem("(top level)", "must be a JSON object")])
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        problems = _problems_from(exc)
        seen = {p.path for p in problems}
        problems += [p for p in _raw_problems(raw) if p.path not in seen]
        raise ScenarioError(source, problems) from None
    problems = _semantic_problems(scenario)
    if problems:
        raise ScenarioError(source, problems)
    return scenario


def load_scenario(path: Path | str) -> Scenario:
    """Read and check a scenario file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(str(path), [ScenarioProblem("(file)", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(str(path), [ScenarioProblem("(file)", f"cannot read: {exc}")]) from None
    return parse_scenario(text, str(path))


def _array_problem(path: str, values: list[float], n: int) -> ScenarioProblem | None:
    if 1 < len(values) < n:
        return ScenarioProblem(path, f"{len(values)} values for horizon_ptus {n}: give {n} values, "
                                     "or one value for every PTU")
    return None


def _raw_problems(raw: dict[str, Any]) -> list[ScenarioProblem]:
    """Array lengths and duplicate ids, checked on the raw JSON when the models already failed,
    so that one run lists every mistake."""
    n = raw.get("horizon_ptus", 96)
    if not isinstance(n, int):
        return []
    problems: list[ScenarioProblem] = []
    prices_raw = raw.get("prices")
    prices: dict[str, Any] = prices_raw if isinstance(prices_raw, dict) else {}
    arrays = [(f"prices.{key}", prices.get(key)) for key in ("import_eur_per_kwh", "export_eur_per_kwh")]
    arrays += [(key, raw.get(key)) for key in ("base_load_kw", "pv_kw")]
    heat_pumps_raw = raw.get("heat_pumps")
    heat_pumps: list[Any] = heat_pumps_raw if isinstance(heat_pumps_raw, list) else []
    arrays += [(f"heat_pumps[{i}].demand_kw", hp.get("demand_kw"))
               for i, hp in enumerate(heat_pumps) if isinstance(hp, dict)]
    problems += [p for path, values in arrays
                 if isinstance(values, list) and (p := _array_problem(path, values, n))]
    seen: dict[str, str] = {}
    for group in ("evs", "batteries", "heat_pumps"):
        group_raw = raw.get(group)
        items: list[Any] = group_raw if isinstance(group_raw, list) else []
        for i, item in enumerate(items):
            asset_id = item.get("id") if isinstance(item, dict) else None
            if not isinstance(asset_id, str):
                continue
            if asset_id in seen:
                problems.append(ScenarioProblem(f"{group}[{i}].id",
                                                f"id {asset_id!r} is already used by {seen[asset_id]}"))
            seen.setdefault(asset_id, f"{group}[{i}]")
    return problems


def _semantic_problems(s: Scenario) -> list[ScenarioProblem]:
    """Checks across fields, each with the JSON path of the value to change."""
    n = s.horizon_ptus
    problems: list[ScenarioProblem] = []
    arrays = [("prices.import_eur_per_kwh", s.prices.import_eur_per_kwh),
              ("prices.export_eur_per_kwh", s.prices.export_eur_per_kwh),
              ("base_load_kw", s.base_load_kw), ("pv_kw", s.pv_kw)]
    arrays += [(f"heat_pumps[{i}].demand_kw", hp.demand_kw) for i, hp in enumerate(s.heat_pumps)]
    problems += [p for path, values in arrays if (p := _array_problem(path, values, n))]
    for path, values in arrays:
        if not all(math.isfinite(v) for v in values):
            problems.append(ScenarioProblem(path, "values must be finite numbers"))
    seen: dict[str, str] = {}
    groups: list[tuple[str, Sequence[Any]]] = [
        ("evs", s.evs), ("batteries", s.batteries), ("heat_pumps", s.heat_pumps)]
    for group, assets in groups:
        for i, item in enumerate(assets):
            if item.id in seen:
                problems.append(ScenarioProblem(f"{group}[{i}].id",
                                                f"id {item.id!r} is already used by {seen[item.id]}"))
            seen.setdefault(item.id, f"{group}[{i}]")
    for i, ev in enumerate(s.evs):
        if ev.departure <= s.start:
            problems.append(ScenarioProblem(f"evs[{i}].departure",
                                            "departure is before the scenario start: remove the EV"))
    return problems


# --- scenario -> Problem -------------------------------------------------------------------------


@dataclass
class BuiltScenario:
    """A Problem made from a scenario, with what the conversion decided (notes)."""

    problem: Problem
    notes: list[str] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)  # asset id -> ev / battery / heat_pump
    ev_target_wh: dict[str, int] = field(default_factory=dict)  # planned target (pro-rata)
    ev_need_wh: dict[str, int] = field(default_factory=dict)  # energy_kwh as given
    base_load_w: np.ndarray | None = None
    pv_w: np.ndarray | None = None
    pv_id: str | None = None


def per_ptu(values: list[float], n: int, what: str, notes: list[str]) -> np.ndarray:
    """A per-PTU array over the horizon by the documented length rule."""
    if len(values) == 1:
        return np.full(n, values[0], dtype=float)
    if len(values) > n:
        notes.append(f"{what}: {len(values)} values, the horizon has {n} PTUs; the rest is ignored")
    if len(values) < n:
        raise ValueError(f"{what}: {len(values)} values for {n} PTUs")
    return np.asarray(values[:n], dtype=float)


def kw_to_w(values: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(values, dtype=float) * 1000).astype(np.int64)


def scenario_to_problem(s: Scenario) -> BuiltScenario:
    """Turn a checked scenario into the planner's Problem (W, Wh, PTU indices)."""
    n = s.horizon_ptus
    ptu_s = s.ptu_minutes * 60
    dt_h = s.ptu_minutes / 60
    start = s.start.astimezone(UTC)
    end = start + timedelta(seconds=ptu_s * n)
    notes: list[str] = []
    limits = limits_from_grid(s.grid, s.congestion, start, s.ptu_minutes, n)
    for i, window in enumerate(s.congestion):
        if window.end <= start or window.start >= end:
            notes.append(f"congestion[{i}] lies outside the horizon: no effect")
    prices = Prices(
        import_eur_per_kwh=per_ptu(s.prices.import_eur_per_kwh, n, "prices.import_eur_per_kwh", notes),
        export_eur_per_kwh=per_ptu(s.prices.export_eur_per_kwh, n, "prices.export_eur_per_kwh", notes),
    )
    built = BuiltScenario(problem=Problem(start=start, ptu_minutes=s.ptu_minutes, n_ptus=n,
                                          limits=limits, prices=prices), notes=notes)
    problem = built.problem
    base = kw_to_w(per_ptu(s.base_load_kw, n, "base_load_kw", notes))
    pv = kw_to_w(per_ptu(s.pv_kw, n, "pv_kw", notes))
    built.base_load_w, built.pv_w = base, pv
    if np.any(base != 0):
        problem.fixed.append(FixedLoad(id="base_load", power_w=base))
    if np.any(pv > 0):
        built.pv_id = "pv"
        problem.curtailable.append(Curtailable(id="pv", production_w=pv, curtailable=s.pv_curtailable))

    for i, ev in enumerate(s.evs):
        arrival = ev.arrival.astimezone(UTC)
        departure = ev.departure.astimezone(UTC)
        if arrival >= end:
            notes.append(f"evs[{i}] ({ev.id}) arrives after the horizon: not planned")
            continue
        first = max(0, math.ceil((arrival - start).total_seconds() / ptu_s))
        last = min(n, math.floor((departure - start).total_seconds() / ptu_s))
        need_wh = round(ev.energy_kwh * 1000)
        target_wh = need_wh
        if departure > end:
            stay_h = (departure - max(arrival, start)).total_seconds() / 3600
            inside_h = (end - max(arrival, start)).total_seconds() / 3600
            target_wh = round(need_wh * inside_h / stay_h)
            notes.append(f"evs[{i}] ({ev.id}) leaves after the horizon: target {target_wh / 1000:.1f} "
                         f"of {ev.energy_kwh:g} kWh (pro-rata for its stay inside the horizon)")
        if last <= first:
            notes.append(f"evs[{i}] ({ev.id}) is not plugged in for a whole PTU: it cannot charge")
            last = first = min(first, n)
        min_kw = ev.min_kw if ev.min_kw is not None else MIN_CURRENT_A * s.grid.voltage_v * ev.phases / 1000
        min_w = min(round(min_kw * 1000), round(ev.max_kw * 1000))
        v2g_w = round(ev.v2g_max_discharge_kw * 1000) if ev.v2g_max_discharge_kw else 0
        problem.storage.append(StorageAsset(
            id=ev.id, kind="ev",
            charge_max_w=round(ev.max_kw * 1000), charge_min_w=min_w,
            discharge_max_w=v2g_w, discharge_min_w=min(min_w, v2g_w),
            level_wh=0, level_min_wh=0, level_max_wh=need_wh,
            available_from=first, available_until=last, target_wh=target_wh,
            priority=ev.priority,
            phase_share=THREE_PHASE if ev.phases == 3 else single_phase(ev.phase or "L1"),
        ))
        built.kinds[ev.id] = "ev"
        built.ev_target_wh[ev.id] = target_wh
        built.ev_need_wh[ev.id] = need_wh

    for b in s.batteries:
        one_way = math.sqrt(b.efficiency)
        top = b.capacity_kwh if b.max_soc_kwh is None else b.max_soc_kwh
        problem.storage.append(StorageAsset(
            id=b.id, kind="battery",
            charge_max_w=round(b.max_charge_kw * 1000), discharge_max_w=round(b.max_discharge_kw * 1000),
            charge_efficiency=one_way, discharge_efficiency=one_way,
            level_wh=round(b.soc_kwh * 1000), level_min_wh=round(b.min_soc_kwh * 1000),
            level_max_wh=round(top * 1000),
        ))
        built.kinds[b.id] = "battery"

    for i, hp in enumerate(s.heat_pumps):
        demand = per_ptu(hp.demand_kw, n, f"heat_pumps[{i}].demand_kw", notes)
        usage_wh = np.rint((demand + hp.loss_kw) * 1000 * dt_h).astype(np.int64)
        problem.storage.append(StorageAsset(
            id=hp.id, kind="heat_pump",
            charge_max_w=round(hp.max_kw * 1000), charge_min_w=round(hp.min_kw * 1000),
            charge_efficiency=hp.cop,
            level_wh=round(hp.level_kwh * 1000), level_min_wh=round(hp.min_level_kwh * 1000),
            level_max_wh=round(hp.buffer_kwh * 1000), usage_wh=usage_wh,
        ))
        built.kinds[hp.id] = "heat_pump"
    return built


def schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of a scenario file, generated from the models."""
    return Scenario.model_json_schema(mode="validation")


if __name__ == "__main__":  # pragma: no cover - regenerates specs/scenario.schema.json
    import sys

    if "--schema" in sys.argv:
        print(json.dumps(schema(), indent=2))
