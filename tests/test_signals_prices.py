"""Live day-ahead prices: entsoe-py's and energyzero's real clients against loopback servers
replaying recorded answers, the feed's cache, retries and fallback, and the loop's replan."""

from __future__ import annotations

import asyncio
import itertools
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from signal_servers import (
    TOKEN,
    EnergyZeroServer,
    EntsoeServer,
    LoopbackResolver,
    certificate_for,
    serve,
    trusting,
)
from test_control_loop import EvRm, FakeRegistry, until

from cem.control.mpc import SiteController
from cem.ports import SignalUpdate
from cem.signals.dayahead import DayAheadFeed, EnergyZeroFetcher, EntsoeFetcher, FeedError
from cem.site.config import PriceConfig, SiteConfig
from cem.store import Store

DAY = datetime(2026, 3, 9, 23, tzinfo=UTC)  # 2026-03-10 00:00 in Amsterdam
QUARTER = timedelta(minutes=15)


def entsoe(base: str, token: str = TOKEN, timeout_s: float = 5.0) -> EntsoeFetcher:
    return EntsoeFetcher(token, "10YNL----------L", base_url=f"{base}/api", timeout_s=timeout_s)


async def test_entsoe_quarter_hour_day_with_negative_prices() -> None:
    server = EntsoeServer(["entsoe_A44_NL_2026-03-10_PT15M.xml"])
    async with serve(server.app) as (base, _):
        points = await entsoe(base).fetch(DAY, DAY + timedelta(days=1))
    assert len(points) == 96
    assert points[0][0] == DAY and points[-1][0] == DAY + 95 * QUARTER
    assert all(b[0] - a[0] == QUARTER for a, b in itertools.pairwise(points))
    assert min(p for _, p in points) == -500.0  # negative prices are kept as they are
    # quarter hours, not hours repeated four times
    assert any(points[4 * h + 1][1] != points[4 * h][1] for h in range(24))
    assert server.requests[0]["documentType"] == "A44"


async def test_entsoe_dst_days_have_100_and_23_periods() -> None:
    server = EntsoeServer(["entsoe_A44_NL_2025-10-26_PT15M_dst.xml",
                           "entsoe_A44_NL_2025-03-30_PT60M_dst.xml"])
    async with serve(server.app) as (base, _):
        autumn_start = datetime(2025, 10, 25, 22, tzinfo=UTC)
        autumn = await entsoe(base).fetch(autumn_start, autumn_start + timedelta(hours=25))
        spring_start = datetime(2025, 3, 29, 23, tzinfo=UTC)
        spring = await entsoe(base).fetch(spring_start, spring_start + timedelta(hours=23))
    assert len(autumn) == 100 and autumn[-1][0] == autumn_start + 99 * QUARTER
    assert len(spring) == 23
    assert all(b[0] - a[0] == timedelta(hours=1) for a, b in itertools.pairwise(spring))
    assert spring[5][1] == spring[4][1]  # the position A03 leaves out repeats the one before


async def test_entsoe_errors_say_what_went_wrong() -> None:
    server = EntsoeServer(["entsoe_A44_NL_2026-03-10_PT15M.xml"])
    async with serve(server.app) as (base, _):
        with pytest.raises(FeedError, match=r"HTTP 401.*security token"):
            await entsoe(base, token="wrong-token").fetch(DAY, DAY + timedelta(days=1))
        server.mode, server.delay_s = "timeout", 2.0
        with pytest.raises(FeedError, match=r"did not answer within 0\.5 s"):
            await entsoe(base, timeout_s=0.5).fetch(DAY, DAY + timedelta(days=1))
        server.mode = "ok"
        later = DAY + timedelta(days=2)  # not published: no prices, not an error
        assert await entsoe(base).fetch(later, later + timedelta(days=1)) == []


