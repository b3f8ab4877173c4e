"""The store's batch writer: many rows per statement, snapshots spread over flushes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cem.store import ROWS_PER_INSERT, Store


async def test_a_large_batch_keeps_every_message_in_order(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "cem.db", flush_interval_s=0.05)
    try:
        count = 3 * ROWS_PER_INSERT + 5  # full multi-row statements and a remainder
        for n in range(count):
            store.log_message(direction="in", message_type="PowerMeasurement",
                              message_id=f"m{n}", text=f'{{"n": {n}}}', session_id="conn-1",
                              rm_id="rm-a", reception_status="OK", at=1000.0 + n)
            store.record_measurements("rm-a", 1000.0 + n, [("ELECTRIC.POWER.L1", float(n))])
        await store.flush()
        ids = await store.query("SELECT message_id, text FROM s2_messages ORDER BY id")
        assert ids == [(f"m{n}", f'{{"n": {n}}}') for n in range(count)]
        values = await store.query("SELECT value FROM measurements ORDER BY rowid")
        assert [v for (v,) in values] == [float(n) for n in range(count)]
        rms = await store.list_rms()
        assert rms[0].messages_in == count
    finally:
        await store.close()


async def test_snapshots_of_many_rms_are_spread_over_flushes(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "cem.db", flush_interval_s=0.02)
    store.snapshots_per_flush = 3
    made: list[str] = []

    def snapshot_of(rm_id: str) -> object:
        def snapshot() -> dict[str, str]:
            made.append(rm_id)
            return {"rm": rm_id}
        return snapshot

    try:
        for n in range(10):
            store.touch_rm(f"rm-{n}", name=f"RM {n}", snapshot=snapshot_of(f"rm-{n}"))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(made) == 10:
                break
        assert sorted(made) == sorted(f"rm-{n}" for n in range(10))
        await asyncio.sleep(0.2)  # the last snapshot is made before its flush is written
        assert store.stats.flushes >= 4  # at most 3 snapshots per writer flush
        rms = {r.rm_id: r for r in await store.list_rms()}
        assert all(rms[f"rm-{n}"].snapshot == {"rm": f"rm-{n}"} for n in range(10))

        # an awaited flush writes every snapshot at once
        made.clear()
        for n in range(10):
            store.touch_rm(f"rm-{n}", snapshot=snapshot_of(f"rm-{n}"))
        await store.flush()
        assert len(made) == 10
    finally:
        await store.close()


async def test_a_busy_rms_counters_ride_with_its_snapshot_and_are_complete_when_flushed(
        tmp_path: Path) -> None:
    """While an RM only sends measurements its row is not rewritten for its counters alone
    (at most once per `rm_row_interval_s`, 5 s: with the server's snapshot), and an awaited
    flush writes them all."""
    store = await Store.open(tmp_path / "cem.db", flush_interval_s=0.05)
    try:
        store.touch_rm("rm-1", name="EV 1", connected=True)
        store.count_message("rm-1", 1.0)
        await store.flush()
        for i in range(40):   # 2 s of measurements, 20 a second, flushed every 50 ms
            store.count_message("rm-1", 2.0 + i)
            await asyncio.sleep(0.05)
        assert await _messages_in(tmp_path) == 1   # not rewritten for its counters
        await store.flush()
        assert await _messages_in(tmp_path) == 41
    finally:
        await store.close()


async def _messages_in(tmp_path: Path) -> int:
    import sqlite3

    db = sqlite3.connect(tmp_path / "cem.db")
    try:
        return int(db.execute("SELECT messages_in FROM rms WHERE rm_id = 'rm-1'").fetchone()[0])
    finally:
        db.close()
