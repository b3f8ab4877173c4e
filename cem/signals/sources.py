"""The grid-signal sources a site config asks for."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from cem.ports import GridSignalSource
from cem.signals.congestion import ConfigCongestion, StoreCongestion
from cem.signals.prices import PriceFeed
from cem.site.config import SiteConfig
from sitekit import clock as process_clock


def configured_sources(config: SiteConfig, store: Any = None, *,
                       clock: Callable[[], datetime] = process_clock.now,
                       congestion_poll_s: float = 5.0,
                       price_poll_s: float = 300.0) -> list[GridSignalSource]:
    """Prices first (the loop plans on the first source that has prices), then limits."""
    sources: list[GridSignalSource] = []
    horizon = timedelta(minutes=config.planner.ptu_minutes * config.planner.horizon_ptus)
    csv = None
    if config.prices.csv is not None:
        from sitekit.prices import CsvPriceSource

        csv = CsvPriceSource(config.prices.csv)
    if config.prices.source == "csv" and csv is not None:
        sources.append(PriceFeed(csv, name="csv", poll_s=price_poll_s,
                                 ahead=horizon + timedelta(days=1), clock=clock))
    elif config.prices.source in ("entsoe", "energyzero"):
        from cem.signals.dayahead import DayAheadFeed, fetcher_for

        sources.append(DayAheadFeed(fetcher_for(config.prices), config.prices, horizon=horizon,
                                    store=store, fallback=csv, clock=clock))
    if config.congestion:
        sources.append(ConfigCongestion(config.congestion))
    if store is not None:
        sources.append(StoreCongestion(store, poll_s=congestion_poll_s, clock=clock))
    if config.openadr is not None:
        from cem.signals.openadr import OpenAdrVen

        sources.append(OpenAdrVen(config.openadr, store=store,
                                  horizon=max(horizon, timedelta(days=1)), clock=clock))
    return sources