def test_entsoe_refuses_plain_http_to_another_host_and_a_missing_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="https"):
        EntsoeFetcher(TOKEN, "10YNL----------L", base_url="http://prices.example/api")
    monkeypatch.delenv("ENTSOE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="ENTSOE_API_KEY"):
        EntsoeFetcher(None, "10YNL----------L")


@pytest.fixture
async def energyzero(tmp_path: Path) -> Any:
    """EnergyZero's host on loopback over HTTPS, and a session factory reaching it."""
    cert, key = certificate_for(tmp_path, "api.energyzero.nl")
    server = EnergyZeroServer()
    async with serve(server.app, cert=cert, key=key) as (_, port):
        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(resolver=LoopbackResolver(port), ssl=trusting(cert))
            return aiohttp.ClientSession(connector=connector)

        yield server, session


async def test_energyzero_excl_and_incl_vat(energyzero: Any) -> None:
    server, session = energyzero
    excl = await EnergyZeroFetcher(vat="excl", session_factory=session).fetch(
        DAY, DAY + timedelta(days=1))
    incl = await EnergyZeroFetcher(vat="incl", session_factory=session).fetch(
        DAY, DAY + timedelta(days=1))
    assert len(excl) == 96 and excl[0][0] == DAY
    assert min(p for _, p in excl) == pytest.approx(-500.0)  # EUR/kWh -> EUR/MWh
    for (t1, a), (t2, b) in zip(excl, incl, strict=True):
        assert t1 == t2 and b == pytest.approx(round(a / 1000 * 1.21, 5) * 1000)
    server.mode = "error"
    with pytest.raises(FeedError, match="EnergyZero"):
        await EnergyZeroFetcher(session_factory=session).fetch(DAY, DAY + timedelta(days=1))


async def test_feed_caches_falls_back_and_says_so(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cem.signals")
    now = [DAY + timedelta(hours=15)]  # 15:00 UTC = 16:00 CET: tomorrow's prices are due
    config = PriceConfig(feed="entsoe", flat_import_eur_per_kwh=0.30, vat=0.2,
                         tax_eur_per_kwh=0.1)
    server = EntsoeServer(["entsoe_A44_NL_2026-03-10_PT15M.xml"])
    store = await Store.open(tmp_path / "cem.db")
    try:
        async with serve(server.app) as (base, _):
            feed = DayAheadFeed(entsoe(base), config, horizon=timedelta(hours=24), store=store,
                                clock=lambda: now[0])
            assert await feed.fetch()
            first = feed.update()
            assert first is not None and first.prices is not None
            assert len(first.prices.points) == 96 and first.prices.resolution == QUARTER
            # tomorrow is not published: a working feed says nothing about a fallback
            assert feed.state().ok and feed.on_fallback is None
            server.mode = "down"
            assert not await feed.fetch()
            fallback = feed.update()
            assert fallback is not None and fallback.prices is not None
            assert "entsoe failing (ENTSO-E answered HTTP 503)" in fallback.reason
            assert "flat fallback" in fallback.reason
            assert not feed.state().ok and "flat fallback" in feed.state().detail
            known_end = DAY + timedelta(days=1)
            after = [p for t, p in fallback.prices.points if t >= known_end]
            # the flat 0.30 EUR/kWh all-in as a day-ahead price: (0.30 / 1.2 - 0.1) * 1000
            assert after and all(p == pytest.approx(150.0) for p in after)
            assert fallback.prices.points[-1][0] >= now[0] + timedelta(hours=23)
            assert any("fetch failed: ENTSO-E answered HTTP 503" in r.getMessage()
                       for r in caplog.records)
        # a restart with the VTN... the provider still gone: the cache is published at once
        again = DayAheadFeed(entsoe("http://127.0.0.1:9"), config, horizon=timedelta(hours=24),
                             store=store, clock=lambda: now[0])
        assert await again.load_cache() == 96
        cached = again.update()
        assert cached is not None and cached.prices is not None
        assert cached.prices.points == first.prices.points
    finally:
        await store.close()


async def test_the_loop_replans_when_new_prices_arrive(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cem.control")
    now = DAY + timedelta(hours=10, minutes=5)
    site = SiteConfig.model_validate({
        "planner": {"horizon_ptus": 8, "replan_min_interval_s": 0.05, "time_limit_s": 0.5},
        "grid": {"fuse_a": 40, "import_limit_kw": 25},
        "prices": {"feed": "entsoe", "retry_s": 0.2, "refresh_s": 0.2}})
    server = EntsoeServer(["entsoe_A44_NL_2026-03-10_PT15M.xml"])
    async with serve(server.app) as (base, _):
        feed = DayAheadFeed(entsoe(base), site.prices, horizon=timedelta(hours=2),
                            clock=lambda: now)
        registry = FakeRegistry()
        seen: list[SignalUpdate] = []
        controller = SiteController(site, registry, None, solver=None, signals=[feed],
                                    clock=lambda: now)
        publish = controller.publish

        def spy(update: SignalUpdate) -> None:
            seen.append(update)
            publish(update)

        controller.publish = spy  # type: ignore[method-assign]
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        try:
            EvRm(registry, "ev-1")
            await until(lambda: controller.problem is not None)
            ptu = (now.replace(minute=0) - DAY) // QUARTER
            expected = [p for _, p in seen[0].prices.points][ptu:ptu + 8]  # type: ignore[union-attr]
            assert list(controller.problem.prices.import_eur_per_kwh) == pytest.approx(
                [p / 1000 for p in expected])
            before = controller.replans
            server.scale = 2.0  # the provider corrects its prices
            doubled = pytest.approx([round(p * 2, 2) / 1000 for p in expected])
            # on a busy machine a replan for another reason (the EV's) can come first: wait
            # for the one that planned on the new prices
            await until(lambda: controller.replans > before and controller.problem is not None
                        and list(controller.problem.prices.import_eur_per_kwh) == doubled,
                        within=10)
            assert any("day-ahead prices changed" in r.getMessage() for r in caplog.records)
        finally:
            stop.set()
            await task
