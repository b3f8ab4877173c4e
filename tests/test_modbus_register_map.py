"""Register maps: every shipped map loads; every mistake is named clearly, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cem.app.cli import app
from resource_managers.modbus.register_map import (
    RegisterMapError,
    load_register_map,
    parse_register_map,
)

SPECS = Path(__file__).parent.parent / "specs" / "modbus"
runner = CliRunner()

BATTERY = """
[device]
class = "battery"

[limits]
max_charge_w = 5000
max_discharge_w = 5000
capacity_wh = 10000
soc_min_pct = 10
soc_max_pct = 95

[points.soc]
address = 0
table = "input"
type = "uint16"

[points.power]
address = 1
table = "input"
type = "int32"

[points.power_setpoint]
address = 100
table = "holding"
type = "int32"
access = "read-write"
"""


@pytest.mark.parametrize("name,device_class", [
    ("battery_generic.toml", "battery"),
    ("battery_vendor_b.toml", "battery"),
    ("sunspec_storage.toml", "battery"),
    ("heat_pump_sg_ready.toml", "heat-pump"),
    ("heat_pump_sg_ready_relays.toml", "heat-pump"),
    ("sunspec_pv_inverter.toml", "pv"),
    ("grid_meter.toml", "meter"),
])
def test_shipped_maps_are_valid(name: str, device_class: str) -> None:
    regmap = load_register_map(SPECS / name)
    assert regmap.device_class == device_class
    assert all(p.name == key for key, p in regmap.points.items())


def test_sunspec_maps_use_scale_factor_registers() -> None:
    storage = load_register_map(SPECS / "sunspec_storage.toml")
    assert storage.point("soc").scale_register == "soc_sf"
    assert storage.point("sunspec_id").address == 40000
    pv = load_register_map(SPECS / "sunspec_pv_inverter.toml")
    assert pv.point("active_power_limit_pct").scale_register == "limit_pct_sf"


def test_a_valid_minimal_map_parses() -> None:
    regmap = parse_register_map(BATTERY)
    assert regmap.point("power_setpoint").writable
    assert regmap.word_order(regmap.point("power")) == "big"


def _problems(text: str) -> list[str]:
    with pytest.raises(RegisterMapError) as info:
        parse_register_map(text, "bad.toml")
    assert "bad.toml" in str(info.value)
    return info.value.problems


def test_overlapping_registers_are_named() -> None:
    text = BATTERY.replace('[points.power]\naddress = 1', '[points.power]\naddress = 0')
    problems = _problems(text)
    assert problems == ["points.power: input register 0 overlaps points.soc (uint16 at 0..0)"]


def test_unknown_type_lists_the_allowed_ones() -> None:
    problems = _problems(BATTERY.replace('type = "uint16"', 'type = "int8"', 1))
    assert problems == [
        "points.soc.type: got 'int8', expected 'int16', 'uint16', 'int32', 'uint32', "
        "'float32' or 'bool'"]


def test_writable_point_in_read_only_table_and_read_only_written_point() -> None:
    text = BATTERY.replace('[points.soc]\naddress = 0\ntable = "input"\ntype = "uint16"',
                           '[points.soc]\naddress = 0\ntable = "input"\ntype = "uint16"\n'
                           'access = "read-write"')
    text = text.replace('access = "read-write"\n"""', '')
    text = text.replace('type = "int32"\naccess = "read-write"', 'type = "int32"')
    problems = _problems(text)
    assert any("points.soc" in p and "read-only" in p for p in problems), problems
    assert any("points.power_setpoint" in p and "writes this point" in p for p in problems)


def test_missing_points_and_limits_for_the_device_class() -> None:
    text = BATTERY.replace("max_charge_w = 5000\n", "")
    text = text.split("[points.power_setpoint]")[0]
    problems = _problems(text)
    assert any("needs the point(s) power_setpoint" in p for p in problems), problems
    assert "limits.max_charge_w: a battery map needs this limit" in problems


def test_unknown_setting_and_bad_scale_register() -> None:
    text = BATTERY.replace('type = "int32"\n', 'type = "int32"\nscale_register = "w_sf"\n'
                                               'adress = 3\n', 1)
    problems = _problems(text)
    assert "points.power.adress: unknown setting" in problems


def test_scale_register_must_exist() -> None:
    text = BATTERY.replace('[points.power]\naddress = 1\ntable = "input"\ntype = "int32"',
                           '[points.power]\naddress = 1\ntable = "input"\ntype = "int32"\n'
                           'scale_register = "w_sf"')
    problems = _problems(text)
    assert problems == ["points.power: scale_register 'w_sf' is not a point in this map"]


def test_missing_file_and_broken_toml(tmp_path: Path) -> None:
    with pytest.raises(RegisterMapError) as info:
        load_register_map(tmp_path / "nope.toml")
    assert "file not found" in info.value.problems[0]
    broken = tmp_path / "broken.toml"
    broken.write_text("[device\nclass = 'battery'\n")
    with pytest.raises(RegisterMapError) as info:
        load_register_map(broken)
    assert "not valid TOML" in info.value.problems[0]


