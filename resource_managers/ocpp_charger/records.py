"""Charging sessions and charge detail records (CDRs) in the RM's own SQLite file.

One table: a session row is written at the start of a transaction, updated with every meter
value (so the energy and cost so far survive a crash) and closed at the end; a closed row is the
CDR. A session still open when the process died is closed at the next start from its last meter
value (`stop_reason` says so); if the charger later reports that transaction again, the row is
reopened and the charger's own StopTransaction closes it with the exact meter reading. So a CDR is
never lost and never counted twice.

One writer (the central system), WAL mode so `cem sessions` / `cem cdrs` can read meanwhile.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

RESTART_REASON = "closed at restart from the last meter value"

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    cp_id TEXT NOT NULL,
    evse_id INTEGER NOT NULL,
    transaction_id TEXT NOT NULL,
    id_tag TEXT,
    card_name TEXT,
    started_at TEXT NOT NULL,
    stopped_at TEXT,
    meter_start_wh REAL NOT NULL,
    meter_last_wh REAL NOT NULL,
    last_meter_at TEXT NOT NULL,
    energy_wh REAL NOT NULL DEFAULT 0,
    peak_w REAL NOT NULL DEFAULT 0,
    power_w REAL NOT NULL DEFAULT 0,
    soc REAL,
    cost_eur REAL NOT NULL DEFAULT 0,
    limit_a REAL,
    stop_reason TEXT,
    state TEXT NOT NULL DEFAULT 'open',
    UNIQUE (cp_id, transaction_id)
);
CREATE INDEX IF NOT EXISTS sessions_state ON sessions (state);
"""


@dataclass
class SessionRow:
    """One charging session (a CDR once `state` is 'closed')."""

    id: int
    cp_id: str
    evse_id: int
    transaction_id: str
    id_tag: str | None
    card_name: str | None
    started_at: datetime
    stopped_at: datetime | None
    meter_start_wh: float
    meter_last_wh: float
    last_meter_at: datetime
    energy_wh: float
    peak_w: float
    power_w: float
    soc: float | None
    cost_eur: float
    limit_a: float | None
    stop_reason: str | None
    state: str

    @property
    def resumable(self) -> bool:
        """Still running, or closed only because the CSMS restarted (the charger may go on)."""
        return self.state == "open" or self.stop_reason == RESTART_REASON

    @classmethod
    def from_sql(cls, row: sqlite3.Row | aiosqlite.Row) -> SessionRow:
        def when(value: str | None) -> datetime | None:
            return datetime.fromisoformat(value) if value else None

        return cls(
            id=row["id"], cp_id=row["cp_id"], evse_id=row["evse_id"],
            transaction_id=row["transaction_id"], id_tag=row["id_tag"],
            card_name=row["card_name"], started_at=when(row["started_at"]),  # type: ignore[arg-type]
            stopped_at=when(row["stopped_at"]), meter_start_wh=row["meter_start_wh"],
            meter_last_wh=row["meter_last_wh"],
            last_meter_at=when(row["last_meter_at"]),  # type: ignore[arg-type]
            energy_wh=row["energy_wh"], peak_w=row["peak_w"], power_w=row["power_w"],
            soc=row["soc"], cost_eur=row["cost_eur"], limit_a=row["limit_a"],
            stop_reason=row["stop_reason"], state=row["state"],
        )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


