"""The process clock (`sitekit.clock`) and the demo's choice of day, visits and settings."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cem.app.demo import DemoError, demo_visits, settings_for
from cem.app.site_file import load_site_file
from sitekit import clock

DEMO_TOML = Path(__file__).resolve().parent.parent / "specs" / "sites" / "demo.toml"


class FakeWall:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_scaled_clock_runs_speed_times_the_wall_clock() -> None:
    wall = FakeWall()
    start = datetime(2019, 10, 8, 4, 0, tzinfo=UTC)
    scaled = clock.ScaledClock(start, 1440, wall=wall)
    assert scaled.now() == start
    wall.t += 0.625  # one PTU of wall time at 1440x
    assert scaled.now() == start + timedelta(minutes=15)
    assert scaled.monotonic() == pytest.approx(900)


def test_use_switches_the_process_clock_and_back() -> None:
    start = datetime(2019, 10, 8, 4, 0, tzinfo=UTC)
    previous = clock.use(clock.ScaledClock(start, 3600))
    try:
        assert abs((clock.now() - start).total_seconds()) < 60
        assert clock.speed() == 3600
        assert clock.to_wall(3600) == pytest.approx(1.0)
    finally:
        clock.use(previous)
    assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 1
    assert clock.speed() == 1


async def test_sleep_takes_simulated_seconds() -> None:
    previous = clock.use(clock.ScaledClock(datetime(2019, 10, 8, tzinfo=UTC), 9000))
    try:
        began = time.monotonic()
        sim_began = clock.now()
        await clock.sleep(900)  # a PTU: 0.1 s of wall time
        assert time.monotonic() - began < 0.5
        assert (clock.now() - sim_began).total_seconds() >= 900
    finally:
        clock.use(previous)


def test_scaled_clock_refuses_naive_start_and_bad_speed() -> None:
    with pytest.raises(ValueError):
        clock.ScaledClock(datetime(2019, 10, 8), 10)
    with pytest.raises(ValueError):
        clock.ScaledClock(datetime(2019, 10, 8, tzinfo=UTC), 0)


def test_demo_replays_the_congestion_day_with_real_ev_visits(tmp_path: Path) -> None:
    site = load_site_file(DEMO_TOML)
    settings = settings_for(site, duration=None, speed=None, report=tmp_path)
    assert settings.speed == 1440
    assert settings.wall_seconds == pytest.approx(60)  # a day in a minute
    local = settings.start.astimezone(site.congestion[0].start.tzinfo)
    assert (local.date(), local.hour) == (site.congestion[0].start.date(), 6)
    visits = demo_visits(settings)
    assert len(visits) >= 8
    assert all(settings.start <= v.arrival < v.departure for v in visits)
    assert all(v.energy_kwh > 0 for v in visits)


def test_demo_options_are_checked(tmp_path: Path) -> None:
    site = load_site_file(DEMO_TOML)
    with pytest.raises(DemoError, match="--speed"):
        settings_for(site, duration=None, speed=0, report=tmp_path)
    with pytest.raises(DemoError, match="--duration"):
        settings_for(site, duration=-1, speed=None, report=tmp_path)


def test_process_clock_stays_real_outside_the_demo() -> None:
    assert isinstance(clock.current(), clock.RealClock)
    assert asyncio.iscoroutinefunction(clock.sleep)
