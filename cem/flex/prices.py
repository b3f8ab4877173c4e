"""Site tariff on top of day-ahead prices -> the planner's per-PTU import and export prices.

- import = (day_ahead / 1000 + markup + tax) * (1 + vat)  (`sitekit.prices.retail_import_eur_per_kwh`);
- export: `day_ahead` -> day_ahead / 1000 (no tax, no VAT: feed-in revenue), `fixed` ->
  `feed_in_eur_per_kwh`, `none` -> 0;
- no price source at all -> import `flat_import_eur_per_kwh` (taken as all-in), export by the
  same feed-in rule (`day_ahead` then gives 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np

from cem.planner.assets import Prices
from cem.site.config import PriceConfig
from sitekit.prices import CsvPriceSource, PriceSource, retail_import_eur_per_kwh, wholesale_per_ptu


@dataclass
class PtuPrices:
    """Per-PTU prices and what was done to get them."""

    prices: Prices
    day_ahead_eur_per_kwh: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def tariff_prices(day_ahead_eur_per_mwh: np.ndarray | None, config: PriceConfig, n_ptus: int) -> Prices:
    """Apply markup, tax, VAT and the feed-in rule to wholesale prices (or to the flat tariff)."""
    if day_ahead_eur_per_mwh is None:
        import_price = np.full(n_ptus, config.flat_import_eur_per_kwh, dtype=float)
        wholesale = np.zeros(n_ptus, dtype=float)
    else:
        wholesale = np.asarray(day_ahead_eur_per_mwh, dtype=float) / 1000.0
        import_price = retail_import_eur_per_kwh(
            np.asarray(day_ahead_eur_per_mwh, dtype=float), markup_eur_per_kwh=config.markup_eur_per_kwh,
            tax_eur_per_kwh=config.tax_eur_per_kwh, vat=config.vat)
    if config.feed_in == "day_ahead":
        export_price = wholesale.copy()
    elif config.feed_in == "fixed":
        export_price = np.full(n_ptus, config.feed_in_eur_per_kwh, dtype=float)
    else:
        export_price = np.zeros(n_ptus, dtype=float)
    return Prices(import_eur_per_kwh=import_price, export_eur_per_kwh=export_price)


def ptu_prices(
    source: PriceSource | None,
    config: PriceConfig,
    start: datetime,
    ptu_minutes: int,
    n_ptus: int,
    *,
    fill: Literal["error", "previous"] = "error",
) -> PtuPrices:
    """Per-PTU import/export prices for the horizon from a source and the tariff rules."""
    if source is None:
        return PtuPrices(tariff_prices(None, config, n_ptus),
                         notes=[f"no price source: flat import price {config.flat_import_eur_per_kwh} EUR/kWh"])
    wholesale, notes = wholesale_per_ptu(source, start, ptu_minutes, n_ptus, fill=fill)
    return PtuPrices(tariff_prices(wholesale, config, n_ptus), wholesale / 1000.0, notes)


def prices_from_config(
    config: PriceConfig, start: datetime, ptu_minutes: int, n_ptus: int,
    *, fill: Literal["error", "previous"] = "error",
) -> PtuPrices:
    """Prices for a site config: its CSV if set, else the flat tariff."""
    source = CsvPriceSource(config.csv) if config.csv is not None else None
    return ptu_prices(source, config, start, ptu_minutes, n_ptus, fill=fill)
