"""The CEM store: survives restarts, batches the hot path, keeps windows, plans, instructions."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from cem.store import SCHEMA_VERSION, Store


async def test_restart_keeps_messages_and_rms_marks_them_disconnected(tmp_path: Path) -> None:
    db = tmp_path / "cem.db"
    store = await Store.open(db)
    store.session_opened("conn-1", peer="127.0.0.1:5000")
    store.session_identified("conn-1", "rm-a")
    store.touch_rm("rm-a", name="Battery", connected=True, control_type="FILL_RATE_BASED_CONTROL",
                   snapshot=lambda: {"soc": 0.5})
    for n in range(5):
        store.log_message(direction="in", message_type="PowerMeasurement", message_id=f"m{n}",
                          text="{}", session_id="conn-1", rm_id="rm-a", reception_status="OK")
    store.log_message(direction="out", message_type="FRBC.Instruction", message_id="i1",
                      text="{}", session_id="conn-1", rm_id="rm-a")
    store.log_reception_status("i1", "INVALID_CONTENT")
    await store.close()  # a crash would leave connected=1 and the session open

    store = await Store.open(db, for_cem=True)
    try:
        rms = await store.list_rms()
        assert [(r.rm_id, r.name, r.connected, r.messages_in, r.messages_out) for r in rms] == [
            ("rm-a", "Battery", False, 5, 1)]
        assert rms[0].control_type == "FILL_RATE_BASED_CONTROL"
        assert rms[0].snapshot == {"soc": 0.5}
        messages = await store.messages(rm_id="rm-a")
        assert len(messages) == 6
        assert messages[0]["message_type"] == "FRBC.Instruction"
        assert messages[0]["reception_status"] == "INVALID_CONTENT"
        sessions = await store.query("SELECT rm_id, reason FROM sessions")
        assert sessions == [("rm-a", "CEM restarted")]
    finally:
        await store.close()


async def test_reopen_after_a_crash_marks_rms_disconnected(tmp_path: Path) -> None:
    db = tmp_path / "cem.db"
    store = await Store.open(db)
    store.touch_rm("rm-b", name="Charger", connected=True)
    await store.flush()
    # simulate a crash: no close(); the file still says connected
    assert sqlite3.connect(db).execute("SELECT connected FROM rms").fetchone() == (1,)
    await store.close()
    sqlite3.connect(db).execute("UPDATE rms SET connected = 1").connection.commit()
    # another process (cem congestion add) next to a live CEM changes nothing
    store = await Store.open(db)
    try:
        assert [r.connected for r in await store.list_rms()] == [True]
    finally:
        await store.close()
    store = await Store.open(db, for_cem=True)
    try:
        assert [r.connected for r in await store.list_rms()] == [False]
    finally:
        await store.close()


async def test_congestion_windows_plans_and_instructions(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "cem.db")
    try:
        tz = timezone(timedelta(hours=1))
        first = await store.add_congestion(datetime(2026, 11, 23, 17, tzinfo=tz),
                                           datetime(2026, 11, 23, 20, tzinfo=tz),
                                           import_limit_kw=10.0, source="dso")
        second = await store.add_congestion(datetime(2026, 11, 23, 8, tzinfo=UTC),
                                            datetime(2026, 11, 23, 9, tzinfo=UTC),
                                            export_limit_kw=5.0)
        windows = await store.list_congestion()
        assert [w.window_id for w in windows] == [second, first]
        assert windows[1].start == datetime(2026, 11, 23, 16, tzinfo=UTC)
        assert windows[1].import_limit_kw == 10.0 and windows[1].export_limit_kw is None
        assert windows[1].source == "dso"
        later = await store.list_congestion(ending_after=datetime(2026, 11, 23, 10, tzinfo=UTC))
        assert [w.window_id for w in later] == [first]
        with pytest.raises(ValueError, match="end after"):
            await store.add_congestion(datetime(2026, 1, 2, tzinfo=UTC),
                                       datetime(2026, 1, 1, tzinfo=UTC), import_limit_kw=1)
        with pytest.raises(ValueError, match="timezone"):
            await store.add_congestion(datetime(2026, 1, 1), datetime(2026, 1, 2),
                                       import_limit_kw=1)

        plan_id = await store.record_plan(horizon_start=datetime(2026, 11, 23, tzinfo=UTC),
                                          ptu_minutes=15, status="FEASIBLE", objective=12.5,
                                          bound=12.0, gap=0.04, solve_s=0.3,
                                          payload={"ev-1": [0, 7400]})
        instruction_id = await store.record_instruction(
            rm_id="rm-a", message_id="msg-1", message_type="FRBC.Instruction", plan_id=plan_id,
            text="{}")
        assert instruction_id > 0
        store.log_reception_status("msg-1", "OK")
        await store.flush()
        rows = await store.query("SELECT plan_id, reception_status FROM instructions")
        assert rows == [(plan_id, "OK")]
        payload = await store.query("SELECT payload, gap FROM plans")
        assert payload == [('{"ev-1": [0, 7400]}', 0.04)]
    finally:
        await store.close()


async def test_hot_path_is_batched_and_fast(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "cem.db", flush_interval_s=0.05)
    try:
        began = time.perf_counter()
        for n in range(20_000):
            rm = f"rm-{n % 1000}"
            store.log_message(direction="in", message_type="PowerMeasurement",
                              message_id=f"id-{n}", text='{"message_type":"PowerMeasurement"}',
                              rm_id=rm, reception_status="OK")
            store.touch_rm(rm, snapshot=lambda: {"x": 1})
            store.record_measurements(rm, time.time(), [("ELECTRIC.POWER.L1", 230.0)])
        appended = time.perf_counter() - began
        await store.flush()
        total = time.perf_counter() - began
        assert appended < 1.0  # appending never waits for the disk
        assert total < 10.0
        count = await store.query("SELECT COUNT(*), SUM(messages_in) FROM rms")
        assert count == [(1000, 20_000)]
        assert store.stats.flushes < 50  # batches, not one transaction per message
        # messages and measurements interleave, yet each flush runs one statement per table
        assert store.stats.statements <= 2 * store.stats.flushes
        assert await store.query("SELECT COUNT(*) FROM measurements") == [(20_000,)]
    finally:
        await store.close()


async def test_retention_deletes_old_messages_only(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "cem.db", retention_days=2)
    try:
        now = time.time()
        store.log_message(direction="in", message_type="old", message_id="a", text="",
                          at=now - 3 * 86400)
        store.log_message(direction="in", message_type="new", message_id="b", text="", at=now)
        store.record_measurements("rm-a", now - 3 * 86400, [("ELECTRIC.POWER.L1", 100.0)])
        await store.flush()
        deleted = await store.apply_retention()
        assert deleted == 2
        assert [m["message_type"] for m in await store.messages()] == ["new"]
    finally:
        await store.close()


async def test_a_store_from_a_newer_cem_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "cem.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer CEM"):
        await Store.open(db)


async def test_one_bad_row_loses_nothing_else_and_is_kept_with_its_reason(tmp_path: Path) -> None:
    """A row SQLite refuses (here a measurement without a value) must not take the other RMs'
    rows of its batch with it: they are written, the bad row is quarantined with the reason."""
    db = tmp_path / "cem.db"
    store = await Store.open(db)
    try:
        store.record_measurements("rm-a", 1000.0, [("ELECTRIC.POWER.L1", 1200.0)])
        store.record_measurements("rm-bad", 1000.0, [("ELECTRIC.POWER.L1", None)])  # type: ignore[list-item]
        store.record_measurements("rm-b", 1000.0, [("ELECTRIC.POWER.L1", 800.0)])
        store.log_message(direction="in", message_type="PowerMeasurement", message_id="m1",
                          text="{}", rm_id="rm-a", reception_status="OK")
        store.touch_rm("rm-b", name="Heat pump", connected=True)
        window = await store.add_congestion(datetime(2026, 12, 6, 17, tzinfo=UTC),
                                            datetime(2026, 12, 6, 20, tzinfo=UTC), 10.0)
        assert window > 0  # an awaited write in the same batch still succeeds
        quarantined = await store.quarantined_rows()
        assert store.stats.quarantined == 1
    finally:
        await store.close()
    with sqlite3.connect(db) as plain:
        rows = plain.execute("SELECT rm_id, value FROM measurements ORDER BY rm_id").fetchall()
        assert rows == [("rm-a", 1200.0), ("rm-b", 800.0)]
        assert plain.execute("SELECT COUNT(*) FROM s2_messages").fetchone() == (1,)
        assert plain.execute("SELECT name FROM rms WHERE rm_id = 'rm-b'").fetchone() == (
            "Heat pump",)
        assert plain.execute("SELECT COUNT(*) FROM congestion_windows").fetchone() == (1,)
    (bad,) = quarantined
    assert "measurements" in bad["statement"] and "rm-bad" in bad["params"]
    assert "NOT NULL" in bad["reason"]
