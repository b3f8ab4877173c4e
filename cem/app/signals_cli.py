"""`cem prices`, `cem openadr status` and the grid-signal part of `cem status` /
`cem congestion list`: what the CEM plans on, read from the config and its store.

The store is read with plain sqlite3 (read-only, next to a running CEM); the live sources save
their state there (`signal_state`) and the price feeds their prices (`price_cache`).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table

from cem.app.common import fail
from cem.site.config import SiteConfig


def signal_states(db_path: Path) -> dict[str, dict[str, Any]]:
    """What each grid-signal source last saved in the store, by name (empty without any)."""
    if not Path(db_path).exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("SELECT name, kind, ok, detail, last_update, saved_at, payload "
                              "FROM signal_state ORDER BY kind, name").fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError:  # a store from before the table existed
        return {}
    return {r[0]: {"name": r[0], "kind": r[1], "ok": bool(r[2]), "detail": r[3],
                   "last_update": r[4], "saved_at": r[5],
                   "payload": json.loads(r[6]) if r[6] else {}} for r in rows}


def live_windows(db_path: Path) -> list[dict[str, Any]]:
    """Windows of the live sources (OpenADR, ...) as they last saved them."""
    out: list[dict[str, Any]] = []
    for state in signal_states(db_path).values():
        out += list(state["payload"].get("windows") or [])
    return out


def print_signal_states(db_path: Path, out: Console) -> None:
    """The `cem status` section: every live grid-signal source, ok or what is wrong."""
    states = signal_states(db_path)
    if not states:
        return
    table = Table(title="Grid signals")
    for column in ("source", "kind", "state", "detail", "saved"):
        table.add_column(column)
    for s in states.values():
        saved = datetime.fromtimestamp(s["saved_at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        table.add_row(s["name"], s["kind"], "[green]ok[/]" if s["ok"] else "[red]problem[/]",
                      s["detail"] or "", saved)
    out.print(table)


# --- cem openadr status -----------------------------------------------------------------------


def openadr_status_command(site: SiteConfig, db_path: Path, json_out: bool) -> None:
    if site.openadr is None:
        fail("the site config has no \\[openadr] section", "add one (see the README) and pass "
             "it with --config")
    state = signal_states(db_path).get("openadr")
    if state is None:
        fail(f"no OpenADR state in the store {db_path}",
             "the VEN saves it while `cem run` runs with this config (or pass --db)")
    p = state["payload"]
    if json_out:
        print(json.dumps({"ok": state["ok"], "detail": state["detail"], **p}, default=str))
        return
    out = Console()
    out.print(f"VTN {p.get('vtn_url')} (OpenADR {p.get('version')}): "
              f"{'[green]ok[/]' if state['ok'] else '[red]problem[/]'}: {state['detail']}",
              soft_wrap=True)
    out.print(f"VEN {p.get('ven_name')} ({p.get('ven_id') or 'not registered'}), program "
              f"{p.get('program')} ({p.get('program_id') or 'not found'})", soft_wrap=True)
    out.print(f"last poll {p.get('last_poll') or 'never'}, last answer "
              f"{p.get('last_ok') or 'never'}", soft_wrap=True)
    safe = p.get("safe_mode_limit_kw")
    out.print(("[bold red]SAFE MODE[/] since " + str(p.get("safe_mode_since")) if p.get("safe_mode")
               else "safe mode: off") + f" (safe-mode limit "
              f"{'unknown' if safe is None else f'{safe:g} kW'}: {p.get('safe_mode_limit_from')})",
              soft_wrap=True)
    events = p.get("events") or []
    out.print(f"{len(events)} event(s) in force: " + (", ".join(
        f"{e['id']} ({e.get('name') or 'unnamed'})" for e in events) or "none"), soft_wrap=True)
    for event_id, reason in (p.get("rejected") or {}).items():
        out.print(f"[red]refused[/] event {event_id}: {reason}", soft_wrap=True)


# --- cem prices --------------------------------------------------------------------------------


def _day_bounds(day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    return start, end


async def _curve_for(site: SiteConfig, db_path: Path | None, start: datetime,
                     end: datetime) -> tuple[Any, str, list[str]]:
    """The price curve the planner would use for [start, end), its source and notes."""
    from cem.ports import PriceCurve
    from sitekit.prices import CsvPriceSource

    cfg = site.prices
    notes: list[str] = []
    csv = CsvPriceSource(cfg.csv) if cfg.csv is not None else None
    if cfg.source is None:
        return None, "flat", notes
    if cfg.source == "csv":
        assert csv is not None
        points = tuple(csv.day_ahead_eur_per_mwh(start, end))
        return PriceCurve(points, csv.resolution, "csv"), f"csv ({cfg.csv})", notes
    from cem.signals.dayahead import DayAheadFeed, fetcher_for
    from cem.store import Store

    fetcher = fetcher_for(cfg)
    feed = DayAheadFeed(fetcher, cfg, horizon=end - start, fallback=csv, clock=lambda: start)
    if db_path is not None:
        store = await Store.open(db_path)
        try:
            cached = await store.cached_prices(fetcher.name, start, end)
        finally:
            await store.close()
        for moment, price, resolution_s in cached:
            feed.known[moment] = price
            feed.resolution = timedelta(seconds=resolution_s)
    source = f"{fetcher.name} (cached by the CEM)"
    if feed.known_end() is None or feed.known_end() < end:  # type: ignore[operator]
        if await feed.fetch():
            source = f"{fetcher.name} (fetched now)"
        else:
            notes.append(f"{fetcher.name}: {feed.last_error}")
    curve = feed.curve()
    if feed.on_fallback:
        notes.append(feed.on_fallback)
        source += f", {cfg.fallback} fallback"
    return curve, source, notes


def prices_command(site: SiteConfig, db_path: Path, day_text: str | None,
                   json_out: bool) -> None:
    from cem.control.grid_signals import curve_ptu_prices
    from sitekit.prices import PriceError

    zone = ZoneInfo(site.site.timezone)
    try:
        day = date.fromisoformat(day_text) if day_text else datetime.now(zone).date()
    except ValueError:
        fail(f"--date {day_text!r} is not a date", "write YYYY-MM-DD")
    start, end = _day_bounds(day, zone)
    ptu = timedelta(minutes=site.planner.ptu_minutes)
    n = int((end - start) / ptu)
    try:
        store_path = db_path if Path(db_path).exists() else None
        curve, source, notes = asyncio.run(_curve_for(site, store_path, start, end))
        planned = curve_ptu_prices(curve, site, start, n)
    except (PriceError, ValueError) as exc:
        fail(str(exc), "check the [prices] section of the site config")
    notes += planned.notes
    c = site.prices
    formula = (f"import = (day-ahead / 1000 + markup {c.markup_eur_per_kwh:g} + tax "
               f"{c.tax_eur_per_kwh:g}) x (1 + VAT {c.vat:g}) EUR/kWh; export: {c.feed_in}"
               if curve is not None else
               f"import = flat {c.flat_import_eur_per_kwh:g} EUR/kWh; export: {c.feed_in}")
    wholesale = planned.day_ahead_eur_per_kwh
    rows: list[dict[str, Any]] = []
    for i in range(n):
        moment = start + i * ptu
        rows.append({
            "start": moment.isoformat().replace("+00:00", "Z"),
            "start_local": moment.astimezone(zone).isoformat(),
            "day_ahead_eur_per_mwh": None if wholesale is None else round(
                float(wholesale[i]) * 1000, 3),
            "import_eur_per_kwh": round(float(planned.prices.import_eur_per_kwh[i]), 6),
            "export_eur_per_kwh": round(float(planned.prices.export_eur_per_kwh[i]), 6)})
    if json_out:
        print(json.dumps({"date": day.isoformat(), "timezone": site.site.timezone,
                          "ptu_minutes": site.planner.ptu_minutes, "source": source,
                          "formula": formula, "markup_eur_per_kwh": c.markup_eur_per_kwh,
                          "tax_eur_per_kwh": c.tax_eur_per_kwh, "vat": c.vat,
                          "feed_in": c.feed_in, "notes": notes, "ptus": rows}))
        return
    out = Console()
    table = Table(title=f"prices {day} ({site.site.timezone}), {n} PTUs: {source}")
    for column in ("local", "UTC", "day-ahead EUR/MWh", "import EUR/kWh", "export EUR/kWh"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["start_local"][11:16], row["start"][11:16],
                      "-" if row["day_ahead_eur_per_mwh"] is None
                      else f"{row['day_ahead_eur_per_mwh']:.2f}",
                      f"{row['import_eur_per_kwh']:.4f}", f"{row['export_eur_per_kwh']:.4f}")
    out.print(table)
    out.print(formula, soft_wrap=True)
    for note in notes:
        out.print(f"[yellow]note:[/] {note}", soft_wrap=True)
