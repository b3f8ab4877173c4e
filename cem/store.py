"""The CEM's memory: one SQLite file (WAL mode), one writer task, batched writes.

Why this shape: a site with 1000 RMs sends thousands of S2 messages a second. Writing each one
in its own transaction would stall the event loop and the disk. So the hot path only *appends*
to an in-memory batch (`log_message`, `touch_rm`, `record_measurements`: plain method calls, no
await) and one writer task flushes the batch every `flush_interval_s` in a single transaction
(`executemany` per statement, INSERTs 64 rows per statement). Per-RM counters and "last message
time" are coalesced in memory and written once per flush; RM snapshots, serialised on the event
loop, at most `snapshots_per_flush` per flush. Awaited methods (`add_congestion`, `record_plan`, ...) go through the
same writer, so there is exactly one writer and writes keep their order.

Message log, kept small on purpose: an incoming message is one row that also carries the
ReceptionStatus the CEM answered with; an RM's ReceptionStatus for a CEM message updates that
outgoing row's `reception_status` instead of adding a row. So every exchange is one row.
Every message is logged except an RM's accepted PowerMeasurements between logged ones: at most
one per `measurement_log_interval_s` per RM goes to the log and the measurements table (the
S2 server asks `measurement_due`); the others only count in the RM's row (`count_message`).
The live state, the guard and the dashboard see every measurement; the log is the audit trail.

A batch SQLite refuses (a row breaking a constraint) is written again row by row, each under
its own savepoint: the good rows land, the bad ones go to the `quarantine` table with the
statement, the parameters and the reason (`quarantined_rows()`), and one warning says so.

Times are UTC. Hot tables store epoch seconds (REAL); windows, plans and instructions store
ISO 8601 UTC text as well, so people can read them with the sqlite3 shell.

The schema is created and migrated on open (`PRAGMA user_version`). When the CEM opens it
(`for_cem=True`) every RM is marked disconnected and every session still open is closed with
reason "CEM restarted": a CEM that died did not see those disconnects; and old messages and
measurements are deleted after `retention_days`, at open and every hour. Other processes
(`cem congestion add`) open it without touching that, since a CEM may be running. The CEM
also stamps `cem_process` (pid, host, a heartbeat every `HEARTBEAT_S`, the time of a clean
stop), so `cem status` can tell a running CEM from one that was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

logger = logging.getLogger("cem.store")

MIGRATIONS: list[str] = [
    # 1: first schema
    """
    CREATE TABLE rms (
        rm_id TEXT PRIMARY KEY,
        name TEXT,
        control_type TEXT,
        connected INTEGER NOT NULL DEFAULT 0,
        first_seen REAL,
        last_message_at REAL,
        messages_in INTEGER NOT NULL DEFAULT 0,
        messages_out INTEGER NOT NULL DEFAULT 0,
        snapshot TEXT,
        snapshot_at REAL
    );
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        rm_id TEXT,
        peer TEXT,
        token_name TEXT,
        connected_at REAL NOT NULL,
        disconnected_at REAL,
        reason TEXT
    );
    CREATE INDEX sessions_rm ON sessions(rm_id, connected_at);
    CREATE TABLE s2_messages (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        session_id TEXT,
        rm_id TEXT,
        direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
        message_type TEXT,
        message_id TEXT,
        text TEXT,
        reception_status TEXT,
        status_at REAL
    );
    CREATE INDEX s2_messages_at ON s2_messages(at);
    CREATE INDEX s2_messages_rm ON s2_messages(rm_id, at);
    CREATE INDEX s2_messages_session ON s2_messages(session_id);
    CREATE INDEX s2_messages_out_id ON s2_messages(message_id) WHERE direction = 'out';
    CREATE TABLE plans (
        plan_id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        created_ts REAL NOT NULL,
        horizon_start TEXT,
        ptu_minutes INTEGER,
        status TEXT,
        reason TEXT,
        objective REAL,
        bound REAL,
        gap REAL,
        solve_s REAL,
        payload TEXT
    );
    CREATE TABLE instructions (
        instruction_id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        created_ts REAL NOT NULL,
        rm_id TEXT,
        plan_id INTEGER,
        message_id TEXT,
        message_type TEXT,
        execution_time TEXT,
        text TEXT,
        reception_status TEXT,
        status_at REAL
    );
    CREATE INDEX instructions_message ON instructions(message_id);
    CREATE INDEX instructions_rm ON instructions(rm_id, created_ts);
    CREATE TABLE measurements (
        at REAL NOT NULL,
        rm_id TEXT NOT NULL,
        commodity_quantity TEXT NOT NULL,
        value REAL NOT NULL
    );
    CREATE INDEX measurements_rm ON measurements(rm_id, at);
    CREATE INDEX measurements_at ON measurements(at);
    CREATE TABLE congestion_windows (
        window_id INTEGER PRIMARY KEY,
        start TEXT NOT NULL,
        end TEXT NOT NULL,
        import_limit_kw REAL,
        export_limit_kw REAL,
        source TEXT NOT NULL DEFAULT 'cli',
        created_at TEXT NOT NULL
    );
    CREATE INDEX congestion_end ON congestion_windows(end);
    """,
    # 2: the CEM process that owns the store, so readers can tell a live CEM from a dead one
    """
    CREATE TABLE cem_process (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        stopped_at REAL
    );
    """,
    # 3: rows a batch could not write, kept with the reason instead of losing the batch
    """
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        statement TEXT NOT NULL,
        params TEXT,
        reason TEXT NOT NULL
    );
    """,
    # 4: S2 Connect pairing (cem/s2connect): this CEM's node, pairing codes, paired nodes with
    # their active access token (a SHA-256, never the token), pending tokens
    """
    CREATE TABLE s2c_node (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        node_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        pairing_url TEXT
    );
    CREATE TABLE s2c_codes (
        kind TEXT PRIMARY KEY CHECK (kind IN ('dynamic', 'static')),
        code TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL
    );
    CREATE TABLE s2c_pairings (
        node_id TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        description TEXT,
        endpoint TEXT,
        paired_at REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('paired', 'unpaired')),
        unpaired_at REAL,
        unpaired_by TEXT,
        token_hash TEXT,
        last_session_at REAL,
        rm_id TEXT,
        peer_url TEXT,
        peer_ca TEXT
    );
    CREATE TABLE s2c_pending (
        token_hash TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        s2_version TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE s2c_initiations (
        node_id TEXT PRIMARY KEY,
        code TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    # 5: day-ahead prices fetched from a feed (kept across restarts and feed outages), and what
    # each grid-signal source last said (for `cem status`, `cem congestion list`, `cem openadr`)
    """
    CREATE TABLE price_cache (
        source TEXT NOT NULL,
        start TEXT NOT NULL,
        resolution_s INTEGER NOT NULL,
        price_eur_per_mwh REAL NOT NULL,
        fetched_at REAL NOT NULL,
        PRIMARY KEY (source, start)
    );
    CREATE TABLE signal_state (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        ok INTEGER NOT NULL,
        detail TEXT,
        last_update REAL,
        saved_at REAL NOT NULL,
        payload TEXT
    );
    """,
    # 6: the operator's charging mode per EV charger (POST /api/evs/{evse}/mode), kept over a
    # restart until the EV leaves
    """
    CREATE TABLE ev_modes (
        rm_id TEXT PRIMARY KEY,
        mode TEXT NOT NULL,
        min_kwh REAL,
        set_at TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT 'api'
    );
    """,
    # 7: which credential owns each resource id (a bearer token's name, or "s2connect:<node>"):
    # an RM presenting another credential cannot take that resource id over
    """
    CREATE TABLE rm_owners (
        rm_id TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        since REAL NOT NULL
    );
    """,
    # 8: finished EV visits (the control loop records one as an EV leaves; the departure
    # learning, `cem.site.departures`, reads them back): where, when it came, what the driver
    # said, when it really left, what it got. Kept beyond the message retention: it is history.
    """
    CREATE TABLE ev_visits (
        id INTEGER PRIMARY KEY,
        evse TEXT NOT NULL,
        driver TEXT,
        arrival TEXT NOT NULL,
        departure TEXT NOT NULL,
        typed_departure TEXT,
        need_wh REAL,
        delivered_wh REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX ev_visits_arrival ON ev_visits (arrival);
    """,
    # 9: cheaper message log rows (docs/adr/0010, round 4). The session index only holds the
    # rows a session's RM has not claimed yet (`rm_id IS NULL`: what session_identified reads
    # and updates), not every row of the log; measurements_rm goes: nothing reads measurements
    # by RM, and retention and reports by time use measurements_at.
    """
    DROP INDEX IF EXISTS s2_messages_session;
    CREATE INDEX s2_messages_session ON s2_messages(session_id) WHERE rm_id IS NULL;
    DROP INDEX IF EXISTS measurements_rm;
    """,
]

HEARTBEAT_S = 10.0  # how often a running CEM stamps cem_process.heartbeat_at

SCHEMA_VERSION = len(MIGRATIONS)

_INSERT_MESSAGE = (
    "INSERT INTO s2_messages (at, session_id, rm_id, direction, message_type, message_id, text,"
    " reception_status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_OUT_STATUS = (
    "UPDATE s2_messages SET reception_status = ?, status_at = ? "
    "WHERE message_id = ? AND direction = 'out'"
)
_INSTRUCTION_STATUS = (
    "UPDATE instructions SET reception_status = ?, status_at = ? WHERE message_id = ?"
)
_CLAIM_MESSAGES = "UPDATE s2_messages SET rm_id = ? WHERE session_id = ? AND rm_id IS NULL"
_COUNT_CLAIMED = """
UPDATE rms SET
    messages_in = messages_in + (SELECT COUNT(*) FROM s2_messages
                                 WHERE session_id = ? AND direction = 'in' AND rm_id IS NULL),
    messages_out = messages_out + (SELECT COUNT(*) FROM s2_messages
                                   WHERE session_id = ? AND direction = 'out' AND rm_id IS NULL)
WHERE rm_id = ?
"""
_INSERT_MEASUREMENT = (
    "INSERT INTO measurements (at, rm_id, commodity_quantity, value) VALUES (?, ?, ?, ?)"
)
_UPSERT_RM = """
INSERT INTO rms (rm_id, name, control_type, connected, first_seen, last_message_at,
                 messages_in, messages_out, snapshot, snapshot_at)
VALUES (:rm_id, :name, :control_type, COALESCE(:connected, 0), :at, :last_message_at,
        :messages_in, :messages_out, :snapshot, :snapshot_at)
ON CONFLICT(rm_id) DO UPDATE SET
    name = COALESCE(excluded.name, rms.name),
    control_type = CASE WHEN :control_type_set THEN excluded.control_type ELSE rms.control_type END,
    connected = COALESCE(:connected, rms.connected),
    last_message_at = MAX(COALESCE(excluded.last_message_at, 0), COALESCE(rms.last_message_at, 0)),
    messages_in = rms.messages_in + excluded.messages_in,
    messages_out = rms.messages_out + excluded.messages_out,
    snapshot = COALESCE(excluded.snapshot, rms.snapshot),
    snapshot_at = COALESCE(excluded.snapshot_at, rms.snapshot_at)
"""


def utc_iso(moment: datetime | float | None = None) -> str:
    """ISO 8601 UTC text for a datetime, epoch seconds or now."""
    if moment is None:
        moment = time.time()
    if isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment, UTC)
    if moment.tzinfo is None:
        raise ValueError("times need a timezone (UTC inside the CEM)")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


