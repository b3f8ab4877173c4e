"""Live day-ahead prices: ENTSO-E Transparency and EnergyZero, fetched, cached and published.

`DayAheadFeed` is the grid-signal source; a `PriceFetcher` is the one thing that differs per
market data provider (`EntsoeFetcher` through `entsoe-py`, `EnergyZeroFetcher` through
`energyzero`): `fetch(start, end)` returns (period start UTC, EUR/MWh) pairs, PT15M or PT60M,
negative prices as they are. The feed:

- publishes the prices cached in the store at once (a restart or an outage loses nothing), then
  fetches today and tomorrow;
- fetches tomorrow's prices from `prices.fetch_after` local market time (the SDAC auction
  publishes around 12:45-13:00 CET), and re-fetches every `refresh_s` for corrections;
- retries a failed fetch after `retry_s`, doubling up to `retry_max_s`;
- caches what it fetched (`Store.save_prices`) and publishes when the prices changed, so the
  loop replans when new prices arrive;
- when fetching fails and the last known prices no longer reach as far as a working feed's
  would (the end of tomorrow after `fetch_after`, else the end of today), it fills the rest of
  the horizon from the configured fallback: the CSV file, or the flat import price (as the
  day-ahead price that gives exactly `flat_import_eur_per_kwh` after markup, tax and VAT); and
  says so in `state()` and the log, never silently.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from cem.ports import PriceCurve, Publish, SignalUpdate, SourceState
from cem.site.config import PriceConfig, is_loopback
from sitekit import clock as process_clock
from sitekit.prices import PriceSource

logger = logging.getLogger("cem.signals")

Points = list[tuple[datetime, float]]


class FeedError(Exception):
    """A fetch failed; the message says what the provider answered."""


class PriceFetcher(Protocol):
    """One market data provider: wholesale day-ahead prices, EUR/MWh, per period start UTC."""

    name: str

    async def fetch(self, start: datetime, end: datetime) -> Points: ...


def resolution_of(points: Points) -> timedelta:
    """The price period: the smallest step between prices (an hour when there is one price)."""
    steps = [b[0] - a[0] for a, b in itertools.pairwise(points) if b[0] > a[0]]
    return min([*steps, timedelta(hours=1)])


def check_base_url(url: str) -> str:
    """An endpoint must be https, plain http only to loopback (tests, a local proxy)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return url
    raise ValueError(f"{url!r}: use https:// (plain http only to a loopback address)")


class EntsoeFetcher:
    """ENTSO-E Transparency (A44 day-ahead prices) through entsoe-py's pandas client.

    The client is synchronous (requests): it runs in a thread. Its endpoint is entsoe-py's own
    setting (`ENTSOE_ENDPOINT_URL`, the module's `URL`), set from `base_url` when given.
    """

    name = "entsoe"

    def __init__(self, token: str | None, bidding_zone: str, *, base_url: str | None = None,
                 timeout_s: float = 30.0, session: Any = None) -> None:
        key = token or os.environ.get("ENTSOE_API_KEY")
        if not key:
            raise ValueError("ENTSO-E needs a security token: set prices.entsoe.token or the "
                             "environment variable ENTSOE_API_KEY")
        self.token: str = key
        self.bidding_zone = bidding_zone
        self.base_url = check_base_url(base_url) if base_url else None
        self.timeout_s = timeout_s
        self.session = session

    async def fetch(self, start: datetime, end: datetime) -> Points:
        return await asyncio.to_thread(self._fetch, start, end)

    def _fetch(self, start: datetime, end: datetime) -> Points:
        import entsoe.entsoe as api
        import pandas as pd
        import requests
        from bs4 import XMLParsedAsHTMLWarning
        from entsoe import EntsoePandasClient
        from entsoe.exceptions import NoMatchingDataError

        if self.base_url is not None:
            api.URL = self.base_url
        client = EntsoePandasClient(api_key=self.token, session=self.session, retry_count=1,
                                    retry_delay=0,
                                    timeout=self.timeout_s)  # type: ignore[arg-type]  # requests takes floats
        try:
            with warnings.catch_warnings():  # its documents are read with an HTML parser
                warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)
                series = client.query_day_ahead_prices(
                    self.bidding_zone, start=pd.Timestamp(start), end=pd.Timestamp(end))
        except NoMatchingDataError:
            return []  # not published (yet)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise FeedError(f"ENTSO-E answered HTTP {status}"
                            + (" (is the security token right?)" if status == 401 else "")) \
                from None
        except requests.Timeout:
            raise FeedError(f"ENTSO-E did not answer within {self.timeout_s:g} s") from None
        except requests.RequestException as exc:
            raise FeedError(f"ENTSO-E unreachable: {type(exc).__name__}") from None
        except Exception as exc:  # a document the parser cannot read
            raise FeedError(f"ENTSO-E answer not understood: {type(exc).__name__}: {exc}") \
                from exc
        out = []
        for stamp, value in series.items():
            moment = stamp.to_pydatetime().astimezone(UTC)
            if start <= moment < end and not math.isnan(float(value)):
                out.append((moment, float(value)))
        return sorted(out)


