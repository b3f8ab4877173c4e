"""An RM that said nothing new since the last replan gets the same asset without it being made
again; one that did gets a new one, and changes a replan makes to its problem's assets (the
EV modes, the finish margin) never reach the next problem."""

from __future__ import annotations

import copy
import dataclasses
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from cem.app.bench_replan import BenchCharger, TimedRegistry, site_for
from cem.flex.site_problem import build_problem
from cem.planner.assets import StorageAsset

NOW = datetime(2026, 12, 7, 9, 2, tzinfo=UTC)


def fields(asset: StorageAsset) -> dict[str, object]:
    """The asset's fields as plain values (copies)."""
    return {f.name: (v.tolist() if isinstance(v := getattr(asset, f.name), np.ndarray)
                     else copy.deepcopy(v)) for f in dataclasses.fields(asset)}


def _bench_site(evs: int, seed: int) -> tuple[dict[str, datetime], TimedRegistry,
                                             list[BenchCharger], Any, dict[str, Any]]:
    """The replan bench's site of `evs` chargers, each told to the CEM once: its clock, the
    registry, the chargers, the config and the RMs' states."""
    clock = {"now": NOW}
    registry = TimedRegistry(clock=lambda: clock["now"])
    rng = random.Random(seed)
    chargers = [BenchCharger(i, NOW, rng) for i in range(evs)]
    for charger in chargers:
        registry.connect(charger)
        charger.tell(registry, NOW)
    states = {rm_id: entry.state for rm_id, entry in registry.rms().items()}
    return clock, registry, chargers, site_for(evs), states


def test_assets_of_rms_with_nothing_new_are_the_same_and_new_levels_are_seen() -> None:
    clock, registry, chargers, config, states = _bench_site(6, seed=3)
    first, _ = build_problem(states, config, None, [], NOW)
    before = {a.id: fields(a) for a in first.storage}
    for asset in first.storage:  # what the EV modes do to a problem's assets
        asset.priority, asset.charge_max_w = 99, 0
        asset.target_profile.append((3, 1, 2))
    clock["now"] = NOW + timedelta(minutes=1)
    chargers[0].charged(registry, clock["now"], 2.0)  # this EV took 2 kWh and says so
    second, mapping = build_problem(states, config, None, [], clock["now"])
    after = {a.id: fields(a) for a in second.storage}
    moved = chargers[0].rm_id
    assert after[moved]["level_wh"] == before[moved]["level_wh"] + 2000
    assert all(after[k] == before[k] for k in after if k != moved)
    assert set(mapping.bindings) == set(after)


def test_an_ev_that_reports_only_a_new_level_gets_what_a_fresh_build_gives_without_a_remake(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A new StorageStatus is taken into the kept asset and binding (the level, the binding's
    fill level, the finish margin's milestone, which reads the level), not made again; the
    problem and the instructions are those a build from nothing gives."""
    import cem.control_types.frbc as frbc_plugin
    clock, registry, chargers, config, states = _bench_site(8, seed=5)
    first, _ = build_problem(states, config, None, [], NOW)
    clock["now"] = NOW + timedelta(minutes=1)
    chargers[0].charged(registry, clock["now"], 1.5)
    near = chargers[1]  # past its target now: the finish margin's milestone goes
    near.charged(registry, clock["now"], near.flex.need_kwh - near.flex.energy_kwh + 0.1)
    made: list[str] = []
    real = frbc_plugin.frbc_storage_asset

    def counted(rm_id: str, *args: object, **kwargs: object) -> object:
        made.append(rm_id)
        return real(rm_id, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(frbc_plugin, "frbc_storage_asset", counted)
    kept, kept_mapping = build_problem(states, config, None, [], clock["now"])
    assert made == []
    monkeypatch.undo()
    for state in states.values():
        state.of("FRBC")._assets_made = None  # what a build from nothing makes
    fresh, fresh_mapping = build_problem(states, config, None, [], clock["now"])
    assert [fields(a) for a in kept.storage] == [fields(a) for a in fresh.storage]
    assert kept.storage[1].level_wh > first.storage[1].level_wh
    assert len(kept.storage[1].target_profile) == len(first.storage[1].target_profile) - 1
    for asset_id, binding in fresh_mapping.bindings.items():
        other = kept_mapping.bindings[asset_id]
        assert other.fill_level == binding.fill_level
        assert other.instruction_key() == binding.instruction_key()
    plan_rows = {a.id: np.full(kept.n_ptus, 4000.0) for a in kept.storage}
    from cem.flex.site_problem import instructions_for_plan
    from cem.planner.assets import Plan
    plan = Plan(status="FEASIBLE", power_w=plan_rows, grid_import_w=np.zeros(kept.n_ptus))

    def content(instructions: dict[str, list[object]]) -> dict[str, list[tuple[object, ...]]]:
        return {rm: [(m.operation_mode, m.operation_mode_factor, m.execution_time)  # type: ignore[attr-defined]
                     for m in msgs] for rm, msgs in instructions.items()}

    assert content(instructions_for_plan(plan, kept, kept_mapping, clock["now"], 4)) == \
        content(instructions_for_plan(plan, fresh, fresh_mapping, clock["now"], 4))
