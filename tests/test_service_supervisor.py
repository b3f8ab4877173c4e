"""The supervisor through its public API: parts that crash are restarted with back-off, the
others keep running, one that keeps failing is reported, a critical one stops the service."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from cem.app.supervisor import BasePart, Health, PartBook, StartFailed, Supervisor, read_parts


class Flaky(BasePart):
    """A part whose work crashes `crashes` times (after `runs_s`), then runs for good."""

    def __init__(self, name: str, crashes: int, runs_s: float = 0.05,
                 critical: bool = False) -> None:
        self.name = name
        self.kind = "test"
        self.critical = critical
        self.crashes = crashes
        self.runs_s = runs_s
        self.starts = 0
        self.stops = 0
        self.bound = False
        self.healthy = True

    async def bind(self) -> None:
        self.bound = True

    async def start(self) -> None:
        self.starts += 1

    async def stop(self) -> None:
        self.stops += 1

    async def wait(self) -> None:
        if self.starts <= self.crashes:
            await asyncio.sleep(self.runs_s)
            raise ConnectionError(f"device gone (crash {self.starts})")
        await asyncio.Event().wait()

    def health(self) -> Health:
        return Health(self.healthy, "fine" if self.healthy else "device does not answer")


async def test_a_crashing_part_restarts_with_back_off_and_the_others_keep_running(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    steady = Flaky("steady", crashes=0)
    flaky = Flaky("flaky", crashes=2)
    book = PartBook(tmp_path / "cem.db")
    supervisor = Supervisor([steady, flaky], backoff_s=(0.1, 1.0), failing_after=5,
                            health_every_s=0.05, start_grace_s=0.0, book=book)
    caplog.set_level(logging.INFO, logger="cem.supervisor")
    loop = asyncio.get_running_loop()
    began = loop.time()
    await supervisor.start()
    try:
        for _ in range(100):
            if flaky.starts == 3 and supervisor.states["flaky"].state == "running":
                break
            await asyncio.sleep(0.05)
        took = loop.time() - began
        assert flaky.starts == 3 and supervisor.states["flaky"].restarts == 2
        assert took >= 0.1 + 0.2  # waited 0.1 s, then 0.2 s (doubled) before restarting
        assert steady.starts == 1 and steady.stops == 0  # never touched
        assert supervisor.states["steady"].state == "running"
        assert "ConnectionError: device gone (crash 1)" in caplog.text  # the cause is logged
        assert any(r.exc_info for r in caplog.records if "failed" in r.getMessage())
        await asyncio.sleep(0.2)
        rows = {r["name"]: r for r in _rows(tmp_path / "cem.db")}
        assert rows["flaky"]["state"] == "running" and rows["flaky"]["restarts"] == 2
        assert "device gone (crash 2)" in str(rows["flaky"]["last_error"])
    finally:
        await supervisor.stop()
    assert {r["state"] for r in _rows(tmp_path / "cem.db")} == {"stopped"}


def _rows(path: Path) -> list[dict[str, object]]:
    db = sqlite3.connect(path)
    try:
        return read_parts(db)
    finally:
        db.close()


async def test_a_part_that_keeps_failing_is_reported_as_failing(
        caplog: pytest.LogCaptureFixture) -> None:
    broken = Flaky("broken", crashes=100, runs_s=0.01)
    supervisor = Supervisor([broken], backoff_s=(0.02, 0.05), failing_after=3,
                            health_every_s=0.05)
    caplog.set_level(logging.INFO, logger="cem.supervisor")
    await supervisor.start()
    try:
        for _ in range(100):
            if supervisor.states["broken"].state == "failing":
                break
            await asyncio.sleep(0.02)
        state = supervisor.states["broken"]
        assert state.state == "failing" and state.failures_in_row >= 3
        assert "keeps failing" in caplog.text
    finally:
        await supervisor.stop()


async def test_an_unhealthy_part_is_degraded_then_failing_then_running_again() -> None:
    modbus = Flaky("modbus battery", crashes=0)
    supervisor = Supervisor([modbus], health_every_s=0.02, unhealthy_after_s=0.2,
                            start_grace_s=0.0)
    await supervisor.start()
    try:
        modbus.healthy = False
        supervisor.refresh_health()
        assert supervisor.states[modbus.name].state == "degraded"
        assert supervisor.states[modbus.name].detail == "device does not answer"
        await asyncio.sleep(0.3)
        assert supervisor.snapshot()[0].state == "failing"
        modbus.healthy = True
        assert supervisor.snapshot()[0].state == "running"
        assert modbus.starts == 1  # the part retries by itself: no restart
    finally:
        await supervisor.stop()


async def test_a_critical_part_failing_stops_the_service() -> None:
    core = Flaky("cem", crashes=1, critical=True)
    other = Flaky("ocpp", crashes=0)
    supervisor = Supervisor([core, other], backoff_s=(0.01, 0.01))
    await supervisor.start()
    await asyncio.wait_for(supervisor.fatal.wait(), 5)
    assert "cem failed: ConnectionError" in supervisor.fatal_reason
    assert core.starts == 1  # not restarted in process
    await supervisor.stop()
    assert core.stops == 1 and other.stops == 1


async def test_every_part_is_bound_before_any_starts_and_a_failed_bind_starts_none() -> None:
    class Busy(Flaky):
        async def bind(self) -> None:
            raise OSError(98, "Address already in use")

    first, busy = Flaky("cem", crashes=0), Busy("ocpp", crashes=0)
    supervisor = Supervisor([first, busy])
    with pytest.raises(StartFailed, match="Address already in use") as failed:
        await supervisor.start()
    assert failed.value.part == "ocpp"
    assert first.bound and first.starts == 0 and busy.starts == 0
    assert first.stops == 1  # what was bound is let go


def test_part_names_are_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([Flaky("x", 0), Flaky("x", 0)])
