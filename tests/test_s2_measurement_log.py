"""The message log keeps every message but an RM's measurements between logged ones.

`store.measurement_log_interval_s` (docs/adr/0010, round 4): a real `cem run`, raw websocket
RMs (the bench's), and the SQLite file read back after a clean stop. And migration 9 on a
store of the version before.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from cem.app.bench_s2 import BenchRm
from cem.app.cli import app
from cem.store import MIGRATIONS, Store

ROOT = Path(__file__).resolve().parent.parent

BAD_MEASUREMENT = ('{"message_type":"PowerMeasurement","message_id":"%s",'
                   '"measurement_timestamp":"2026-12-07T00:00:00Z","values":[{"commodity_quantity":'
                   '"ELECTRIC.POWER.L1","value":"NaN"}]}')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_cem(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cem.app.cli", "run", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def listening(process: asyncio.subprocess.Process, seen: list[str]) -> None:
    assert process.stdout is not None
    while not seen or "S2 CEM listening on" not in seen[-1]:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        if not line:
            raise AssertionError("cem run ended early:\n" + "".join(seen))
        seen.append(line)


def write_site(tmp_path: Path, port: int, interval: str) -> Path:
    config = tmp_path / "site.toml"
    config.write_text(f'[site]\nname = "Log test"\n[server]\nhost = "127.0.0.1"\nport = {port}\n'
                      f'[store]\npath = "{tmp_path / "cem.db"}"\n'
                      f'measurement_log_interval_s = {interval}\n'
                      '[http]\nenabled = false\n[grid]\nfuse_a = 25\nimport_limit_kw = 17\n')
    return config


async def burst(rm: BenchRm, count: int) -> None:
    """`count` measurements back to back, and wait until each is answered."""
    answered = len(rm.latencies) + count
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for value in range(count):
        rm.send_measurement(1000 + value, stamp)
    while len(rm.latencies) < answered:
        rm.acked.clear()
        await asyncio.wait_for(rm.acked.wait(), 20)


async def test_the_log_keeps_every_other_message_and_one_measurement_per_interval(
        tmp_path: Path) -> None:
    port = free_port()
    process = await start_cem(write_site(tmp_path, port, "1"))
    seen: list[str] = []
    rms = [BenchRm(n, f"ws://127.0.0.1:{port}") for n in range(2)]
    try:
        await listening(process, seen)
        for rm in rms:
            await asyncio.wait_for(rm.open(), 20)   # Handshake, details, control type selected
        for rm in rms:
            await burst(rm, 10)      # within the interval: the first is logged
        rms[0].sent_at["refused-1"] = time.perf_counter()
        rms[0].send_text(BAD_MEASUREMENT % "refused-1")   # refused: logged like any message
        await asyncio.sleep(1.1)     # the interval has passed
        for rm in rms:
            await burst(rm, 5)       # the first is logged again
        assert [rm.not_ok for rm in rms] == [1, 0]
        for rm in rms:
            await rm.close()
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, "".join(seen) + rest.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    db = sqlite3.connect(tmp_path / "cem.db")
    try:
        for rm, refused in zip(rms, (1, 0), strict=True):
            rm_id = rm.resource_id
            logged = db.execute(
                "SELECT direction, message_type, reception_status FROM s2_messages"
                " WHERE rm_id = ? ORDER BY id", (rm_id,)).fetchall()
            assert logged[:5] == [("out", "Handshake", "OK"), ("in", "Handshake", "OK"),
                                  ("out", "HandshakeResponse", "OK"),
                                  ("in", "ResourceManagerDetails", "OK"),
                                  ("out", "SelectControlType", "OK")], logged
            measurements = [row[2] for row in logged if row[1] == "PowerMeasurement"]
            assert measurements == ["OK"] + ["INVALID_CONTENT"] * refused + ["OK"], logged
            assert db.execute("SELECT COUNT(*) FROM measurements WHERE rm_id = ?",
                              (rm_id,)).fetchone() == (2,)
            # every message the RM sent still counts (what `cem status` shows)
            assert db.execute("SELECT messages_in FROM rms WHERE rm_id = ?",
                              (rm_id,)).fetchone() == (2 + 15 + refused,)
    finally:
        db.close()


def test_a_bad_measurement_log_interval_is_a_clear_error(tmp_path: Path) -> None:
    config = write_site(tmp_path, 8765, "-5")
    result = CliRunner().invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "store.measurement_log_interval_s (line 8)" in result.output
    assert "greater than or equal to 0" in result.output


async def test_a_schema_8_store_is_migrated_and_its_session_rows_still_claimed(
        tmp_path: Path) -> None:
    """Migration 9 (the partial session index, no measurements_rm) on a store of the last
    version: its rows stay, and a session identified afterwards still claims its messages."""
    path = tmp_path / "cem.db"
    old = sqlite3.connect(path)
    for script in MIGRATIONS[:8]:
        old.executescript(script)
    old.execute("PRAGMA user_version = 8")
    old.execute("INSERT INTO s2_messages (at, session_id, direction, message_type, text)"
                " VALUES (1.0, 'conn-1', 'in', 'Handshake', '{}')")
    old.execute("INSERT INTO measurements VALUES (1.0, 'rm-a', 'ELECTRIC.POWER.L1', 5.0)")
    old.commit()
    old.close()
    store = await Store.open(path)
    store.session_identified("conn-1", "rm-a")
    await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (9,)
        indexes = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                                  " AND sql IS NOT NULL").fetchall())
        assert "measurements_rm" not in indexes and "measurements_at" in indexes
        assert indexes["s2_messages_session"].endswith("WHERE rm_id IS NULL")
        assert db.execute("SELECT rm_id FROM s2_messages").fetchall() == [("rm-a",)]
        assert db.execute("SELECT messages_in FROM rms WHERE rm_id = 'rm-a'").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM measurements").fetchone() == (1,)
    finally:
        db.close()
