"""The operator's charging mode per EV charger: smart, charge now, paused, a minimum first.

A driver whose dwell the CEM guessed wrong must not be left empty: the HTTP API
(`POST /api/evs/{evse}/mode`) sets a mode here, the store keeps it (a restart keeps it), and
the control loop applies it on the next replan by adjusting that EV's planner asset
(`EvModes.apply`, called from `SiteController.replan` right after the problem is built):

- `smart`: the plan as usual; with `min_kwh`, the first that many kWh as soon as the limits
  allow (each PTU's level is asked to be as high as full power could make it, until the
  minimum is in), the rest at the cheapest hours;
- `charge_now`: full power as soon as the limits allow until the EV is full or leaves, at the
  highest priority; the fuse, the GTV and congestion windows still hold;
- `paused`: no power at all (the EV keeps its place; its target is not planned).

The limits stay hard in every mode: a mode only changes what the planner is asked for. A mode
ends when the EV leaves (the charger describes itself without an EV): it is forgotten here and
in the store, so the next EV starts smart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from cem.planner.assets import Problem, StorageAsset
from cem.planner.layout import ptu_hours

logger = logging.getLogger("cem.control")

MODES = ("smart", "charge_now", "paused")
TOP_PRIORITY = 10  # the highest charge-card priority the config allows


@dataclass(frozen=True)
class EvMode:
    """One EV charger's mode, as the operator set it."""

    mode: str
    min_kwh: float | None = None
    set_at: datetime | None = None
    source: str = "api"

    def describe(self) -> str:
        if self.mode == "paused":
            return "paused by the operator"
        if self.mode == "charge_now":
            return "charge now (operator)"
        if self.min_kwh:
            return f"smart, the first {self.min_kwh:g} kWh at once (operator)"
        return "smart"


class EvModeError(ValueError):
    """A mode that cannot be set; the message says why."""


def check_mode(mode: str, min_kwh: float | None) -> None:
    """Raise EvModeError for a mode or minimum the loop cannot apply."""
    if mode not in MODES:
        raise EvModeError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if min_kwh is not None:
        if not np.isfinite(min_kwh) or min_kwh <= 0 or min_kwh > 200:
            raise EvModeError(f"min_kwh {min_kwh:g}: use a number of kWh above 0 and at most 200")
        if mode != "smart":
            raise EvModeError(f"min_kwh goes with mode 'smart' (charge the minimum first, the "
                              f"rest at the cheapest hours), not with {mode!r}")


class EvModes:
    """The modes in force, keyed by the EV charger's RM id; persisted through `store`."""

    def __init__(self, store: Any = None) -> None:
        self.store = store
        self.modes: dict[str, EvMode] = {}
        self.version = 0  # bumped on every change, for the page
        self.applied: dict[str, str] = {}  # rm id -> what the last replan did with its mode

    async def load(self) -> None:
        """Read the modes the store kept (at start)."""
        if self.store is None:
            return
        for rm_id, mode, min_kwh, set_at, source in await self.store.list_ev_modes():
            self.modes[rm_id] = EvMode(mode, min_kwh, set_at, source)
        if self.modes:
            self.version += 1
            logger.info("EV modes kept from before the restart: %s", ", ".join(
                f"{rm_id[:8]} {m.describe()}" for rm_id, m in self.modes.items()))

    def get(self, rm_id: str) -> EvMode | None:
        return self.modes.get(rm_id)

    async def set(self, rm_id: str, mode: str, min_kwh: float | None, now: datetime,
                  source: str = "api") -> EvMode:
        """Set (and persist) a mode; `smart` without a minimum is no mode at all."""
        check_mode(mode, min_kwh)
        entry = EvMode(mode, min_kwh, now, source)
        if mode == "smart" and min_kwh is None:
            self.modes.pop(rm_id, None)
            if self.store is not None:
                await self.store.clear_ev_mode(rm_id)
        else:
            self.modes[rm_id] = entry
            if self.store is not None:
                await self.store.set_ev_mode(rm_id, mode, min_kwh, now, source)
        self.version += 1
        return entry

    async def forget(self, rm_ids: Iterable[str]) -> None:
        """The EVs of these chargers left: their modes end."""
        for rm_id in list(rm_ids):
            if self.modes.pop(rm_id, None) is not None:
                self.version += 1
                self.applied.pop(rm_id, None)
                logger.info("EV mode of %s ended: the EV left", rm_id[:8])
                if self.store is not None:
                    await self.store.clear_ev_mode(rm_id)

    def apply(self, problem: Problem, rm_assets: dict[str, list[str]]) -> list[str]:
        """Adjust the EV assets of `problem` to the modes in force; returns the RM ids whose
        EV has left (their mode should end: `forget`)."""
        storage = {s.id: s for s in problem.storage}
        gone = []
        self.applied = {}
        for rm_id, mode in self.modes.items():
            assets = [storage[a] for a in rm_assets.get(rm_id, []) if a in storage]
            evs = [s for s in assets if s.kind == "ev"]
            if not evs:
                continue  # not connected now (a restart): kept until it says its EV left
            if all(s.charge_max_w <= 0 for s in evs):
                gone.append(rm_id)
                continue
            for asset in evs:
                self.applied[rm_id] = apply_mode(asset, mode, problem)
        return gone


def apply_mode(asset: StorageAsset, mode: EvMode, problem: Problem) -> str:
    """Change one EV asset for `mode`; returns what was done, in words."""
    if mode.mode == "paused":
        asset.charge_max_w = asset.charge_min_w = 0
        asset.target_wh = None
        asset.target_profile = []
        return "paused: planned at 0 W"
    if mode.mode == "charge_now":
        asset.priority = TOP_PRIORITY
        asap(asset, asset.level_max_wh, problem)
        return "charge now: full power as soon as the limits allow"
    if mode.min_kwh:
        goal = asset.level_wh + round(mode.min_kwh * 1000)
        asap(asset, min(goal, asset.level_max_wh), problem)
        return f"the first {mode.min_kwh:g} kWh as soon as the limits allow"
    return "smart"


def asap(asset: StorageAsset, goal_wh: float, problem: Problem) -> None:
    """Ask for the level full power would reach at the end of each PTU, up to `goal_wh`.

    The planner's milestones are soft (an unreachable one costs its shortfall), so the limits
    decide how close it gets; the EV then charges as early as they allow.
    """
    hours = ptu_hours(problem)
    end = problem.n_ptus if asset.available_until is None else min(asset.available_until,
                                                                   problem.n_ptus)
    level = float(asset.level_wh)
    top = min(float(goal_wh), float(asset.level_max_wh))
    milestones = []
    for t in range(asset.available_from, end):
        level = min(top, level + asset.charge_max_w * asset.charge_efficiency * float(hours[t]))
        milestones.append((t + 1, int(level), int(asset.level_max_wh)))
        if level >= top:
            break
    asset.target_profile = [m for m in asset.target_profile
                            if m[0] > (milestones[-1][0] if milestones else 0)] + milestones
