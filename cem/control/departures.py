"""Departure learning in the control loop: record EV visits as they end, plan to a safe departure.

Live, an EV visit reaches the CEM only through its charger's RM: the EV charger's FRBC system
description gains a charging mode when an EV plugs in (with a fill-level target at the
departure the driver or the RM's defaults gave), loses it when the EV is full (its fill-level
range shrinks to the level it reached), and describes an empty storage (fill-level range
0 .. 0) once the EV has left. `DepartureLearning.observe`,
called by `SiteController.replan` with each new problem, follows every EV charger's asset: the
first plan that sees an EV opens its visit (arrival = now, typed departure = the asset's end,
need = target - level); the first plan whose asset is empty again closes it (departure = now)
and the visit goes to the store (`Store.record_visits`) and to the model
(`cem.site.departures.DepartureModel`). A new EV with a lower fill level than the last one
seen closes the old visit too. An RM that is not connected keeps its visit open.

Only an arrival the CEM saw is one: the charger's RM described it without an EV first (in a
system description the CEM received, `described`, also before its first plan after a start,
or in a plan), or the CEM saw the previous EV leave. An EV already at its charger when its RM
first described it (a CEM started or restarted beside parked EVs, a charger that connects, or
reconnects, with an EV plugged in) came at a time nobody knows. Its visit is planned to its
typed and learned departures as any other, but it gets no front-load floor (that would rush every parked EV at
the value of a kWh after a restart) and, once it ends, it is not learned from (its stay would
be the time since the restart).

`apply` then gives every EV that still wants energy a milestone at its **safe departure**
(`planner.safe_departure_quantile` of the learned departure, never after the typed one): its
target by then, each kWh short of it priced at `planner.value_of_undelivered_kwh_eur` rather
than at the unmet-target penalty. The planner front-loads the energy before the safe departure
unless waiting saves more than that per kWh; the target at the typed departure and every
limit stay as they were. Once the safe departure has passed the EV is asked for its target in
the next PTU (as soon as the limits allow, at the same price).

A typed departure the site's history says is too early (round 10, `planner.late_departure_quantile`,
off by default: ADR 0009 round 10 has the figures): where even that quantile of comparable drivers' real stay over their typed one (the
model's groups, with the typed stay's always: `DepartureModel.late_departure`) ends after the
typed departure, the EV's asset ends at that later time instead, whose milestone asks the
target at the value of an undelivered kWh; what the typed departure asked at the unmet-target
weight (the charger's target, the finish margin's milestone) becomes
`planner.late_departure_floor_share` of the typed need, so a driver who does leave then is
not left empty. Such an EV gets no early departure milestones (the history says it stays),
and a started charge is kept (`commit_started`) only up to that floor; only arrivals so far,
the typed values and the store's history go into it.

An EV whose charger says its departure and need are only its site defaults (the OCPP RM's
"needs from site defaults": an OCPP 1.6 EV reports neither SoC nor departure nor energy) is
recorded and planned without a typed departure: its milestones come from the stays of
comparable visits, and their target is the most those visits took (their 0.99 quantile,
`DepartureModel.energy`) when that is more than the charger's default need: an EV that takes
less stops drawing and is dropped from the next plan. Its asset ends at the later of
the charger's default departure and the learned median stay (`STAY_QUANTILE`; round 9: with
the default 8 h half of a JPL morning's learned stays end later, and the plan could not use
the hours after the default); the charger's default need by its default departure stays
asked as it was. The shares of the departure scenarios that still fall at or after the end go
on its last PTU free of another milestone, not dropped (round 8, second part: such an EV was
worth 0.15 EUR a kWh above its default need, where the need a driver types is the EV's
target).

Two floors per driver (round 5): every EV that wants energy is asked its first
`planner.ev_front_load_kwh` within `planner.ev_front_load_minutes` of its arrival (a milestone
at `ev_front_load_eur_per_kwh`, by default the value of a kWh): the driver who leaves before
every learned quantile still gets that much. The floors ask no more than the site can give by
then (`floor_headroom_w`: import limit and fuse per phase after the base load), first come,
first floored: in a morning rush the last arrivals get a smaller floor or none, where floors
for all spread the first hour over every EV and the early leavers got less (ADR 0009 round 7,
second part). An EV that tells no need and still takes energy is
asked `planner.ev_open_need_kwh` more than it has (it is not full while it draws), at its
departure milestones' prices.

An EV whose RM plans it in SoC (its fill-level label "SoC %") and whose target lies above
`planner.ev_taper_from_soc` gets every milestone (its learned departures' and its finish
margin's) earlier by the extra time its last part takes under an assumed taper
(`taper_ptus`): the planner has full power to the end, the EV does not.

`commit_started` keeps a charge the last plan started: an EV the previous plan charged in the
PTU that is now running gets a milestone at the end of this PTU asking for that energy, priced
like the safe departure. A replan no longer pushes it to a later PTU for a slightly cheaper
price (a small need was postponed PTU by PTU until the departure margin left no room); the
limits, and other EVs' targets, still can.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import numpy as np
from s2python.common import ControlType

from cem.planner.assets import Plan, Problem, StorageAsset
from cem.planner.layout import fixed_draw_w, per_ptu, ptu_hours, share_vector
from cem.site.config import SiteConfig
from cem.site.departures import DepartureModel, SafeDeparture, Visit

logger = logging.getLogger("cem.control")

HISTORY_DAYS = 365  # visits the model learns from, counted back from the start
OVERSTAY = timedelta(hours=1)  # the charger RM's target for an EV past its departure
DRIVER = re.compile(r"driver ([^,]+)")
DEFAULTS = "needs from site defaults"  # the OCPP RM's label when neither EV nor card told it
# the charging curve assumed above `planner.ev_taper_from_soc`: the EV's power falls linearly
# to this share of its maximum at 100 % SoC (a common shape for Li-ion cars; the twin's EVs
# taper the same way, so the twin measures this with the curve right)
TAPER_END_SHARE = 0.15
# an EV whose charger gives only its default departure is planned to this quantile of the
# stays of comparable visits where that is later than the default (round 9)
STAY_QUANTILE = 0.5
T = TypeVar("T")


@dataclass
class OpenVisit:
    evse: str
    arrival: datetime
    typed_departure: datetime | None
    need_wh: float | None
    level_wh: float  # the last level seen, in the asset's Wh
    scale_wh: float  # the asset's level_max_wh then (its level's unit: kWh charged or SoC)
    driver: str | None = None
    delivered_wh: float = 0.0  # level rises seen, while the unit stayed the same
    typed_latest: datetime | None = None  # the asset's end now (an overstayer's is renewed)
    defaults: bool = False  # the RM's departure and need are its site defaults (OCPP 1.6)
    soc: bool = False  # the RM plans the EV in SoC % (the fill level is its state of charge)
    arrival_seen: bool = True  # its charger was seen without an EV first: `arrival` is when it came


def first_evs(problem: Problem, rm_assets: Mapping[str, list[str]]) -> dict[str, StorageAsset]:
    """Per RM with one, its first EV asset in `problem` (as `SiteMapping.evs` holds them)."""
    storage = {s.id: s for s in problem.storage}
    out: dict[str, StorageAsset] = {}
    for rm_id, ids in rm_assets.items():
        asset = next((storage[a] for a in ids if a in storage and storage[a].kind == "ev"), None)
        if asset is not None:
            out[rm_id] = asset
    return out


def no_ev(asset: StorageAsset, state: Any, now: datetime) -> bool:
    """The charger describes no EV: nothing to charge and an empty fill-level range (0 .. 0).

    A full EV keeps its level as the range (the level it reached), so it is still there. An
    RM that is not FRBC says so by its asset alone (nothing to charge, no level).
    """
    if asset.charge_max_w > 0:
        return False
    try:
        sd = state.of(ControlType.FILL_RATE_BASED_CONTROL).system_description(now)
        return float(sd.storage.fill_level_range.end_of_range) <= 0.0
    except Exception:  # not FRBC, or no description
        return asset.level_max_wh <= 0


def describes_no_ev(state: Any, now: datetime) -> bool:
    """The RM's FRBC system description in force describes no EV: an empty fill-level range
    (0 .. 0) and no operation mode that draws power (False without an FRBC description)."""
    try:
        sd = state.of(ControlType.FILL_RATE_BASED_CONTROL).system_description(now)
        if sd is None or float(sd.storage.fill_level_range.end_of_range) > 0:
            return False
        return not any(float(r.end_of_range) > 0 for a in sd.actuators
                       for m in a.operation_modes for e in m.elements for r in e.power_ranges)
    except Exception:  # not FRBC
        return False


def storage_label(state: Any, now: datetime) -> str:
    """The RM's storage label of its FRBC system description ("" if none)."""
    try:
        sd = state.of(ControlType.FILL_RATE_BASED_CONTROL).system_description(now)
        return str(sd.storage.diagnostic_label or "")
    except Exception:  # not FRBC, or no description yet
        return ""


