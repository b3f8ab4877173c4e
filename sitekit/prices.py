"""Day-ahead price sources (EUR/MWh) and the retail formula, shared by the CEM and the RMs.

A `PriceSource` gives wholesale prices (EUR/MWh) for a time range; `wholesale_per_ptu` puts them
on a PTU grid; `cem.flex.prices` turns that into the planner's prices with the site's tariff:

- import = (day_ahead / 1000 + markup + tax) * (1 + vat)  (the all-in price a household pays);
- export: `day_ahead` -> day_ahead / 1000 (no tax, no VAT: feed-in revenue), `fixed` ->
  `feed_in_eur_per_kwh`, `none` -> 0;
- no price source at all -> import `flat_import_eur_per_kwh` (taken as all-in), export by the
  same feed-in rule (`day_ahead` then gives 0).

Negative prices are kept as they are (negative import prices pay the site to consume).
A PTU takes the price of the price period that contains its start (an hour splits into four
15-minute PTUs with the same price; 15-minute price data works the same way); a PTU longer than
the price period takes the mean of the periods inside it. A PTU whose
period is missing is an error naming the first missing time, unless `fill="previous"`, which
carries the last known price forward and says so in `PtuPrices.notes`.

Two sources share the interface: `CsvPriceSource` (the ENTSO-E CSV format
`start_utc,price_eur_per_mwh`) and `MockDayAheadFeed`, a stand-in for an internet day-ahead
feed (which cannot run here) that only publishes tomorrow's prices after the daily auction.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import io
import math
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable
from zoneinfo import ZoneInfo

import numpy as np


class PriceError(ValueError):
    """Prices cannot be produced for the horizon; the message says which file, line or time."""


@runtime_checkable
class PriceSource(Protocol):
    """Wholesale day-ahead prices, EUR/MWh, as (period start UTC, price) sorted by time."""

    resolution: timedelta

    def day_ahead_eur_per_mwh(self, start: datetime, end: datetime) -> list[tuple[datetime, float]]:
        """Every known price period that overlaps [start, end)."""
        ...


def _aware_utc(value: datetime, what: str) -> datetime:
    if value.tzinfo is None:
        raise PriceError(f"{what} {value.isoformat()} has no timezone; give UTC times")
    return value.astimezone(UTC)


class SeriesPriceSource:
    """A price source over a sorted, in-memory series of (period start UTC, EUR/MWh)."""

    def __init__(self, series: list[tuple[datetime, float]], resolution: timedelta | None = None) -> None:
        self._times = [t for t, _ in series]
        self._prices = [p for _, p in series]
        if resolution is None:
            gaps = [b - a for a, b in zip(self._times, self._times[1:], strict=False) if b > a]
            # hourly unless the data is finer (15-minute day-ahead prices): a gap is missing data
            resolution = min([*gaps, timedelta(hours=1)])
        self.resolution = resolution

    def day_ahead_eur_per_mwh(self, start: datetime, end: datetime) -> list[tuple[datetime, float]]:
        start = _aware_utc(start, "start")
        end = _aware_utc(end, "end")
        lo = bisect.bisect_right(self._times, start - self.resolution)
        hi = bisect.bisect_left(self._times, end)
        return list(zip(self._times[lo:hi], self._prices[lo:hi], strict=True))

    @property
    def first(self) -> datetime | None:
        return self._times[0] if self._times else None

    @property
    def last(self) -> datetime | None:
        return self._times[-1] if self._times else None


class CsvPriceSource(SeriesPriceSource):
    """Prices from a CSV with columns `start_utc,price_eur_per_mwh` (plain or .gz).

    Times are ISO 8601 with `Z` or an offset; duplicate times are an error (the file is wrong,
    and guessing which row is right would hide it).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise PriceError(f"{self.path}: price file not found")
        opener = gzip.open if self.path.suffix == ".gz" else open
        rows: dict[datetime, float] = {}
        with opener(self.path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
            reader = csv.DictReader(text)
            if not reader.fieldnames or not {"start_utc", "price_eur_per_mwh"} <= set(reader.fieldnames):
                raise PriceError(
                    f"{self.path}: expected columns start_utc,price_eur_per_mwh, got {reader.fieldnames}"
                )
            for line, row in enumerate(reader, start=2):
                where = f"{self.path}:{line}"
                try:
                    when = datetime.fromisoformat(row["start_utc"].strip().replace("Z", "+00:00"))
                except ValueError:
                    raise PriceError(f"{where}: {row['start_utc']!r} is not an ISO 8601 time") from None
                if when.tzinfo is None:
                    raise PriceError(f"{where}: {row['start_utc']!r} has no timezone (write ...Z)")
                try:
                    price = float(row["price_eur_per_mwh"])
                except (TypeError, ValueError):
                    raise PriceError(f"{where}: price {row['price_eur_per_mwh']!r} is not a number") from None
                if not math.isfinite(price):
                    raise PriceError(f"{where}: price {price} is not finite")
                when = when.astimezone(UTC)
                if when in rows:
                    raise PriceError(f"{where}: {when.isoformat()} is listed twice")
                rows[when] = price
        if not rows:
            raise PriceError(f"{self.path}: no prices in the file")
        super().__init__(sorted(rows.items()))


class MockDayAheadFeed(SeriesPriceSource):
    """A day-ahead feed as an internet API behaves, without the internet.

    Day D's prices become known when the day-ahead auction publishes them on day D-1 at
    `publish_at` (12:45 Europe/Amsterdam for EPEX NL). Asking for unpublished hours returns
    only what is published so far, like a real feed. Prices come from `series` (e.g. a CSV
    source's data) or, if none is given, from a synthetic daily shape (cheap nights, a morning
    and an evening peak, a negative dip on summer middays).
    """

    def __init__(
        self,
        now: datetime,
        series: Mapping[datetime, float] | None = None,
        *,
        publish_at: time = time(12, 45),
        market_tz: str = "Europe/Amsterdam",
    ) -> None:
        self.now = _aware_utc(now, "now")
        self.market_tz = ZoneInfo(market_tz)
        self.publish_at = publish_at
        self._synthetic = series is None
        super().__init__(sorted(series.items()) if series is not None else [], timedelta(hours=1))

    def published_until(self) -> datetime:
        """End (exclusive, UTC) of the prices known at `now`."""
        local = self.now.astimezone(self.market_tz)
        last_day = local.date() + timedelta(days=1 if local.time() >= self.publish_at else 0)
        end_local = datetime.combine(last_day + timedelta(days=1), time(0), tzinfo=self.market_tz)
        return end_local.astimezone(UTC)

    @staticmethod
    def synthetic_price(when: datetime) -> float:
        """A plausible Dutch day-ahead price in EUR/MWh for the hour starting at `when`."""
        local = when.astimezone(ZoneInfo("Europe/Amsterdam"))
        h = local.hour + local.minute / 60
        price = 60 + 35 * math.exp(-((h - 8) ** 2) / 4) + 55 * math.exp(-((h - 19) ** 2) / 5)
        price -= 40 * math.exp(-((h - 4) ** 2) / 6)
        if local.month in (4, 5, 6, 7, 8):
            price -= 110 * math.exp(-((h - 13.5) ** 2) / 3)
        return round(price, 2)

    def day_ahead_eur_per_mwh(self, start: datetime, end: datetime) -> list[tuple[datetime, float]]:
        end = min(_aware_utc(end, "end"), self.published_until())
        if not self._synthetic:
            return super().day_ahead_eur_per_mwh(start, end)
        hour = _aware_utc(start, "start").replace(minute=0, second=0, microsecond=0)
        out = []
        while hour < end:
            out.append((hour, self.synthetic_price(hour)))
            hour += timedelta(hours=1)
        return out


def wholesale_per_ptu(
    source: PriceSource,
    start: datetime,
    ptu_minutes: int,
    n_ptus: int,
    *,
    fill: Literal["error", "previous"] = "error",
) -> tuple[np.ndarray, list[str]]:
    """Day-ahead EUR/MWh per PTU: the price period containing the PTU's start, or the mean of the
    periods inside it when prices are finer than the PTU (15-minute prices, hourly PTUs)."""
    start = _aware_utc(start, "start")
    ptu = timedelta(minutes=ptu_minutes)
    end = start + n_ptus * ptu
    series = source.day_ahead_eur_per_mwh(start, end)
    times = [t for t, _ in series]
    out = np.empty(n_ptus, dtype=float)
    notes: list[str] = []
    missing: list[datetime] = []
    last: float | None = None
    if times and times[0] <= start:
        last = series[0][1]
    steps = max(1, int(ptu // source.resolution)) if source.resolution < ptu else 1

    def price_at(moment: datetime) -> float | None:
        k = bisect.bisect_right(times, moment) - 1
        if k >= 0 and moment < times[k] + source.resolution:
            return series[k][1]
        return None

    for i in range(n_ptus):
        moment = start + i * ptu
        found = [price_at(moment + j * source.resolution) for j in range(steps)]
        prices = [p for p in found if p is not None]
        if len(prices) == len(found):
            out[i] = last = float(np.mean(prices))
            continue
        missing.append(moment)
        if fill == "previous" and last is not None:
            out[i] = last
        elif fill == "previous" and series:
            out[i] = last = series[0][1]
        else:
            out[i] = np.nan
    if missing:
        first = missing[0].isoformat().replace("+00:00", "Z")
        if fill == "error" or not series:
            first_known = times[0] if times else getattr(source, "first", None)
            last_known = times[-1] if times else getattr(source, "last", None)
            known = (f"prices known from {first_known.isoformat()} to "
                     f"{(last_known + source.resolution).isoformat()}"
                     if first_known and last_known else "the source has no prices for it")
            raise PriceError(
                f"no day-ahead price for {len(missing)} PTU(s) of the horizon, first at {first} "
                f"({known}); shorten the horizon or use fill='previous'"
            )
        notes.append(f"{len(missing)} PTU(s) without a day-ahead price (first {first}): "
                     "the previous known price is carried forward")
    return out, notes




def retail_import_eur_per_kwh(day_ahead_eur_per_mwh: Any, *, markup_eur_per_kwh: float,
                              tax_eur_per_kwh: float, vat: float) -> Any:
    """The all-in import price, EUR/kWh: (day-ahead / 1000 + markup + tax) x (1 + VAT).

    For one price (float) or many (numpy array), the same type back.
    """
    return (day_ahead_eur_per_mwh / 1000.0 + markup_eur_per_kwh + tax_eur_per_kwh) * (1 + vat)
