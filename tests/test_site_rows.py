"""A replan that takes what did not change from the last one (each RM's kept asset, each
RM's EV asset found by the site build for the departures, not searched for) gives exactly the
problems, plans and instructions a full rebuild gives.

Two identical bench sites (the replan bench's OCPP charger RMs through real sans-I/O S2
sessions) go through the same replans and the same changes: one EV reports a new measurement
and level, one a new departure, one an instruction status that voids what it was sent, one an
idle actuator. One controller works as it does live; the other rebuilds every replan from
nothing (every asset made again, every EV asset searched for among the RM's assets). The
planner is a deterministic stand-in that couples the EVs through a site cap, so equal problems
give equal plans and one EV's change moves the others' rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from s2python.common import InstructionStatus, InstructionStatusUpdate
from s2python.frbc import FRBCInstruction
from test_flex_assets_reused import fields

import cem.control.mpc as mpc
from cem.app.bench_replan import BenchCharger, TimedRegistry, site_for
from cem.flex.site_problem import build_problem
from cem.planner.assets import Plan, Problem
from resource_managers.ocpp_charger import frbc

NOW = datetime(2026, 12, 7, 9, 2, tzinfo=UTC)
EVS = 12


def plan_by_need(problem: Problem, **_: Any) -> Plan:
    """First come (by id), first served under a site cap of four EVs at full power: each EV at
    full power until its target while the cap allows (deterministic; one EV's change moves the
    others' rows)."""
    hours = problem.ptu_minutes / 60
    cap = np.full(problem.n_ptus, 4 * 11040.0)
    power: dict[str, np.ndarray] = {}
    for asset in sorted(problem.storage, key=lambda a: a.id):
        need = max(0.0, (asset.target_wh or 0.0) - asset.level_wh)
        row = np.zeros(problem.n_ptus, dtype=np.int64)
        for t in range(problem.n_ptus):
            if need <= 0:
                break
            row[t] = round(max(0.0, min(asset.charge_max_w, cap[t], need / hours)))
            cap[t] -= row[t]
            need -= row[t] * hours
        power[asset.id] = row
    total = sum(power.values(), np.zeros(problem.n_ptus, dtype=np.int64))
    return Plan(status="FEASIBLE", power_w=power, grid_import_w=total)


class Site:
    """A bench site with its controller; what the planner was given and what each RM got."""

    def __init__(self, full_rebuild: bool) -> None:
        self.clock = {"now": NOW}
        self.registry = TimedRegistry(clock=lambda: self.clock["now"])
        rng = random.Random(7)
        self.chargers = [BenchCharger(i, NOW, rng) for i in range(EVS)]
        for charger in self.chargers:
            self.registry.connect(charger)
            charger.tell(self.registry, NOW)
        self.problems: list[Problem] = []
        self.received: list[tuple[Any, ...]] = []

        def solver(problem: Problem, **kwargs: Any) -> Plan:
            self.problems.append(problem)
            return plan_by_need(problem)

        self.controller = mpc.SiteController(site_for(EVS), self.registry,
                                             clock=lambda: self.clock["now"], solver=solver)
        self.full_rebuild = full_rebuild
        send = self.registry.send_instruction

        async def recorded(rm_id: str, message: Any, **kwargs: Any) -> Any:
            if isinstance(message, FRBCInstruction):
                self.received.append((rm_id, str(message.operation_mode),
                                      round(message.operation_mode_factor, 6),
                                      message.execution_time))
            else:
                self.received.append((rm_id, message.message_type))
            return await send(rm_id, message, **kwargs)

        self.registry.send_instruction = recorded  # type: ignore[method-assign]

    async def replan(self) -> None:
        self.clock["now"] += timedelta(seconds=60)
        await self.controller.replan(["test"])


def _full_rebuild(monkeypatch: pytest.MonkeyPatch, site: Site) -> None:
    """Make `site`'s controller rebuild everything each replan."""
    real_build = mpc.build_problem

    def build_from_nothing(states: dict[str, Any], *args: Any) -> Any:
        for state in states.values():
            state.of("FRBC")._assets_made = None
            state.of("FRBC")._described = None
        problem, mapping = real_build(states, *args)
        mapping.evs = None  # type: ignore[assignment]  # the departures search every RM's assets
        return problem, mapping

    monkeypatch.setattr(mpc, "build_problem", build_from_nothing)


def _first_served(site: Site) -> BenchCharger:
    """The charger whose EV the stand-in planner serves first (its rows move the others')."""
    first = min(site.problems[-1].storage, key=lambda a: a.id).id
    rm_id = site.controller.mapping.bindings[first].rm_id
    return next(c for c in site.chargers if c.rm_id == rm_id)


def _to_near_target(charger: BenchCharger) -> float:
    """The kWh that bring the charger's EV to half a kWh below its need."""
    return charger.flex.need_kwh - charger.flex.energy_kwh - 0.5


async def _run(site: Site) -> None:
    """The replans and changes both sites go through."""
    await site.replan()  # the cold one
    await site.replan()  # nothing new
    site.clock["now"] += timedelta(seconds=5)
    charger = _first_served(site)  # a new measurement and level: half a kWh from its target
    charger.charged(site.registry, site.clock["now"], _to_near_target(charger))
    await site.replan()
    departing = site.chargers[1]  # a new departure: earlier, so its plan rows change
    departing.flex = dataclasses.replace(departing.flex,
                                         departure=site.clock["now"] + timedelta(hours=1))
    departing.tell(site.registry, site.clock["now"])
    await site.replan()
    voided = site.chargers[2]  # an instruction status: the RM aborted what it was sent
    sent = site.controller.dispatcher.sent[voided.rm_id][-1]
    site.registry.feed(voided.rm_id, InstructionStatusUpdate(
        message_id=uuid.uuid4(), instruction_id=sent.message.id,
        status_type=InstructionStatus.ABORTED, timestamp=site.clock["now"]))
    await site.replan()
    paused = site.chargers[3]  # its actuator is idle now: its binding changes, not its rows
    paused.flex = dataclasses.replace(paused.flex, limit_a=0.0)
    site.registry.feed(paused.rm_id, frbc.actuator_status(paused.flex, paused.ids))
    await site.replan()
    await site.replan()  # nothing new again


def test_a_change_in_one_rm_gives_the_problems_plans_and_instructions_of_a_full_rebuild(
        monkeypatch: pytest.MonkeyPatch) -> None:
    live = Site(full_rebuild=False)
    asyncio.run(_run(live))
    rebuilt = Site(full_rebuild=True)
    with monkeypatch.context() as patch:
        _full_rebuild(patch, rebuilt)
        asyncio.run(_run(rebuilt))
    assert len(live.problems) == len(rebuilt.problems) == 7
    for kept, fresh in zip(live.problems, rebuilt.problems, strict=True):
        assert [fields(a) for a in kept.storage] == [fields(a) for a in fresh.storage]
    assert live.received == rebuilt.received
    # each change reached its RM: the departure and the aborted instruction were sent again
    sent_to = [entry[0] for entry in live.received]
    assert live.chargers[1].rm_id in sent_to and live.chargers[2].rm_id in sent_to


def test_the_site_build_hands_each_rm_s_ev_asset_to_the_departures() -> None:
    """`SiteMapping.evs` holds each RM's EV asset, the very one in the problem, and the
    departures find with it what they find searching every RM's assets."""
    site = Site(full_rebuild=False)
    asyncio.run(site.replan())
    states = {rm_id: entry.state for rm_id, entry in site.registry.rms().items()}
    now = site.clock["now"]
    problem, mapping = build_problem(states, site.controller.config, None, [], now)
    assert set(mapping.evs) == {c.rm_id for c in site.chargers}
    for rm_id, asset in mapping.evs.items():
        assert asset.kind == "ev" and asset.id in mapping.rm_assets[rm_id]
        assert any(a is asset for a in problem.storage)
    searched, _ = build_problem(states, site.controller.config, None, [], now)
    learning = site.controller.departures
    learning.apply(problem, mapping.rm_assets, mapping.evs)
    learning.apply(searched, mapping.rm_assets)
    assert [fields(a) for a in problem.storage] == [fields(a) for a in searched.storage]
