"""Entry points for `cem rm ocpp`, `cem sim chargers`, `cem sessions` and `cem cdrs`."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from resource_managers.ocpp_charger.config import ChargePoint, OcppRmConfig
from resource_managers.ocpp_charger.records import SessionRow, read_sessions
from sitekit import logs
from sitekit.config import DEFAULT_TIMEZONE
from sitekit.lock import LockHeld

console = Console(stderr=True)


def _logging(level: str = "INFO") -> None:
    logs.configure(level)  # the ocpp library logs every frame at INFO: it is kept quiet


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def run_ocpp_rm(config: OcppRmConfig, cem_url: str, port: int | None = None,
                token: str | None = None) -> None:
    """Run the OCPP central system with one S2 RM per EVSE until Ctrl-C / SIGTERM."""
    from resource_managers.ocpp_charger.csms import OcppCentralSystem

    _logging()

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        csms = OcppCentralSystem(config, cem_url, token=token, port=port)
        csms.lock_command = "cem rm ocpp"
        try:
            config.ocpp.tls_context()
        except (ssl.SSLError, OSError) as exc:
            console.print(f"[bold red]error:[/] cannot use the TLS certificate "
                          f"{config.ocpp.tls_cert} with key {config.ocpp.tls_key}: {exc}")
            console.print("  [dim]hint:[/] both must be PEM files, the key matching the "
                          "certificate (ocpp.tls_cert, ocpp.tls_key)")
            raise typer.Exit(2) from None
        try:
            await csms.start()
        except LockHeld as exc:
            console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False,
                          soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            console.print(f"[bold red]error:[/] cannot listen on {csms.host}:{csms.requested_port}: "
                          f"{exc.strerror or exc}")
            console.print("  [dim]hint:[/] another program uses the port; pick one with --port")
            raise typer.Exit(2) from None
        try:
            await stop.wait()
        finally:
            logging.getLogger("resource_managers.ocpp").info("stopping (signal received)")
            await csms.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def run_charger_simulators(count: int, ocpp: str, csms: str, sessions: Path | None,
                           speed: float, charge_points: Sequence[ChargePoint] = (),
                           ca: Path | None = None) -> None:
    """Run `count` simulated charge points with EVs from an ACN CSV or a built-in sequence.

    With configured charge points (a site file's `ocpp.charge_points`), the first `count` are
    simulated as configured (ids, EVSEs, phases, maximum current, password), so ACN sessions
    land on their station.
    """
    from resource_managers.ocpp_charger.simulator import (
        SimulatedChargePoint,
        built_in_arrivals,
        load_acn_arrivals,
        run_fleet,
        stations_for_site,
    )

    if ocpp not in ("1.6", "2.0.1"):
        console.print(f"[bold red]error:[/] --ocpp {ocpp!r}: use 1.6 or 2.0.1")
        raise typer.Exit(2)
    if count < 1 or speed <= 0:
        console.print("[bold red]error:[/] --count must be at least 1 and --speed above 0")
        raise typer.Exit(2)
    if not csms.startswith(("ws://", "wss://")):
        console.print(f"[bold red]error:[/] --csms {csms!r} is not a websocket URL (ws://host:port)")
        raise typer.Exit(2)
    trust: ssl.SSLContext | None = None
    if ca is not None:
        try:
            trust = ssl.create_default_context(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            console.print(f"[bold red]error:[/] cannot use --ca {ca}: {exc}")
            console.print("  [dim]hint:[/] give the central system's certificate as a PEM file")
            raise typer.Exit(2) from None
    if sessions is not None:
        try:
            arrivals = load_acn_arrivals(sessions)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            console.print(f"[bold red]error:[/] cannot use the sessions file: {exc}")
            raise typer.Exit(2) from None
    else:
        arrivals = built_in_arrivals(count)
    _logging()
    logging.getLogger("resource_managers.ocpp.simulator").info(
        "%d simulated charge point(s), OCPP %s, %d EV visit(s), %gx speed", count, ocpp,
        len(arrivals), speed)

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        if charge_points:
            stations = stations_for_site(charge_points, csms, speed=speed, versions=(ocpp,),
                                         ssl_context=trust)[:count]
        else:
            stations = [SimulatedChargePoint(f"SIM-CP-{i + 1:02d}", csms, version=ocpp,
                                             speed=speed, meter_interval_s=60.0,
                                             ssl_context=trust)
                        for i in range(count)]
        await run_fleet(stations, arrivals, stop)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


# --- tables ------------------------------------------------------------------------------------


def _local(moment: datetime | None, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M") if moment else ""


def _sessions_table(rows: list[SessionRow], zone: ZoneInfo) -> Table:
    table = Table(title=f"Charging sessions ({len(rows)} open)", title_justify="left")
    for name, justify in (("charger", "left"), ("tx", "left"), ("card", "left"),
                          ("started", "left"), ("kWh", "right"), ("kW now", "right"),
                          ("limit A", "right"), ("SoC %", "right"), ("EUR", "right"),
                          ("last meter", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(f"{row.cp_id}/{row.evse_id}", row.transaction_id[:18],
                      row.card_name or row.id_tag or "", _local(row.started_at, zone),
                      f"{row.energy_wh / 1000:.2f}", f"{row.power_w / 1000:.1f}",
                      "" if row.limit_a is None else f"{row.limit_a:.1f}",
                      "" if row.soc is None else f"{row.soc:.0f}", f"{row.cost_eur:.2f}",
                      row.last_meter_at.astimezone(zone).strftime("%H:%M:%S"))
    return table


def print_sessions(db: Path, refresh_s: float = 2.0, once: bool | None = None,
                   timezone: str = DEFAULT_TIMEZONE) -> None:
    """Show live sessions, refreshing until Ctrl-C (once when the output is not a terminal)."""
    zone = ZoneInfo(timezone)
    out = _table_console()
    if not Path(db).exists():
        console.print(f"[bold red]error:[/] no OCPP database at {db}")
        console.print("  [dim]hint:[/] start `cem rm ocpp` first, or pass --db")
        raise typer.Exit(2)
    if once is None:
        once = not out.is_terminal
    if once:
        out.print(_sessions_table(read_sessions(db, "open"), zone))
        return
    try:
        with Live(_sessions_table(read_sessions(db, "open"), zone), console=out,
                  refresh_per_second=4) as live:
            while True:
                time.sleep(refresh_s)
                live.update(_sessions_table(read_sessions(db, "open"), zone))
    except KeyboardInterrupt:
        pass


def _table_console() -> Console:
    """Stdout console; wide enough for the tables when writing to a pipe or file."""
    out = Console()
    return out if out.is_terminal else Console(width=160)


CDR_COLUMNS = ("cp_id", "evse_id", "transaction_id", "id_tag", "card_name", "started_at",
               "stopped_at", "energy_kwh", "cost_eur", "peak_kw", "stop_reason")


def cdr_record(row: SessionRow) -> dict[str, object]:
    return {"cp_id": row.cp_id, "evse_id": row.evse_id, "transaction_id": row.transaction_id,
            "id_tag": row.id_tag or "", "card_name": row.card_name or "",
            "started_at": row.started_at.astimezone(UTC).isoformat(),
            "stopped_at": row.stopped_at.astimezone(UTC).isoformat() if row.stopped_at else "",
            "energy_kwh": round(row.energy_wh / 1000, 3), "cost_eur": round(row.cost_eur, 2),
            "peak_kw": round(row.peak_w / 1000, 2), "stop_reason": row.stop_reason or ""}


def print_cdrs(db: Path, csv: Path | None = None, timezone: str = DEFAULT_TIMEZONE) -> None:
    """Print the charge detail records as a table, or write them to a CSV file."""
    zone = ZoneInfo(timezone)
    if not Path(db).exists():
        console.print(f"[bold red]error:[/] no OCPP database at {db}")
        console.print("  [dim]hint:[/] start `cem rm ocpp` first, or pass --db")
        raise typer.Exit(2)
    rows = read_sessions(db, "closed")
    if csv is not None:
        _write_csv(csv, rows)
        console.print(f"wrote {len(rows)} CDR(s) to {csv}")
        return
    table = Table(title=f"Charge detail records ({len(rows)})", title_justify="left")
    for name, justify in (("charger", "left"), ("tx", "left"), ("card", "left"),
                          ("start", "left"), ("stop", "left"), ("kWh", "right"),
                          ("EUR", "right"), ("peak kW", "right"), ("why it ended", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(f"{row.cp_id}/{row.evse_id}", row.transaction_id[:18],
                      row.card_name or row.id_tag or "", _local(row.started_at, zone),
                      _local(row.stopped_at, zone), f"{row.energy_wh / 1000:.2f}",
                      f"{row.cost_eur:.2f}", f"{row.peak_w / 1000:.1f}", row.stop_reason or "")
    if rows:
        table.add_section()
        table.add_row("total", "", "", "", "", f"{sum(r.energy_wh for r in rows) / 1000:.2f}",
                      f"{sum(r.cost_eur for r in rows):.2f}", "", "")
    _table_console().print(table)


def _write_csv(path: Path, rows: list[SessionRow]) -> None:
    try:
        handle = path.open("w", newline="", encoding="utf-8") if str(path) != "-" else sys.stdout
    except OSError as exc:
        console.print(f"[bold red]error:[/] cannot write {path}: {exc.strerror or exc}")
        raise typer.Exit(2) from None
    with handle if handle is not sys.stdout else contextlib.nullcontext(handle):
        writer = csv.DictWriter(handle, fieldnames=CDR_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(cdr_record(row))
