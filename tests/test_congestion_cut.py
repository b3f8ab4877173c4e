"""Who the congestion fast path cuts first (`cem.control.congestion_cut.cut_to_limit`).

Three EVs charging at 11 kW and a battery, then a new import limit over the plan's first four
PTUs: the EV that can best wait goes first, a lower priority before a higher one, an EV whose
departure needs every watt keeps it unless nothing else is left, the battery discharges before
that, and nothing is cut where the plan already kept the limit.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from cem.control.congestion_cut import cut_to_limit
from cem.planner.assets import Plan, Prices, Problem, SiteLimits, StorageAsset

N = 8
EV_W = 11_000


def site() -> tuple[Problem, Plan]:
    def ev(name: str, until: int, target: int, priority: int = 1) -> StorageAsset:
        return StorageAsset(id=name, kind="ev", charge_max_w=EV_W, charge_min_w=4140,
                            available_until=until, target_wh=target, priority=priority,
                            level_max_wh=60_000)

    storage = [
        ev("relaxed", until=N, target=10_000),  # 10 kWh in two hours: it can wait
        ev("leaving", until=2, target=5_500),  # needs 11 kW in both PTUs before it leaves
        ev("low priority", until=N, target=10_000, priority=0),
        StorageAsset(id="battery", kind="battery", charge_max_w=5000, discharge_max_w=5000,
                     level_wh=20_000, level_max_wh=40_000),
    ]
    limits = SiteLimits(fuse_a=400, phases=3, voltage_v=230,
                        import_limit_w=np.full(N, 100_000), export_limit_w=np.full(N, 100_000))
    problem = Problem(start=datetime(2026, 12, 7, 14, 0, tzinfo=UTC), ptu_minutes=15, n_ptus=N,
                      limits=limits, prices=Prices(np.full(N, 0.2), np.full(N, 0.1)),
                      storage=storage)
    power = {"relaxed": np.full(N, EV_W), "leaving": np.array([EV_W, EV_W] + [0] * (N - 2)),
             "low priority": np.full(N, EV_W), "battery": np.zeros(N, dtype=np.int64)}
    levels = {k: np.cumsum(v * 0.25) + (20_000 if k == "battery" else 0)
              for k, v in power.items()}
    grid = sum(power.values())
    return problem, Plan(status="FEASIBLE", power_w=power, grid_import_w=np.asarray(grid),
                         level_wh=levels)


def limit_from_now(kw: float) -> np.ndarray:
    limit = np.full(N, 100_000)
    limit[:4] = kw * 1000
    return limit


def test_the_ev_that_can_best_wait_goes_first_then_the_lower_priority() -> None:
    problem, plan = site()
    cut = cut_to_limit(problem, plan, limit_from_now(15))
    power = cut.plan.power_w
    assert np.all(cut.plan.grid_import_w[:4] <= 15_000)
    assert power["low priority"][0] == 0  # lowest priority: cut first
    # then the EV that can wait: 7 kW less leaves 4 kW, below its 6 A minimum: off
    assert list(power["relaxed"][:2]) == [0, 0]
    assert list(power["leaving"][:2]) == [EV_W, EV_W]  # its departure needs every watt
    assert not cut.below_milestones and not cut.discharged
    assert list(cut.plan.grid_import_w[4:]) == list(plan.grid_import_w[4:])  # outside: as it was
    assert plan.power_w["relaxed"][0] == EV_W  # the plan in force itself is left as it was
    # levels follow what was cut
    assert cut.plan.level_wh["low priority"][3] < plan.level_wh["low priority"][3]


def test_the_battery_discharges_before_an_ev_misses_its_departure() -> None:
    problem, plan = site()
    cut = cut_to_limit(problem, plan, limit_from_now(7))
    # 11 kW of the leaving EV against 7: the battery gives the 4 kW, the EV keeps its need
    assert list(cut.plan.power_w["battery"][:2]) == [-4000, -4000]
    assert list(cut.plan.power_w["leaving"][:2]) == [EV_W, EV_W]
    assert cut.discharged == {"battery"} and not cut.below_milestones

    cut = cut_to_limit(problem, plan, limit_from_now(5))
    power = cut.plan.power_w
    assert np.all(cut.plan.grid_import_w[:4] <= 5_000)
    # the battery at its most, and only then the limit forces the leaving EV below its need
    assert list(power["battery"][:2]) == [-5000, -5000]
    assert list(power["leaving"][:2]) == [10_000, 10_000] and cut.below_milestones == {"leaving"}
    # once it has left, the others share the limit and the battery is not needed
    assert list(power["battery"][2:4]) == [0, 0] and list(power["relaxed"][2:4]) == [5000, 5000]
    assert cut.excess_w == 0


def test_a_limit_the_plan_keeps_already_cuts_nothing() -> None:
    problem, plan = site()
    cut = cut_to_limit(problem, plan, limit_from_now(40))
    assert cut.plan is plan and not cut.changed
