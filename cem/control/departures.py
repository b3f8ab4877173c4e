"""Departure learning in the control loop: record EV visits as they end, plan to a safe departure.

Live, an EV visit reaches the CEM only through its charger's RM: the EV charger's FRBC system
description gains a charging mode when an EV plugs in (with a fill-level target at the
departure the driver or the RM's defaults gave), loses it when the EV is full, and describes an
empty storage (fill-level range 0 .. 0) once the EV has left. `DepartureLearning.observe`,
called by `SiteController.replan` with each new problem, follows every EV charger's asset: the
first plan that sees an EV opens its visit (arrival = now, typed departure = the asset's end,
need = target - level); the first plan whose asset is empty again closes it (departure = now)
and the visit goes to the store (`Store.record_visits`) and to the model
(`cem.site.departures.DepartureModel`). A new EV with a lower fill level than the last one
seen closes the old visit too. An RM that is not connected keeps its visit open.

`apply` then gives every EV that still wants energy a milestone at its **safe departure**
(`planner.safe_departure_quantile` of the learned departure, never after the typed one): its
target by then, each kWh short of it priced at `planner.value_of_undelivered_kwh_eur` rather
than at the unmet-target penalty. The planner front-loads the energy before the safe departure
unless waiting saves more than that per kWh; the target at the typed departure and every
limit stay as they were. Once the safe departure has passed the EV is asked for its target in
the next PTU (as soon as the limits allow, at the same price).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from s2python.common import ControlType

from cem.planner.assets import Problem, StorageAsset
from cem.site.config import SiteConfig
from cem.site.departures import DepartureModel, SafeDeparture, Visit

logger = logging.getLogger("cem.control")

HISTORY_DAYS = 365  # visits the model learns from, counted back from the start
DRIVER = re.compile(r"driver ([^,]+)")


@dataclass
class OpenVisit:
    evse: str
    arrival: datetime
    typed_departure: datetime | None
    need_wh: float | None
    level0_wh: float
    level_wh: float
    driver: str | None = None


def empty(asset: StorageAsset) -> bool:
    """The charger describes no EV: nothing to charge and an empty fill-level range."""
    return asset.charge_max_w <= 0 and asset.level_max_wh <= 0


def driver_of(state: Any, now: datetime) -> str | None:
    """The charge card the RM names in its storage label ("driver X"), if any."""
    try:
        sd = state.of(ControlType.FILL_RATE_BASED_CONTROL).system_description(now)
        label = str(sd.storage.diagnostic_label or "")
    except Exception:  # not FRBC, or no description yet
        return None
    match = DRIVER.search(label)
    return match.group(1).strip() if match else None


class DepartureLearning:
    """Open visits per EV charger, the learned model, and the safe-departure milestones."""

    def __init__(self, config: SiteConfig, store: Any = None) -> None:
        planner = config.planner
        self.quantile = float(planner.safe_departure_quantile)
        self.value_eur_per_wh = float(planner.value_of_undelivered_kwh_eur) / 1000
        self.ptu_minutes = planner.ptu_minutes
        self.store = store
        self.model = DepartureModel([], config.site.timezone)
        self.open: dict[str, OpenVisit] = {}
        self.safe: dict[str, SafeDeparture] = {}  # rm id -> the last safe departure planned to
        self.recorded = 0

    async def load(self, now: datetime) -> None:
        """Learn from the visits the store kept."""
        if self.store is None:
            return
        rows = await self.store.ev_visits(since=now - timedelta(days=HISTORY_DAYS))
        for evse, driver, arrival, departure, typed, need, delivered in rows:
            self.model.add(Visit(evse, arrival, departure, typed, need, delivered, driver))
        if rows:
            logger.info("departure learning: %d earlier EV visits", len(rows))

    def observe(self, problem: Problem, rm_assets: dict[str, list[str]], states: dict[str, Any],
                names: dict[str, str], now: datetime) -> list[Visit]:
        """Open and close visits from the EV assets of a new problem; returns the closed ones."""
        storage = {s.id: s for s in problem.storage}
        closed: list[Visit] = []
        for rm_id, ids in rm_assets.items():
            evs = [storage[a] for a in ids if a in storage and storage[a].kind == "ev"]
            if not evs:
                continue
            asset = evs[0]
            visit = self.open.get(rm_id)
            if empty(asset):
                if visit is not None:
                    closed.append(self._close(rm_id, now))
                continue
            level = float(asset.level_wh)
            if visit is not None and level + 1.0 < visit.level_wh:
                closed.append(self._close(rm_id, now))  # a new EV since the last plan
                visit = None
            if visit is None:
                typed = None if asset.available_until is None else problem.start + timedelta(
                    minutes=problem.ptu_minutes * int(asset.available_until))
                need = None if asset.target_wh is None else max(0.0, asset.target_wh - level)
                self.open[rm_id] = OpenVisit(names.get(rm_id, rm_id), now, typed, need, level,
                                             level, driver_of(states.get(rm_id), now))
            else:
                visit.level_wh = max(visit.level_wh, level)
        for visit in closed:
            self.model.add(visit)
        return closed

    def _close(self, rm_id: str, now: datetime) -> Visit:
        visit = self.open.pop(rm_id)
        self.safe.pop(rm_id, None)
        return Visit(visit.evse, visit.arrival, now, visit.typed_departure, visit.need_wh,
                     max(0.0, visit.level_wh - visit.level0_wh), visit.driver)

    async def record(self, visits: list[Visit]) -> None:
        """Keep closed visits in the store (a store failure only costs the history)."""
        if not visits or self.store is None:
            return
        try:
            await self.store.record_visits([
                (v.evse, v.driver, v.arrival, v.departure, v.typed_departure, v.need_wh,
                 v.delivered_wh) for v in visits])
            self.recorded += len(visits)
        except Exception:
            logger.exception("recording finished EV visits failed")

    def apply(self, problem: Problem, rm_assets: dict[str, list[str]]) -> int:
        """Add the safe-departure milestone to every open visit's EV; returns how many."""
        if self.quantile <= 0:
            return 0
        storage = {s.id: s for s in problem.storage}
        step = timedelta(minutes=problem.ptu_minutes)
        count = 0
        for rm_id, visit in self.open.items():
            evs = [storage[a] for a in rm_assets.get(rm_id, []) if a in storage
                   and storage[a].kind == "ev"]
            if not evs:
                continue
            asset = evs[0]
            if asset.charge_max_w <= 0 or asset.target_wh is None \
                    or asset.target_wh <= asset.level_wh or asset.available_until is None:
                continue
            safe = self.model.safe_departure(visit.evse, visit.arrival, visit.typed_departure,
                                             self.quantile, visit.driver)
            if safe is None:
                continue
            self.safe[rm_id] = safe
            ptu = math.floor((safe.at - problem.start) / step)
            ptu = max(ptu, asset.available_from + 1)
            if ptu >= asset.available_until or any(m[0] == ptu for m in asset.target_profile):
                continue  # at the departure, or a milestone at full weight is already there
            asset.target_profile.append((ptu, int(asset.target_wh), int(asset.level_max_wh)))
            asset.milestone_eur_per_wh[ptu] = self.value_eur_per_wh
            count += 1
        return count