class SessionRecords:
    """Async access for the central system (the only writer)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.executescript(SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("session records are not open")
        return self._db

    async def _one(self, sql: str, args: tuple[object, ...]) -> SessionRow | None:
        async with self.db.execute(sql, args) as cursor:
            row = await cursor.fetchone()
        return SessionRow.from_sql(row) if row else None

    async def get(self, session_id: int) -> SessionRow | None:
        return await self._one("SELECT * FROM sessions WHERE id = ?", (session_id,))

    async def find(self, cp_id: str, transaction_id: str) -> SessionRow | None:
        return await self._one("SELECT * FROM sessions WHERE cp_id = ? AND transaction_id = ?",
                               (cp_id, transaction_id))

    async def open_sessions(self) -> list[SessionRow]:
        async with self.db.execute("SELECT * FROM sessions WHERE state = 'open' ORDER BY id") as c:
            return [SessionRow.from_sql(r) for r in await c.fetchall()]

    async def closed_sessions(self) -> list[SessionRow]:
        async with self.db.execute("SELECT * FROM sessions WHERE state = 'closed' ORDER BY id") as c:
            return [SessionRow.from_sql(r) for r in await c.fetchall()]

    async def start(self, *, cp_id: str, evse_id: int, transaction_id: str, id_tag: str | None,
                    card_name: str | None, started_at: datetime, meter_start_wh: float) -> int:
        """Record a new session and return its id."""
        cursor = await self.db.execute(
            "INSERT INTO sessions (cp_id, evse_id, transaction_id, id_tag, card_name, started_at,"
            " meter_start_wh, meter_last_wh, last_meter_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (cp_id, evse_id, transaction_id, id_tag, card_name, _iso(started_at), meter_start_wh,
             meter_start_wh, _iso(started_at)),
        )
        await self.db.commit()
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def set_tag(self, session_id: int, id_tag: str, card_name: str | None) -> None:
        await self.db.execute("UPDATE sessions SET id_tag = ?, card_name = ? WHERE id = ?",
                              (id_tag, card_name, session_id))
        await self.db.commit()

    async def meter(self, session_id: int, *, meter_wh: float | None, at: datetime,
                    power_w: float | None, soc: float | None, price_eur_per_kwh: float) -> None:
        """Add a meter reading: energy so far, cost of the new energy at this price, peak power."""
        row = await self.get(session_id)
        if row is None:
            return
        meter_wh = row.meter_last_wh if meter_wh is None else max(meter_wh, row.meter_last_wh)
        added_wh = meter_wh - row.meter_last_wh
        power = row.power_w if power_w is None else power_w
        await self.db.execute(
            "UPDATE sessions SET meter_last_wh = ?, last_meter_at = ?, energy_wh = ?,"
            " peak_w = MAX(peak_w, ?), power_w = ?, soc = COALESCE(?, soc),"
            " cost_eur = cost_eur + ? WHERE id = ?",
            (meter_wh, _iso(at), meter_wh - row.meter_start_wh, power, power, soc,
             added_wh / 1000 * price_eur_per_kwh, session_id),
        )
        await self.db.commit()

    async def rebase(self, session_id: int, meter_wh: float) -> None:
        """A session that started with an implausible meterStart counts from this reading."""
        await self.db.execute(
            "UPDATE sessions SET meter_start_wh = ?, meter_last_wh = ?, energy_wh = 0,"
            " cost_eur = 0 WHERE id = ?", (meter_wh, meter_wh, session_id))
        await self.db.commit()

    async def set_limit(self, session_id: int, limit_a: float | None) -> None:
        await self.db.execute("UPDATE sessions SET limit_a = ? WHERE id = ?", (limit_a, session_id))
        await self.db.commit()

    async def stop(self, session_id: int, *, meter_stop_wh: float | None, at: datetime,
                   reason: str, price_eur_per_kwh: float) -> SessionRow | None:
        """Close a session (the CDR), with the final meter reading when the charger gave one."""
        await self.meter(session_id, meter_wh=meter_stop_wh, at=at, power_w=0.0, soc=None,
                         price_eur_per_kwh=price_eur_per_kwh)
        await self.db.execute(
            "UPDATE sessions SET state = 'closed', stopped_at = ?, stop_reason = ?, power_w = 0"
            " WHERE id = ?", (_iso(at), reason, session_id))
        await self.db.commit()
        return await self.get(session_id)

    async def reopen(self, session_id: int) -> None:
        """A session closed at restart is running after all: keep counting on the same row."""
        await self.db.execute(
            "UPDATE sessions SET state = 'open', stopped_at = NULL, stop_reason = NULL WHERE id = ?",
            (session_id,))
        await self.db.commit()

    async def last_resumable(self, cp_id: str, evse_id: int) -> SessionRow | None:
        """The newest session of an EVSE if it is open or was closed only by a restart."""
        row = await self._one("SELECT * FROM sessions WHERE cp_id = ? AND evse_id = ? "
                              "ORDER BY id DESC LIMIT 1", (cp_id, evse_id))
        return row if row is not None and row.resumable else None

    async def close_orphans(self) -> list[SessionRow]:
        """Close sessions left open by a previous run, from their last meter value."""
        closed = []
        for row in await self.open_sessions():
            await self.db.execute(
                "UPDATE sessions SET state = 'closed', stopped_at = last_meter_at, power_w = 0,"
                " stop_reason = ? WHERE id = ?", (RESTART_REASON, row.id))
            closed.append(row)
        await self.db.commit()
        return closed


def read_sessions(path: Path, state: str | None = None) -> list[SessionRow]:
    """Synchronous read for the CLI (a second reader next to the running central system)."""
    if not Path(path).exists():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    connection.row_factory = sqlite3.Row
    try:
        try:
            if state is None:
                rows = connection.execute("SELECT * FROM sessions ORDER BY id").fetchall()
            else:
                rows = connection.execute("SELECT * FROM sessions WHERE state = ? ORDER BY id",
                                          (state,)).fetchall()
        except sqlite3.OperationalError:
            return []  # not an OCPP RM database (yet)
    finally:
        connection.close()
    return [SessionRow.from_sql(r) for r in rows]
