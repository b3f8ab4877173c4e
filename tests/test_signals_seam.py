"""Grid signals beside the control loop: any `GridSignalSource` plugs into `SiteController`.

A source written here in a few lines (as a new feed would be) publishes limits and prices; the
loop plans on them and says why it replanned. The config's and the store's windows are sources
too, each limit carrying where it came from.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_control_loop import EvRm, FakeRegistry, config, until

from cem.control.mpc import SiteController
from cem.ports import CongestionLimit, PriceCurve, Publish, SignalUpdate, SourceState
from cem.signals import ConfigCongestion, StoreCongestion, configured_sources
from cem.site.config import SiteConfig
from cem.store import Store


class GridOperatorFeed:
    """A new feed: one class implementing GridSignalSource, changeable by the test."""

    name = "operator"

    def __init__(self) -> None:
        self.publish: Publish | None = None

    async def run(self, publish: Publish) -> None:
        self.publish = publish
        publish(SignalUpdate(source=self.name, reason="operator: no limits", congestion=()))
        await asyncio.Event().wait()

    def state(self) -> SourceState:
        return SourceState(name=self.name, kind="congestion")


async def test_a_new_source_class_limits_the_plan_and_gives_its_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cem.control")
    registry = FakeRegistry()
    feed = GridOperatorFeed()
    controller = SiteController(config(), registry, None, solver=None, signals=[feed])
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    try:
        ev = EvRm(registry, "ev-1")
        await until(lambda: ev.instructions() and controller.problem is not None)
        assert ev.power_of(ev.instructions()[-1]) == 22080
        start = controller.problem.start
        assert feed.publish is not None
        feed.publish(SignalUpdate(source="operator", reason="operator limit 7 kW", congestion=(
            CongestionLimit(start, start + timedelta(hours=2), import_limit_kw=7.0,
                            source="operator", ref="event-1"),)))
        await until(lambda: any("replan: operator limit 7 kW" in r.getMessage()
                                for r in caplog.records))
        await until(lambda: ev.power_of(ev.instructions()[-1]) <= 7000)
        assert controller.problem.limits.import_limit_w[0] <= 7000
        assert [(w.source, w.ref) for w in controller.congestion] == [("operator", "event-1")]
        # the same limits again: nothing to replan for
        before = controller.replans
        feed.publish(SignalUpdate(source="operator", reason="operator again",
                                  congestion=tuple(controller.congestion)))
        await asyncio.sleep(0.3)
        assert controller.replans == before
        assert not any("operator again" in r.getMessage() for r in caplog.records)
    finally:
        stop.set()
        await task


async def test_prices_published_by_a_driver_are_planned_on() -> None:
    """The twin publishes a whole run's prices itself; the plan takes them per PTU."""
    registry = FakeRegistry()
    controller = SiteController(config(), registry, None, solver=None)
    start = datetime(2026, 3, 2, 10, tzinfo=UTC)
    points = tuple((start + timedelta(hours=h), 40.0 * h - 100) for h in range(6))
    controller.publish(SignalUpdate(source="twin", reason="prices", prices=PriceCurve(
        points=points, resolution=timedelta(hours=1), source="twin")))
    prices = controller.board.prices(start, 8)
    # 4 PTUs of -100 EUR/MWh (negative: kept), then 4 of -60
    assert list(prices.import_eur_per_kwh) == [-0.1] * 4 + [-0.06] * 4


async def test_config_and_store_windows_carry_their_source(tmp_path: Path) -> None:
    site = SiteConfig.model_validate({"congestion": [
        {"start": "2026-11-23T17:00:00+01:00", "end": "2026-11-23T19:00:00+01:00",
         "import_limit_kw": 9}]})
    store = await Store.open(tmp_path / "cem.db")
    try:
        window_id = await store.add_congestion(datetime(2026, 11, 23, 18, tzinfo=UTC),
                                               datetime(2026, 11, 23, 20, tzinfo=UTC), 5.0)
        sources = configured_sources(site, store, clock=lambda: datetime(2026, 11, 23, tzinfo=UTC))
        assert [s.name for s in sources] == ["config", "cli"]
        got: list[SignalUpdate] = []
        tasks = [asyncio.create_task(s.run(got.append)) for s in sources]
        await until(lambda: len(got) == 2)
        for t in tasks:
            t.cancel()
        by_source = {u.source: u for u in got}
        (config_window,) = by_source["config"].congestion or ()
        assert (config_window.start, config_window.import_limit_kw, config_window.ref) == (
            datetime(2026, 11, 23, 16, tzinfo=UTC), 9, "congestion[0]")
        (cli_window,) = by_source["cli"].congestion or ()
        assert (cli_window.source, cli_window.ref, cli_window.import_limit_kw) == (
            "cli", str(window_id), 5.0)
        assert by_source["cli"].reason == "1 congestion window(s) in the store"
        store_source = sources[1]
        assert isinstance(store_source, StoreCongestion) and store_source.state().ok
        assert isinstance(sources[0], ConfigCongestion)
        assert sources[0].state().detail == "1 window(s) in the config"
    finally:
        await store.close()
