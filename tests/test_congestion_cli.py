"""`cem congestion add/list`: windows land in the store; mistakes exit 2 without a traceback."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from typer.testing import CliRunner

from cem.app.cli import app
from cem.store import Store

runner = CliRunner()
EXAMPLE = Path(__file__).parent.parent / "specs" / "sites" / "example.toml"


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["congestion", *args, "--config", str(EXAMPLE)])
    return result.exit_code, result.output


def test_add_then_list_shows_the_window_from_the_store(tmp_path: Path) -> None:
    db = tmp_path / "cem.db"
    code, out = cli("add", "--start", "2026-11-23T17:00:00+01:00", "--end",
                    "2026-11-23T19:00:00+01:00", "--import-limit-kw", "40", "--db", str(db))
    assert code == 0, out
    assert "2026-11-23 16:00 - 2026-11-23 18:00 UTC" in out and "import <= 40 kW" in out

    async def stored() -> list:
        store = await Store.open(db)
        try:
            return await store.list_congestion()
        finally:
            await store.close()

    (row,) = asyncio.run(stored())
    assert row.start == datetime(2026, 11, 23, 16, 0, tzinfo=UTC)
    assert row.import_limit_kw == 40 and row.export_limit_kw is None
    code, out = cli("list", "--db", str(db))
    assert code == 0, out
    assert "2026-11-23 16:00" in out and "40" in out and "cli #1" in out


def test_bad_times_and_missing_limits_exit_2_with_a_hint(tmp_path: Path) -> None:
    db = str(tmp_path / "cem.db")
    cases = [
        (["--start", "2026-11-23T17:00:00", "--end", "2026-11-23T19:00:00+01:00",
          "--import-limit-kw", "5"], "no UTC offset"),
        (["--start", "tomorrow", "--end", "2026-11-23T19:00:00+01:00",
          "--import-limit-kw", "5"], "not an ISO 8601 time"),
        (["--start", "2026-11-23T19:00:00+01:00", "--end", "2026-11-23T17:00:00+01:00",
          "--import-limit-kw", "5"], "before or when it starts"),
        (["--start", "2026-11-23T17:00:00+01:00", "--end", "2026-11-23T19:00:00+01:00"],
         "no limit given"),
    ]
    for args, message in cases:
        code, out = cli("add", *args, "--db", db)
        assert code == 2, out
        assert message in out and "hint" in out and "Traceback" not in out
    assert not Path(db).exists() or cli("list", "--db", db)[1].count("cli #") == 0


def test_list_without_store_or_config_windows(tmp_path: Path) -> None:
    code, out = cli("list", "--db", str(tmp_path / "none.db"))
    assert code == 0 and "no congestion windows" in out