def driver_of(state: Any, now: datetime) -> str | None:
    """The charge card the RM names in its storage label ("driver X"), if any."""
    match = DRIVER.search(storage_label(state, now))
    return match.group(1).strip() if match else None


def plans_in_soc(state: Any, now: datetime, description: Any = None) -> bool:
    """The RM's fill level is the EV's SoC in % (its FRBC storage's fill-level label), from
    `description` (the FRBC system description in force, when the caller has it) or the
    RM's state."""
    try:
        sd = description if description is not None else \
            state.of(ControlType.FILL_RATE_BASED_CONTROL).system_description(now)
        return str(sd.storage.fill_level_label or "").startswith("SoC")
    except Exception:  # not FRBC, or no description yet
        return False


def taper_ptus(asset: StorageAsset, knee: float, ptu_minutes: int) -> int:
    """PTUs more than at full power that an EV planned in SoC (level / level_max = SoC) needs
    to reach its target when above `knee` (0..1) its power falls linearly to
    `TAPER_END_SHARE` of its maximum at 100 %; 0 when the target is below the knee."""
    if knee >= 1.0 or asset.target_wh is None or asset.level_max_wh <= 0 \
            or asset.charge_max_w <= 0:
        return 0
    soc0 = max(float(asset.level_wh) / asset.level_max_wh, knee)
    soc1 = min(float(asset.target_wh) / asset.level_max_wh, 1.0)
    if soc1 <= soc0:
        return 0
    k = (1.0 - TAPER_END_SHARE) / (1.0 - knee)  # share of the maximum lost per unit of SoC
    wh_h = asset.level_max_wh / float(asset.charge_max_w)  # hours for 100 % at full power
    full_h = (soc1 - soc0) * wh_h
    taper_h = wh_h / k * math.log((1.0 - k * (soc0 - knee)) / (1.0 - k * (soc1 - knee)))
    return max(0, round((taper_h - full_h) * 60 / ptu_minutes))


