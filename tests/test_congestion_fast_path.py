"""The congestion fast path: a new congestion limit reaches the RMs before the replan's plan.

Real S2 RMs (the shared RM client) over websockets to the real S2 server, three 22 kW EVs
charging at full power (66 kW). The replan's planner is held at a gate, so whatever the RMs
get while it waits came from the fast path: a window in force now caps the EVs at once to
the new limit, a window that starts hours later leaves them to the replan, and so does a
site that turned the fast path off. A replan made before the limit arrived is cut to it
before it is sent. Every instruction sent after the limit keeps it.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from s2python.common import Duration, NumberRange
from s2python.frbc import (
    FRBCFillLevelTargetProfile,
    FRBCFillLevelTargetProfileElement,
)
from test_replan_sends_only_changes import EvControl as KeepingControl
from test_replan_sends_only_changes import connect_ev

from cem.control.mpc import SiteController
from cem.planner.assets import Plan, Problem
from cem.planner.solve import SitePlanner
from cem.ports import CongestionLimit, SignalUpdate
from cem.s2.server import S2Server
from cem.site.config import SiteConfig
from cem.store import Store

EVS = 3
MIN_W, MAX_W = 4140.0, 22080.0
LIMIT_KW = 30.0


class EvControl(KeepingControl):
    """The RM side: accepts every FRBC.Instruction and keeps it, and knows what it was told
    to draw now."""

    def __init__(self) -> None:
        super().__init__()
        self.charging_mode = ""

    def power_now_w(self, now: datetime) -> float:
        """What the EV was told to draw now: the last instruction whose time has come."""
        due = [m for m in self.received if m.execution_time <= now]
        if not due:
            return MAX_W  # it charged at full power before any instruction
        last = due[-1]
        if str(last.operation_mode) != self.charging_mode:
            return 0.0
        return MIN_W + float(last.operation_mode_factor) * (MAX_W - MIN_W)


class GatedPlanner:
    """The controller's planner, held at a gate: while it is shut, no replan's plan exists."""

    def __init__(self) -> None:
        self.planner = SitePlanner()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.returned = 0

    def __call__(self, problem: Problem, **kwargs: Any) -> Plan:
        self.entered.set()
        self.gate.wait(30)
        plan = self.planner(problem, **kwargs)
        self.returned += 1
        return plan


Site = tuple[SiteController, list[EvControl], GatedPlanner]


async def open_site(tmp_path: Path, fast_path: bool, planner: GatedPlanner | None = None,
                    **planner_settings: Any) -> AsyncIterator[Site]:
    config = SiteConfig.model_validate({
        "server": {"host": "127.0.0.1", "port": 0},
        "grid": {"fuse_a": 400, "import_limit_kw": 250},
        "planner": {"horizon_ptus": 12, "time_limit_s": 5.0,
                    "congestion_fast_path": fast_path, **planner_settings}})
    store = await Store.open(tmp_path / "cem.db")
    server = S2Server(config, store)
    await server.start()
    planner = planner or GatedPlanner()
    controller = SiteController(config, server, store, solver=planner)  # replans by the test
    stop = asyncio.Event()
    controls: list[EvControl] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for number in range(EVS):
            control = EvControl()
            four_hours = FRBCFillLevelTargetProfile(  # 90 % within four hours: room to wait
                message_id=uuid.uuid4(), start_time=datetime.now(UTC), elements=[
                    FRBCFillLevelTargetProfileElement(
                        duration=Duration(root=4 * 3600 * 1000),
                        fill_level_range=NumberRange(start_of_range=90, end_of_range=100))])
            _rm, control.charging_mode = await connect_ev(server.url, number, control, stop,
                                                          tasks, four_hours)
            controls.append(control)
        yield controller, controls, planner
    finally:
        planner.gate.set()
        stop.set()
        for task in tasks:
            await task
        await controller.stop()
        await server.stop()
        await store.close()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async for opened in open_site(tmp_path, fast_path=True):
        yield opened


@pytest.fixture
async def site_without_fast_path(tmp_path: Path) -> AsyncIterator[Site]:
    async for opened in open_site(tmp_path, fast_path=False):
        yield opened


def window(start: datetime, hours: float = 2.0) -> SignalUpdate:
    return SignalUpdate(source="api", reason="a congestion window was added", congestion=(
        CongestionLimit(start=start, end=start + timedelta(hours=hours),
                        import_limit_kw=LIMIT_KW, source="api"),))


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until `condition` holds (the RMs record an instruction after acknowledging it)."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout_s:g} s")


def instructed_kw(controls: list[EvControl]) -> float:
    now = datetime.now(UTC)
    return sum(c.power_now_w(now) for c in controls) / 1000


def planned_over(controller: SiteController, first: int, last: int) -> np.ndarray:
    """The plan in force's import in PTUs [first, last) above the share of the window's limit
    a plan may use (and the limits it knows are the window's)."""
    assert controller.plan is not None and controller.problem is not None
    share = controller.config.planner.limit_share
    last = min(last, controller.problem.n_ptus)
    assert list(controller.problem.limits.import_limit_w[first:last]) == [LIMIT_KW * 1000] * \
        (last - first)
    return np.asarray(controller.plan.grid_import_w[first:last]) - LIMIT_KW * 1000 * share


async def start_gated_replan(controller: SiteController, planner: GatedPlanner) -> asyncio.Task[Plan]:
    planner.gate.clear()
    planner.entered.clear()
    task = asyncio.create_task(controller.replan(controller.take_reasons() or ["the test"]))
    await asyncio.to_thread(planner.entered.wait, 10)
    return task


async def test_a_window_in_force_caps_the_evs_before_the_replans_plan_arrives(site: Site) -> None:
    controller, controls, planner = site
    await controller.replan(["the CEM started"])
    await until(lambda: all(c.received for c in controls))
    assert instructed_kw(controls) > 60  # every EV at full power

    sent_before = [len(c.received) for c in controls]
    controller.publish(window(datetime.now(UTC) - timedelta(minutes=1)))
    replan = await start_gated_replan(controller, planner)
    await controller.fast_path_done()
    # the replan is held at its planner: what the RMs got now is the fast path's cut
    await until(lambda: instructed_kw(controls) <= LIMIT_KW)
    assert planner.returned == 1 and not replan.done()
    assert any(len(c.received) > n for c, n in zip(controls, sent_before, strict=True))
    # the plan in force keeps the limit over the whole window (8 PTUs), not only now
    assert controller.plan is not None and planned_over(controller, 0, 8).max() <= 0
    assert controller.guard_limits().import_limit_w == LIMIT_KW * 1000  # the guard knows it
    said = controller.limit_cuts[-1]
    assert "congestion window" in said and "30 kW" in said and "capped at once" in said
    assert "replan follows" in said

    # the replan follows, refines, and keeps it too
    planner.gate.set()
    await replan
    assert planner.returned == 2
    assert planned_over(controller, 0, 8).max() <= 0
    await asyncio.sleep(0.2)  # the last acknowledgements reach the RMs' lists
    assert instructed_kw(controls) <= LIMIT_KW


async def test_a_replan_made_before_the_limit_is_cut_to_it_before_it_is_sent(site: Site) -> None:
    controller, controls, planner = site
    await controller.replan(["the CEM started"])
    await until(lambda: all(c.received for c in controls))
    # a replan is under way (its problem has no window) when the limit arrives
    replan = await start_gated_replan(controller, planner)
    controller.publish(window(datetime.now(UTC) - timedelta(minutes=1)))
    await controller.fast_path_done()
    await until(lambda: instructed_kw(controls) <= LIMIT_KW)
    planner.gate.set()
    await replan
    # the plan it made for the old limits was cut to the new ones before it went out
    assert planned_over(controller, 0, 8).max() <= 0
    await asyncio.sleep(0.2)
    assert instructed_kw(controls) <= LIMIT_KW


async def test_a_window_hours_ahead_is_left_to_the_replan(site: Site) -> None:
    controller, controls, planner = site
    await controller.replan(["the CEM started"])
    await until(lambda: all(c.received for c in controls))
    sent_before = [len(c.received) for c in controls]
    later = datetime.now(UTC) + timedelta(hours=1, minutes=30)
    controller.publish(window(later))
    replan = await start_gated_replan(controller, planner)
    await controller.fast_path_done()
    assert controller.limit_cut_count == 0
    assert [len(c.received) for c in controls] == sent_before  # nothing before the replan
    planner.gate.set()
    await replan
    assert controller.problem is not None
    first = int((later - controller.problem.start).total_seconds() // 900)
    assert planned_over(controller, first, first + 8).max() <= 0  # the replan keeps it


async def test_the_fast_path_can_be_turned_off(site_without_fast_path: Site) -> None:
    controller, controls, planner = site_without_fast_path
    await controller.replan(["the CEM started"])
    await until(lambda: all(c.received for c in controls))
    sent_before = [len(c.received) for c in controls]
    controller.publish(window(datetime.now(UTC) - timedelta(minutes=1)))
    replan = await start_gated_replan(controller, planner)
    await controller.fast_path_done()
    assert controller.limit_cut_count == 0 and not controller.limit_cuts
    assert [len(c.received) for c in controls] == sent_before
    assert instructed_kw(controls) > 60
    planner.gate.set()
    await replan
    assert planned_over(controller, 0, 8).max() <= 0
    await until(lambda: instructed_kw(controls) <= LIMIT_KW)
