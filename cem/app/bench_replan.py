"""`cem bench replan`: one live replan of N EV chargers, and how long S2 sessions wait meanwhile.

A replan builds the site problem from every RM's S2 state, solves it and sends each RM its
instructions. With 1000 RMs that is a lot of Python next to the S2 server on the same event
loop: this bench measures the replan (`SiteController.replan`, the real planner) and the
event loop's lag while it runs, which is how long a ReceptionStatus could be held back.

The RMs are the OCPP charger RM's own FRBC messages (`resource_managers.ocpp_charger.frbc`)
through real sans-I/O S2 sessions in process (`cem.simulation.twin.TwinRegistry`): no
sockets, so the figure is the CEM's own work. `gc_freeze` mirrors `cem run`, which freezes
long-lived objects out of full garbage collections (`cem.app.service.tenure_long_lived`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from s2python.common import ResourceManagerDetails

from cem.simulation.twin import TwinDevice, TwinRegistry, evse_details
from cem.site.config import SiteConfig
from resource_managers.ocpp_charger import frbc

VOLTAGE_V = 230.0
NAMESPACE = uuid.UUID("7d3f8a52-4c1e-4a8e-9a51-0b6f3c2d9e10")


class BenchCharger(TwinDevice):
    """A 3-phase 16 A EVSE with an EV plugged in, as the OCPP charger RM presents it."""

    def __init__(self, index: int, now: datetime, rng: random.Random) -> None:
        self.resource_id = uuid.uuid5(NAMESPACE, f"evse {index}")
        self.rm_id = str(self.resource_id)
        self.name = f"EV charger {index}"
        self.ids = frbc.FrbcIds.for_resource(self.resource_id)
        self.flex = frbc.EvseFlex(
            name=self.name, online=True, has_session=True, phases=3, phase="L1",
            min_current_a=6.0, max_current_a=16.0, energy_kwh=rng.uniform(0, 5),
            need_kwh=rng.uniform(8, 40), departure=now + timedelta(hours=rng.uniform(3, 11)),
            power_w=(3680.0, 3680.0, 3680.0), limit_a=16.0, voltage_v=VOLTAGE_V)

    def details(self) -> ResourceManagerDetails:
        return evse_details(self.resource_id, self.name, 3, "L1")

    def tell(self, registry: TwinRegistry, now: datetime) -> None:
        feed = registry.feed
        feed(self.rm_id, frbc.system_description(self.flex, self.ids, now))
        target = frbc.fill_level_target(self.flex, now)
        if target is not None:
            feed(self.rm_id, target)
        feed(self.rm_id, frbc.storage_status(self.flex))
        feed(self.rm_id, frbc.actuator_status(self.flex, self.ids))
        feed(self.rm_id, frbc.power_measurement(self.flex, now))


def site_for(evs: int, time_limit_s: float | None = None) -> SiteConfig:
    """A car park whose fuse carries 40 % of its chargers at full current: the limit binds."""
    fuse_a = max(25.0, round(evs * 16 * 0.4))
    return SiteConfig.model_validate({
        "site": {"name": f"bench car park, {evs} EVSEs"},
        "grid": {"fuse_a": fuse_a, "import_limit_kw": round(fuse_a * 3 * VOLTAGE_V / 1000 * 0.9),
                 "export_limit_kw": round(fuse_a * 3 * VOLTAGE_V / 1000 * 0.9)},
        **({"planner": {"time_limit_s": time_limit_s}} if time_limit_s else {}),
    })


async def measure(evs: int, replans: int, gc_freeze: bool, time_limit_s: float | None = None,
                  seed: int = 1) -> dict[str, Any]:
    from cem.control.mpc import SiteController

    now = datetime.now(UTC).replace(second=0, microsecond=0)
    registry = TwinRegistry(clock=lambda: now)
    rng = random.Random(seed)
    for index in range(evs):
        charger = BenchCharger(index, now, rng)
        registry.connect(charger)
        charger.tell(registry, now)
    refused = len(registry.cem_refusals)
    config = site_for(evs, time_limit_s)
    controller = SiteController(config, registry, clock=lambda: now)
    if gc_freeze:
        gc.collect()
        gc.freeze()
    lags: list[float] = []
    replan_s: list[float] = []
    statuses: list[str] = []
    sent_before = registry.messages
    running = True

    async def ticker() -> None:
        while running:
            began = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - began - 0.001) * 1000)

    tick = asyncio.create_task(ticker())
    try:
        for number in range(replans):
            began = time.perf_counter()
            plan = await controller.replan([f"bench replan {number + 1}"])
            replan_s.append(time.perf_counter() - began)
            statuses.append(plan.status)
    finally:
        running = False
        await tick
        await controller.stop()
        if gc_freeze:
            gc.unfreeze()
    lags.sort()
    return {
        "evs": evs, "replans": replans, "gc_freeze": gc_freeze,
        "time_limit_s": config.planner.time_limit_s,
        "cem_refused_rm_messages": refused,
        "replan_p50_s": round(statistics.median(replan_s), 3),
        "replan_max_s": round(max(replan_s), 3),
        "loop_lag_p99_ms": round(lags[int(0.99 * (len(lags) - 1))], 1) if lags else None,
        "loop_lag_max_ms": round(lags[-1], 1) if lags else None,
        "plan_status": sorted(set(statuses)),
        "s2_messages_during_replans": registry.messages - sent_before,
        "rm_refusals": len(registry.rm_refusals),
    }


def bench_command(*, evs: int, replans: int, json_out: bool,
                  time_limit_s: float | None = None) -> None:
    """Run with and without the garbage-collector freeze; print a table or JSON."""
    import logging

    logging.getLogger("cem").setLevel(logging.WARNING)
    results = [asyncio.run(measure(evs, replans, gc_freeze=freeze, time_limit_s=time_limit_s))
               for freeze in (True, False)]
    if json_out:
        print(json.dumps({"runs": results}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cem bench replan: {evs} EV chargers, {replans} replans, "
                        f"planner.time_limit_s {results[0]['time_limit_s']:g}")
    for column in ("gc freeze (as cem run)", "replan p50", "replan max", "loop lag p99",
                   "loop lag max", "plan", "S2 messages"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row("yes" if r["gc_freeze"] else "no", f"{r['replan_p50_s']:.2f} s",
                      f"{r['replan_max_s']:.2f} s", f"{r['loop_lag_p99_ms']} ms",
                      f"{r['loop_lag_max_ms']} ms", ", ".join(r["plan_status"]),
                      str(r["s2_messages_during_replans"]))
    Console().print(table)
