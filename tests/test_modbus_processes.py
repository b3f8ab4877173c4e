"""`cem sim modbus` and `cem rm modbus` as real processes: they work and stop cleanly."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cem.s2.server import S2Server
from cem.site.config import SiteConfig

SPECS = Path(__file__).parent.parent / "specs" / "modbus"
CEM = [sys.executable, "-c", "from cem.app.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def cem() -> AsyncIterator[S2Server]:
    config = SiteConfig()
    config.server.port = 0
    server = S2Server(config)
    await server.start()
    yield server
    await server.stop()


async def test_simulator_and_rm_processes_report_and_stop_on_sigterm(cem: S2Server) -> None:
    port = free_port()
    meter_map = str(SPECS / "grid_meter.toml")
    sim = await asyncio.create_subprocess_exec(
        *CEM, "sim", "modbus", "--device", "meter", "--map", meter_map, "--port", str(port),
        stderr=asyncio.subprocess.PIPE)
    rm = await asyncio.create_subprocess_exec(
        *CEM, "rm", "modbus", "--device", "meter", "--map", meter_map, "--port", str(port),
        "--cem", cem.url, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(200):
            lives = list(cem.rms().values())
            if lives and lives[0].state.latest_measurement() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no measurement from the RM process")
        values = [v.value for v in lives[0].state.latest_measurement().values]
        assert values == pytest.approx([500 / 3] * 3, abs=0.1)  # the simulator's base load
    finally:
        rm.send_signal(signal.SIGTERM)
        sim.send_signal(signal.SIGINT)
        _, rm_err = await asyncio.wait_for(rm.communicate(), timeout=10)
        _, sim_err = await asyncio.wait_for(sim.communicate(), timeout=10)
    logs = rm_err.decode() + sim_err.decode()
    assert rm.returncode == 0, logs
    assert sim.returncode == 0, logs
    assert "Traceback" not in logs
    assert "meter 127.0.0.1" in logs and logs.count("stopped") >= 2