@dataclass
class CongestionRow:
    """A congestion window as stored (start/end are timezone-aware UTC)."""

    window_id: int
    start: datetime
    end: datetime
    import_limit_kw: float | None
    export_limit_kw: float | None
    source: str
    created_at: datetime


@dataclass
class RmRow:
    """What the store knows about one RM."""

    rm_id: str
    name: str | None
    control_type: str | None
    connected: bool
    first_seen: float | None
    last_message_at: float | None
    messages_in: int
    messages_out: int
    snapshot: dict[str, Any] | None


@dataclass
class _RmDelta:
    """Changes to one RM row, coalesced in memory until the next flush."""

    name: str | None = None
    control_type: str | None = None
    control_type_set: bool = False
    connected: bool | None = None
    last_message_at: float | None = None
    messages_in: int = 0
    messages_out: int = 0
    snapshot: Callable[[], dict[str, Any]] | dict[str, Any] | None = None

    def counts_only(self) -> bool:
        """Only message counters and the last message time changed."""
        return (self.name is None and not self.control_type_set and self.connected is None
                and self.snapshot is None)


@dataclass
class StoreStats:
    """Counters for logs and the bench."""

    flushes: int = 0
    rows_written: int = 0
    statements: int = 0
    last_flush_s: float = 0.0
    max_flush_s: float = 0.0
    dropped: int = 0
    errors: int = 0
    quarantined: int = 0
    _started: float = field(default_factory=time.monotonic)


