"""`cem status`: whether the CEM runs, how its parts are doing, the RMs it knows.

Read straight from its SQLite store, read-only and synchronous (plain sqlite3): it works while
the CEM runs (WAL lets readers in) and after it stopped. The exit code says the verdict, for
scripts and the Docker healthcheck: 0 running and healthy, 1 not running (never ran with this
store, stopped, killed, or its heartbeat is stale), 3 running but a part is failing. `--json`
prints the same as one object: `running`, `why`, `process`, `parts` (each with its `state`),
`rms` (`resource_id`, `name`, `control_type`, `connected`, `last_message`), `signals`.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cem.app.supervisor import read_parts
from cem.store import HEARTBEAT_S

RUNNING, NOT_RUNNING, PART_FAILING = 0, 1, 3

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
    return (int(row[0]), str(row[1]), float(row[2]), float(row[3]),
            None if row[4] is None else float(row[4])) if row else None


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


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def gather(db_path: Path) -> dict[str, Any]:
    """Everything `cem status` says, as plain data (see the module docstring); `code` is the
    exit code, `why` the verdict in words."""
    db_path = Path(db_path)
    out: dict[str, Any] = {"store": str(db_path), "running": False, "why": "", "process": None,
                           "parts": [], "rms": [], "signals": [], "open_connections": 0,
                           "code": NOT_RUNNING}
    if not db_path.exists():
        out["why"] = (f"no CEM store at {db_path}: the CEM has not run with this database yet "
                      "(start it with cem run, or pass --db)")
        return out
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute(
                "SELECT rm_id, name, control_type, connected, last_message_at, messages_in,"
                " messages_out FROM rms ORDER BY connected DESC, name, rm_id").fetchall()
            out["open_connections"] = db.execute(
                "SELECT COUNT(*) FROM sessions WHERE disconnected_at IS NULL").fetchone()[0]
            process = _cem_process(db)
            parts = read_parts(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        out["why"] = f"cannot read {db_path}: {exc} (is it a CEM store, written by cem run?)"
        out["error"] = True
        return out
    now = datetime.now(UTC).timestamp()
    running, line = cem_liveness(process, now)
    out["running"] = running
    out["why"] = line.replace("[yellow]", "").replace("[/]", "")
    if process is not None:
        pid, host, started_at, heartbeat_at, stopped_at = process
        out["process"] = {"pid": pid, "host": host, "started": _iso(started_at),
                          "heartbeat": _iso(heartbeat_at), "stopped": _iso(stopped_at)}
        # rows a supervisor left from an earlier run are not this process's
        parts = [p for p in parts if p["pid"] == pid]
    out["parts"] = [{"name": p["name"], "kind": p["kind"],
                     "state": p["state"] if running else f"{p['state']} (last known)",
                     "detail": p["detail"] or "", "restarts": p["restarts"],
                     "since": _iso(float(str(p["since"]))), "last_error": p["last_error"]}
                    for p in parts]
    connected_shown = running
    out["rms"] = [{"resource_id": rm_id, "name": name, "control_type": control_type,
                   "connected": bool(connected) and connected_shown,
                   "connected_when_last_heard": bool(connected),
                   "last_message": _iso(last_at), "messages_in": n_in, "messages_out": n_out}
                  for rm_id, name, control_type, connected, last_at, n_in, n_out in rows]
    from cem.app.signals_cli import signal_states

    out["signals"] = [{"name": st["name"], "kind": st["kind"], "ok": st["ok"],
                       "detail": st["detail"] or "", "last_update": _iso(st["last_update"])}
                      for st in signal_states(db_path).values()]
    failing = [p for p in parts if p["state"] == "failing"]
    if not running:
        out["code"] = NOT_RUNNING
    elif failing:
        out["code"] = PART_FAILING
        out["why"] = ("CEM running, but " + "; ".join(
            f"part {p['name']} is failing: {p['detail'] or p['last_error'] or ''}".rstrip(": ")
            for p in failing))
    else:
        out["code"] = RUNNING
    return out


def status_json(db_path: Path) -> int:
    """`cem status --json`: one JSON object on stdout; returns the exit code."""
    data = gather(db_path)
    print(json.dumps({k: v for k, v in data.items() if k != "code"}, indent=2))
    return int(data["code"])


def print_status(db_path: Path, console: Console | None = None) -> int:
    """Print whether the CEM runs, its parts and a table of RMs; returns the exit code."""
    out = console or Console()
    db_path = Path(db_path)
    if not db_path.exists():
        out.print(f"No CEM store at [bold]{db_path}[/]: the CEM has not run with this database "
                  "yet. Start it with [bold]cem run[/] (or pass --db).", soft_wrap=True)
        return NOT_RUNNING
    data = gather(db_path)
    if data.get("error"):
        out.print(f"[red]Cannot read {db_path}:[/] {data['why']}", soft_wrap=True)
        return NOT_RUNNING
    now = datetime.now(UTC).timestamp()
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute(
                "SELECT rm_id, name, control_type, connected, last_message_at, messages_in,"
                " messages_out FROM rms ORDER BY connected DESC, name, rm_id").fetchall()
            process = _cem_process(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        out.print(f"[red]Cannot read {db_path}:[/] {exc}. Is it a CEM store (written by "
                  "[bold]cem run[/])?", soft_wrap=True)
        return NOT_RUNNING
    running, line = cem_liveness(process, now)
    if line:
        out.print(line, soft_wrap=True)
    if data["parts"]:
        _print_parts(out, data["parts"], running)
    if data["code"] == PART_FAILING:
        out.print(f"[red]{data['why']}[/]", soft_wrap=True)
    from cem.app.signals_cli import print_signal_states

    print_signal_states(db_path, out)  # prices and limits feeds: ok, or what is wrong
    code = int(data["code"])
    if not rows:
        out.print(f"{db_path}: no resource manager has connected yet "
                  f"({data['open_connections']} connection(s) without ResourceManagerDetails "
                  "open).", soft_wrap=True)
        return code
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
    return code


STATE_COLOUR = {"running": "green", "degraded": "yellow", "restarting": "yellow",
                "starting": "yellow", "failing": "red", "stopped": "dim"}


def _print_parts(out: Console, parts: list[dict[str, Any]], running: bool) -> None:
    table = Table(title="Parts" if running else "Parts (as last known)")
    for column in ("part", "state", "restarts", "detail"):
        table.add_column(column)
    for p in parts:
        state = p["state"].split(" ")[0]
        colour = STATE_COLOUR.get(state, "white")
        table.add_row(p["name"], f"[{colour}]{p['state']}[/]", str(p["restarts"]),
                      p["detail"] or (p["last_error"] or ""))
    out.print(table)
