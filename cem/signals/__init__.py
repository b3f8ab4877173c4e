"""Grid-signal sources beside the control loop: day-ahead prices and congestion limits.

Each source implements `cem.ports.GridSignalSource`: `run(publish)` publishes what it knows at
once (a `SignalUpdate` with its `CongestionLimit`s and/or its `PriceCurve`), then every change,
until cancelled, and handles its own retries; `state()` says how it is doing. The control loop
(`cem.control.mpc.SiteController(..., signals=[...])`) keeps the latest update of each source,
builds the plan's limits and prices from them and replans with the update's reason.

Sources here:

- `ConfigCongestion` (source "config"): the site config's `[[congestion]]` windows;
- `StoreCongestion` (source "cli"): the store's congestion table (`cem congestion add`), polled;
- `PriceFeed` (source "csv", ...): any `sitekit.prices.PriceSource` (the CSV file), re-read;
- `DayAheadFeed` (source "entsoe" / "energyzero", `cem.signals.dayahead`): live day-ahead
  prices, cached in the store, with retries and a stated fallback;
- `OpenAdrVen` (source "openadr", `cem.signals.openadr`): a grid operator's capacity limits
  over OpenADR 3 (GAC), with safe mode when the VTN is gone.

`configured_sources(config, store)` builds the ones a site config asks for.

A new grid signal (a price feed, a grid operator's protocol) is one new class in this package
implementing `GridSignalSource`, and one line in `configured_sources`: nothing else changes.
"""

from cem.signals.congestion import ConfigCongestion, StoreCongestion
from cem.signals.prices import PriceFeed, price_update
from cem.signals.sources import configured_sources

__all__ = ["ConfigCongestion", "PriceFeed", "StoreCongestion", "configured_sources",
           "price_update"]
