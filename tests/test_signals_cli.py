"""`cem prices`, `cem congestion list --json`, `cem openadr status` and the grid signals in
`cem status`, on a real store the sources wrote to."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from cem.app.cli import app
from cem.ports import CongestionLimit
from cem.signals.openadr import window_dict
from cem.store import Store

runner = CliRunner()
DAY = datetime(2026, 3, 9, 23, tzinfo=UTC)  # 2026-03-10 in Amsterdam


def site_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "site.toml"
    path.write_text(f'[store]\npath = "{tmp_path / "cem.db"}"\n{extra}')
    return path


def fill_store(db: Path) -> None:
    async def fill() -> None:
        store = await Store.open(db)
        try:
            # ENTSO-E prices the running CEM cached: one day, quarter hours, some negative
            await store.save_prices("entsoe", [(DAY + i * timedelta(minutes=15), 100.0 - 2 * i)
                                               for i in range(96)], 900)
            await store.add_congestion(DAY + timedelta(hours=7), DAY + timedelta(hours=9), 12.0)
            window = CongestionLimit(DAY + timedelta(hours=17), DAY + timedelta(hours=18), 8.0,
                                     source="openadr", ref="evt-1")
            await store.save_signal_state(
                "openadr", "congestion", False, "SAFE MODE since 2026-03-10 16:00:00 UTC",
                DAY, {"vtn_url": "https://vtn.example/openadr3/3.1.0", "version": "3.1.0",
                      "ven_name": "NL-CEM", "ven_id": "ven-1", "program": "gac",
                      "program_id": "prog-1", "safe_mode": True,
                      "safe_mode_since": "2026-03-10 16:00:00+00:00", "safe_mode_limit_kw": 7.0,
                      "safe_mode_limit_from": "the program's safe-mode event safe",
                      "events": [{"id": "evt-1", "name": "evening"}],
                      "rejected": {"evt-2": "units must be 'KW', got 'W'"},
                      "windows": [window_dict(window)]})
        finally:
            await store.close()

    asyncio.run(fill())


ENTSOE = ('[prices]\nfeed = "entsoe"\nmarkup_eur_per_kwh = 0.02\ntax_eur_per_kwh = 0.1\n'
          'vat = 0.21\n[prices.entsoe]\ntoken = "t"\nbase_url = "http://127.0.0.1:9/api"\n'
          'timeout_s = 2\n')


def test_prices_show_the_cached_feed_with_the_retail_formula(tmp_path: Path) -> None:
    config = site_file(tmp_path, ENTSOE)
    fill_store(tmp_path / "cem.db")
    result = runner.invoke(app, ["prices", "--config", str(config), "--date", "2026-03-10",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"] == "entsoe (cached by the CEM)" and len(data["ptus"]) == 96
    first, last = data["ptus"][0], data["ptus"][-1]
    assert first["start"] == "2026-03-09T23:00:00Z" and first["day_ahead_eur_per_mwh"] == 100.0
    assert first["import_eur_per_kwh"] == round((0.100 + 0.02 + 0.1) * 1.21, 6)
    assert last["day_ahead_eur_per_mwh"] == -90.0  # negative prices stay negative
    assert last["export_eur_per_kwh"] == -0.09
    assert "VAT 0.21" in data["formula"]
    # a day the CEM has not cached and the feed cannot be reached: the fallback, said so
    result = runner.invoke(app, ["prices", "--config", str(config), "--date", "2026-03-12",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "flat fallback" in data["source"]
    assert any("ENTSO-E unreachable" in n for n in data["notes"])
    assert len(data["ptus"]) == 96
    assert all(p["import_eur_per_kwh"] == 0.25 for p in data["ptus"])


def test_prices_on_dst_days_and_bad_dates(tmp_path: Path) -> None:
    csv = tmp_path / "prices.csv"
    start = datetime(2025, 10, 25, 22, tzinfo=UTC)
    csv.write_text("start_utc,price_eur_per_mwh\n" + "".join(
        f"{(start + timedelta(hours=h)).isoformat().replace('+00:00', 'Z')},{50 + h}\n"
        for h in range(30)))
    config = site_file(tmp_path, f'[prices]\ncsv = "{csv}"\n')
    result = runner.invoke(app, ["prices", "--config", str(config), "--date", "2025-10-26",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["ptus"]) == 100 and data["source"].startswith("csv")
    assert [p["start_local"][11:16] for p in data["ptus"][8:16]] == [
        "02:00", "02:15", "02:30", "02:45", "02:00", "02:15", "02:30", "02:45"]
    result = runner.invoke(app, ["prices", "--config", str(config), "--date", "tomorrow"])
    assert result.exit_code == 2 and "is not a date" in result.output


def test_congestion_list_json_has_every_source(tmp_path: Path) -> None:
    config = site_file(tmp_path, '[[congestion]]\nstart = 2026-03-10T06:00:00Z\n'
                                 'end = 2026-03-10T07:00:00Z\nimport_limit_kw = 15\n')
    fill_store(tmp_path / "cem.db")
    result = runner.invoke(app, ["congestion", "list", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    windows = json.loads(result.stdout)
    assert [(w["source"], w["import_limit_kw"]) for w in windows] == [
        ("config", 15), ("cli", 12.0), ("openadr", 8.0)]
    assert windows[2]["ref"] == "evt-1" and windows[2]["start"] == "2026-03-10T16:00:00+00:00"
    assert set(windows[0]) == {"start", "end", "import_limit_kw", "export_limit_kw", "source",
                               "ref", "state"}


def test_openadr_status_and_cem_status_say_safe_mode(tmp_path: Path) -> None:
    fill_store(tmp_path / "cem.db")
    config = site_file(tmp_path, '[openadr]\nvtn_url = "https://vtn.example/openadr3/3.1.0"\n'
                                 'token = "t"\nven_name = "NL-CEM"\nprogram = "gac"\n')
    result = runner.invoke(app, ["openadr", "status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "VTN https://vtn.example/openadr3/3.1.0" in text and "SAFE MODE" in text
    assert "safe-mode limit 7 kW" in text and "evt-1 (evening)" in text
    assert "refused event evt-2: units must be 'KW', got 'W'" in text
    result = runner.invoke(app, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "Grid signals" in result.output and "problem" in result.output
    no_openadr = site_file(tmp_path)
    result = runner.invoke(app, ["openadr", "status", "--config", str(no_openadr)])
    assert result.exit_code == 2 and "no [openadr] section" in result.output
