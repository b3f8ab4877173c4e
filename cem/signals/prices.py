"""Day-ahead prices as a grid-signal source: any `sitekit.prices.PriceSource` (the CSV file, a
simulated feed), read around now and re-read every `poll_s` seconds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cem.ports import PriceCurve, Publish, SignalUpdate, SourceState
from sitekit import clock as process_clock
from sitekit.prices import PriceSource

logger = logging.getLogger("cem.signals")


def utc_day(moment: datetime) -> datetime:
    """Midnight UTC of the day holding `moment`."""
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def price_update(source: PriceSource, start: datetime, end: datetime, *, name: str,
                 reason: str | None = None) -> SignalUpdate:
    """What `source` knows of [start, end) as one update (e.g. a simulation's whole run)."""
    points = tuple(source.day_ahead_eur_per_mwh(start, end))
    return SignalUpdate(source=name, reason=reason or f"day-ahead prices from {name}",
                        prices=PriceCurve(points=points, resolution=source.resolution,
                                          source=name))


class PriceFeed:
    """A `PriceSource` as a grid-signal source.

    Publishes the prices from the start of yesterday (UTC) to `ahead` after today at once, then
    re-reads every `poll_s` seconds and publishes again when they changed ("day-ahead prices
    changed"). The control loop replans only when the prices of its horizon changed.
    """

    def __init__(self, source: PriceSource, *, name: str = "csv", poll_s: float = 300.0,
                 ahead: timedelta = timedelta(days=5),
                 clock: Callable[[], datetime] = process_clock.now) -> None:
        self.name = name
        self.source = source
        self.poll_s = poll_s
        self.ahead = ahead
        self.clock = clock
        self._points: tuple[tuple[datetime, float], ...] | None = None
        self._error: str | None = None
        self._last: datetime | None = None

    def read(self) -> SignalUpdate | None:
        """The update to publish: the first read, or prices that changed since the last."""
        day = utc_day(self.clock())
        fresh = price_update(self.source, day - timedelta(days=1), day + self.ahead,
                             name=self.name)
        assert fresh.prices is not None
        if fresh.prices.points == self._points:
            return None
        first = self._points is None
        self._points = fresh.prices.points
        self._last = process_clock.now()
        if first:
            return fresh
        return SignalUpdate(source=self.name, reason="day-ahead prices changed",
                            prices=fresh.prices)

    async def run(self, publish: Publish) -> None:
        while True:
            try:
                update = self.read()
                self._error = None
            except Exception as exc:  # a feed that fails says so and tries again
                if self._error is None:
                    logger.warning("prices from %s: %s", self.name, exc)
                self._error = f"{type(exc).__name__}: {exc}"
                update = None
            if update is not None:
                publish(update)
            await asyncio.sleep(self.poll_s)

    def state(self) -> SourceState:
        points = self._points or ()
        if self._error is not None:
            detail = self._error
        elif points:
            end = points[-1][0] + self.source.resolution
            detail = (f"{len(points)} price(s) from {points[0][0]:%Y-%m-%d %H:%M} to "
                      f"{end:%Y-%m-%d %H:%M} UTC")
        else:
            detail = "no prices around now"
        return SourceState(name=self.name, kind="prices", ok=self._error is None and bool(points),
                           detail=detail, last_update=self._last)
