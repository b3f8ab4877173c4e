"""Raises wait for the control loop: never sent ahead, sent at their PTU from the plan in force.

The MPC loop on a simulated clock (a PTU boundary a second of wall time away), a fake registry
with real S2 sessions, and a congestion window that keeps an EV idle until the boundary.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_control_loop import EvRm, FakeRegistry, config, until

from cem.app.congestion_cli import add_congestion_command
from cem.control.mpc import SiteController
from cem.flex.ptu import floor_to_ptu
from cem.signals import StoreCongestion
from cem.store import Store
from sitekit import clock as process_clock


async def test_a_raise_is_sent_at_its_boundary_not_ahead(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cem.control")
    boundary = floor_to_ptu(datetime.now(UTC), 15) + timedelta(minutes=15)
    sim = process_clock.ScaledClock(boundary - timedelta(seconds=90), speed=60)
    previous = process_clock.use(sim)
    store = await Store.open(tmp_path / "cem.db")
    # the grid operator allows 1 kW until the boundary: the EV (4.1 kW minimum) must wait
    await asyncio.to_thread(add_congestion_command, tmp_path / "cem.db",
                            (boundary - timedelta(minutes=15)).isoformat(),
                            boundary.isoformat(), 1.0, None)
    registry = FakeRegistry()
    sent_at: dict[str, datetime] = {}
    send = registry.send_instruction

    async def stamped(rm_id: str, message: Any, **kwargs: Any) -> Any:
        sent_at[str(message.id)] = sim.now()
        return await send(rm_id, message, **kwargs)

    registry.send_instruction = stamped  # type: ignore[method-assign]
    controller = SiteController(config(), registry, store, solver=None, clock=sim.now,
                                signals=[StoreCongestion(store, poll_s=0.1, clock=sim.now)])
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    try:
        await until(lambda: registry.queue is not None)
        ev = EvRm(registry, "ev-1")
        await until(lambda: ev.instructions())
        assert all(ev.power_of(m) == 0 for m in ev.instructions())  # idle until the boundary
        # the plan charges from the boundary on: nothing of that went out ahead of it
        assert controller.plan is not None
        assert controller.plan.power_w["ev-1"][1] > 0
        await until(lambda: any(ev.power_of(m) > 0 for m in ev.instructions()), within=10)
        raise_ = next(m for m in ev.instructions() if ev.power_of(m) > 0)
        assert sent_at[str(raise_.id)] >= boundary
        assert raise_.execution_time == boundary  # the plan's own instruction for that PTU
        # (the RM has the raise once it acknowledged it; the loop logs it when the dispatch
        # returns, a moment later on a busy machine)
        await until(lambda: any(r.getMessage().startswith(
            f"PTU {boundary:%H:%M}: the plan's raises for it: 1 instruction(s) to 1 RM(s)")
            for r in caplog.records), within=5)
    finally:
        stop.set()
        await task
        await store.close()
        process_clock.use(previous)