def needs_from_defaults(state: Any, now: datetime) -> bool:
    """The RM says its departure and need are only its site defaults: the EV and the card told
    it nothing (an OCPP 1.6 EV reports neither SoC nor departure nor energy)."""
    return DEFAULTS in storage_label(state, now)


def floor_headroom_w(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """What the site can give flexible loads per PTU, W: in all (the planned import limit) and
    per phase (the planned fuse), after the fixed loads and with the forecast PV (on the fuse
    at `fuse_production_credit`); never below 0."""
    n = problem.n_ptus
    lim = problem.limits
    fixed, fixed_phase = fixed_draw_w(problem)
    pv = np.zeros(n)
    pv_phase = np.zeros((3, n))
    for c in problem.curtailable:
        p = np.maximum(per_ptu(c.production_w, n), 0)
        pv += p
        pv_phase += np.outer(share_vector(c.phase_share), p)
    credit = min(1.0, max(0.0, float(lim.fuse_production_credit)))
    total = per_ptu(lim.planned_import_limit_w, n) - fixed + pv
    phase = float(lim.planned_fuse_w_per_phase) - fixed_phase + credit * pv_phase
    return np.maximum(total, 0.0), np.maximum(phase, 0.0)


class DepartureLearning:
    """Open visits per EV charger, the learned model, and the safe-departure milestones."""

    def __init__(self, config: SiteConfig, store: Any = None) -> None:
        planner = config.planner
        self.quantile = float(planner.safe_departure_quantile)
        self.value_eur_per_wh = float(planner.value_of_undelivered_kwh_eur) / 1000
        # departure scenarios: the safe departure alone (priced at the full value), or more
        # quantiles, each milestone priced at the value times the share of drivers leaving
        # between it and the next (the expected value of what a plan leaves undelivered)
        more = sorted(q for q in planner.departure_scenario_quantiles if q > self.quantile)
        self.quantiles = [self.quantile, *more] if self.quantile > 0 else []
        self.scenarios = bool(more)
        self.ptu_minutes = planner.ptu_minutes
        self.taper_knee = float(planner.ev_taper_from_soc) / 100
        self.front_wh = float(planner.ev_front_load_kwh) * 1000
        self.front_window = timedelta(minutes=int(planner.ev_front_load_minutes))
        front_eur = planner.ev_front_load_eur_per_kwh
        self.front_eur_per_wh = (self.value_eur_per_wh if front_eur is None
                                 else float(front_eur) / 1000)
        self.front_loaded = 0  # EVs given a front-load milestone (summed over plans)
        self.open_need_wh = float(planner.ev_open_need_kwh) * 1000
        self.late_quantile = float(planner.late_departure_quantile)
        self.late_floor_share = float(planner.late_departure_floor_share)
        self.past_typed = 0  # EVs planned past their typed departure (summed over plans)
        self.by_late: set[tuple[str, datetime]] = set()  # visits planned past it at least once
        self.store = store
        self.model = DepartureModel([], config.site.timezone,
                                    relative=bool(planner.departures_relative),
                                    by_typed_stay=bool(planner.departures_by_typed_stay))
        self.open: dict[str, OpenVisit] = {}
        self.safe: dict[str, SafeDeparture] = {}  # rm id -> the last safe departure planned to
        self.recorded = 0  # visits recorded (this run)
        self.planned = 0  # safe-departure milestones added (this run, summed over plans)
        self.tapered = 0  # EVs whose milestones moved earlier for the taper (summed over plans)
        # EVs that tell no departure planned to their learned stay past the charger's default
        # (summed over plans)
        self.stretched = 0
        # visits whose charger gave only its defaults (OCPP 1.6), planned by their stay: with
        # any learned departure, and with a learned energy above the charger's default need
        self.by_stay: set[tuple[str, datetime]] = set()
        self.by_learned_energy: set[tuple[str, datetime]] = set()
        # chargers seen without an EV (or whose EV was seen leaving): their next EV's arrival is seen
        self.empty_seen: set[str] = set()
        self.unseen_arrivals = 0  # visits not learned from: the EV was there before the CEM saw it
        # per RM, what the model said for its open visit and what it was asked: a replan asks
        # for every EV's departures and energy, and the answer changes only when the visit or
        # the model does (a quantile over a group of visits each: ~50 us, 5000 EVs a replan)
        self._asked: dict[tuple[str, str], tuple[tuple[Any, ...], Any]] = {}
        # per RM, what `observe` last took in of a charging EV: its open visit, the system
        # description and the asset's numbers; the same again changes nothing (5000 EVs a
        # replan, most of which said nothing new)
        self._seen: dict[str, tuple[OpenVisit | None, Any, tuple[Any, ...]]] = {}

    def described(self, rm_id: str, state: Any, now: datetime) -> None:
        """An RM sent a system description: one that describes no EV makes the charger's next
        EV an arrival the CEM saw, also one that plugs in before the CEM's next plan (the RMs
        describe their chargers as they connect, before the first plan after a start)."""
        if describes_no_ev(state, now):
            self.empty_seen.add(rm_id)

    def disconnected(self, rm_id: str) -> None:
        """An RM's session ended: an EV that plugs in meanwhile comes at a time the CEM does not
        see (an EV already on its charger keeps its open visit)."""
        if rm_id not in self.open:
            self.empty_seen.discard(rm_id)

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
                names: Mapping[str, str], now: datetime,
                bindings: Mapping[str, Any] | None = None,
                evs: Mapping[str, StorageAsset] | None = None) -> list[Visit]:
        """Open and close visits from the EV assets of a new problem; returns the closed ones.

        `bindings` (asset id -> the binding it was built with, `SiteMapping.bindings`) give
        each FRBC asset's system description without a look-up in the RM's state; `evs`
        (`SiteMapping.evs`) each RM's EV asset without a search through its assets."""
        bindings = bindings or {}
        closed: list[Visit] = []
        seen_of, open_of = self._seen, self.open
        for rm_id, asset in (first_evs(problem, rm_assets) if evs is None else evs).items():
            binding = bindings.get(asset.id)
            description = None if binding is None \
                else getattr(binding, "system_description", None)
            visit = open_of.get(rm_id)
            seen = (asset.level_wh, asset.level_max_wh, asset.charge_max_w,
                    asset.available_until, problem.start)
            last = seen_of.get(rm_id)
            if last is not None and last[0] is visit and last[1] is description \
                    and last[2] == seen:
                continue  # the same visit, description and numbers: nothing to take in
            if no_ev(asset, states.get(rm_id), now):
                self.empty_seen.add(rm_id)
                if visit is not None:
                    self._end(rm_id, now, closed)
                continue
            level = float(asset.level_wh)
            scale = float(asset.level_max_wh)
            typed = None if asset.available_until is None else problem.start + timedelta(
                minutes=problem.ptu_minutes * int(asset.available_until))
            if visit is not None and asset.charge_max_w > 0 and self._new_ev(visit, level, scale,
                                                                             typed, now):
                self._end(rm_id, now, closed)  # a new EV since the last plan
                self.empty_seen.add(rm_id)  # the old one left: the new one's arrival is seen
                visit = None
            if visit is None:
                if asset.charge_max_w <= 0:
                    continue  # an EV that takes nothing from the start: nothing to learn
                need = None if asset.target_wh is None else max(0.0, asset.target_wh - level)
                defaults = needs_from_defaults(states.get(rm_id), now)
                # a default departure and need say nothing of this driver: learn and plan by
                # the stay and the energy comparable visits took instead
                self.open[rm_id] = OpenVisit(names.get(rm_id, rm_id), now,
                                             None if defaults else typed,
                                             None if defaults else need, level, scale,
                                             driver_of(states.get(rm_id), now),
                                             typed_latest=typed, defaults=defaults,
                                             soc=plans_in_soc(states.get(rm_id), now,
                                                              description),
                                             arrival_seen=rm_id in self.empty_seen)
                if description is not None:
                    self._seen[rm_id] = (self.open[rm_id], description, seen)
                continue
            if asset.charge_max_w > 0:
                visit.soc = plans_in_soc(states.get(rm_id), now, description)
            if asset.charge_max_w > 0 and typed is not None:
                visit.typed_latest = typed
            if asset.charge_max_w > 0 or scale > 0:
                if scale == visit.scale_wh or asset.charge_max_w <= 0:
                    visit.delivered_wh += max(0.0, level - visit.level_wh)
                visit.level_wh = level
                if asset.charge_max_w > 0:
                    visit.scale_wh = scale
            if description is not None and asset.charge_max_w > 0:
                self._seen[rm_id] = (visit, description, seen)
        for done in closed:
            self.model.add(done)
        return closed

    def _new_ev(self, visit: OpenVisit, level: float, scale: float, typed: datetime | None,
                now: datetime) -> bool:
        """Another EV plugged in since the last plan: its level is lower (same unit), or its
        charger gives another departure that is not an overstayer's next-hour target."""
        if level + 1.0 < visit.level_wh and scale == visit.scale_wh:
            return True
        latest = visit.typed_latest
        if typed is None or latest is None:
            return False
        step = timedelta(minutes=self.ptu_minutes)
        if abs(typed - latest) <= step:
            return False
        overstaying = now >= latest - OVERSTAY and typed <= now + 2 * OVERSTAY
        return not overstaying

    def _end(self, rm_id: str, now: datetime, closed: list[Visit]) -> None:
        """Close an RM's open visit; one whose arrival the CEM saw goes to `closed`."""
        visit = self.open.pop(rm_id)
        self.safe.pop(rm_id, None)
        self._asked.pop((rm_id, "energy"), None)
        self._asked.pop((rm_id, "departures"), None)
        self._asked.pop((rm_id, "stay"), None)
        self._asked.pop((rm_id, "late"), None)
        if not visit.arrival_seen:
            self.unseen_arrivals += 1
            return
        closed.append(Visit(visit.evse, visit.arrival, now, visit.typed_departure,
                            visit.need_wh, visit.delivered_wh, visit.driver))

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

    def _prices(self, early_share: float) -> list[float]:
        """EUR per Wh short at each departure quantile: the full value for the safe departure
        alone; with scenarios, the value times the share of drivers that leave between this
        quantile and the next (the last: up to the share that leaves before the typed one)."""
        if not self.scenarios:
            return [self.value_eur_per_wh] * len(self.quantiles)
        bounds = [*self.quantiles, max(early_share, self.quantiles[-1])]
        return [self.value_eur_per_wh * (bounds[k + 1] - bounds[k])
                for k in range(len(self.quantiles))]

    def apply(self, problem: Problem, rm_assets: dict[str, list[str]],
              evs: Mapping[str, StorageAsset] | None = None) -> int:
        """Add the safe-departure milestone to every open visit's EV; returns how many.
        (`evs`: each RM's EV asset, `SiteMapping.evs`.)"""
        if self.quantile <= 0:
            return 0
        ev_of = first_evs(problem, rm_assets) if evs is None else evs
        step = timedelta(minutes=problem.ptu_minutes)
        count = 0
        floors: list[tuple[StorageAsset, OpenVisit, int]] = []
        for rm_id, visit in self.open.items():
            asset = ev_of.get(rm_id)
            if asset is None:
                continue
            if asset.charge_max_w <= 0 or asset.target_wh is None \
                    or asset.available_until is None:
                continue
            target = int(asset.target_wh)
            if visit.defaults:  # the RM's need is a default: plan what comparable EVs took
                # (such an RM keeps its level in kWh charged this visit: energy one to one)
                learned = self._ask(rm_id, "energy", self.model.energy, visit.evse,
                                    visit.arrival, visit.driver)
                if learned is not None and round(learned) > target:
                    target = min(round(learned), int(asset.level_max_wh))
                    self.by_learned_energy.add((rm_id, visit.arrival))
                # it is not full while it still takes energy: ask for more than it has
                if self.open_need_wh > 0:
                    target = max(target, min(round(asset.level_wh + self.open_need_wh),
                                             int(asset.level_max_wh)))
            if target <= asset.level_wh:
                continue
            if self.late_quantile > 0 and visit.typed_departure is not None \
                    and self._past_typed(problem, asset, rm_id, visit, target):
                floors.append((asset, visit, target))
                count += 1
                continue
            found = self._ask(rm_id, "departures", self.model.departures, visit.evse,
                              visit.arrival, visit.typed_departure, self.quantiles, visit.driver)
            if not found:
                floors.append((asset, visit, target))
                continue
            self.safe[rm_id] = found[0]
            if visit.defaults:
                self.by_stay.add((rm_id, visit.arrival))
                self._to_learned_stay(problem, asset, rm_id, visit)
            shift = self._taper_shift(problem, asset, visit)
            self._for_taper(asset, shift)
            ours: set[int] = set()
            carried = 0.0
            for safe, price in zip(found, self._prices(found[0].early_share), strict=True):
                ptu = math.floor((safe.at - problem.start) / step) - shift
                ptu = max(ptu, asset.available_from + 1)
                if ptu in ours:  # two quantiles in one PTU: one milestone, both shares
                    asset.milestone_eur_per_wh[ptu] += price
                    continue
                if ptu >= asset.available_until:
                    carried += price
                    continue
                if any(m[0] == ptu for m in asset.target_profile):
                    continue  # a milestone at full weight is already there
                asset.target_profile.append((ptu, target, int(asset.level_max_wh)))
                asset.milestone_eur_per_wh[ptu] = price
                ours.add(ptu)
            if carried > 0 and visit.defaults:
                # its last level: the end of its asset, unless the charger's target is there
                last = asset.available_until
                while last > asset.available_from and last not in ours \
                        and any(m[0] == last for m in asset.target_profile):
                    last -= 1
                if last in ours:
                    asset.milestone_eur_per_wh[last] += carried
                elif last > asset.available_from:
                    asset.target_profile.append((last, target, int(asset.level_max_wh)))
                    asset.milestone_eur_per_wh[last] = carried
                    ours.add(last)
            floors.append((asset, visit, target))
            count += bool(ours)
        self._front_load(problem, floors)
        self.planned += count
        return count

    def _taper_shift(self, problem: Problem, asset: StorageAsset, visit: OpenVisit) -> int:
        """PTUs the last part of the target takes longer under the assumed taper (an EV that
        reports its SoC; `taper_ptus`), 0 otherwise."""
        return taper_ptus(asset, self.taper_knee, problem.ptu_minutes) if visit.soc else 0

    def _for_taper(self, asset: StorageAsset, shift: int) -> None:
        """Every milestone of the asset `shift` PTUs earlier (`_finish_earlier`), counted."""
        if shift:
            self._finish_earlier(asset, shift)
            self.tapered += 1

    def _past_typed(self, problem: Problem, asset: StorageAsset, rm_id: str, visit: OpenVisit,
                    target: int) -> bool:
        """Plan a typed EV past its typed departure where the site's history says it is too
        early: where even the `late_departure_quantile` of comparable drivers' real stay
        against their typed one ends after it (`DepartureModel.late_departure`), the asset
        ends at that later time, whose milestone asks the target at the value of an
        undelivered kWh; by the typed departure (and the finish margin before it) only
        `late_departure_floor_share` of the typed need is asked at the unmet-target weight,
        so a driver who does leave then is not left empty. Also while the EV overstays (its
        charger's next-hour target). False (the asset unchanged) where the history does not
        say so."""
        typed = visit.typed_departure
        until = asset.available_until
        if typed is None or until is None:
            return False
        late = self._ask(rm_id, "late", self.model.late_departure, visit.evse, visit.arrival,
                         typed, self.late_quantile, visit.driver)
        if late is None:
            return False
        step = timedelta(minutes=problem.ptu_minutes)
        shift = self._taper_shift(problem, asset, visit)
        end = min(math.floor((late.at - problem.start) / step), problem.n_ptus)
        if end - shift <= until or end - shift <= asset.available_from + 1:
            return False
        need = visit.need_wh if visit.need_wh is not None else target - asset.level_wh
        floor = int(max(asset.level_wh, target - (1.0 - self.late_floor_share) * need))
        # what the typed departure asked at full weight (the charger's target, the finish
        # margin's milestone) becomes the floor; milestones priced below it stay as they are
        kept: list[tuple[int, int, int]] = []
        for ptu, lo, hi in asset.target_profile:
            if ptu <= until and ptu not in asset.milestone_eur_per_wh and lo > floor:
                lo = floor
            kept.append((ptu, lo, hi))
        if not any(m[0] == until for m in kept):
            kept.append((until, floor, int(asset.level_max_wh)))
        asset.target_profile[:] = kept
        asset.target_wh = floor
        asset.available_until = end
        self._for_taper(asset, shift)
        ptu = end - shift
        asset.target_profile.append((ptu, target, int(asset.level_max_wh)))
        asset.milestone_eur_per_wh[ptu] = self.value_eur_per_wh
        self.safe[rm_id] = late
        self.past_typed += 1
        self.by_late.add((rm_id, visit.arrival))
        return True

    def _to_learned_stay(self, problem: Problem, asset: StorageAsset, rm_id: str,
                         visit: OpenVisit) -> None:
        """End the asset of an EV whose charger gives only its default departure at the
        learned `STAY_QUANTILE` stay of comparable visits when that is later: the plan may
        then charge it after the default, where half of such drivers are still there. The
        charger's default need by its default departure stays asked as it was."""
        until = asset.available_until
        stay = self._ask(rm_id, "stay", self.model.departures, visit.evse, visit.arrival, None,
                         [STAY_QUANTILE], visit.driver)
        if until is None or not stay:
            return
        step = timedelta(minutes=problem.ptu_minutes)
        end = min(math.ceil((stay[0].at - problem.start) / step), problem.n_ptus)
        if end > until:
            asset.available_until = end
            self.stretched += 1

    def _ask(self, rm_id: str, what: str, answer: Callable[..., T],
             *args: Any) -> T:
        """`answer(*args)` from the model, asked again only when the model learned a visit
        since (or another model took its place) or the question is another one."""
        question = (id(self.model), len(self.model.visits), *args)
        asked = self._asked.get((rm_id, what))
        if asked is not None and asked[0] == question:
            return cast(T, asked[1])
        found = answer(*args)
        self._asked[(rm_id, what)] = (question, found)
        return found

    def _front_load(self, problem: Problem,
                    floors: list[tuple[StorageAsset, OpenVisit, int]]) -> None:
        """The first `ev_front_load_kwh` of each visit by `ev_front_load_minutes` after its
        arrival, at the full value of a kWh: the drivers who leave before every learned
        departure quantile get at least this (a floor per driver, not an expected value).

        The floors ask no more than the site can deliver: first come, first floored, each EV
        is asked what its charger and the headroom its earlier-arrived EVs' floors left
        (import limit and fuse per phase, after the base load and PV) give it by its floor's
        PTU. In a rush the last arrivals get less or no floor, rather than every EV a floor
        the site cannot meet (which spread the first hour over all of them)."""
        if self.front_wh <= 0:
            return
        # an EV that was there before the CEM saw it (its arrival is not known), or one that
        # took its first kWh already, gets none: the headroom is worked out only for the rest
        floors = [f for f in floors
                  if f[1].arrival_seen and self.front_wh - f[1].delivered_wh > 1]
        if not floors:
            return
        step = timedelta(minutes=problem.ptu_minutes)
        hours = ptu_hours(problem)
        total_w, phase_w = floor_headroom_w(problem)
        total: list[float] = total_w.tolist()  # plain floats: 5000 EVs a replan
        phase: list[list[float]] = phase_w.tolist()
        floors.sort(key=lambda f: (f[1].arrival, f[0].id))
        for asset, visit, target in floors:
            missing = self.front_wh - visit.delivered_wh
            ptu = math.ceil((visit.arrival + self.front_window - problem.start) / step)
            if ptu <= asset.available_from or (asset.available_until is not None
                                               and ptu >= asset.available_until):
                continue
            while any(m[0] == ptu for m in asset.target_profile):
                ptu -= 1  # a departure milestone there already: the floor just before it
            if ptu <= asset.available_from:
                continue
            eta = max(float(asset.charge_efficiency), 1e-6)
            wanted = min(target, asset.level_wh + missing, asset.level_max_wh) - asset.level_wh
            shares = [max(float(x), 0.0) for x in asset.phase_share]
            share = [x / sum(shares) for x in shares] if sum(shares) > 0 else [1 / 3] * 3
            granted = 0.0  # Wh into the EV
            for t in range(max(asset.available_from, 0), min(ptu, problem.n_ptus)):
                if granted >= wanted:
                    break
                room = min([float(asset.charge_max_w), total[t],
                            *(phase[p][t] / share[p] for p in range(3) if share[p] > 0)])
                w = max(0.0, min(room, (wanted - granted) / (eta * hours[t])))
                total[t] -= w
                for p in range(3):
                    phase[p][t] -= w * share[p]
                granted += w * eta * hours[t]
            goal = int(asset.level_wh + min(granted, wanted))
            if goal <= asset.level_wh + 1:
                continue
            asset.target_profile.append((ptu, goal, int(asset.level_max_wh)))
            asset.milestone_eur_per_wh[ptu] = self.front_eur_per_wh
            self.front_loaded += 1

    @staticmethod
    def _finish_earlier(asset: StorageAsset, shift: int) -> None:
        """Move the EV's milestones (its finish margin's) `shift` PTUs earlier: under the
        taper the last part of the target takes that much longer than the plan's full power."""
        moved: list[tuple[int, int, int]] = []
        for ptu, lo, hi in asset.target_profile:
            new = max(ptu - shift, asset.available_from + 1)
            if any(m[0] == new for m in moved):
                new = ptu
            moved.append((new, lo, hi))
            if new != ptu and ptu in asset.milestone_eur_per_wh:
                asset.milestone_eur_per_wh[new] = asset.milestone_eur_per_wh.pop(ptu)
        asset.target_profile[:] = moved


