"""All connected RMs + site config + prices + congestion -> one planner `Problem`, and the way back.

`build_problem` asks each RM's state (`cem.s2.state.RmState`, read-only) for what is in force
now, per its selected control type, and turns it into assets with the modules beside this one.
It returns the problem and a `SiteMapping`: asset id -> binding (which RM, which S2 ids),
so that `instructions_for_plan` can turn a plan into S2 instructions per RM.

RMs without a control type, with NOT_CONTROLABLE, or whose flexibility is not known yet, are
planned as fixed loads from their forecast or measurement. A NOT_CONTROLABLE RM whose name or
model says "meter" is taken as the grid meter: it measures the whole site, so it is not added
as a load; instead the part of its measurement that no other RM explains becomes a flat
"base-load" FixedLoad, and the guard reads it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from cem.flex.ddbc import ddbc_mode_assets
from cem.flex.frbc import frbc_storage_asset, guess_kind
from cem.flex.limits import site_limits
from cem.flex.not_controlable import fixed_load
from cem.flex.ombc import ombc_mode_asset
from cem.flex.pebc import pebc_assets
from cem.flex.ppbc import ppbc_assets
from cem.flex.ptu import FlexBinding, PtuGrid, electric_total, floor_to_ptu, sid
from cem.planner.assets import FixedLoad, Plan, Prices, Problem, StorageAsset
from cem.site.config import CongestionWindow, SiteConfig

FRBC = "FILL_RATE_BASED_CONTROL"
PEBC = "POWER_ENVELOPE_BASED_CONTROL"
PPBC = "POWER_PROFILE_BASED_CONTROL"
OMBC = "OPERATION_MODE_BASED_CONTROL"
DDBC = "DEMAND_DRIVEN_BASED_CONTROL"


@dataclass
class SiteMapping:
    """How the problem's assets map back to RMs, and what was noticed building it."""

    bindings: dict[str, FlexBinding] = field(default_factory=dict)  # asset id -> binding
    rm_assets: dict[str, list[str]] = field(default_factory=dict)  # rm id -> asset ids
    meter_rm: str | None = None
    notes: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)

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


def is_grid_meter(state: Any) -> bool:
    """A NOT_CONTROLABLE RM that calls itself a meter measures the grid connection."""
    details = getattr(state, "details", None)
    if details is None:
        return False
    text = " ".join(filter(None, [details.name, details.model])).lower()
    return "meter" in text and _control_type(state) in (None, "NOT_CONTROLABLE", "NO_SELECTION")


def _control_type(state: Any) -> str | None:
    value = getattr(state, "control_type", None)
    if value is None:
        return None
    return str(getattr(value, "value", value))


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
    limits = site_limits(config, start, grid.n_ptus, _windows(congestion),
                         planning_share=config.planner.limit_share, fuse_production_credit=0.0)
    problem = Problem(start=start, ptu_minutes=ptu_minutes, n_ptus=grid.n_ptus, limits=limits,
                      prices=_prices(prices, config, grid))
    problem.first_ptu_share = grid.share_ahead(now)
    mapping = SiteMapping()
    explained_w = 0.0
    for rm_id, state in states.items():
        if is_grid_meter(state):
            mapping.meter_rm = rm_id
            continue
        try:
            explained_w += _add_rm(problem, mapping, rm_id, state, grid, now, config)
        except Exception as exc:  # one RM's odd data must not stop the site's plan
            mapping.notes.append(f"{rm_id}: left out of the plan ({type(exc).__name__}: {exc})")
    if mapping.meter_rm is not None:
        grid_w = measured_w(states[mapping.meter_rm])
        if grid_w is not None:
            base = max(0.0, grid_w - explained_w)
            problem.fixed.append(FixedLoad(id="base-load",
                                           power_w=np.full(grid.n_ptus, round(base), dtype=np.int64)))
            mapping.notes.append(f"base load {base:.0f} W from the grid meter {mapping.meter_rm}")
    return problem, mapping


_PRIORITY_LABEL = re.compile(r"\bpriority[ =:]*(\d{1,2})\b", re.IGNORECASE)


def label_priority(system_description: Any) -> int | None:
    """Priority an RM states in its storage's diagnostic label ("..., priority 3").

    S2 has no priority field; the OCPP RM carries the charge card's priority this way
    (docs/adr/0002-ev-priority-in-s2.md). None when the label says nothing.
    """
    storage = getattr(system_description, "storage", None)
    label = getattr(storage, "diagnostic_label", None) or ""
    match = _PRIORITY_LABEL.search(label)
    return int(match.group(1)) if match else None