class Store:
    """SQLite store with one writer task. Open with `await Store.open(path)`; `await close()`."""

    def __init__(self, db: aiosqlite.Connection, path: Path, *, retention_days: int,
                 flush_interval_s: float, max_pending: int) -> None:
        self._db = db
        self.path = path
        self.retention_days = retention_days
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.stats = StoreStats()
        self._inserts: dict[str, list[tuple[Any, ...]]] = {}   # per statement, in order
        self._pending: list[tuple[str, tuple[Any, ...]]] = []   # updates, in order, after inserts
        self._pending_rows = 0
        self._rm_deltas: dict[str, _RmDelta] = {}
        self._calls: list[tuple[Callable[[aiosqlite.Connection], Any], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self._last_retention = 0.0
        self._last_heartbeat = time.time()
        self.for_cem = False
        self.snapshots_per_flush = 100
        #: an RM row whose only news is its message counters and last message time is written
        #: at most once per this interval (1000 RMs each sending 5 messages a second made one
        #: row upsert per message); anything else about it, and an awaited flush, write it now.
        #: 5 s: the S2 server's snapshot interval, so a busy RM's counters ride with its
        #: snapshot (each upsert rewrites the whole row, snapshot text included: at 1 s, 1000
        #: busy RMs cost ~13 µs of CPU per message, docs/adr/0010 round 10)
        self.rm_row_interval_s = 5.0
        self._rm_written: dict[str, float] = {}   # rm id -> when its row was last written
        #: an RM's accepted PowerMeasurements are logged at most once per this many seconds
        #: (`measurement_due`); 0: every one
        self.measurement_log_interval_s = 0.0
        self._measurement_logged: dict[str, float] = {}   # rm id -> its last logged one's time

    # --- opening and closing ------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path | str, *, retention_days: int = 30,
                   flush_interval_s: float = 0.2, max_pending: int = 500_000,
                   for_cem: bool = False, measurement_log_interval_s: float = 0.0) -> Store:
        """Open (create, migrate) the database and start the writer task.

        `for_cem=True` is for the CEM process itself: a CEM that starts knows no RM is connected
        yet, so it marks every RM disconnected and closes sessions left open by a crash, and it
        applies retention (now and hourly). Other users (`cem congestion add`, reports) leave
        that alone: they may run next to a live CEM. `measurement_log_interval_s`: see
        `measurement_due` (0, the default: every measurement is logged).
        """
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path))
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA temp_store=MEMORY")  # multi-row INSERTs' statement journal
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute("PRAGMA foreign_keys=ON")
            await _migrate(db, path)
            if for_cem:
                now = time.time()
                await db.execute(
                    "INSERT INTO cem_process (id, pid, host, started_at, heartbeat_at, stopped_at)"
                    " VALUES (1, ?, ?, ?, ?, NULL) ON CONFLICT(id) DO UPDATE SET pid = excluded.pid,"
                    " host = excluded.host, started_at = excluded.started_at,"
                    " heartbeat_at = excluded.heartbeat_at, stopped_at = NULL",
                    (os.getpid(), socket.gethostname(), now, now))
                await db.execute("UPDATE rms SET connected = 0 WHERE connected != 0")
                await db.execute(
                    "UPDATE sessions SET disconnected_at = ?, reason = 'CEM restarted' "
                    "WHERE disconnected_at IS NULL", (time.time(),))
                await db.commit()
        except BaseException:
            await db.close()
            raise
        store = cls(db, path, retention_days=retention_days, flush_interval_s=flush_interval_s,
                    max_pending=max_pending)
        store.for_cem = for_cem
        store.measurement_log_interval_s = measurement_log_interval_s
        if for_cem:
            await store.apply_retention()
        else:
            store._last_retention = float("inf")  # retention is the CEM's job
        store._writer = asyncio.get_running_loop().create_task(store._write_loop(),
                                                               name="cem-store-writer")
        return store

    async def close(self) -> None:
        """Flush everything still pending and close the database."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._flush_once()
        if self.for_cem:
            with contextlib.suppress(Exception):
                await self._db.execute("UPDATE cem_process SET stopped_at = ? WHERE pid = ?",
                                       (time.time(), os.getpid()))
                await self._db.commit()
        await self._db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- hot path: no await, appended to the batch ----------------------------------------------

    def log_message(self, *, direction: str, message_type: str | None, message_id: str | None,
                    text: str | None, session_id: str | None = None, rm_id: str | None = None,
                    reception_status: str | None = None, at: float | None = None) -> None:
        """Log one S2 message (an incoming one with the status the CEM answered)."""
        at = time.time() if at is None else at
        self._append(_INSERT_MESSAGE, (at, session_id, rm_id, direction, message_type,
                                       message_id, text, reception_status))
        if rm_id is not None:
            self.count_message(rm_id, at, direction)

    def measurement_due(self, rm_id: str, at: float) -> bool:
        """Whether an RM's accepted PowerMeasurement received at `at` (epoch s) is to be logged.

        True for the first of each RM and then once `measurement_log_interval_s` has passed since
        the last one logged (or the clock went back); the caller then logs it (`log_message`,
        `record_measurements`), else only counts it (`count_message`).
        """
        interval = self.measurement_log_interval_s
        if interval <= 0:
            return True
        last = self._measurement_logged.get(rm_id)
        if last is not None and 0 <= at - last < interval:
            return False
        self._measurement_logged[rm_id] = at
        return True

    def count_message(self, rm_id: str, at: float, direction: str = "in") -> None:
        """Count an RM's message in its row (and its last time); a message that is not logged
        (a PowerMeasurement between logged ones) is only counted."""
        delta = self._delta(rm_id)
        delta.last_message_at = at
        if direction == "in":
            delta.messages_in += 1
        else:
            delta.messages_out += 1

    def log_reception_status(self, message_id: str, status: str, at: float | None = None) -> None:
        """The RM answered a CEM message: put its status on the outgoing row (and instruction)."""
        at = time.time() if at is None else at
        self._append(_OUT_STATUS, (status, at, message_id))
        self._append(_INSTRUCTION_STATUS, (status, at, message_id))

    def touch_rm(self, rm_id: str, *, name: str | None = None,
                 control_type: str | None = None, clear_control_type: bool = False,
                 connected: bool | None = None,
                 snapshot: Callable[[], dict[str, Any]] | dict[str, Any] | None = None) -> None:
        """Update what is known about an RM (coalesced until the next flush).

        `snapshot` may be a callable: it is called once, at flush time, so a busy RM costs one
        serialisation per flush, not one per message.
        """
        delta = self._delta(rm_id)
        if name is not None:
            delta.name = name
        if control_type is not None or clear_control_type:
            delta.control_type = control_type
            delta.control_type_set = True
        if connected is not None:
            delta.connected = connected
            if not connected:
                self._measurement_logged.pop(rm_id, None)
        if snapshot is not None:
            delta.snapshot = snapshot

    def record_measurements(self, rm_id: str, at: float,
                            values: Iterable[tuple[str, float]]) -> None:
        """Power values (commodity quantity, W) measured by an RM at one moment."""
        for quantity, value in values:
            self._append(_INSERT_MEASUREMENT, (at, rm_id, quantity, value))

    def session_opened(self, session_id: str, *, peer: str | None = None,
                       token_name: str | None = None, at: float | None = None) -> None:
        self._append("INSERT OR REPLACE INTO sessions (session_id, peer, token_name, connected_at)"
                     " VALUES (?, ?, ?, ?)",
                     (session_id, peer, token_name, time.time() if at is None else at))

    def session_identified(self, session_id: str, rm_id: str) -> None:
        """The session's RM is known: link the session and its messages logged so far to it."""
        self._append("UPDATE sessions SET rm_id = ? WHERE session_id = ?", (rm_id, session_id))
        self._delta(rm_id)  # the RM row exists before the count below (upserts run first)
        self._append(_COUNT_CLAIMED, (session_id, session_id, rm_id))
        self._append(_CLAIM_MESSAGES, (rm_id, session_id))

    def session_closed(self, session_id: str, reason: str, at: float | None = None) -> None:
        self._append("UPDATE sessions SET disconnected_at = ?, reason = ? WHERE session_id = ?",
                     (time.time() if at is None else at, reason, session_id))

    def bind_rm(self, rm_id: str, holder: str) -> None:
        """`holder` (a credential) owns resource id `rm_id` from now on."""
        self._append("INSERT OR REPLACE INTO rm_owners (rm_id, holder, since) VALUES (?, ?, ?)",
                     (rm_id, holder, time.time()))

    @property
    def pending(self) -> int:
        return self._pending_rows

    # --- awaited writes ---------------------------------------------------------------------------

    async def add_congestion(self, start: datetime, end: datetime,
                             import_limit_kw: float | None = None,
                             export_limit_kw: float | None = None,
                             source: str = "cli") -> int:
        """Store a congestion window; returns its id."""
        if end <= start:
            raise ValueError("a congestion window must end after it starts")
        if import_limit_kw is None and export_limit_kw is None:
            raise ValueError("a congestion window needs an import or export limit")
        row = (utc_iso(start), utc_iso(end), import_limit_kw, export_limit_kw, source, utc_iso())

        async def write(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(
                "INSERT INTO congestion_windows (start, end, import_limit_kw, export_limit_kw,"
                " source, created_at) VALUES (?, ?, ?, ?, ?, ?)", row)
            return int(cursor.lastrowid or 0)

        return await self._call(write)

    async def remove_congestion(self, window_id: int) -> bool:
        async def write(db: aiosqlite.Connection) -> bool:
            cursor = await db.execute("DELETE FROM congestion_windows WHERE window_id = ?",
                                      (window_id,))
            return cursor.rowcount > 0

        return await self._call(write)

    async def record_plan(self, *, horizon_start: datetime | None = None,
                          ptu_minutes: int | None = None, status: str | None = None,
                          reason: str | None = None, objective: float | None = None,
                          bound: float | None = None, gap: float | None = None,
                          solve_s: float | None = None, payload: Any = None) -> int:
        """Store a plan (payload: anything JSON-serialisable); returns its id."""
        now = time.time()
        row = (utc_iso(now), now, utc_iso(horizon_start) if horizon_start else None, ptu_minutes,
               status, reason, objective, bound, gap, solve_s,
               None if payload is None else json.dumps(payload, default=str))

        async def write(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(
                "INSERT INTO plans (created_at, created_ts, horizon_start, ptu_minutes, status,"
                " reason, objective, bound, gap, solve_s, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            return int(cursor.lastrowid or 0)

        return await self._call(write)

    async def record_instruction(self, *, rm_id: str, message_id: str, message_type: str,
                                 text: str | None = None, plan_id: int | None = None,
                                 execution_time: datetime | None = None,
                                 reception_status: str | None = None) -> int:
        """Store an instruction sent to an RM; its ReceptionStatus is filled in when it arrives."""
        now = time.time()
        row = (utc_iso(now), now, rm_id, plan_id, message_id, message_type,
               utc_iso(execution_time) if execution_time else None, text, reception_status)

        async def write(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(
                "INSERT INTO instructions (created_at, created_ts, rm_id, plan_id, message_id,"
                " message_type, execution_time, text, reception_status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            return int(cursor.lastrowid or 0)

        return await self._call(write)

    async def execute(self, *statements: tuple[str, Sequence[Any]]) -> list[int]:
        """Run (sql, params) write statements in order, all or none; rows changed by each.

        For tables a package keeps itself (cem/s2connect); they go through the one writer.
        """
        async def write(db: aiosqlite.Connection) -> list[int]:
            await db.execute("SAVEPOINT store_execute")
            try:
                counts = []
                for sql, params in statements:
                    cursor = await db.execute(sql, tuple(params))
                    counts.append(cursor.rowcount)
            except BaseException:
                await db.execute("ROLLBACK TO store_execute")
                await db.execute("RELEASE store_execute")
                raise
            await db.execute("RELEASE store_execute")
            return counts

        result: list[int] = await self._call(write)
        return result

    async def save_prices(self, source: str, points: Iterable[tuple[datetime, float]],
                          resolution_s: int) -> int:
        """Cache day-ahead prices (EUR/MWh) a feed fetched; a period fetched again replaces
        its price. Returns how many were written."""
        now = time.time()
        rows = [(source, utc_iso(start), resolution_s, float(price), now) for start, price in points]

        async def write(db: aiosqlite.Connection) -> int:
            await db.executemany(
                "INSERT INTO price_cache (source, start, resolution_s, price_eur_per_mwh,"
                " fetched_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(source, start) DO UPDATE SET"
                " resolution_s = excluded.resolution_s,"
                " price_eur_per_mwh = excluded.price_eur_per_mwh,"
                " fetched_at = excluded.fetched_at", rows)
            return len(rows)

        return await self._call(write)

    async def save_signal_state(self, name: str, kind: str, ok: bool, detail: str,
                                last_update: datetime | None, payload: Any = None) -> None:
        """What a grid-signal source last said (its windows, its link), for other processes."""
        row = (name, kind, int(ok), detail, last_update.timestamp() if last_update else None,
               time.time(), None if payload is None else json.dumps(payload, default=str))

        async def write(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO signal_state (name, kind, ok, detail, last_update, saved_at, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET kind = excluded.kind,"
                " ok = excluded.ok, detail = excluded.detail, last_update = excluded.last_update,"
                " saved_at = excluded.saved_at, payload = excluded.payload", row)

        await self._call(write)

    async def set_ev_mode(self, rm_id: str, mode: str, min_kwh: float | None,
                          set_at: datetime, source: str = "api") -> None:
        """Keep the operator's charging mode of one EV charger (replacing the previous one)."""
        row = (rm_id, mode, min_kwh, utc_iso(set_at), source)

        async def write(db: aiosqlite.Connection) -> None:
            await db.execute("INSERT OR REPLACE INTO ev_modes (rm_id, mode, min_kwh, set_at,"
                             " source) VALUES (?, ?, ?, ?, ?)", row)

        await self._call(write)

    async def clear_ev_mode(self, rm_id: str) -> bool:
        """Forget an EV charger's mode (the EV left); True if there was one."""
        async def write(db: aiosqlite.Connection) -> bool:
            cursor = await db.execute("DELETE FROM ev_modes WHERE rm_id = ?", (rm_id,))
            return cursor.rowcount > 0

        return bool(await self._call(write))

    async def list_ev_modes(self) -> list[tuple[str, str, float | None, datetime, str]]:
        """(rm_id, mode, min_kwh, set_at, source) of every EV charger with a mode."""
        async with self._db.execute(
                "SELECT rm_id, mode, min_kwh, set_at, source FROM ev_modes ORDER BY rm_id") as cur:
            rows = await cur.fetchall()
        return [(r[0], r[1], r[2], datetime.fromisoformat(r[3]), r[4]) for r in rows]

    async def record_visits(self, visits: list[tuple[str, str | None, datetime, datetime,
                                                     datetime | None, float | None, float]]) -> None:
        """Keep finished EV visits: (evse, driver, arrival, departure, typed departure,
        need Wh, delivered Wh) each."""
        rows = [(evse, driver, utc_iso(arrival), utc_iso(departure),
                 None if typed is None else utc_iso(typed), need, delivered)
                for evse, driver, arrival, departure, typed, need, delivered in visits]

        async def write(db: aiosqlite.Connection) -> None:
            await db.executemany("INSERT INTO ev_visits (evse, driver, arrival, departure,"
                                 " typed_departure, need_wh, delivered_wh)"
                                 " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

        if rows:
            await self._call(write)

    async def ev_visits(self, since: datetime | None = None) -> list[
            tuple[str, str | None, datetime, datetime, datetime | None, float | None, float]]:
        """Finished EV visits that arrived at or after `since` (all when None), oldest first."""
        query = ("SELECT evse, driver, arrival, departure, typed_departure, need_wh, delivered_wh"
                 " FROM ev_visits")
        args: tuple[Any, ...] = ()
        if since is not None:
            query += " WHERE arrival >= ?"
            args = (utc_iso(since),)
        async with self._db.execute(query + " ORDER BY arrival, id", args) as cur:
            rows = await cur.fetchall()
        return [(r[0], r[1], datetime.fromisoformat(r[2]), datetime.fromisoformat(r[3]),
                 None if r[4] is None else datetime.fromisoformat(r[4]), r[5], float(r[6]))
                for r in rows]

    # --- reads (they see everything flushed; call flush() first to see the very latest) -------

    async def cached_prices(self, source: str, start: datetime,
                            end: datetime) -> list[tuple[datetime, float, int]]:
        """Cached prices of `source` starting in [start, end): (start, EUR/MWh, resolution s)."""
        async with self._db.execute(
                "SELECT start, price_eur_per_mwh, resolution_s FROM price_cache WHERE source = ?"
                " AND start >= ? AND start < ? ORDER BY start",
                (source, utc_iso(start), utc_iso(end))) as cursor:
            rows = await cursor.fetchall()
        return [(datetime.fromisoformat(r[0]), float(r[1]), int(r[2])) for r in rows]

    async def list_congestion(self, *, ending_after: datetime | None = None) -> list[CongestionRow]:
        """Congestion windows, earliest first (only those ending after `ending_after` if given)."""
        sql = ("SELECT window_id, start, end, import_limit_kw, export_limit_kw, source, created_at"
               " FROM congestion_windows")
        params: tuple[Any, ...] = ()
        if ending_after is not None:
            sql += " WHERE end > ?"
            params = (utc_iso(ending_after),)
        sql += " ORDER BY start, window_id"
        async with self._db.execute(sql, params) as cursor:
            rows = await cursor.fetchall()
        return [CongestionRow(r[0], datetime.fromisoformat(r[1]), datetime.fromisoformat(r[2]),
                              r[3], r[4], r[5], datetime.fromisoformat(r[6])) for r in rows]

    async def list_rms(self) -> list[RmRow]:
        async with self._db.execute(
            "SELECT rm_id, name, control_type, connected, first_seen, last_message_at,"
            " messages_in, messages_out, snapshot FROM rms ORDER BY name, rm_id") as cursor:
            rows = await cursor.fetchall()
        return [RmRow(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6], r[7],
                      json.loads(r[8]) if r[8] else None) for r in rows]

    async def rm_owners(self) -> dict[str, str]:
        """Resource id -> the credential that owns it (see `bind_rm`)."""
        async with self._db.execute("SELECT rm_id, holder FROM rm_owners") as cursor:
            return {str(r[0]): str(r[1]) for r in await cursor.fetchall()}

    async def messages(self, *, rm_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The latest logged messages, newest first."""
        sql = ("SELECT at, session_id, rm_id, direction, message_type, message_id, text,"
               " reception_status, status_at FROM s2_messages")
        params: tuple[Any, ...] = ()
        if rm_id is not None:
            sql += " WHERE rm_id = ?"
            params = (rm_id,)
        sql += " ORDER BY id DESC LIMIT ?"
        async with self._db.execute(sql, (*params, limit)) as cursor:
            cols = [d[0] for d in cursor.description]
            return [dict(zip(cols, row, strict=True)) for row in await cursor.fetchall()]

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read-only escape hatch for reports and tests."""
        async with self._db.execute(sql, tuple(params)) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]

    async def flush(self) -> None:
        """Wait until everything appended so far is written (also a batch being written now)."""
        if self._writer is None or self._writer.done():
            if self._closing:
                raise RuntimeError("the store is closed")
            await self._flush_once()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._calls.append((_noop, future))
        self._wake.set()
        await future

    async def apply_retention(self, now: float | None = None) -> int:
        """Delete messages and measurements older than retention_days; returns rows deleted."""
        now = time.time() if now is None else now
        cutoff = now - self.retention_days * 86400.0
        self._last_retention = now
        deleted = 0
        for table in ("s2_messages", "measurements"):
            cursor = await self._db.execute(f"DELETE FROM {table} WHERE at < ?", (cutoff,))
            deleted += max(cursor.rowcount, 0)
        await self._db.commit()
        if deleted:
            logger.info("store: deleted %d message/measurement rows older than %d days",
                        deleted, self.retention_days)
        return deleted

    # --- the writer ----------------------------------------------------------------------------

    def _append(self, sql: str, params: tuple[Any, ...]) -> None:
        """Queue a statement. INSERTs are grouped per statement (one executemany each, however
        they interleave); UPDATEs run after them, in order, so they see the rows inserted."""
        if self._pending_rows >= self.max_pending:
            self.stats.dropped += 1
            if self.stats.dropped in (1, 1000, 100_000):
                logger.warning("store: writer is behind (%d rows pending); dropping log rows",
                               self._pending_rows)
            return
        self._pending_rows += 1
        if sql.startswith("INSERT"):
            rows = self._inserts.get(sql)
            if rows is None:
                self._inserts[sql] = [params]
            else:
                rows.append(params)
        else:
            self._pending.append((sql, params))

    def _delta(self, rm_id: str) -> _RmDelta:
        delta = self._rm_deltas.get(rm_id)
        if delta is None:
            delta = self._rm_deltas[rm_id] = _RmDelta()
        return delta

    async def _call(self, write: Callable[[aiosqlite.Connection], Any]) -> Any:
        if self._closing and self._writer is not None and self._writer.done():
            raise RuntimeError("the store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls.append((write, future))
        self._wake.set()
        return await future

    async def _write_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval_s)
            if not self._calls:
                # let a burst of appends gather for one interval before writing
                await asyncio.sleep(0 if self._closing else self.flush_interval_s / 4)
            self._wake.clear()
            await self._flush_once(snapshot_budget=self.snapshots_per_flush)
            if self.for_cem and time.time() - self._last_heartbeat >= HEARTBEAT_S:
                self._last_heartbeat = time.time()
                self._append("UPDATE cem_process SET heartbeat_at = ? WHERE pid = ?",
                             (self._last_heartbeat, os.getpid()))
            if time.time() - self._last_retention > 3600:
                try:
                    await self.apply_retention()
                except Exception:
                    logger.exception("store: retention failed; will retry in an hour")

    async def _flush_once(self, snapshot_budget: int | None = None) -> None:
        """Write everything pending in one transaction.

        `snapshot_budget`: serialise at most this many RM snapshots now (they are made on the
        event loop); the others wait for the next flush. 1000 RMs that connected together
        would otherwise stall the loop for all their snapshots at once, every 5 s. Ignored
        when someone awaits this flush (`flush()`, awaited writes).
        """
        inserts, self._inserts = self._inserts, {}
        pending, self._pending = self._pending, []
        rows_count, self._pending_rows = self._pending_rows, 0
        deltas, self._rm_deltas = self._rm_deltas, {}
        calls, self._calls = self._calls, []
        if not inserts and not pending and not deltas and not calls:
            return
        began = time.perf_counter()
        if calls:
            snapshot_budget = None
        rm_rows = []
        now = time.monotonic()
        hold = not calls and not self._closing and self.rm_row_interval_s > 0
        for rm_id, delta in deltas.items():
            if hold and delta.counts_only() and \
                    now - self._rm_written.get(rm_id, -math.inf) < self.rm_row_interval_s:
                self._rm_deltas[rm_id] = delta   # its counters go with a later flush
                continue
            if delta.connected is False:
                self._rm_written.pop(rm_id, None)
            else:
                self._rm_written[rm_id] = now
            if delta.snapshot is not None and snapshot_budget is not None:
                if snapshot_budget <= 0:
                    later = self._delta(rm_id)
                    if later.snapshot is None:
                        later.snapshot = delta.snapshot
                    delta.snapshot = None
                else:
                    snapshot_budget -= 1
            rm_rows.append(self._rm_row(rm_id, delta))
        if not rm_rows and not inserts and not pending and not calls:
            return
        try:
            results = await self._write_batch(rm_rows, inserts, pending, calls)
        except Exception as exc:
            self.stats.errors += 1
            with contextlib.suppress(Exception):
                await self._db.rollback()
            # one bad row must not cost the others theirs: write them one by one, keep the
            # rows that still fail in the quarantine table with the reason
            try:
                results, bad = await self._write_one_by_one(rm_rows, inserts, pending, calls)
            except Exception:
                logger.exception("store: a batch of %d rows could not be written", rows_count)
                with contextlib.suppress(Exception):
                    await self._db.rollback()
                for _, future in calls:
                    if not future.done():
                        future.set_exception(exc)
                return
            self.stats.quarantined += bad
            logger.warning("store: a batch of %d rows failed (%s: %s); written row by row, "
                           "%d row(s) kept in the quarantine table", rows_count,
                           type(exc).__name__, exc, bad)
        for future, value, error in results:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)
        took = time.perf_counter() - began
        self.stats.flushes += 1
        self.stats.rows_written += rows_count + len(rm_rows)
        self.stats.last_flush_s = took
        self.stats.max_flush_s = max(self.stats.max_flush_s, took)

    async def _write_batch(
        self, rm_rows: list[dict[str, Any]], inserts: dict[str, list[tuple[Any, ...]]],
        pending: list[tuple[str, tuple[Any, ...]]],
        calls: list[tuple[Callable[[aiosqlite.Connection], Any], asyncio.Future[Any]]],
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """The whole batch in one transaction (raises on the first bad row)."""
        db = self._db
        if rm_rows:
            await db.executemany(_UPSERT_RM, rm_rows)
        for sql, rows in inserts.items():
            await _insert_rows(db, sql, rows)
            self.stats.statements += 1
        for sql, group in itertools.groupby(pending, key=lambda item: item[0]):
            await db.executemany(sql, [params for _, params in group])
            self.stats.statements += 1
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for write, future in calls:
            try:
                results.append((future, await write(db), None))
            except Exception as exc:
                results.append((future, None, exc))
        await db.commit()
        return results

    async def _write_one_by_one(
        self, rm_rows: list[dict[str, Any]], inserts: dict[str, list[tuple[Any, ...]]],
        pending: list[tuple[str, tuple[Any, ...]]],
        calls: list[tuple[Callable[[aiosqlite.Connection], Any], asyncio.Future[Any]]],
    ) -> tuple[list[tuple[asyncio.Future[Any], Any, BaseException | None]], int]:
        """The batch again, each row under its own savepoint; rows that fail go to quarantine.

        Returns the awaited writes' results and how many rows were quarantined.
        """
        db = self._db
        rows: list[tuple[str, Any]] = [(_UPSERT_RM, row) for row in rm_rows]
        rows += [(sql, params) for sql, group in inserts.items() for params in group]
        rows += pending
        bad: list[tuple[float, str, str, str]] = []
        for sql, params in rows:
            await db.execute("SAVEPOINT store_row")
            try:
                await db.execute(sql, params)
            except Exception as exc:
                await db.execute("ROLLBACK TO store_row")
                bad.append((time.time(), sql, json.dumps(params, default=repr),
                            f"{type(exc).__name__}: {exc}"))
            await db.execute("RELEASE store_row")
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for write, future in calls:
            await db.execute("SAVEPOINT store_call")
            try:
                results.append((future, await write(db), None))
            except Exception as exc:
                await db.execute("ROLLBACK TO store_call")
                results.append((future, None, exc))
            await db.execute("RELEASE store_call")
        if bad:
            await db.executemany("INSERT INTO quarantine (at, statement, params, reason)"
                                 " VALUES (?, ?, ?, ?)", bad)
        await db.commit()
        return results, len(bad)

    async def quarantined_rows(self) -> list[dict[str, Any]]:
        """Rows a batch could not write, newest first: statement, parameters, reason."""
        async with self._db.execute(
                "SELECT id, at, statement, params, reason FROM quarantine ORDER BY id DESC"
        ) as cursor:
            cols = [d[0] for d in cursor.description]
            return [dict(zip(cols, row, strict=True)) for row in await cursor.fetchall()]

    @staticmethod
    def _rm_row(rm_id: str, delta: _RmDelta) -> dict[str, Any]:
        snapshot_text = None
        snapshot_at = None
        if delta.snapshot is not None:
            try:
                value = delta.snapshot() if callable(delta.snapshot) else delta.snapshot
                snapshot_text = snapshot_json(value)
                snapshot_at = time.time()
            except Exception:
                logger.exception("store: snapshot of RM %s could not be serialised", rm_id)
        return {
            "rm_id": rm_id,
            "name": delta.name,
            "control_type": delta.control_type,
            "control_type_set": int(delta.control_type_set),
            "connected": None if delta.connected is None else int(delta.connected),
            "at": time.time(),
            "last_message_at": delta.last_message_at,
            "messages_in": delta.messages_in,
            "messages_out": delta.messages_out,
            "snapshot": snapshot_text,
            "snapshot_at": snapshot_at,
        }


_fast_dumps: Callable[..., bytes] | None
try:
    from orjson import OPT_NON_STR_KEYS, OPT_PASSTHROUGH_DATACLASS, OPT_PASSTHROUGH_DATETIME
    from orjson import dumps as _fast_dumps
    _DUMPS_OPTIONS = OPT_NON_STR_KEYS | OPT_PASSTHROUGH_DATACLASS | OPT_PASSTHROUGH_DATETIME
except ImportError:   # orjson is a dependency; without it the standard library writes alone
    _fast_dumps = None


def snapshot_json(value: Any) -> str:
    """An RM's snapshot as JSON text: ``json.dumps(value, default=str)``'s values, compact.

    orjson writes it (~0.5 µs for an RM's ~1.3 kB, where the standard library took 9-25 µs,
    every 5 s for each of 1000 RMs, on the event loop); datetimes and dataclasses go to
    `str` as before. What orjson refuses (an integer beyond 64 bits, ...) the standard
    library writes. (One difference: a NaN would be null, not the non-JSON NaN; the session
    refuses non-finite numbers before they reach a snapshot.)"""
    if _fast_dumps is not None:
        try:
            return _fast_dumps(value, default=str, option=_DUMPS_OPTIONS).decode()
        except TypeError:   # orjson.JSONEncodeError is a TypeError
            pass
    return json.dumps(value, default=str)


ROWS_PER_INSERT = 64
"""Rows per multi-row INSERT (64 x 8 columns stays under SQLite's oldest 999-variable limit)."""


@functools.cache
def _multi_row(sql: str, rows: int) -> str | None:
    """``INSERT ... VALUES (?, ?)`` made into one statement inserting `rows` rows.

    None for any other shape (e.g. a clause after VALUES): such statements run row by row.
    """
    head, _, values = sql.partition(" VALUES ")
    values = values.strip()
    if not (values.startswith("(") and values.endswith(")") and values.count("(") == 1):
        return None
    return head + " VALUES " + ",".join([values] * rows)


async def _insert_rows(db: aiosqlite.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """Insert `rows` in order, ROWS_PER_INSERT per statement.

    The same rows as ``executemany(sql, rows)``, with ~64x fewer statement steps: sqlite3
    releases and retakes the GIL around every step, and while the event loop is busy each of
    those handovers costs both threads a futex wait and a context switch (~5 per S2 message
    in the bench).
    """
    k = ROWS_PER_INSERT
    multi = _multi_row(sql, k)
    full = len(rows) // k * k if multi is not None else 0
    if full:
        await db.executemany(multi,
                             [[x for row in rows[i:i + k] for x in row] for i in range(0, full, k)])
    if full < len(rows):
        await db.executemany(sql, rows[full:])


async def _noop(db: aiosqlite.Connection) -> None:
    return None


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"{path} was written by a newer CEM (schema {version}, "
                           f"this CEM knows up to {SCHEMA_VERSION})")
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        await db.executescript(script)
        await db.execute(f"PRAGMA user_version = {number}")
        await db.commit()
        logger.info("store: %s migrated to schema %d", path, number)
