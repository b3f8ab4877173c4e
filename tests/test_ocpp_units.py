"""OCPP RM without the network: limits, the FRBC mapping, cards, arrivals, CDR export, the process."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from s2python.frbc import FRBCInstruction
from typer.testing import CliRunner

from cem.app.cli import app
from cem.app.site_file import load_site_file, parse_site_file
from resource_managers.ocpp_charger import frbc, limits
from resource_managers.ocpp_charger.csms import OcppCentralSystem, next_local_time
from resource_managers.ocpp_charger.records import SessionRecords
from resource_managers.ocpp_charger.simulator import (
    SimulatedEv,
    built_in_arrivals,
    load_acn_arrivals,
)

ROOT = Path(__file__).resolve().parents[1]


@given(st.floats(-50, 100, allow_nan=False), st.floats(1, 80, allow_nan=False))
def test_charging_current_is_zero_or_within_range_in_tenths(amps: float, max_a: float) -> None:
    current = limits.charging_current(amps, max_a)
    # (1e-6: 5.9999999999 A is float noise for 6 A, see round_down_tenth)
    assert current == 0 or limits.MIN_CURRENT_A <= current <= max_a + 1e-6
    assert abs(current * 10 - round(current * 10)) < 1e-9
    if amps >= limits.MIN_CURRENT_A and max_a >= limits.MIN_CURRENT_A:
        assert current <= max(amps, limits.MIN_CURRENT_A) + 1e-6  # never more than asked


def test_profile_limit_in_watts_uses_the_phases() -> None:
    assert limits.ProfileLimit(10.3, "W", 3).value == round(10.3 * 230 * 3)
    assert limits.ProfileLimit(10.3, "A", 1).value == 10.3
    profile = limits.tx_profile_v16(2, 17, limits.ProfileLimit(16, "A", 3))
    assert profile["transaction_id"] == 17 and profile["charging_profile_id"] == 102


def flex(**changes: object) -> frbc.EvseFlex:
    base = {"name": "CP/1", "online": True, "has_session": True, "phases": 3, "phase": "L1",
            "min_current_a": 6.0, "max_current_a": 16.0, "energy_kwh": 4.0, "need_kwh": 20.0,
            "departure": datetime.now(UTC) + timedelta(hours=3)}
    base.update(changes)
    return frbc.EvseFlex(**base)  # type: ignore[arg-type]


def test_frbc_power_range_rates_and_target() -> None:
    now = datetime.now(UTC)
    ids = frbc.FrbcIds.for_resource(uuid.uuid4())
    state = flex()
    sd = frbc.system_description(state, ids, now)
    charging = sd.actuators[0].operation_modes[0].elements[0]
    assert (charging.power_ranges[0].start_of_range, charging.power_ranges[0].end_of_range) == (
        6 * 230 * 3, 16 * 230 * 3)
    # fill rate in kWh/s matches the power: P / (rate * 3600) = Wh per kWh
    assert charging.power_ranges[0].end_of_range / (charging.fill_rate.end_of_range * 3600) == \
        pytest.approx(1000)
    target = frbc.fill_level_target(state, now)
    assert target is not None
    end = now + sum((e.duration.to_timedelta() for e in target.elements), timedelta())
    assert abs((end - state.departure).total_seconds()) < 1  # type: ignore[operator]
    assert target.elements[-1].fill_level_range.start_of_range == 20.0
    assert target.elements[0].fill_level_range.start_of_range == 0.0
    assert "priority 1" in (sd.storage.diagnostic_label or "")


def test_a_late_driver_gets_an_hour_more_not_a_one_minute_sprint() -> None:
    state = flex()
    ids = frbc.FrbcIds.for_resource(uuid.uuid4())
    assert state.departure is not None
    late = state.departure + timedelta(minutes=20)  # still plugged in after the departure
    target = frbc.fill_level_target(state, late)
    assert target is not None
    end = late + sum((e.duration.to_timedelta() for e in target.elements), timedelta())
    assert abs((end - (late + frbc.OVERSTAY)).total_seconds()) < 1
    assert frbc.system_description(state, ids, late) is not None


def test_frbc_uses_soc_once_the_battery_size_is_known() -> None:
    state = flex(soc=50.0, capacity_kwh=60.0, energy_kwh=6.0, need_kwh=18.0)
    ids = frbc.FrbcIds.for_resource(uuid.uuid4())
    sd = frbc.system_description(state, ids, datetime.now(UTC))
    assert sd.storage.fill_level_label == "SoC %"
    element = sd.actuators[0].operation_modes[0].elements[0]
    wh_per_percent = element.power_ranges[0].end_of_range / (element.fill_rate.end_of_range * 3600)
    assert wh_per_percent == pytest.approx(600)  # 60 kWh battery
    assert state.target_level() == pytest.approx(50 + 12 / 60 * 100)


def test_without_ev_or_offline_there_is_no_flexibility() -> None:
    ids = frbc.FrbcIds.for_resource(uuid.uuid4())
    for state in (flex(has_session=False), flex(online=False)):
        sd = frbc.system_description(state, ids, datetime.now(UTC))
        assert [str(m.id) for m in sd.actuators[0].operation_modes] == [ids.idle]
        assert frbc.fill_level_target(state, datetime.now(UTC)) is None
        assert all(v.value == 0 for v in frbc.power_measurement(state, datetime.now(UTC)).values)


def test_instruction_to_current() -> None:
    ids = frbc.FrbcIds.for_resource(uuid.uuid4())

    def order(mode: str, factor: float, actuator: str | None = None) -> FRBCInstruction:
        return FRBCInstruction(message_id=uuid.uuid4(), id=uuid.uuid4(),
                               actuator_id=actuator or ids.actuator, operation_mode=mode,
                               operation_mode_factor=factor, execution_time=datetime.now(UTC),
                               abnormal_condition=False)

    state = flex()
    assert frbc.instruction_current(state, ids, order(ids.charging, 0)) == 6.0
    assert frbc.instruction_current(state, ids, order(ids.charging, 1)) == 16.0
    assert frbc.instruction_current(state, ids, order(ids.charging, 0.5)) == 11.0
    assert frbc.instruction_current(state, ids, order(ids.idle, 0.7)) == 0.0
    with pytest.raises(frbc.InstructionProblem):
        frbc.instruction_current(state, ids, order(str(uuid.uuid4()), 0.5))
    with pytest.raises(frbc.InstructionProblem):
        frbc.instruction_current(flex(has_session=False), ids, order(ids.charging, 0.5))
    single = flex(phases=1, phase="L3")
    sd = frbc.system_description(single, ids, datetime.now(UTC))
    assert sd.actuators[0].operation_modes[0].elements[0].power_ranges[0].commodity_quantity.value \
        == "ELECTRIC.POWER.L3"


def test_cards_set_needs_departure_and_current(tmp_path: Path) -> None:
    site = parse_site_file("""