class EnergyZeroFetcher:
    """EnergyZero (NL, no key) through the `energyzero` client; EUR/kWh excl. or incl. VAT.

    `session` is the client's own seam: an aiohttp ClientSession (a proxy, or in tests a
    resolver pointing api.energyzero.nl at loopback and a certificate to trust).
    """

    name = "energyzero"

    def __init__(self, *, vat: str = "excl", timeout_s: float = 30.0,
                 session_factory: Callable[[], Any] | None = None) -> None:
        self.vat = vat
        self.timeout_s = timeout_s
        self.session_factory = session_factory

    async def fetch(self, start: datetime, end: datetime) -> Points:
        from energyzero import EnergyZero, EnergyZeroConnectionError, EnergyZeroError
        from energyzero.const import PriceType

        session = self.session_factory() if self.session_factory is not None else None
        client = EnergyZero(request_timeout=self.timeout_s, session=session)
        try:
            # the client turns dates into UTC days with the machine's zone: ask a day more
            data = await client.get_electricity_prices(
                (start - timedelta(days=1)).date(), (end + timedelta(days=1)).date(),
                price_type=PriceType.MARKET)
        except EnergyZeroConnectionError as exc:
            raise FeedError(f"EnergyZero unreachable: {exc}") from None
        except EnergyZeroError as exc:
            if "No energy prices" in str(exc):
                return []
            raise FeedError(f"EnergyZero: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise FeedError(f"EnergyZero answer not understood: {type(exc).__name__}: {exc}") \
                from exc
        finally:
            if session is not None:
                await session.close()
            else:
                await client.close()
        out = []
        for block in data.raw_blocks:
            moment = block.time_range.start_including.astimezone(UTC)
            price = block.energy_price_incl if self.vat == "incl" else block.energy_price_excl
            if start <= moment < end:
                out.append((moment, float(price) * 1000.0))  # EUR/kWh -> EUR/MWh
        return sorted(out)


def fetcher_for(config: PriceConfig) -> PriceFetcher:
    """The fetcher of the configured feed (entsoe or energyzero)."""
    if config.source == "entsoe":
        e = config.entsoe
        return EntsoeFetcher(e.token, e.bidding_zone, base_url=e.base_url, timeout_s=e.timeout_s)
    if config.source == "energyzero":
        return EnergyZeroFetcher(vat=config.energyzero.vat)
    raise ValueError(f"no live feed for prices.feed = {config.source!r}")


class DayAheadFeed:
    """Live day-ahead prices as a grid-signal source (see the module docstring)."""

    def __init__(self, fetcher: PriceFetcher, config: PriceConfig, *, horizon: timedelta,
                 store: Any = None, fallback: PriceSource | None = None,
                 clock: Callable[[], datetime] = process_clock.now) -> None:
        self.fetcher = fetcher
        self.name = fetcher.name
        self.config = config
        self.horizon = horizon
        self.store = store
        self.fallback = fallback
        self.clock = clock
        self.market_tz = ZoneInfo(config.market_timezone)
        self.known: dict[datetime, float] = {}
        self.resolution = timedelta(hours=1)
        self.last_fetch: datetime | None = None      # last successful fetch
        self.last_error: str | None = None
        self.failing_since: datetime | None = None
        self.on_fallback: str | None = None          # why the fallback fills in, if it does
        self._published: tuple[tuple[datetime, float], ...] | None = None
        self._last_publish: datetime | None = None

    # --- what a working feed knows ----------------------------------------------------------

    def expected_end(self, now: datetime) -> datetime:
        """How far a working feed's prices reach at `now`: the end of tomorrow (local market
        day) from `fetch_after` on, else the end of today."""
        local = now.astimezone(self.market_tz)
        days = 2 if local.time() >= self.config.fetch_after else 1
        end_day = local.date() + timedelta(days=days)
        return datetime.combine(end_day, time(0), tzinfo=self.market_tz).astimezone(UTC)

    def known_end(self) -> datetime | None:
        return max(self.known) + self.resolution if self.known else None

    # --- fetching ---------------------------------------------------------------------------

    async def load_cache(self) -> int:
        """Take the cached prices from yesterday on; how many there were."""
        if self.store is None:
            return 0
        day = self.clock().astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        rows = await self.store.cached_prices(self.name, day - timedelta(days=1),
                                              day + timedelta(days=3))
        for start, price, resolution_s in rows:
            self.known[start] = price
            self.resolution = timedelta(seconds=resolution_s)
        return len(rows)

    async def fetch(self) -> bool:
        """Fetch yesterday to the end of tomorrow; True on success (even if nothing new)."""
        now = self.clock()
        local_day = datetime.combine(now.astimezone(self.market_tz).date(), time(0),
                                     tzinfo=self.market_tz)
        start = (local_day - timedelta(days=1)).astimezone(UTC)
        end = (local_day + timedelta(days=2)).astimezone(UTC)
        try:
            points = await self.fetcher.fetch(start, end)
        except Exception as exc:
            message = str(exc) if isinstance(exc, FeedError) else f"{type(exc).__name__}: {exc}"
            if self.last_error != message:
                logger.warning("prices from %s: fetch failed: %s", self.name, message)
            self.last_error = message
            self.failing_since = self.failing_since or now
            return False
        if self.failing_since is not None:
            logger.info("prices from %s: fetching works again", self.name)
        self.last_error = None
        self.failing_since = None
        self.last_fetch = now
        if points:
            self.resolution = resolution_of(points)
            fresh = {t: p for t, p in points if self.known.get(t) != p}
            self.known.update(points)
            if fresh and self.store is not None:
                await self.store.save_prices(self.name, sorted(fresh.items()),
                                             int(self.resolution.total_seconds()))
        return True

    # --- what is published ------------------------------------------------------------------

    def curve(self) -> PriceCurve:
        """Known prices, and the fallback after them when the feed fails short of the horizon."""
        now = self.clock()
        points = sorted(self.known.items())
        known_end = self.known_end()
        need_end = min(self.expected_end(now), now + self.horizon)
        self.on_fallback = None
        if self.last_error is not None and (known_end is None or known_end < need_end):
            fill_from = max(known_end or now, now - self.resolution)
            fill = self._fallback_points(fill_from, now + self.horizon)
            self.on_fallback = (
                f"{self.name} failing ({self.last_error}); prices known until "
                f"{known_end:%Y-%m-%d %H:%M} UTC" if known_end else
                f"{self.name} failing ({self.last_error}); no prices known")
            self.on_fallback += f"; from there on the {self.config.fallback} fallback"
            points += fill
        return PriceCurve(points=tuple(points), resolution=self.resolution, source=self.name)

    def _fallback_points(self, start: datetime, end: datetime) -> Points:
        step = self.resolution
        if self.config.fallback == "csv" and self.fallback is not None:
            return [(t, p) for t, p in self.fallback.day_ahead_eur_per_mwh(start, end)
                    if t >= start]
        # the flat all-in import price, as the day-ahead price that gives it after the tariff
        c = self.config
        equivalent = ((c.flat_import_eur_per_kwh / (1 + c.vat)) - c.markup_eur_per_kwh
                      - c.tax_eur_per_kwh) * 1000.0
        first = start.astimezone(UTC).replace(second=0, microsecond=0)
        count = max(0, math.ceil((end - first) / step))
        return [(first + i * step, equivalent) for i in range(count)]

    def update(self) -> SignalUpdate | None:
        """The update to publish when what the loop should plan on changed."""
        curve = self.curve()
        if curve.points == self._published:
            return None
        first = self._published is None
        self._published = curve.points
        self._last_publish = process_clock.now()
        if self.on_fallback:
            logger.warning("prices: %s", self.on_fallback)
            reason = f"day-ahead prices: {self.on_fallback}"
        elif first:
            reason = f"day-ahead prices from {self.name}"
        else:
            reason = "day-ahead prices changed"
        return SignalUpdate(source=self.name, reason=reason, prices=curve)

    def next_fetch_in(self, ok: bool, retry_s: float) -> float:
        """Seconds until the next fetch: a retry, tomorrow's publication, or a refresh."""
        if not ok:
            return retry_s
        now = self.clock()
        known_end = self.known_end()
        expected = self.expected_end(now)
        if known_end is not None and known_end < expected:
            return retry_s  # after the publication time and tomorrow not there yet
        local = now.astimezone(self.market_tz)
        publication = datetime.combine(local.date(), self.config.fetch_after,
                                       tzinfo=self.market_tz)
        if publication <= local:
            publication += timedelta(days=1)
        return max(1.0, min(self.config.refresh_s, (publication - local).total_seconds()))

    async def run(self, publish: Publish) -> None:
        try:
            await self.load_cache()
        except Exception:
            logger.exception("prices from %s: reading the cache failed", self.name)
        if self.known:
            update = self.update()
            if update is not None:
                publish(update)
        retry_s = self.config.retry_s
        while True:
            ok = await self.fetch()
            update = self.update()
            if update is not None:
                publish(update)
            await self._save_state()
            wait = self.next_fetch_in(ok, retry_s)
            retry_s = min(self.config.retry_max_s, retry_s * 2) if wait == retry_s \
                else self.config.retry_s
            await asyncio.sleep(wait)

    async def _save_state(self) -> None:
        if self.store is None:
            return
        state = self.state()
        try:
            await self.store.save_signal_state(state.name, state.kind, state.ok, state.detail,
                                               state.last_update, state.extra)
        except Exception:
            logger.debug("saving the state of %s failed", self.name, exc_info=True)

    def state(self) -> SourceState:
        known_end = self.known_end()
        reach = f"prices until {known_end:%Y-%m-%d %H:%M} UTC" if known_end else "no prices"
        if self.on_fallback:
            detail = self.on_fallback
        elif self.last_error:
            detail = f"{reach}; last fetch failed: {self.last_error} (still covering)"
        else:
            detail = reach
        return SourceState(
            name=self.name, kind="prices", ok=self.last_error is None and bool(self.known),
            detail=detail, last_update=self._last_publish,
            extra={"last_fetch": self.last_fetch, "failing_since": self.failing_since,
                   "known_until": known_end, "resolution_s": int(self.resolution.total_seconds()),
                   "fallback": self.config.fallback if self.on_fallback else None})
