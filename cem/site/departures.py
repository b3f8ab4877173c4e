"""When do drivers really leave? Departures learned from the site's finished visits.

A live CEM knows a driver's own estimate of departure (when given) and, from its store, every
earlier visit: where and when it began, what the driver said, when the EV really left. From
those it learns, for a new EV, the distribution of its real departure and takes a **safe
departure**: a low quantile `q` of it (the driver is gone by then in only a share `q` of
comparable visits), never later than the departure the driver typed.

Comparable visits, most specific first, the first group with at least `min_visits`:
1. the same driver (charge card) where the RM names one;
2. the same EVSE, weekday and local arrival hour;
3. with `by_typed_stay` and a typed departure: the same local arrival hour and typed stay
   (0-3, 3-6, 6-9, 9+ h; round 6);
4. the same local arrival hour (any EVSE, any day);
5. every visit.
With a typed departure the group's share of the typed stay the drivers really stayed (capped
at 1) gives the safe departure as arrival plus its q quantile times this driver's typed stay
(`relative`, the default since round 4: drivers who type a long stay leave more hours early
than those who type a short one, so "hours early" pooled over both planned the long stays too
late and the short ones too early); with `relative=False` the group's "how much earlier than
typed" (hours, 0 for those who stayed longer) gives typed minus its (1 - q) quantile; without one, the
group's stay (hours from arrival) gives arrival plus its q quantile; that is how an EV whose
charger passes on no departure (OCPP 1.6) is planned, and `energy` gives it the most the group
took (its 0.99 quantile), instead of the charger's default need. Pure functions: the store
keeps the visits (`cem.store`), the control loop records them and asks (`cem.control.departures`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np

MIN_VISITS = 8
# the energy an EV that tells nothing is planned for: this quantile of what comparable visits
# took. High, because the two errors cost differently: an EV planned for more than it takes
# stops drawing and the next plan drops it (nothing bought for it), one planned for less goes
# home short. Tuned on the Caltech week of 2019-10-07 (0.8 / 0.95 / 0.99: 93.2 / 98.3 / 99.2 %
# of the optimum's energy, -1.3 / +7.3 / +9.0 % cost; ADR 0009, round 3)
ENERGY_QUANTILE = 0.99
EARLY_H = 0.25  # leaving this much before the typed departure counts as early
# with `by_typed_stay`, visits of an arrival hour are also grouped by their typed stay in
# buckets of this many hours (0-3, 3-6, 6-9, 9+ h): a long typed stay is left early more often
TYPED_BUCKET_H = 3.0


@dataclass(frozen=True)
class Visit:
    """One finished EV visit at an EVSE (aware times)."""

    evse: str
    arrival: datetime
    departure: datetime  # when the EV really left
    typed_departure: datetime | None = None  # what the driver (or the RM's defaults) said
    need_wh: float | None = None  # what the driver asked for
    delivered_wh: float = 0.0
    driver: str | None = None

    @property
    def stay_h(self) -> float:
        return (self.departure - self.arrival).total_seconds() / 3600

    @property
    def stayed_share(self) -> float | None:
        """The share of its typed stay the EV really stayed (at most 1; None without one)."""
        if self.typed_departure is None or self.typed_departure <= self.arrival:
            return None
        typed_h = (self.typed_departure - self.arrival).total_seconds() / 3600
        return min(1.0, max(0.0, self.stay_h / typed_h))

    @property
    def stay_ratio(self) -> float | None:
        """Its real stay over its typed stay, not capped (above 1: it stayed longer; None
        without a typed departure)."""
        if self.typed_departure is None or self.typed_departure <= self.arrival:
            return None
        return self.stay_h / ((self.typed_departure - self.arrival).total_seconds() / 3600)

    @property
    def early_h(self) -> float | None:
        """Hours the EV left before its typed departure (0 if it stayed as long or longer)."""
        if self.typed_departure is None:
            return None
        return max(0.0, (self.typed_departure - self.departure).total_seconds() / 3600)


@dataclass(frozen=True)
class SafeDeparture:
    """The safe departure of one EV and where it came from (for the log and the page)."""

    at: datetime
    basis: str  # "driver", "EVSE, weekday and hour", "arrival hour", "all visits", "none"
    visits: int
    early_share: float = 1.0  # share of the group that left more than a PTU before typed


# what each group of comparable visits is called in a learned departure (`SafeDeparture`)
GROUP_NAMES = {"driver": "driver", "evse": "EVSE, weekday and hour",
               "typed": "arrival hour and typed stay", "hour": "arrival hour",
               "all": "all visits"}


class DepartureModel:
    """The visits of the site, grouped for quick look-ups (rebuild it when visits are added)."""

    def __init__(self, visits: Iterable[Visit], timezone: str = "UTC", *,
                 min_visits: int = MIN_VISITS, relative: bool = True,
                 by_typed_stay: bool = False) -> None:
        self.zone = ZoneInfo(timezone)
        self.min_visits = min_visits
        self.relative = relative
        self.by_typed_stay = by_typed_stay
        self.visits: list[Visit] = []
        self._groups: dict[tuple[object, ...], list[Visit]] = {}
        for visit in visits:
            self.add(visit)

    def __len__(self) -> int:
        return len(self.visits)

    def _keys(self, evse: str, arrival: datetime, driver: str | None,
              typed: datetime | None = None, by_typed_stay: bool | None = None,
              ) -> list[tuple[object, ...]]:
        local = arrival.astimezone(self.zone)
        keys: list[tuple[object, ...]] = []
        if driver:
            keys.append(("driver", driver))
        keys.append(("evse", evse, local.weekday(), local.hour))
        typed_stay = self.by_typed_stay if by_typed_stay is None else by_typed_stay
        if typed_stay and typed is not None and typed > arrival:
            typed_h = (typed - arrival).total_seconds() / 3600
            keys.append(("typed", local.hour, min(int(typed_h // TYPED_BUCKET_H), 3)))
        keys += [("hour", local.hour), ("all",)]
        return keys

    def add(self, visit: Visit) -> None:
        self.visits.append(visit)
        # (the typed-stay groups are kept whether `by_typed_stay` asks them or not:
        # `late_departure` always does)
        for key in self._keys(visit.evse, visit.arrival, visit.driver, visit.typed_departure,
                              by_typed_stay=True):
            self._groups.setdefault(key, []).append(visit)

    def energy(self, evse: str, arrival: datetime, driver: str | None = None,
               quantile: float = ENERGY_QUANTILE) -> float | None:
        """Wh comparable visits took (a quantile, from the first group with enough visits that
        delivered anything), for an EV whose charger tells no need; None without history."""
        for key in self._keys(evse, arrival, driver):
            values = [v.delivered_wh for v in self._groups.get(key, []) if v.delivered_wh > 0]
            if len(values) >= self.min_visits:
                return float(np.quantile(values, quantile))
        return None

    def safe_departure(self, evse: str, arrival: datetime, typed: datetime | None,
                       quantile: float, driver: str | None = None) -> SafeDeparture | None:
        """The safe departure of an EV that arrived at `arrival` (None: nothing to go by)."""
        if quantile <= 0:
            return None
        found = self.departures(evse, arrival, typed, [quantile], driver)
        return found[0] if found else None

    def late_departure(self, evse: str, arrival: datetime, typed: datetime, quantile: float,
                       driver: str | None = None) -> SafeDeparture | None:
        """The departure at `quantile` of how long comparable drivers really stayed against
        their typed stay (not capped at it), when that is after `typed`: even that share of
        them was still there. None when it is not, or without history. The groups are those
        of `departures` with the typed stay's always (a short typed stay is overstayed by
        far more than a long one)."""
        if quantile <= 0 or typed <= arrival:
            return None
        for key in self._keys(evse, arrival, driver, typed, by_typed_stay=True):
            group = [v for v in self._groups.get(key, []) if v.stay_ratio is not None]
            if len(group) < self.min_visits:
                continue
            ratio = float(np.quantile([v.stay_ratio for v in group], quantile))
            if ratio <= 1.0:
                return None
            early = float(np.mean([(v.early_h or 0.0) > EARLY_H for v in group]))
            return SafeDeparture(arrival + ratio * (typed - arrival), GROUP_NAMES[str(key[0])],
                                 len(group), early)
        return None

    def departures(self, evse: str, arrival: datetime, typed: datetime | None,
                   quantiles: list[float], driver: str | None = None) -> list[SafeDeparture]:
        """The departure at each quantile (ascending), from one group; [] without history."""
        for key in self._keys(evse, arrival, driver, typed):
            group = self._groups.get(key, [])
            if typed is not None and self.relative:
                values = [v.stayed_share for v in group if v.stayed_share is not None]
            elif typed is not None:
                values = [v.early_h for v in group if v.early_h is not None]
            else:
                values = [v.stay_h for v in group]
            if len(values) < self.min_visits:
                continue
            name = GROUP_NAMES[str(key[0])]
            if typed is not None and self.relative:
                early_share = float(np.mean([(v.early_h or 0.0) > EARLY_H for v in group
                                             if v.stayed_share is not None]))
                shares = np.quantile(values, quantiles)
                return [SafeDeparture(min(typed, max(arrival, arrival + float(f) * (typed - arrival))),
                                      name, len(values), early_share) for f in shares]
            if typed is not None:
                early = np.quantile(values, [1.0 - q for q in quantiles])
                share = float(np.mean(np.asarray(values) > EARLY_H))
                return [SafeDeparture(max(arrival, typed - timedelta(hours=float(e))), name,
                                      len(values), share) for e in early]
            stays = np.quantile(values, quantiles)
            return [SafeDeparture(arrival + timedelta(hours=float(s)), name, len(values))
                    for s in stays]
        return []
