"""`cem run` as a real process and `cem status` as a user sees them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

from s2python.common import Commodity, CommodityQuantity, Duration, Role, RoleType
from typer.testing import CliRunner

from cem.app.cli import app
from cem.store import Store
from resource_managers.base import AssetDetails, FRBCControlType, S2ResourceManager

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "specs" / "sites" / "example.toml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_site(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "site.toml"
    config.write_text(f'[site]\nname = "Process test"\n[server]\nhost = "127.0.0.1"\n'
                      f'port = {port}\n[store]\npath = "{tmp_path / "cem.db"}"\n[http]\nport = 0\n'
                      '[grid]\nfuse_a = 25\nimport_limit_kw = 17\n')
    return config


class Frbc(FRBCControlType):
    async def handle_instruction(self, connection: object, message: object,
                                 send_okay: object) -> None:
        await send_okay()  # type: ignore[operator]

    async def activate(self, connection: object) -> None:
        pass

    async def deactivate(self, connection: object) -> None:
        pass


async def start_cem(config: Path, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cem.app.cli", "run", "--config", str(config), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def read_until(process: asyncio.subprocess.Process, text: str, seen: list[str]) -> None:
    assert process.stdout is not None
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        if not line:
            raise AssertionError("cem run ended early:\n" + "".join(seen))
        seen.append(line)
        if text in line:
            return


async def test_cem_run_answers_an_rm_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = write_site(tmp_path, port)
    process = await start_cem(config)
    seen: list[str] = []
    try:
        await read_until(process, "S2 CEM listening on", seen)
        assert f"ws://127.0.0.1:{port} (no tokens: any RM may connect)" in seen[-1]
        rm = boiler_rm(port)
        stop = asyncio.Event()
        task = asyncio.create_task(rm.run(stop))
        await asyncio.wait_for(rm.connected.wait(), 20)
        await read_until(process, "RM 'boiler' connected, control type FRBC selected", seen)

        # a second CEM on the same port: a clear message, exit 2, no traceback
        second = await start_cem(config)
        output, _ = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 2
        assert b"already in use" in output and b"Traceback" not in output

        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0
        log = "".join(seen) + rest.decode()
        assert "SIGTERM received" in log and "closed 1 RM session(s): CEM shutting down" in log
        assert "Traceback" not in log
        await _wait_disconnect(rm)
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    result = CliRunner().invoke(app, ["status", "--config", str(config)],
                                env={"COLUMNS": "160"})
    assert result.exit_code == 1, result.output  # not running: scripts and healthchecks see it
    assert "boiler" in result.output and "FRBC" in result.output
    assert "0 of 1 RM(s) connected." not in result.output  # the CEM is not running
    assert "The CEM is not running: it stopped cleanly" in result.output
    assert "0 of 1 RM(s) were connected" in result.output


def boiler_rm(port: int) -> S2ResourceManager:
    return S2ResourceManager(
        cem_url=f"ws://127.0.0.1:{port}", control_types=[Frbc()], backoff_s=(0.1, 1.0),
        asset_details=AssetDetails(
            resource_id=uuid.uuid4(), provides_forecast=False,
            provides_power_measurements=[CommodityQuantity.ELECTRIC_POWER_L1],
            instruction_processing_delay=Duration.from_milliseconds(100),
            roles=[Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY)],
            name="boiler"))


async def test_cem_status_after_a_crash_does_not_claim_rms_are_connected(tmp_path: Path) -> None:
    port = free_port()
    config = write_site(tmp_path, port)
    process = await start_cem(config)
    seen: list[str] = []
    rm = boiler_rm(port)
    stop = asyncio.Event()
    task = asyncio.create_task(rm.run(stop))
    try:
        await read_until(process, "S2 CEM listening on", seen)
        await read_until(process, "RM 'boiler' connected", seen)
        await asyncio.sleep(0.6)  # the store writes the RM as connected
        running = CliRunner().invoke(app, ["status", "--config", str(config)],
                                     env={"COLUMNS": "160"})
        assert f"CEM running (pid {process.pid}" in running.output, running.output
        assert "1 of 1 RM(s) connected." in running.output
        boiler = next(line for line in running.output.splitlines() if "boiler" in line)
        assert "yes" in boiler

        process.kill()  # a crash: nothing is marked disconnected
        await process.wait()
        crashed = CliRunner().invoke(app, ["status", "--config", str(config)],
                                     env={"COLUMNS": "160"})
        assert crashed.exit_code == 1, crashed.output  # not running
        assert f"The CEM is not running (process {process.pid} is gone)" in crashed.output
        boiler = next(line for line in crashed.output.splitlines() if "boiler" in line)
        assert "unknown" in boiler and "yes" not in boiler
        assert "1 of 1 RM(s) were connected when the CEM was last heard of" in crashed.output
    finally:
        stop.set()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.wait_for(task, 10)


async def _wait_disconnect(rm: S2ResourceManager) -> None:
    for _ in range(200):
        if not rm.connected.is_set():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the RM did not notice the CEM stopping")


async def test_cem_status_lists_rms_or_says_there_is_no_store(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["status", "--config", str(EXAMPLE), "--db",
                                  str(tmp_path / "none.db")])
    assert missing.exit_code == 1  # nothing runs with this store
    assert "No CEM store" in missing.output and "cem run" in missing.output
    assert not (tmp_path / "none.db").exists()

    db = tmp_path / "cem.db"
    store = await Store.open(db)
    store.touch_rm("rm-1", name="EV charger 1", connected=True,
                   control_type="FILL_RATE_BASED_CONTROL")
    store.touch_rm("rm-2", name="PV inverter", connected=False,
                   control_type="POWER_ENVELOPE_BASED_CONTROL")
    for _ in range(3):
        store.log_message(direction="in", message_type="PowerMeasurement", message_id="x",
                          text="{}", rm_id="rm-1")
    await store.close()
    listed = runner.invoke(app, ["status", "--config", str(EXAMPLE), "--db", str(db)],
                           env={"COLUMNS": "160"})
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    charger = next(line for line in lines if "EV charger 1" in line)
    assert "FRBC" in charger and " 3 " in charger
    assert any("PV inverter" in line and "PEBC" in line for line in lines)
    assert "1 of 2 RM(s) connected." in listed.output


async def _transcript(port: int) -> list[str]:
    """An RM's side of a session with raw S2 JSON: the type and status of every answer (ids
    left out), for a handshake, a measurement, a bad number and a message that is no JSON."""
    import json

    import websockets

    resource_id = str(uuid.uuid4())
    sent = [
        {"message_type": "Handshake", "message_id": str(uuid.uuid4()), "role": "RM",
         "supported_protocol_versions": ["0.0.2-beta"]},
        {"message_type": "ResourceManagerDetails", "message_id": str(uuid.uuid4()),
         "resource_id": resource_id, "name": "meter",
         "roles": [{"role": "ENERGY_CONSUMER", "commodity": "ELECTRICITY"}],
         "instruction_processing_delay": 100, "available_control_types": ["NOT_CONTROLABLE"],
         "provides_forecast": False, "provides_power_measurement_types": ["ELECTRIC.POWER.L1"]},
        {"message_type": "PowerMeasurement", "message_id": str(uuid.uuid4()),
         "measurement_timestamp": "2026-01-01T00:00:00Z",
         "values": [{"commodity_quantity": "ELECTRIC.POWER.L1", "value": 1200}]},
        {"message_type": "PowerMeasurement", "message_id": str(uuid.uuid4()),
         "measurement_timestamp": "2026-01-01T00:00:01Z",
         "values": [{"commodity_quantity": "ELECTRIC.POWER.L1", "value": 1e300}]},
    ]
    seen: list[str] = []
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        for message in [*(json.dumps(m) for m in sent), "not json"]:
            await ws.send(message)
            while True:
                answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
                kind = answer["message_type"]
                if kind != "ReceptionStatus":
                    seen.append(kind)
                    await ws.send(json.dumps({"message_type": "ReceptionStatus", "status": "OK",
                                              "subject_message_id": answer["message_id"]}))
                    continue
                seen.append(f"{kind} {answer['status']}")
                break
    return seen


async def test_the_cem_runs_on_asyncio_unless_told_uvloop_and_answers_the_same(
        tmp_path: Path) -> None:
    transcripts = {}
    for loop, said in (("uvloop", "on uvloop"), ("asyncio", "on asyncio's event loop")):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CEM_EVENT_LOOP": loop}
        if loop == "asyncio":
            del env["CEM_EVENT_LOOP"]  # the default
        port = free_port()
        folder = tmp_path / loop
        folder.mkdir()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cem.app.cli", "run", "--config", str(write_site(folder, port)),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
            env=env)
        seen: list[str] = []
        try:
            await read_until(process, "cem 0", seen)
            assert said in seen[-1]
            await read_until(process, "S2 CEM listening on", seen)
            transcripts[loop] = await _transcript(port)
            process.send_signal(signal.SIGTERM)
            rest, _ = await asyncio.wait_for(process.communicate(), 30)
            assert process.returncode == 0
            assert "Traceback" not in "".join(seen) + rest.decode()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert transcripts["uvloop"] == transcripts["asyncio"]
    assert transcripts["uvloop"][:6] == ["Handshake", "ReceptionStatus OK", "HandshakeResponse",
                                         "ReceptionStatus OK", "SelectControlType",
                                         "ReceptionStatus OK"]
    assert transcripts["uvloop"][-3:] == ["ReceptionStatus OK", "ReceptionStatus INVALID_CONTENT",
                                          "ReceptionStatus INVALID_DATA"], transcripts
