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


async def test_a_site_files_devices_run_from_one_sim_and_one_rm_process(
        cem: S2Server, tmp_path: Path) -> None:
    """`cem sim modbus --config` and `cem rm modbus --config` read `[[modbus.devices]]`: every
    device (or those named) is simulated on its port and represented by its own S2 RM, and the
    simulated grid meter measures the other simulated devices plus the base load."""
    battery_port, meter_port, pv_port = free_port(), free_port(), free_port()
    site = tmp_path / "site.toml"
    site.write_text(
        f'[[modbus.devices]]\nname = "house battery"\ndevice = "battery"\n'
        f'map = "{SPECS / "battery_generic.toml"}"\nport = {battery_port}\n'
        f'[[modbus.devices]]\nname = "grid meter"\ndevice = "meter"\n'
        f'map = "{SPECS / "grid_meter.toml"}"\nport = {meter_port}\n'
        f'[[modbus.devices]]\nname = "roof pv"\ndevice = "pv"\n'
        f'map = "{SPECS / "sunspec_pv_inverter.toml"}"\nport = {pv_port}\n')
    sim = await asyncio.create_subprocess_exec(
        *CEM, "sim", "modbus", "--config", str(site), "--name", "house battery",
        "--name", "grid meter", stderr=asyncio.subprocess.PIPE)
    rm = await asyncio.create_subprocess_exec(
        *CEM, "rm", "modbus", "--config", str(site), "--name", "house battery",
        "--name", "grid meter", "--cem", cem.url, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(300):
            lives = {live.state.details.name: live for live in cem.rms().values()
                     if live.state.details is not None}
            meter = lives.get("grid meter")
            if "house battery" in lives and meter is not None \
                    and meter.state.latest_measurement() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"not both RMs described themselves: {sorted(lives)}")
        assert sorted(lives) == ["grid meter", "house battery"]  # not the PV: not named
        assert meter is not None
        # the simulator's first registers may predate its first physics step: wait for a reading
        # that has one (on a busy machine a few hundred ms)
        total = 0.0
        for _ in range(200):
            total = sum(v.value for v in meter.state.latest_measurement().values)
            if abs(total - 500) <= 2:
                break
            await asyncio.sleep(0.05)
        assert total == pytest.approx(500, abs=2)  # base load, the idle battery adds 0
    finally:
        rm.send_signal(signal.SIGTERM)
        sim.send_signal(signal.SIGTERM)
        _, rm_err = await asyncio.wait_for(rm.communicate(), timeout=10)
        _, sim_err = await asyncio.wait_for(sim.communicate(), timeout=10)
    logs = rm_err.decode() + sim_err.decode()
    assert rm.returncode == 0 and sim.returncode == 0, logs
    assert "Traceback" not in logs
    assert f"house battery (battery) on 127.0.0.1:{battery_port}" in logs
    assert "roof pv" not in logs


def test_site_file_device_choice_mistakes_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cem.app.cli import app

    site = tmp_path / "site.toml"
    site.write_text(f'[[modbus.devices]]\nname = "meter"\ndevice = "meter"\n'
                    f'map = "{SPECS / "grid_meter.toml"}"\n')
    empty = tmp_path / "empty.toml"
    empty.write_text("[site]\nname = 'no devices'\n")
    runner = CliRunner()
    cases = [
        (["rm", "modbus", "--config", str(site), "--name", "boiler"],
         "no Modbus device named 'boiler'"),
        (["sim", "modbus", "--config", str(site), "--device", "meter"], "leave out --device"),
        (["rm", "modbus", "--config", str(empty)], "has no [[modbus.devices]]"),
        (["sim", "modbus"], "give --device and --map, or --config"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
