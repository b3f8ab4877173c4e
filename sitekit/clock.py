"""One clock for the whole process: real time by default, a scaled simulated clock in `cem demo`.

Everything that stamps or schedules something in the energy world (S2 timestamps, PTU
boundaries, execution times, timers, forecasts, EV departures) asks this module, never
`datetime.now` directly, so a demo can run a day in a minute without two parts disagreeing on
what time it is (see docs/adr/0001-demo-clock.md):

    from sitekit import clock
    clock.now()                 # aware UTC datetime on the process clock
    await clock.sleep(900)      # one simulated PTU (0.625 s of wall time at speed 1440)
    clock.to_wall(900)          # how long that is on the wall clock

`use(ScaledClock(start, speed))` switches the process to simulated time; `use(RealClock())`
(or the returned previous clock) switches back. Durations about computing and communication
(solver deadlines, replan rate limits, websocket pings, device watchdogs, polling) stay in
wall-clock seconds and do not go through this module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What the process clock offers."""

    speed: float

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class RealClock:
    """The wall clock (speed 1)."""

    speed = 1.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "RealClock()"


class ScaledClock:
    """Simulated time: `start` at creation, then `speed` simulated seconds per wall second.

    It is linear in `time.monotonic()`, the same base the simulators integrate their physics
    on (wall seconds x speed), so a simulated device and this clock never drift apart.
    """

    def __init__(self, start: datetime, speed: float,
                 wall: Callable[[], float] = time.monotonic) -> None:
        if start.tzinfo is None:
            raise ValueError("the start of a simulated clock needs a timezone")
        if speed <= 0:
            raise ValueError("speed must be above 0")
        self.start = start.astimezone(UTC)
        self.speed = float(speed)
        self._wall = wall
        self._wall_start = wall()

    def elapsed(self) -> float:
        """Simulated seconds since the start."""
        return (self._wall() - self._wall_start) * self.speed

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed())

    def monotonic(self) -> float:
        return self.elapsed()

    def __repr__(self) -> str:
        return f"ScaledClock(start={self.start.isoformat()}, speed={self.speed:g})"


_current: Clock = RealClock()


def current() -> Clock:
    """The clock in use."""
    return _current


def use(clock: Clock) -> Clock:
    """Make `clock` the process clock; returns the previous one (to restore it)."""
    global _current
    previous, _current = _current, clock
    return previous


def now() -> datetime:
    """Now on the process clock (aware, UTC)."""
    return _current.now()


def monotonic() -> float:
    """Seconds on the process clock's time base (for 'how long ago' in simulated time)."""
    return _current.monotonic()


def speed() -> float:
    """Simulated seconds per wall-clock second (1 for real time)."""
    return _current.speed


def to_wall(seconds: float) -> float:
    """Wall-clock seconds that `seconds` of process-clock time take."""
    return seconds / _current.speed


async def sleep(seconds: float) -> None:
    """Sleep `seconds` of process-clock time."""
    await asyncio.sleep(max(0.0, to_wall(seconds)))