def commit_started(problem: Problem, previous: Problem | None, plan: Plan | None,
                   eur_per_wh: float) -> int:
    """Milestones that keep the charging the previous plan had in the PTU now running (see the
    module docstring); returns how many EVs got one."""
    if previous is None or plan is None or eur_per_wh <= 0:
        return 0
    step = timedelta(minutes=problem.ptu_minutes)
    k = round((problem.start - previous.start) / step)
    if k < 0 or k >= previous.n_ptus or problem.n_ptus < 2:
        return 0
    hours = float(ptu_hours(problem)[0])
    count = 0
    for asset in problem.storage:
        if asset.kind != "ev" or asset.charge_max_w <= 0 or asset.available_from > 0:
            continue
        power = plan.power_w.get(asset.id)
        if power is None or len(power) <= k or float(power[k]) < asset.charge_min_w:
            continue
        until = asset.available_until if asset.available_until is not None else problem.n_ptus
        if until <= 1 or any(m[0] == 1 for m in asset.target_profile):
            continue
        watts = min(float(power[k]), float(asset.charge_max_w))
        goal = min(asset.level_wh + watts * hours * asset.charge_efficiency, asset.level_max_wh)
        if asset.target_wh is not None:
            goal = min(goal, max(asset.target_wh, asset.level_wh))
        if goal <= asset.level_wh + 1:
            continue
        asset.target_profile.append((1, int(goal), int(asset.level_max_wh)))
        asset.milestone_eur_per_wh[1] = eur_per_wh
        count += 1
    return count
