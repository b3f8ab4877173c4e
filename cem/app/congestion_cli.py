"""`cem congestion add` / `cem congestion list`: the grid operator's congestion windows.

Windows added here go into the store's `congestion_windows` table (through `cem.store.Store`,
which owns the schema); a running CEM polls that table and replans when it changes. Times must
carry an offset (a bare local time is ambiguous around DST changes); mistakes end with a clear
message and exit code 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from cem.site.config import SiteConfig

console = Console(stderr=True)
EXAMPLE = "2026-11-23T17:00:00+01:00"


def _fail(message: str, hint: str = "") -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        console.print(f"  [dim]hint:[/] {hint}", highlight=False)
    raise typer.Exit(2)


def parse_time(text: str, what: str) -> datetime:
    """An ISO 8601 time with offset, or a clear error (exit 2)."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        _fail(f"--{what} {text!r} is not an ISO 8601 time", f"write e.g. {EXAMPLE}")
    if moment.tzinfo is None:
        _fail(f"--{what} {text!r} has no UTC offset",
              f"add the offset, e.g. {EXAMPLE} (or Z for UTC)")
    return moment


def check_window(start: str, end: str, import_limit_kw: float | None,
                 export_limit_kw: float | None) -> tuple[datetime, datetime]:
    """Validate the CLI input; returns (start, end) as aware datetimes."""
    start_at = parse_time(start, "start")
    end_at = parse_time(end, "end")
    if end_at <= start_at:
        _fail(f"the window ends ({end}) before or when it starts ({start})",
              "--end must be later than --start")
    if import_limit_kw is None and export_limit_kw is None:
        _fail("no limit given", "give --import-limit-kw, --export-limit-kw or both")
    for name, value in (("import", import_limit_kw), ("export", export_limit_kw)):
        if value is not None and value < 0:
            _fail(f"--{name}-limit-kw {value:g} is negative", "limits are kW, 0 or more")
    return start_at, end_at


async def _add(db_path: Path, start: datetime, end: datetime, import_limit_kw: float | None,
               export_limit_kw: float | None) -> int:
    from cem.store import Store

    store = await Store.open(db_path)
    try:
        return await store.add_congestion(start, end, import_limit_kw, export_limit_kw,
                                          source="cli")
    finally:
        await store.close()


async def _list(db_path: Path) -> list:
    from cem.store import Store

    store = await Store.open(db_path)
    try:
        return await store.list_congestion()
    finally:
        await store.close()


def add_congestion_command(db_path: Path, start: str, end: str, import_limit_kw: float | None,
                           export_limit_kw: float | None) -> int:
    """Store a congestion window; a running CEM picks it up within seconds and replans."""
    start_at, end_at = check_window(start, end, import_limit_kw, export_limit_kw)
    try:
        window_id = asyncio.run(_add(Path(db_path), start_at, end_at, import_limit_kw,
                                     export_limit_kw))
    except Exception as exc:  # an unreadable or foreign database file
        _fail(f"cannot write to the store {db_path}: {exc}",
              "check --db / store.path in the site config")
    limits = []
    if import_limit_kw is not None:
        limits.append(f"import <= {import_limit_kw:g} kW")
    if export_limit_kw is not None:
        limits.append(f"export <= {export_limit_kw:g} kW")
    Console().print(f"congestion window {window_id}: {start_at.astimezone(UTC):%Y-%m-%d %H:%M} - "
                    f"{end_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC, {', '.join(limits)} "
                    f"(stored in {db_path}; a running CEM replans within seconds)",
                    highlight=False, soft_wrap=True)
    return window_id


def list_congestion_command(site: SiteConfig, db_path: Path, json_out: bool = False) -> None:
    """Print the congestion windows from the config, the store and the live sources (OpenADR,
    as the running CEM last saved them), earliest first, each with its source."""
    from cem.app.signals_cli import live_windows

    rows: list[tuple[datetime, datetime, float | None, float | None, str]] = [
        (w.start, w.end, w.import_limit_kw, w.export_limit_kw, "config") for w in site.congestion]
    refs: list[str | None] = [f"congestion[{i}]" for i in range(len(site.congestion))]
    if Path(db_path).exists():
        try:
            stored = asyncio.run(_list(Path(db_path)))
        except Exception as exc:
            _fail(f"cannot read the store {db_path}: {exc}",
                  "check --db / store.path in the site config")
        rows += [(r.start, r.end, r.import_limit_kw, r.export_limit_kw,
                  f"{r.source} #{r.window_id}") for r in stored]
        refs += [str(r.window_id) for r in stored]
        for w in live_windows(Path(db_path)):
            rows.append((datetime.fromisoformat(w["start"]), datetime.fromisoformat(w["end"]),
                         w.get("import_limit_kw"), w.get("export_limit_kw"),
                         f"{w.get('source')} {w.get('ref') or ''}".strip()))
            refs.append(w.get("ref"))
    now = datetime.now(UTC)
    if json_out:
        order = sorted(range(len(rows)), key=lambda i: rows[i][0])
        print(json.dumps([{
            "start": rows[i][0].astimezone(UTC).isoformat(),
            "end": rows[i][1].astimezone(UTC).isoformat(),
            "import_limit_kw": rows[i][2], "export_limit_kw": rows[i][3],
            "source": rows[i][4].split(" ")[0], "ref": refs[i],
            "state": "past" if rows[i][1] <= now else ("active" if rows[i][0] <= now
                                                         else "coming")} for i in order]))
        return
    out = Console()
    if not rows:
        out.print("no congestion windows (config or store)", soft_wrap=True)
        return
    table = Table(title=f"congestion windows ({site.site.name})")
    for column in ("start (UTC)", "end (UTC)", "import kW", "export kW", "from", "state"):
        table.add_column(column)

    def kw(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    for start, end, imp, exp, source in sorted(rows, key=lambda r: r[0]):
        state = "past" if end <= now else ("active" if start <= now else "coming")
        table.add_row(f"{start.astimezone(UTC):%Y-%m-%d %H:%M}",
                      f"{end.astimezone(UTC):%Y-%m-%d %H:%M}", kw(imp), kw(exp), source, state)
    out.print(table)
