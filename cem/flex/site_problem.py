"""All connected RMs + site config + prices + congestion -> one planner `Problem`, and the way back.

`build_problem` hands each RM's state (an `RmStateView`, read-only) to the plug-in of its
selected control type (`RmStateView.plugin`, see `cem.control_types`), which adds the RM's
assets and bindings for what is in force now (`SiteBuild`, `AssetSource`). It returns the
problem and a `SiteMapping`: asset id -> binding (which RM, which S2 ids), so that
`instructions_for_plan` can turn a plan into S2 instructions per RM.

RMs without a control type, with NOT_CONTROLABLE, or whose flexibility is not known yet, are
planned as fixed loads from their forecast or measurement. The grid meter (recognised from what
it says in S2, `cem.flex.kinds`) measures the whole site, so it is not added as a load;
instead the part of its measurement that no other RM explains becomes a flat "base-load"
FixedLoad, and the guard reads it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np

from cem.flex.kinds import is_grid_meter
from cem.flex.limits import site_limits
from cem.flex.not_controlable import fixed_load
from cem.flex.ptu import FlexBinding, PtuGrid, electric_total, floor_to_ptu
from cem.planner.assets import FixedLoad, Plan, Prices, Problem, SiteLimits, StorageAsset
from cem.ports import RmStateView
from cem.site.config import CongestionWindow, SiteConfig


@dataclass
class SiteMapping:
    """How the problem's assets map back to RMs, and what was noticed building it."""

    bindings: dict[str, FlexBinding] = field(default_factory=dict)  # asset id -> binding
    rm_assets: dict[str, list[str]] = field(default_factory=dict)  # rm id -> asset ids
    meter_rm: str | None = None
    notes: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    # rm id -> its first EV asset in the problem (the departures and EV modes read these)
    evs: dict[str, StorageAsset] = field(default_factory=dict)

    def add(self, rm_id: str, asset_id: str, binding: FlexBinding | None, kind: str) -> None:
        self.rm_assets.setdefault(rm_id, []).append(asset_id)
        if binding is not None:
            self.bindings[asset_id] = binding
        self.kinds[kind] += 1

    def summary(self) -> str:
        """'12 EVs, 1 battery, 1 PV' for log lines."""
        names = {"ev": "EV", "battery": "battery", "heat_pump": "heat pump", "storage": "storage",
                 "pv": "PV", "load": "fixed load", "modes": "mode device", "profile": "profile",
                 "ddbc": "demand-driven device"}
        parts = []
        for kind, count in self.kinds.most_common():
            name = names.get(kind, kind)
            plural = "s" if count != 1 and name not in ("PV", "storage") else ""
            parts.append(f"{count} {name}{plural}")
        return ", ".join(parts) or "no devices"


@dataclass
class SiteBuild:
    """The site's problem while it is built: what a control type's plug-in adds an RM to."""

    problem: Problem
    mapping: SiteMapping
    grid: PtuGrid
    config: SiteConfig
    now: datetime
    # what a plug-in works out once per build instead of once per RM (its own keys)
    memo: dict[str, Any] = field(default_factory=dict)


class AssetSource(Protocol):
    """The flex side of a control-type plug-in (`cem.control_types.base.ControlTypePlugin`)."""

    def add_assets(self, site: SiteBuild, rm_id: str, rm: RmStateView) -> bool:
        """Add the RM's assets and bindings; False when its flexibility is not known yet."""
        ...


def measured_w(state: Any) -> float | None:
    """The RM's latest electric power measurement (sum over phases), or None."""
    measurement = state.latest_measurement()
    return electric_total(measurement.values) if measurement is not None else None


def _windows(congestion: Iterable[Any]) -> list[CongestionWindow]:
    out = []
    for w in congestion:
        if isinstance(w, CongestionWindow):
            out.append(w)
        else:
            out.append(CongestionWindow(start=w.start, end=w.end, import_limit_kw=w.import_limit_kw,
                                        export_limit_kw=w.export_limit_kw))
    return out


def _prices(prices: Any, config: SiteConfig, grid: PtuGrid) -> Prices:
    if prices is None:
        from cem.flex.prices import prices_from_config

        return prices_from_config(config.prices, grid.start, grid.ptu_minutes, grid.n_ptus,
                                  fill="previous").prices
    if hasattr(prices, "prices"):
        prices = prices.prices
    return prices


def live_limits(config: SiteConfig, start: datetime, n_ptus: int,
                congestion: Iterable[Any]) -> SiteLimits:
    """The site's limits for a live plan from `start`: the grid connection and the congestion
    windows (store rows or CongestionWindow, on top of the config's); live, PV is a forecast,
    so the fuse must hold without the sun, and plans keep `planner.limit_share` of them."""
    return site_limits(config, start, n_ptus, _windows(congestion),
                       planning_share=config.planner.limit_share, fuse_production_credit=0.0)


