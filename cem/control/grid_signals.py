"""What the control loop knows from its grid-signal sources (`cem.ports.GridSignalSource`).

`SignalBoard` keeps the latest `SignalUpdate` of each source (an update replaces what that
source said before) and makes the plan's inputs from them: the congestion limits of every
source together, and per-PTU prices from the first source (in the order the sources were given)
that has prices, with the site's tariff applied; no prices at all: the flat import price.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cem.flex.prices import PtuPrices, ptu_prices, tariff_prices
from cem.planner.assets import Prices
from cem.ports import CongestionLimit, PriceCurve, SignalUpdate
from cem.site.config import SiteConfig
from sitekit.prices import PriceError, SeriesPriceSource

logger = logging.getLogger("cem.control")


def curve_ptu_prices(curve: PriceCurve | None, config: SiteConfig, start: datetime,
                     n_ptus: int) -> PtuPrices:
    """Per-PTU planner prices from a curve and the site's tariff; the flat price without one.

    A PTU the curve does not reach takes the last known price (and `notes` says so)."""
    if curve is None or not curve.points:
        return ptu_prices(None, config.prices, start, config.planner.ptu_minutes, n_ptus)
    source = SeriesPriceSource(list(curve.points), curve.resolution)
    return ptu_prices(source, config.prices, start, config.planner.ptu_minutes,
                      n_ptus, fill="previous")


class SignalBoard:
    """The latest update of each source; the limits and prices the plan uses."""

    def __init__(self, config: SiteConfig, order: Sequence[str] = ()) -> None:
        self.config = config
        self.order = list(order)
        self.updates: dict[str, SignalUpdate] = {}
        self.congestion: list[CongestionLimit] = []
        self._cache: tuple[datetime, int, Prices] | None = None

    def take(self, update: SignalUpdate) -> tuple[bool, bool]:
        """Keep `update`; returns (the congestion limits changed, the prices were replaced)."""
        self.updates[update.source] = update
        congestion_changed = False
        if update.congestion is not None:
            before = self._key(self.congestion)
            self.congestion = [w for u in self._ordered() if u.congestion for w in u.congestion]
            congestion_changed = self._key(self.congestion) != before
        if update.prices is not None:
            self._cache = None
        return congestion_changed, update.prices is not None

    @staticmethod
    def _key(limits: list[CongestionLimit]) -> list[tuple[Any, ...]]:
        return sorted((w.source, w.ref or "", w.start, w.end, w.import_limit_kw or -1.0,
                       w.export_limit_kw or -1.0) for w in limits)

    def _ordered(self) -> list[SignalUpdate]:
        rank = {name: i for i, name in enumerate(self.order)}
        return sorted(self.updates.values(), key=lambda u: rank.get(u.source, len(rank)))

    def price_curve(self) -> PriceCurve | None:
        """The curve the plan uses: the first source (in order) that published prices."""
        for update in self._ordered():
            if update.prices is not None and update.prices.points:
                return update.prices
        return None

    def prices(self, start: datetime, n_ptus: int, *, use_cache: bool = True) -> Prices:
        """Planner prices for `n_ptus` PTUs from `start`."""
        if use_cache and self._cache is not None and self._cache[:2] == (start, n_ptus):
            return self._cache[2]
        try:
            prices = curve_ptu_prices(self.price_curve(), self.config, start, n_ptus).prices
        except PriceError as exc:
            logger.warning("prices: %s; planning with the flat import price", exc)
            prices = tariff_prices(None, self.config.prices, n_ptus)
        self._cache = (start, n_ptus, prices)
        return prices
