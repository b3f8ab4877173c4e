"""`cem status`: the resource managers the CEM knows, read straight from its SQLite store.

Read-only and synchronous (plain sqlite3): it works while the CEM runs (WAL lets readers in)
and after it stopped.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cem.store import HEARTBEAT_S

CONTROL_TYPE_SHORT = {
    "FILL_RATE_BASED_CONTROL": "FRBC",
    "POWER_PROFILE_BASED_CONTROL": "PPBC",
    "OPERATION_MODE_BASED_CONTROL": "OMBC",
    "DEMAND_DRIVEN_BASED_CONTROL": "DDBC",
    "POWER_ENVELOPE_BASED_CONTROL": "PEBC",
    "NOT_CONTROLABLE": "none",
    "NO_SELECTION": "not selected",
}


def _ago(epoch: float | None, now: float) -> str:
    if epoch is None:
        return "never"
    moment = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    seconds = max(0.0, now - epoch)
    if seconds < 120:
        age = f"{seconds:.0f} s ago"
    elif seconds < 7200:
        age = f"{seconds / 60:.0f} min ago"
    elif seconds < 172800:
        age = f"{seconds / 3600:.0f} h ago"
    else:
        age = f"{seconds / 86400:.0f} days ago"
    return f"{moment} ({age})"


def _cem_process(db: sqlite3.Connection) -> tuple[int, str, float, float, float | None] | None:
    """The store's CEM process row (pid, host, started, heartbeat, stopped), if it has one."""
    try:
        row = db.execute("SELECT pid, host, started_at, heartbeat_at, stopped_at "
                         "FROM cem_process WHERE id = 1").fetchone()
    except sqlite3.OperationalError:  # a store from before the table existed
        return None
    return tuple(row) if row else None  # type: ignore[return-value]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cem_liveness(process: tuple[int, str, float, float, float | None] | None,
                 now: float) -> tuple[bool, str]:
    """Whether the CEM that writes this store is running, and a line saying so.

    A CEM that was killed never marked its RMs disconnected: without this, `cem status` would
    show them connected until the next start. Dead means: it stopped (clean), its process is
    gone (same host), or its heartbeat is older than three heartbeats.
    """
    if process is None:
        return True, ""
    pid, host, started_at, heartbeat_at, stopped_at = process
    if stopped_at is not None:
        return False, f"The CEM is not running: it stopped cleanly at {_ago(stopped_at, now)}."
    gone = host == socket.gethostname() and not _pid_alive(pid)
    if gone or now - heartbeat_at > 3 * HEARTBEAT_S:
        why = f"process {pid} is gone" if gone else f"no heartbeat since {_ago(heartbeat_at, now)}"
        return False, (f"[yellow]The CEM is not running[/] ({why}): it did not stop cleanly. "
                       "Connections below are as it last knew them.")
    return True, f"CEM running (pid {pid} on {host}, started {_ago(started_at, now)})."


def print_status(db_path: Path, console: Console | None = None) -> None:
    """Print a table of RMs: name/id, connected, control type, last message, messages in/out."""
    out = console or Console()
    db_path = Path(db_path)
    if not db_path.exists():
        out.print(f"No CEM store at [bold]{db_path}[/]: the CEM has not run with this database "
                  "yet. Start it with [bold]cem run[/] (or pass --db).", soft_wrap=True)
        return
    try:
        db = sqlite3.connect(db_path, timeout=5)
        try:
            rows = db.execute(
                "SELECT rm_id, name, control_type, connected, last_message_at, messages_in,"
                " messages_out FROM rms ORDER BY connected DESC, name, rm_id").fetchall()
            open_sessions = db.execute(
                "SELECT COUNT(*) FROM sessions WHERE disconnected_at IS NULL").fetchone()[0]
            process = _cem_process(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        out.print(f"[red]Cannot read {db_path}:[/] {exc}. Is it a CEM store (written by "
                  "[bold]cem run[/])?", soft_wrap=True)
        return
    now = datetime.now(UTC).timestamp()
    running, line = cem_liveness(process, now)
    if line:
        out.print(line, soft_wrap=True)
    from cem.app.signals_cli import print_signal_states

    print_signal_states(db_path, out)  # prices and limits feeds: ok, or what is wrong
    if not rows:
        out.print(f"{db_path}: no resource manager has connected yet "
                  f"({open_sessions} connection(s) without ResourceManagerDetails open).", soft_wrap=True)
        return
    table = Table(title=f"Resource managers in {db_path}")
    table.add_column("RM")
    table.add_column("connected")
    table.add_column("control type")
    table.add_column("last message")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    for rm_id, name, control_type, connected, last_at, n_in, n_out in rows:
        label = f"{name}\n[dim]{rm_id}[/]" if name else rm_id
        table.add_row(
            label,
            ("[green]yes[/]" if running else "[yellow]unknown[/]") if connected else "[dim]no[/]",
            CONTROL_TYPE_SHORT.get(control_type or "", control_type or "-"),
            _ago(last_at, now),
            str(n_in),
            str(n_out),
        )
    out.print(table)
    connected_count = sum(1 for r in rows if r[3])
    if running:
        out.print(f"{connected_count} of {len(rows)} RM(s) connected.")
    else:
        out.print(f"{connected_count} of {len(rows)} RM(s) were connected when the CEM was last "
                  "heard of; they reconnect when it starts again.", soft_wrap=True)