def build_problem(states: Mapping[str, Any], config: SiteConfig, prices: Any,
                  congestion: Iterable[Any], now: datetime) -> tuple[Problem, SiteMapping]:
    """The planner problem for the site at `now`, and the mapping back to the RMs.

    `prices` is a planner `Prices` (or `PtuPrices`) for the grid starting at the PTU that holds
    `now`, or None to take them from the config. `congestion` holds run-time congestion windows
    (store rows or CongestionWindow) on top of those in the config.
    """
    ptu_minutes = config.planner.ptu_minutes
    start = floor_to_ptu(now, ptu_minutes)
    grid = PtuGrid(start, ptu_minutes, config.planner.horizon_ptus)
    # live, PV is a forecast: the fuse must hold even when the sun is not there; and
    # measurements drift from plans between replans: plan inside the limits, not on them
    limits = live_limits(config, start, grid.n_ptus, congestion)
    problem = Problem(start=start, ptu_minutes=ptu_minutes, n_ptus=grid.n_ptus, limits=limits,
                      prices=_prices(prices, config, grid))
    problem.first_ptu_share = grid.share_ahead(now)
    mapping = SiteMapping()
    site = SiteBuild(problem, mapping, grid, config, now)
    planned = []
    storage, evs = problem.storage, mapping.evs
    for rm_id, state in states.items():
        if is_grid_meter(state):
            mapping.meter_rm = rm_id
            continue
        before = len(storage)
        try:
            _add_rm(site, rm_id, state)
            planned.append(state)
        except Exception as exc:  # one RM's odd data must not stop the site's plan
            mapping.notes.append(f"{rm_id}: left out of the plan ({type(exc).__name__}: {exc})")
        for asset in storage[before:]:
            if asset.kind == "ev":
                evs[rm_id] = asset
                break
    if mapping.meter_rm is not None:
        grid_w = measured_w(states[mapping.meter_rm])
        if grid_w is not None:
            # what the planned RMs draw now, as far as it is known (only read with a meter)
            explained_w = sum(measured_w(state) or 0.0 for state in planned)
            base = max(0.0, grid_w - explained_w)
            problem.fixed.append(FixedLoad(id="base-load",
                                           power_w=np.full(grid.n_ptus, round(base), dtype=np.int64)))
            mapping.notes.append(f"base load {base:.0f} W from the grid meter {mapping.meter_rm}")
    return problem, mapping


def _add_rm(site: SiteBuild, rm_id: str, state: RmStateView) -> None:
    """Add one RM's assets (a fixed load from its forecast or measurement when its plug-in
    adds none)."""
    plugin: AssetSource | None = state.plugin
    if plugin is not None and plugin.add_assets(site, rm_id, state):
        return
    if state.latest_measurement() is None and state.power_forecast() is None:
        return
    load = fixed_load(rm_id, site.grid, forecast=state.power_forecast(),
                      measurement=state.latest_measurement())
    site.problem.fixed.append(load)
    site.mapping.add(rm_id, load.id, None, "load")


def instructions_for_plan(plan: Plan, problem: Problem, mapping: SiteMapping, now: datetime,
                          until_ptu: int | None = None,
                          skip: Collection[str] = ()) -> dict[str, list[Any]]:
    """S2 instructions per RM id for PTUs [0, until_ptu) of the plan (default: all), for every
    RM but those in `skip`."""
    until = problem.n_ptus if until_ptu is None else until_ptu
    out: dict[str, list[Any]] = {}
    for binding in mapping.bindings.values():
        if binding.rm_id in skip:
            continue
        messages = binding.instructions(plan, problem, now, until)
        if messages:
            out.setdefault(binding.rm_id, []).extend(messages)
    return out


def instruction_keys(plan: Plan, problem: Problem, mapping: SiteMapping,
                     until_ptu: int) -> dict[str, Hashable | None]:
    """Per RM with bindings, what its instructions for PTUs [0, until_ptu) are made of: the
    PTU, its assets' plan rows there (power, and levels unless the binding says its
    instructions do not read them) and what each binding reads besides (its
    `instruction_key`). Two plans giving an RM equal keys give it equal instructions, so one
    sent for the first need not be built nor sent again for the second. None: not known (a
    binding without `instruction_key`, or one that depends on the time itself)."""
    keys: dict[str, Hashable | None] = {}
    parts: dict[str, list[Hashable]] = {}
    power_w, level_wh = plan.power_w, plan.level_wh
    for asset_id, binding in mapping.bindings.items():
        rm_id = binding.rm_id
        if rm_id in keys:
            continue  # already unknown
        key_of = getattr(binding, "instruction_key", None)
        own = key_of() if key_of is not None else None
        if own is None:
            keys[rm_id] = None
            parts.pop(rm_id, None)
            continue
        power = power_w.get(asset_id)
        level = level_wh.get(asset_id) \
            if getattr(binding, "instructions_read_levels", True) else None
        row = (asset_id, own, None if power is None else _row_bytes(power, until_ptu),
               None if level is None else _row_bytes(level, until_ptu))
        rows = parts.get(rm_id)
        if rows is None:
            parts[rm_id] = [row]
        else:
            rows.append(row)
    head = (problem.start, until_ptu)
    for rm_id, rows in parts.items():
        keys[rm_id] = (*head, *rows)
    return keys


def settled_keys(keys: Mapping[str, Hashable | None], instructions: Mapping[str, list[Any]],
                 mapping: SiteMapping, now: datetime) -> dict[str, Hashable]:
    """Per RM in `instructions` with a key: its key once it has carried out its instructions
    due by `now` (each binding's `settled_key`; an RM takes what it is told, which makes that
    its state). A later plan giving it this key gives it the same instructions again."""
    out: dict[str, Hashable] = {}
    for rm_id, messages in instructions.items():
        key = keys.get(rm_id)
        if not isinstance(key, tuple):
            continue
        rows = []
        for row in key[2:]:
            binding = mapping.bindings.get(row[0])
            settle = getattr(binding, "settled_key", None)
            own = settle(messages, now) if settle is not None else row[1]
            if own is None:
                break
            rows.append((row[0], own, *row[2:]))
        else:
            out[rm_id] = (*key[:2], *rows)
    return out


def _row_bytes(row: Any, until: int) -> bytes:
    """The bytes of a plan row's PTUs [0, until)."""
    if type(row) is not np.ndarray:
        row = np.asarray(row)
    return row[:until].tobytes()


def storage_by_id(problem: Problem) -> dict[str, StorageAsset]:
    return {s.id: s for s in problem.storage}
