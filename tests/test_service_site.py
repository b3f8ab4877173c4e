"""A whole site from one `cem run`, as real processes: the example site with an OCPP central
system and two Modbus devices against their simulators; a device simulator killed and back; a
mistaken second start; `kill -9` during charging sessions, five times in a row."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cem.app.cli import app
from resource_managers.ocpp_charger.records import RESTART_REASON
from resource_managers.ocpp_charger.simulator import (
    SimulatedChargePoint,
    SimulatedEv,
    keep_connected,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "specs" / "sites" / "example.toml"
MAPS = ROOT / "specs" / "modbus"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def example_site(tmp_path: Path, *, modbus: bool = True) -> tuple[Path, dict[str, int]]:
    """specs/sites/example.toml on free ports, with [ocpp] (two charge points) and, with
    `modbus`, a battery and a grid meter on Modbus TCP."""
    ports = {"s2": free_port(), "ocpp": free_port(), "battery": free_port(),
             "meter": free_port()}
    text = EXAMPLE.read_text().replace("port = 8765", f"port = {ports['s2']}")
    text = text.split("\n[ocpp]\n")[0]  # the example's own [ocpp] lets any charger in
    text += f"""
[http]
port = 0

[ocpp]
port = {ports['ocpp']}
database = "ocpp.db"
safe_limit_a = 6

[[ocpp.charge_points]]
id = "CP-1"
max_current_a = 16

[[ocpp.charge_points]]
id = "CP-2"
max_current_a = 16
"""
    if modbus:
        text += f"""
[[modbus.devices]]
name = "battery"
device = "battery"
map = "{MAPS / 'battery_generic.toml'}"
port = {ports['battery']}

