"""An RM that said nothing new since the last replan gets the same asset without it being made
again; one that did gets a new one, and changes a replan makes to its problem's assets (the
EV modes, the finish margin) never reach the next problem."""

from __future__ import annotations

import copy
import dataclasses
import random
from datetime import UTC, datetime, timedelta

import numpy as np

from cem.app.bench_replan import BenchCharger, TimedRegistry, site_for
from cem.flex.site_problem import build_problem
from cem.planner.assets import StorageAsset

NOW = datetime(2026, 12, 7, 9, 2, tzinfo=UTC)


def fields(asset: StorageAsset) -> dict[str, object]:
    """The asset's fields as plain values (copies)."""
    return {f.name: (v.tolist() if isinstance(v := getattr(asset, f.name), np.ndarray)
                     else copy.deepcopy(v)) for f in dataclasses.fields(asset)}


def test_assets_of_rms_with_nothing_new_are_the_same_and_new_levels_are_seen() -> None:
    clock = {"now": NOW}
    registry = TimedRegistry(clock=lambda: clock["now"])
    rng = random.Random(3)
    chargers = [BenchCharger(i, NOW, rng) for i in range(6)]
    for charger in chargers:
        registry.connect(charger)
        charger.tell(registry, NOW)
    config = site_for(6)
    states = {rm_id: entry.state for rm_id, entry in registry.rms().items()}
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