[site]
timezone = "Europe/Amsterdam"
[ev_defaults]
energy_kwh = 12
departure = "17:30:00"
[[charge_cards]]
id_tag = "BOSS"
priority = 5
energy_kwh = 40
departure = "08:00:00"
max_current_a = 10
""")
    csms = OcppCentralSystem(site.ocpp_rm(), database=tmp_path / "x.db")
    arrival = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)  # 10:00 in Amsterdam
    departure, need, priority, source = csms._needs(arrival, csms.cards["BOSS"])
    assert (need, priority) == (40_000, 5) and "BOSS" in source
    assert departure == datetime(2026, 11, 24, 7, 0, tzinfo=UTC)  # next morning 08:00 local
    departure, need, priority, source = csms._needs(arrival, None)
    assert departure == datetime(2026, 11, 23, 16, 30, tzinfo=UTC) and need == 12_000
    assert csms.check_card("BOSS") == ("Accepted", csms.cards["BOSS"])
    assert next_local_time(arrival, time(10, 0), "Europe/Amsterdam") == arrival + timedelta(days=1)


def test_arrivals_from_acn_and_built_in() -> None:
    visits = load_acn_arrivals(ROOT / "cem/data/acn_caltech_2019-10-01_2019-10-21.csv", limit=20)
    assert len(visits) == 20 and visits[0].at_s == 0
    assert all(v.dwell_s > 0 and v.energy_kwh > 0 for v in visits)
    assert [v.at_s for v in visits] == sorted(v.at_s for v in visits)
    assert len(built_in_arrivals(3)) == 3
    ev = SimulatedEv(soc=90, max_current_a=32)
    assert ev.current_limit_a() == pytest.approx(16)  # tapering above 80 %


async def test_cdrs_table_and_csv_export(tmp_path: Path) -> None:
    db = tmp_path / "ocpp.db"
    records = SessionRecords(db)
    await records.open()
    start = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    sid = await records.start(cp_id="CP1", evse_id=1, transaction_id="7", id_tag="ALICE",
                              card_name="Alice", started_at=start, meter_start_wh=1000)
    await records.meter(sid, meter_wh=5000, at=start + timedelta(hours=1), power_w=7400,
                        soc=None, price_eur_per_kwh=0.25)
    await records.stop(sid, meter_stop_wh=9000, at=start + timedelta(hours=2), reason="Local",
                       price_eur_per_kwh=0.30)
    await records.close()
    config = tmp_path / "site.toml"
    config.write_text("[site]\nname = 'x'\n")
    runner = CliRunner()
    shown = runner.invoke(app, ["cdrs", "-c", str(config), "--db", str(db)])
    assert shown.exit_code == 0 and "Alice" in shown.output and "8.00" in shown.output
    out = tmp_path / "cdrs.csv"
    exported = runner.invoke(app, ["cdrs", "-c", str(config), "--db", str(db), "--csv", str(out)])
    assert exported.exit_code == 0
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["energy_kwh"] == "8.0" and float(rows[0]["cost_eur"]) == pytest.approx(2.2)
    assert float(rows[0]["peak_kw"]) == pytest.approx(7.4)
    missing = runner.invoke(app, ["sessions", "-c", str(config), "--db", str(tmp_path / "no.db")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_rm_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(f"[ocpp]\nport = 0\ndatabase = '{tmp_path / 'ocpp.db'}'\n")
    process = subprocess.Popen(
        [sys.executable, "-c", "from cem.app.cli import main; main()", "rm", "ocpp", "-c", str(config),
         "--cem", "ws://127.0.0.1:9"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "OCPP central system listening" in line:
                break
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "OCPP central system stopped" in rest and "Traceback" not in rest


def test_cdr_prices_follow_the_site_files_tariff(tmp_path: Path) -> None:
    """The central system prices CDR meter readings with the site file's [prices]: day-ahead
    (the CSV's 50.15 EUR/MWh at 17:00 UTC) plus markup and tax, with VAT; flat without a CSV."""
    site = tmp_path / "site.toml"
    site.write_text(f"[prices]\ncsv = '{ROOT / 'cem/data/nl_day_ahead_2019-10.csv'}'\n"
                    "markup_eur_per_kwh = 0.02\ntax_eur_per_kwh = 0.10\nvat = 0.21\n"
                    "[grid]\nfuse_a = 40\n[site]\ntimezone = 'Europe/Berlin'\n")
    config = load_site_file(site).ocpp_rm()
    assert (config.timezone, config.fuse_a) == ("Europe/Berlin", 40)
    csms = OcppCentralSystem(config, database=tmp_path / "x.db")
    at = datetime(2019, 10, 8, 17, 30, tzinfo=UTC)
    assert csms.tariff.eur_per_kwh(at) == pytest.approx((0.05015 + 0.02 + 0.10) * 1.21)
    flat = parse_site_file("[prices]\nflat_import_eur_per_kwh = 0.31\n").ocpp_rm()
    assert OcppCentralSystem(flat, database=tmp_path / "y.db").tariff.eur_per_kwh(at) == 0.31
