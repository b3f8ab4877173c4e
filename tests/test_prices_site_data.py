"""Day-ahead CSV -> PTU prices (markup, tax, VAT, feed-in, negative prices, gaps), the mock
feed, congestion windows -> SiteLimits, PV and base-load forecasts, ACN session loading."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from cem.data import PRICES_2019_10, PRICES_2023_07, PV_2019_10, acn_file, bundled
from cem.flex.limits import limits_from_grid, site_limits
from cem.flex.prices import prices_from_config, ptu_prices
from cem.site.config import CongestionWindow, GridConfig, PriceConfig, parse_site_config
from cem.site.forecast import ForecastError, base_load_w, load_pv_per_kwp, pv_forecast_w
from cem.site.sessions import (
    SessionFileError,
    bundled_acn_sessions,
    load_acn_sessions,
    on_local_clock,
)
from sitekit.prices import CsvPriceSource, MockDayAheadFeed, PriceError, PriceSource

T0 = datetime(2023, 7, 2, 10, tzinfo=UTC)


def _csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "prices.csv"
    path.write_text("start_utc,price_eur_per_mwh\n" + "\n".join(rows) + "\n")
    return path


def test_hourly_prices_become_four_ptus_with_markup_tax_and_vat(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["2026-11-23T00:00:00Z,100", "2026-11-23T01:00:00Z,-20.5"])
    rules = PriceConfig(markup_eur_per_kwh=0.02, tax_eur_per_kwh=0.10, vat=0.21)
    out = ptu_prices(CsvPriceSource(path), rules, datetime(2026, 11, 23, tzinfo=UTC), 15, 8)
    np.testing.assert_allclose(out.prices.import_eur_per_kwh[:4], (0.1 + 0.12) * 1.21)
    np.testing.assert_allclose(out.prices.import_eur_per_kwh[4:], (-0.0205 + 0.12) * 1.21)
    np.testing.assert_allclose(out.prices.export_eur_per_kwh, [0.1] * 4 + [-0.0205] * 4)  # no tax/VAT
    assert out.notes == []


def test_feed_in_rules_and_flat_tariff(tmp_path: Path) -> None:
    source = CsvPriceSource(_csv(tmp_path, ["2026-11-23T00:00:00Z,80"]))
    start = datetime(2026, 11, 23, tzinfo=UTC)
    fixed = ptu_prices(source, PriceConfig(feed_in="fixed", feed_in_eur_per_kwh=0.07), start, 15, 4)
    assert list(fixed.prices.export_eur_per_kwh) == [0.07] * 4
    none = ptu_prices(source, PriceConfig(feed_in="none"), start, 15, 4)
    assert list(none.prices.export_eur_per_kwh) == [0.0] * 4
    flat = prices_from_config(PriceConfig(flat_import_eur_per_kwh=0.3), start, 15, 4)
    assert list(flat.prices.import_eur_per_kwh) == [0.3] * 4


def test_bundled_july_2023_has_negative_prices_that_stay_negative() -> None:
    source = CsvPriceSource(bundled(PRICES_2023_07))
    out = ptu_prices(source, PriceConfig(), T0, 15, 16)
    assert out.prices.import_eur_per_kwh.min() == pytest.approx(-0.5)  # -500 EUR/MWh
    assert isinstance(source, PriceSource)


def test_missing_hour_is_an_error_naming_it_or_filled_on_request(tmp_path: Path) -> None:
    source = CsvPriceSource(_csv(tmp_path, ["2026-11-23T00:00:00Z,50", "2026-11-23T02:00:00Z,70"]))
    start = datetime(2026, 11, 23, tzinfo=UTC)
    with pytest.raises(PriceError, match=r"4 PTU\(s\).*first at 2026-11-23T01:00:00Z"):
        ptu_prices(source, PriceConfig(), start, 15, 12)
    filled = ptu_prices(source, PriceConfig(), start, 15, 12, fill="previous")
    assert list(filled.day_ahead_eur_per_kwh) == [0.05] * 8 + [0.07] * 4
    assert "carried forward" in filled.notes[0]
    with pytest.raises(PriceError, match="known from"):
        ptu_prices(source, PriceConfig(), start + timedelta(days=2), 15, 4)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["2026-11-23T00:00:00Z,abc"], r"prices.csv:2: price 'abc' is not a number"),
        (["2026-11-23 00:00,50"], "has no timezone"),
        (["2026-11-23T00:00:00Z,50", "2026-11-23T00:00:00Z,51"], "listed twice"),
    ],
)
def test_bad_price_files_name_the_line(tmp_path: Path, rows: list[str], message: str) -> None:
    with pytest.raises(PriceError, match=message):
        CsvPriceSource(_csv(tmp_path, rows))


def test_price_file_not_found_and_wrong_columns(tmp_path: Path) -> None:
    with pytest.raises(PriceError, match="not found"):
        CsvPriceSource(tmp_path / "none.csv")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("time,price\n2026-11-23T00:00:00Z,1\n")
    with pytest.raises(PriceError, match="expected columns"):
        CsvPriceSource(wrong)


def test_mock_feed_publishes_tomorrow_only_after_the_auction() -> None:
    series = dict(CsvPriceSource(bundled(PRICES_2019_10)).day_ahead_eur_per_mwh(
        datetime(2019, 10, 1, tzinfo=UTC), datetime(2019, 10, 10, tzinfo=UTC)))
    morning = MockDayAheadFeed(datetime(2019, 10, 3, 8, tzinfo=UTC), series)  # 10:00 local
    afternoon = MockDayAheadFeed(datetime(2019, 10, 3, 12, tzinfo=UTC), series)  # 14:00 local
    assert morning.published_until() == datetime(2019, 10, 3, 22, tzinfo=UTC)
    assert afternoon.published_until() == datetime(2019, 10, 4, 22, tzinfo=UTC)
    start = datetime(2019, 10, 3, 12, tzinfo=UTC)
    with pytest.raises(PriceError, match="first at 2019-10-03T22:00:00Z"):
        ptu_prices(morning, PriceConfig(), start, 15, 96)
    same = ptu_prices(afternoon, PriceConfig(), start, 15, 96)
    csv_prices = ptu_prices(CsvPriceSource(bundled(PRICES_2019_10)), PriceConfig(), start, 15, 96)
    np.testing.assert_allclose(same.prices.import_eur_per_kwh, csv_prices.prices.import_eur_per_kwh)
    synthetic = MockDayAheadFeed(datetime(2023, 7, 1, 12, tzinfo=UTC))
    summer = ptu_prices(synthetic, PriceConfig(), datetime(2023, 7, 1, 22, tzinfo=UTC), 60, 24)
    assert summer.prices.import_eur_per_kwh.min() < 0 < summer.prices.import_eur_per_kwh.max()


def test_congestion_windows_lower_the_limit_in_every_ptu_they_touch() -> None:
    grid = GridConfig(fuse_a=40, import_limit_kw=25, export_limit_kw=10, peak_so_far_kw=7.5)
    start = datetime(2026, 11, 23, 15, tzinfo=UTC)
    windows = [
        CongestionWindow(start=datetime(2026, 11, 23, 16, 5, tzinfo=UTC),
                         end=datetime(2026, 11, 23, 16, 30, tzinfo=UTC), import_limit_kw=12),
        CongestionWindow(start=datetime(2026, 11, 23, 16, 15, tzinfo=UTC),
                         end=datetime(2026, 11, 23, 17, 0, tzinfo=UTC), import_limit_kw=8,
                         export_limit_kw=2),
        CongestionWindow(start=datetime(2026, 11, 23, 10, tzinfo=UTC),
                         end=datetime(2026, 11, 23, 11, tzinfo=UTC), import_limit_kw=1),  # before
        CongestionWindow(start=datetime(2026, 11, 23, 17, 30, tzinfo=UTC),
                         end=datetime(2026, 11, 24, 0, tzinfo=UTC), import_limit_kw=30),  # above GTV
    ]
    limits = limits_from_grid(grid, windows, start, 15, 12)
    assert list(limits.import_limit_w) == [25000] * 4 + [12000] + [8000] * 3 + [25000] * 4
    assert list(limits.export_limit_w) == [10000] * 5 + [2000] * 3 + [10000] * 4
    assert (limits.fuse_a, limits.phases, limits.peak_so_far_w) == (40, 3, 7500)


def test_site_limits_from_a_site_config() -> None:
    config = parse_site_config(
        '[grid]\nfuse_a = 35\nimport_limit_kw = 24\n[planner]\nptu_minutes = 15\nhorizon_ptus = 8\n'
        '[[congestion]]\nstart = 2026-11-23T17:00:00+01:00\nend = 2026-11-23T18:00:00+01:00\n'
        'import_limit_kw = 10\n'
    )
    limits = site_limits(config, datetime(2026, 11, 23, 15, 30, tzinfo=UTC))
    assert list(limits.import_limit_w) == [24000] * 2 + [10000] * 4 + [24000] * 2


def test_pv_forecast_scales_per_kwp_profile() -> None:
    per_kwp = load_pv_per_kwp(bundled(PV_2019_10))
    noon = datetime(2019, 10, 10, 11, tzinfo=UTC)
    pv = pv_forecast_w(per_kwp, 10.0, noon, 15, 8)
    assert list(pv[:4]) == [round(per_kwp[noon] * 10000)] * 4
    assert pv.min() >= 0
    night = pv_forecast_w(per_kwp, 10.0, datetime(2019, 10, 10, 1, tzinfo=UTC), 15, 4)
    assert list(night) == [0, 0, 0, 0]
    with pytest.raises(ForecastError, match="2019-11-01"):
        pv_forecast_w(per_kwp, 10.0, datetime(2019, 10, 31, 23, tzinfo=UTC), 15, 8)


def test_base_load_profile_keeps_the_annual_energy() -> None:
    start = datetime(2026, 11, 23, tzinfo=UTC)  # a Monday
    week = base_load_w(3500, start, 15, 96 * 7)
    assert week.sum() * 0.25 / 1000 * 52.14 == pytest.approx(3500, rel=0.02)
    office = base_load_w(8760, start, 15, 96, profile="office")
    assert office[12 * 4] > 2 * office[2 * 4]  # 13:00 local well above 03:00


def test_acn_sessions_load_and_move_to_a_dutch_day(tmp_path: Path) -> None:
    caltech = load_acn_sessions(acn_file("caltech"))
    both = bundled_acn_sessions()
    assert 500 < len(caltech) < len(both)
    s = caltech[0]
    assert s.arrival.tzinfo is not None and s.departure > s.arrival
    assert s.energy_kwh > 0
    moved = on_local_clock([s], date(2026, 11, 23))[0]
    assert moved.arrival.tzinfo == UTC
    local = moved.arrival.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Amsterdam"))
    assert (local.date(), local.hour, local.minute) == (date(2026, 11, 23), s.arrival.hour, s.arrival.minute)
    assert moved.departure - moved.arrival == s.departure - s.arrival
    bad = tmp_path / "s.csv"
    bad.write_text("arrival,departure\n")
    with pytest.raises(SessionFileError, match="missing column"):
        load_acn_sessions(bad)


def test_quarter_hour_prices_and_hourly_ptus(tmp_path: Path) -> None:
    rows = [f"2026-11-23T00:{m:02d}:00Z,{10 * (i + 1)}" for i, m in enumerate((0, 15, 30, 45))]
    source = CsvPriceSource(_csv(tmp_path, rows))
    assert source.resolution == timedelta(minutes=15)
    start = datetime(2026, 11, 23, tzinfo=UTC)
    out = ptu_prices(source, PriceConfig(), start, 15, 4)
    assert list(out.day_ahead_eur_per_kwh) == [0.01, 0.02, 0.03, 0.04]
    with pytest.raises(PriceError, match="first at 2026-11-23T01:00:00Z"):
        ptu_prices(source, PriceConfig(), start, 15, 5)
    mean = ptu_prices(source, PriceConfig(), start, 60, 1)  # an hourly PTU: the mean of its quarters
    assert mean.day_ahead_eur_per_kwh[0] == pytest.approx(0.025)
    hourly = ptu_prices(CsvPriceSource(bundled(PRICES_2019_10)), PriceConfig(), datetime(2019, 10, 5, tzinfo=UTC), 60, 3)
    assert len(hourly.prices.import_eur_per_kwh) == 3