[[modbus.devices]]
name = "grid meter"
device = "meter"
map = "{MAPS / 'grid_meter.toml'}"
port = {ports['meter']}
"""
    site = tmp_path / "site.toml"
    site.write_text(text)
    return site, ports


def cem(*args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "cem", *args], cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def status(site: Path) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(app, ["status", "--json", "--config", str(site)])
    return result.exit_code, json.loads(result.output)


def until(condition: Callable[[], Any], within_s: float, what: str) -> Any:
    end = time.monotonic() + within_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not within {within_s:g} s: {what}")
        time.sleep(0.2)


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        connection.close()


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def parts_by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in data["parts"]}


def what_a_second_start_could_damage(folder: Path) -> dict[str, Any]:
    store, ocpp = folder / "cem.db", folder / "ocpp.db"
    return {
        "process": rows(store, "SELECT pid, host, started_at, stopped_at FROM cem_process"),
        "closed by a restart": rows(store, "SELECT COUNT(*) FROM sessions "
                                           "WHERE reason = 'CEM restarted'"),
        "rms": rows(store, "SELECT rm_id, connected FROM rms ORDER BY rm_id"),
        "charging sessions": rows(ocpp, "SELECT id, cp_id, transaction_id, state, stop_reason "
                                        "FROM sessions ORDER BY id"),
        "lock": (folder / "cem.db.lock").read_text(),
    }


def test_the_whole_example_site_runs_from_one_cem_run(tmp_path: Path) -> None:
    site, ports = example_site(tmp_path)
    log = tmp_path / "cem.log"
    with processes() as started:
        battery_sim = cem("sim", "modbus", "--config", str(site), "--name", "battery",
                          log=tmp_path / "battery.log")
        meter_sim = cem("sim", "modbus", "--config", str(site), "--name", "grid meter",
                        log=tmp_path / "meter.log")
        started += [battery_sim, meter_sim]
        run = cem("run", "--config", str(site), log=log)
        started.append(run)
        started.append(cem("sim", "chargers", "--config", str(site), "--count", "2", "--csms",
                           f"ws://127.0.0.1:{ports['ocpp']}", "--speed", "60",
                           log=tmp_path / "chargers.log"))

        def all_up() -> dict[str, Any] | None:
            code, data = status(site)
            names = {rm["name"] for rm in data["rms"] if rm["connected"]}
            parts = parts_by_name(data)
            if code == 0 and {"battery", "grid meter"} <= names and len(names) >= 4 and \
                    all(p["state"] == "running" for p in parts.values()) and \
                    rows(tmp_path / "ocpp.db", "SELECT 1 FROM sessions WHERE state = 'open'"):
                return data
            return None

        data = until(all_up, 90, "every part running, the RMs connected, a charging session")
        assert data["running"] and data["process"]["pid"] == run.pid
        assert set(parts_by_name(data)) == {"cem", "signals", "ocpp", "modbus battery",
                                             "modbus grid meter"}
        rm = next(r for r in data["rms"] if r["name"] == "battery")
        assert rm["control_type"] == "FILL_RATE_BASED_CONTROL" and rm["last_message"]
        assert set(rm) >= {"resource_id", "name", "control_type", "connected", "last_message"}

        # a mistaken second start of the CEM, or of the OCPP RM, changes nothing
        before = what_a_second_start_could_damage(tmp_path)
        second = subprocess.run([sys.executable, "-m", "cem", "run", "--config", str(site)],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"already in use by cem run (pid {run.pid}" in second.stderr
        assert "Traceback" not in second.stdout + second.stderr
        other_rm = subprocess.run([sys.executable, "-m", "cem", "rm", "ocpp", "--config",
                                   str(site), "--cem", f"ws://127.0.0.1:{ports['s2']}"],
                                  capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert other_rm.returncode == 2, other_rm.stdout + other_rm.stderr
        assert f"pid {run.pid}" in other_rm.stderr and "already in use" in other_rm.stderr
        after = what_a_second_start_could_damage(tmp_path)
        # the charger simulator goes on plugging EVs in meanwhile: a new session is no damage,
        # a session that was there before must be unchanged
        sessions = len(before["charging sessions"])
        assert after["charging sessions"][:sessions] == before["charging sessions"]
        after["charging sessions"] = before["charging sessions"]
        assert after == before
        assert status(site)[0] == 0

        # the battery's device goes away: its part retries, the rest keeps planning
        battery_sim.kill()
        battery_sim.wait(10)
        killed_at = time.time()

        def battery_degraded() -> dict[str, Any] | None:
            code, data = status(site)
            part = parts_by_name(data)["modbus battery"]
            return data if code == 0 and part["state"] == "degraded" else None

        data = until(battery_degraded, 30, "the battery's part degraded")
        parts = parts_by_name(data)
        assert "retrying" in parts["modbus battery"]["detail"]
        assert all(p["state"] == "running" for name, p in parts.items()
                   if name != "modbus battery")
        added = CliRunner().invoke(app, [
            "congestion", "add", "--config", str(site), "--import-limit-kw", "9",
            "--start", "2030-01-01T17:00:00+01:00", "--end", "2030-01-01T19:00:00+01:00"])
        assert added.exit_code == 0, added.output
        until(lambda: rows(tmp_path / "cem.db", "SELECT 1 FROM plans WHERE created_ts > "
                                                 f"{killed_at} AND reason LIKE '%congestion%'"),
              30, "a replan for the new window while the battery is gone")
        log_text = log.read_text()
        assert "battery: device fault" in log_text or "battery: device still" in log_text

        battery_sim = cem("sim", "modbus", "--config", str(site), "--name", "battery",
                          log=tmp_path / "battery.log")
        started.append(battery_sim)
        until(lambda: parts_by_name(status(site)[1])["modbus battery"]["state"] == "running",
              60, "the battery's part running again")

        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 0
    text = log.read_text()
    assert "Traceback" not in text and "SIGTERM received" in text
    code, data = status(site)
    assert code == 1 and not data["running"] and "stopped cleanly" in data["why"]


# --- kill -9 during charging, five times --------------------------------------------------------


OCPP_SITE = """
[site]
name = "Crash test"
[server]
port = {s2}
[store]
path = "cem.db"
[grid]
fuse_a = 32
import_limit_kw = 22
[http]
port = 0
[planner]
time_limit_s = 0.3
replan_min_interval_s = 0.5
horizon_ptus = 16
[ocpp]
port = {ocpp}
database = "ocpp.db"
safe_limit_a = 6
[[ocpp.charge_points]]
id = "CP16"
max_current_a = 16
[[ocpp.charge_points]]
id = "CP201"
max_current_a = 16
"""


async def _until(condition: Callable[[], Any], within_s: float, what: str) -> Any:
    end = time.monotonic() + within_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not within {within_s:g} s: {what}")
        await asyncio.sleep(0.2)


def _sessions(db: Path) -> dict[str, dict[str, Any]]:
    keys = ("id", "cp_id", "evse_id", "transaction_id", "started_at", "stopped_at",
            "meter_start_wh", "energy_wh", "cost_eur", "stop_reason", "state")
    found = rows(db, f"SELECT {', '.join(keys)} FROM sessions ORDER BY id")
    return {f"{r[1]}/{r[3]}": dict(zip(keys, r, strict=True)) for r in found}


def _open(db: Path, transactions: set[str], metered: bool = False) -> bool:
    """Whether each of these sessions is open (and, with `metered`, has energy)."""
    now = _sessions(db)
    return all(tx in now and now[tx]["state"] == "open" and
               (now[tx]["energy_wh"] > 0 or not metered) for tx in transactions)


def _recoveries(log: Path) -> int:
    """How many sessions restarted central systems have closed from their last meter value."""
    return sum(1 for line in log.read_text().splitlines()
               if "was open when the CSMS stopped" in line)


async def _start_cem(site: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    """`cem run`, once it has opened its store and serves S2 (its ports are bound earlier)."""
    def up() -> int:
        return log.read_text().count("S2 CEM listening on") if log.exists() else 0

    before = up()
    process = cem("run", "--config", str(site), "--log-format", "json", log=log)

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0 and up() > before

    await _until(listening, 90, "cem run listening for chargers")
    return process


async def test_kill_9_during_charging_five_times_loses_and_duplicates_nothing(
        tmp_path: Path) -> None:
    s2, ocpp_port = free_port(), free_port()
    site = tmp_path / "site.toml"
    site.write_text(OCPP_SITE.format(s2=s2, ocpp=ocpp_port))
    log, ocpp_db, store = tmp_path / "cem.log", tmp_path / "ocpp.db", tmp_path / "cem.db"
    url = f"ws://127.0.0.1:{ocpp_port}"
    stations = [SimulatedChargePoint("CP16", url, version="1.6", speed=60, meter_interval_s=60),
                SimulatedChargePoint("CP201", url, version="2.0.1", speed=60,
                                     meter_interval_s=60)]
    stop = asyncio.Event()
    run = await _start_cem(site, log, ocpp_port)
    links = [asyncio.create_task(keep_connected(s, stop)) for s in stations]
    cards = iter(f"CARD-{i:03d}" for i in range(100))
    started_tx: set[str] = set()
    try:
        added = await asyncio.to_thread(CliRunner().invoke, app, [
            "congestion", "add", "--config", str(site), "--import-limit-kw", "15",
            "--start", "2030-01-01T17:00:00+01:00", "--end", "2030-01-01T19:00:00+01:00"])
        assert added.exit_code == 0, added.output
        windows = rows(store, "SELECT * FROM congestion_windows")
        for cycle in range(5):
            for station in stations:
                await asyncio.wait_for(station.booted.wait(), 60)
                evse = station.evses[1]
                if cycle % 2 == 1 and evse.ev is not None:  # one EV leaves: a CDR
                    await station.unplug(1)
                if evse.ev is None:
                    assert await station.plug_in(1, SimulatedEv(capacity_kwh=60, soc=20),
                                                 next(cards), dwell_s=36000)
                    assert evse.transaction_id is not None
                    started_tx.add(f"{station.cp_id}/{evse.transaction_id}")
            live = {f"{s.cp_id}/{s.evses[1].transaction_id}" for s in stations}

            await _until(lambda live=live: _open(ocpp_db, live, metered=True), 60,
                         f"cycle {cycle}: both sessions charging and metered")
            await _until(lambda: rows(store, "SELECT COUNT(*) FROM plans")[0][0] > 0, 30,
                         "a plan")
            before = _sessions(ocpp_db)
            cdrs = {tx: row for tx, row in before.items() if row["state"] == "closed"}
            plans = rows(store, "SELECT plan_id, created_at, status FROM plans")

            recovered = _recoveries(log)
            run.send_signal(signal.SIGKILL)  # kill -9: no clean stop of anything
            run.wait(10)
            run = await _start_cem(site, log, ocpp_port)
            # the port is bound before the database is recovered: wait for the recovery
            await _until(lambda n=recovered + len(live): _recoveries(log) >= n, 60,
                         f"cycle {cycle}: the restarted CSMS closed what was open")
            await _until(lambda live=live: _open(ocpp_db, live), 60,
                         f"cycle {cycle}: the sessions open at the kill resumed")
            after = _sessions(ocpp_db)
            assert {tx: after[tx] for tx in cdrs} == cdrs  # every CDR as it was
            assert set(after) == set(before)  # no session lost, none added twice
            for tx in live:  # resumed on the same row, nothing counted twice
                assert after[tx]["id"] == before[tx]["id"]
                assert after[tx]["energy_wh"] >= before[tx]["energy_wh"]
                assert after[tx]["stop_reason"] is None
            kept = {p[0]: p for p in rows(store, "SELECT plan_id, created_at, status FROM plans")}
            assert all(kept.get(p[0]) == p for p in plans)  # every committed plan kept
            assert rows(store, "SELECT * FROM congestion_windows") == windows
        for station in stations:  # the last EVs leave: their CDRs
            await asyncio.wait_for(station.booted.wait(), 60)
            await station.unplug(1)
        await _until(lambda: all(r["state"] == "closed" for r in _sessions(ocpp_db).values()),
                     30, "every session closed")
    finally:
        stop.set()
        for station in stations:
            with contextlib.suppress(Exception):
                await station.close()
        for task in links:
            task.cancel()
        await asyncio.gather(*links, return_exceptions=True)
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
            try:
                run.wait(30)
            except subprocess.TimeoutExpired:
                run.kill()
    final = _sessions(ocpp_db)
    assert set(final) == started_tx  # one row per transaction the chargers started
    assert len(final) == len({(r["cp_id"], r["transaction_id"]) for r in final.values()})
    for tx, row in final.items():  # each closed by its charger, with its reading
        assert row["stop_reason"] != RESTART_REASON and row["energy_wh"] > 0, (tx, row)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    closed = [e for e in lines if "was open when the CSMS stopped" in e["message"]]
    assert len(closed) == 10  # two sessions open at each of the five kills
    assert all("closed it from its last meter value" in e["message"] for e in closed)
    assert all(e["time"][-6] in "+-" and e["time"][10] == "T" for e in lines)  # ISO with zone