def test_config_check_validates_configured_maps(tmp_path: Path) -> None:
    bad_map = tmp_path / "bad_battery.toml"
    bad_map.write_text(BATTERY.replace('type = "uint16"', 'type = "int8"', 1))
    site = tmp_path / "site.toml"
    site.write_text(
        "[[modbus.devices]]\nname = 'battery'\ndevice = 'battery'\nmap = 'bad_battery.toml'\n\n"
        "[[modbus.devices]]\nname = 'pv'\ndevice = 'pv'\n"
        f"map = '{SPECS / 'grid_meter.toml'}'\n\n"
        "[[modbus.devices]]\nname = 'meter'\ndevice = 'meter'\n"
        f"map = '{SPECS / 'grid_meter.toml'}'\n")
    result = runner.invoke(app, ["config", "check", str(site)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "modbus.devices[0].map" in result.output
    assert "points.soc.type: got 'int8'" in result.output
    assert "modbus.devices[1].map" in result.output
    assert "for a 'pv'" in result.output
    assert "modbus.devices[2]" not in result.output


def test_config_check_accepts_shipped_maps(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    entries = [("battery", "battery_generic.toml"), ("heat-pump", "heat_pump_sg_ready.toml"),
               ("pv", "sunspec_pv_inverter.toml"), ("meter", "grid_meter.toml")]
    site.write_text("[grid]\nfuse_a = 25\n\n" + "".join(  # a site file cem run can run
        f"[[modbus.devices]]\nname = '{d}'\ndevice = '{d}'\nmap = '{SPECS / m}'\n\n"
        for d, m in entries))
    result = runner.invoke(app, ["config", "check", str(site)])
    assert result.exit_code == 0, result.output
    assert "4 Modbus device(s)" in result.output


def test_rm_command_reports_a_wrong_map_without_traceback() -> None:
    result = runner.invoke(app, ["rm", "modbus", "--device", "battery", "--map",
                                 str(SPECS / "grid_meter.toml")])
    assert result.exit_code == 2
    assert "register map for a 'meter', not a 'battery'" in result.output
    result = runner.invoke(app, ["sim", "modbus", "--device", "toaster", "--map",
                                 str(SPECS / "grid_meter.toml")])
    assert result.exit_code == 2
    assert "unknown device 'toaster'" in result.output


def test_a_relay_heat_pump_without_its_second_relay_is_told_what_is_missing() -> None:
    src = (SPECS / "heat_pump_sg_ready_relays.toml").read_text()
    start = src.index("[points.sg_ready_relay_2]")
    bad = src[:start] + src[src.index("[points.setpoint_temperature]"):]
    with pytest.raises(RegisterMapError) as error:
        parse_register_map(bad, Path("relays.toml"))
    assert "needs the point(s) sg_ready_relay_2" in str(error.value.problems)


def test_a_point_whose_registers_run_past_65535_is_refused(tmp_path: Path) -> None:
    """A float32 at 65535 would need register 65536, which Modbus cannot address."""
    text = BATTERY + '\n[points.voltage]\naddress = 65535\ntable = "input"\ntype = "float32"\n'
    assert _problems(text) == [
        "points.voltage: a float32 at 65535 takes registers 65535..65536, beyond the last "
        "Modbus address 65535; move it to 65534 or below"]
    fits = BATTERY + '\n[points.voltage]\naddress = 65534\ntable = "input"\ntype = "float32"\n'
    assert parse_register_map(fits).point("voltage").span == range(65534, 65536)
    # the CLI and the config check refuse such a map, with the reason and no traceback
    bad_map = tmp_path / "battery.toml"
    bad_map.write_text(text)
    result = runner.invoke(app, ["rm", "modbus", "--device", "battery", "--map", str(bad_map)])
    assert result.exit_code == 2, result.output
    assert "beyond the last Modbus address 65535" in result.output
    assert "Traceback" not in result.output
    site = tmp_path / "site.toml"
    site.write_text("[[modbus.devices]]\nname = 'battery'\ndevice = 'battery'\n"
                    "map = 'battery.toml'\n")
    result = runner.invoke(app, ["config", "check", str(site)])
    assert result.exit_code == 2, result.output
    assert "modbus.devices[0].map" in result.output
    assert "points.voltage: a float32 at 65535" in result.output


def test_a_written_point_must_sit_in_a_table_modbus_can_write() -> None:
    text = BATTERY.replace('[points.power_setpoint]\naddress = 100\ntable = "holding"',
                           '[points.power_setpoint]\naddress = 100\ntable = "input"')
    problems = _problems(text)
    assert problems == ["points.power_setpoint: access 'read-write' but the input table is "
                        "read-only in Modbus; use a holding register or coil"]