def finish_early(asset: StorageAsset, margin_minutes: int, ptu_minutes: int) -> None:
    """Aim to reach an EV's target `margin_minutes` before its departure.

    Live, the last PTUs of a plan meet reality (a slow taper, an instruction that lands late,
    a replan that comes a little after the PTU starts): a plan that finishes exactly at the
    departure leaves drivers a few hundred Wh short. The EV may still charge until it leaves.
    Close to the departure the margin shrinks to the end of the first PTU the EV can use, but
    never to nothing: the last plans before a departure are the ones reality upsets most.
    """
    if margin_minutes <= 0 or asset.target_wh is None or asset.available_until is None:
        return
    early = max(asset.available_until - -(-margin_minutes // ptu_minutes),
                asset.available_from + 1)
    if early >= asset.available_until or asset.target_wh <= asset.level_wh:
        return
    asset.target_profile.append((early, asset.target_wh, asset.level_max_wh))


def _add_rm(problem: Problem, mapping: SiteMapping, rm_id: str, state: Any, grid: PtuGrid,
            now: datetime, config: SiteConfig) -> float:
    """Add one RM's assets; returns the power it draws now (W) as far as it is known."""
    control = _control_type(state)
    now_w = measured_w(state) or 0.0
    name = state.details.name if state.details is not None and state.details.name else ""
    if control == FRBC and (sd := state.frbc_system_description(now)) is not None:
        kind = guess_kind(sd, name)
        priority = label_priority(sd) or (config.ev_defaults.priority if kind == "ev" else 1)
        asset, binding = frbc_storage_asset(
            rm_id, sd, grid, now,
            storage_status=state.frbc_storage_status,
            actuator_statuses=state.frbc_actuator_statuses(),
            leakage=state.frbc_leakage_behaviour(now),
            usage_forecast=state.frbc_usage_forecast,
            target_profile=state.frbc_fill_level_target_profile,
            timer_statuses=list(state.frbc_timer_statuses().values()),
            kind=kind, priority=priority)
        if asset.kind == "ev":
            finish_early(asset, config.planner.ev_finish_margin_minutes, problem.ptu_minutes)
        problem.storage.append(asset)
        mapping.add(rm_id, asset.id, binding, asset.kind)
        if binding.held_load is not None:  # kept on by a minimum run time: not to plan
            problem.fixed.append(binding.held_load)
            mapping.rm_assets[rm_id].append(binding.held_load.id)
            mapping.notes.append(f"{name or rm_id}: kept on until PTU "
                                 f"{int(asset.available_from)} by a running timer")
        return now_w
    if control == PEBC:
        constraints = state.pebc_power_constraints(now)
        assets, pebc_binding, notes = pebc_assets(
            rm_id, grid, now, constraints=constraints[-1] if constraints else None,
            energy_constraints=state.pebc_energy_constraints(),
            forecast=state.power_forecast(), measurement=state.latest_measurement())
        mapping.notes += notes
        # the binding once, under the energy window when there is one (its instructions pin
        # the envelope to that asset's plan) and else under the only asset
        bound_to = assets[1].id if len(assets) > 1 else assets[0].id
        for asset in assets:
            binding = pebc_binding if asset.id == bound_to else None
            if isinstance(asset, StorageAsset):
                problem.storage.append(asset)
                mapping.add(rm_id, asset.id, binding, "flexible load")
            elif isinstance(asset, FixedLoad):
                problem.fixed.append(asset)
                mapping.add(rm_id, asset.id, binding, "load")
            else:
                problem.curtailable.append(asset)
                mapping.add(rm_id, asset.id, binding, "pv")
        return now_w
    if control == OMBC and (sd := state.ombc_system_description(now)) is not None:
        mode_asset, mode_binding = ombc_mode_asset(
            rm_id, sd, grid, status=state.ombc_status,
            timer_statuses=list(state.ombc_timer_statuses().values()))
        problem.modes.append(mode_asset)
        mapping.add(rm_id, mode_asset.id, mode_binding, "modes")
        return now_w
    if control == DDBC and (sd := state.ddbc_system_description(now)) is not None:
        statuses = {sid(a.id): s for a in sd.actuators
                    if (s := state.ddbc_actuator_status(a.id)) is not None}
        for ddbc_asset, ddbc_binding in ddbc_mode_assets(
                rm_id, sd, grid, now, forecast=state.ddbc_average_demand_rate_forecast,
                statuses=statuses, timer_statuses=list(state.ddbc_timer_statuses().values())):
            problem.modes.append(ddbc_asset)
            mapping.add(rm_id, ddbc_asset.id, ddbc_binding, "ddbc")
        return now_w
    if control == PPBC and state.ppbc_power_profile_definitions():
        added = False
        for definition in state.ppbc_power_profile_definitions():
            profile, ppbc_binding = ppbc_assets(rm_id, definition, grid, now,
                                                status=state.ppbc_power_profile_status)
            mapping.notes += ppbc_binding.notes
            if profile is None:
                continue
            if isinstance(profile, FixedLoad):
                problem.fixed.append(profile)
            else:
                problem.profiles.append(profile)
            mapping.add(rm_id, profile.id, ppbc_binding, "profile")
            added = True
        if added:
            return now_w
    if state.latest_measurement() is None and state.power_forecast() is None:
        return 0.0
    load = fixed_load(rm_id, grid, forecast=state.power_forecast(),
                      measurement=state.latest_measurement())
    problem.fixed.append(load)
    mapping.add(rm_id, load.id, None, "load")
    return now_w


def instructions_for_plan(plan: Plan, problem: Problem, mapping: SiteMapping, now: datetime,
                          until_ptu: int | None = None) -> dict[str, list[Any]]:
    """S2 instructions per RM id for PTUs [0, until_ptu) of the plan (default: all)."""
    until = problem.n_ptus if until_ptu is None else until_ptu
    out: dict[str, list[Any]] = {}
    for binding in mapping.bindings.values():
        messages = binding.instructions(plan, problem, now, until)
        if messages:
            out.setdefault(binding.rm_id, []).extend(messages)
    return out


def storage_by_id(problem: Problem) -> dict[str, StorageAsset]:
    return {s.id: s for s in problem.storage}
