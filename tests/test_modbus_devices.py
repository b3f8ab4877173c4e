"""Modbus TCP round trips on loopback: real pymodbus servers (the simulators) and clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from resource_managers.modbus import s2_mapping as s2m
from resource_managers.modbus.link import DeviceRejected, DeviceUnreachable, ModbusLink
from resource_managers.modbus.register_map import RegisterMap, load_register_map, parse_register_map
from resource_managers.modbus.simulator import (
    BatterySimulator,
    HeatPumpSimulator,
    MeterSimulator,
    ModbusSimulator,
    PvSimulator,
    simulator_for,
)

SPECS = Path(__file__).parent.parent / "specs" / "modbus"
SUMMER_NOON = datetime(2019, 6, 11, 11, 0, tzinfo=UTC)

#: a valid value for every point the RMs write
WRITE_VALUES = {
    "power_setpoint": -1230.0, "revert_timeout": 45.0, "storage_control_mode": 1.0,
    "charge_rate_pct": 50.5, "discharge_rate_pct": 20.0, "sg_ready_state": 3.0,
    "setpoint_temperature": 50.5, "active_power_limit_pct": 42.5, "limit_enabled": 1.0,
    "limit_revert_timeout": 200.0,
}


async def _running(sim: ModbusSimulator) -> ModbusSimulator:
    await sim.start()
    return sim


@pytest.fixture
async def stack() -> AsyncIterator[list[object]]:
    """Things to close after the test (simulators and links), whatever happens."""
    items: list[object] = []
    yield items
    for item in reversed(items):
        if isinstance(item, ModbusSimulator):
            await item.stop()
        elif isinstance(item, ModbusLink):
            await item.close()


async def _open(stack: list[object], regmap: RegisterMap, **kwargs: object
                ) -> tuple[ModbusSimulator, ModbusLink]:
    sim = simulator_for(regmap, tick_s=0.05, **kwargs)
    await sim.start()
    stack.append(sim)
    # these tests are about values on the wire, not timeouts: 0.5 s (a 1 s connect) failed to
    # connect to the PV simulator under five CPU hogs beside the suite's two workers
    link = ModbusLink(regmap, "127.0.0.1", sim.port, device_id=1, timeout_s=2.0)
    await link.connect()
    stack.append(link)
    return sim, link


@pytest.mark.parametrize("name", [
    "battery_generic.toml", "battery_vendor_b.toml", "sunspec_storage.toml",
    "heat_pump_sg_ready.toml", "heat_pump_sg_ready_relays.toml", "sunspec_pv_inverter.toml",
    "grid_meter.toml",
])
async def test_every_point_reads_and_every_written_point_reads_back(
        stack: list[object], name: str) -> None:
    regmap = load_register_map(SPECS / name)
    # PV near noon, producing a fractional power (whole W on the wire) at any time of the run
    extra = {"start": SUMMER_NOON + timedelta(minutes=7)} if regmap.device_class == "pv" else {}
    sim, link = await _open(stack, regmap, **extra)
    readable = [n for n in regmap.points if not n.endswith("_sf")]
    values = await link.read_many(readable)
    assert set(values) == set(readable)
    for name_ in readable:
        if name_ in sim.values and name_ not in ("voltage_l1", "voltage_l2", "voltage_l3"):
            point = regmap.points[name_]
            exponent = sim.values.get(point.scale_register, 0) if point.scale_register else 0
            step = abs(point.scale) * 10 ** exponent  # what one register count is worth
            assert values[name_] == pytest.approx(sim.values[name_], abs=step / 2 + 0.06), name_
    for point, value in WRITE_VALUES.items():
        if regmap.has(point):
            await link.write(point, value)
            assert await link.read(point) == pytest.approx(value, abs=0.051), point
            assert sim.values[point] == pytest.approx(value, abs=0.051), point


async def test_other_vendor_map_other_addresses_word_order_and_scale(stack: list[object]
                                                                      ) -> None:
    """Vendor B: setpoint in 10 W steps, discharge positive, float SoC little-endian."""
    regmap = load_register_map(SPECS / "battery_vendor_b.toml")
    sim, link = await _open(stack, regmap, soc_pct=61.25)
    await link.write("power_setpoint", -1230)  # S2: discharging 1230 W
    raw = AsyncModbusTcpClient("127.0.0.1", port=sim.port)
    await raw.connect()
    try:
        setpoint = await raw.read_holding_registers(6000, count=1, device_id=1)
        assert setpoint.registers == [123]  # +123 x 10 W = discharge in the vendor's sign
        soc = await raw.read_holding_registers(5000, count=2, device_id=1)
        value = raw.convert_from_registers(soc.registers, raw.DATATYPE.FLOAT32, "little")
        assert value == pytest.approx(61.25)
    finally:
        raw.close()
    assert isinstance(sim, BatterySimulator)
    assert sim.setpoint_w == -1230
    assert await link.read("soc") == pytest.approx(61.25, abs=0.01)


async def test_sunspec_storage_scale_factors_are_applied(stack: list[object]) -> None:
    regmap = load_register_map(SPECS / "sunspec_storage.toml")
    sim, link = await _open(stack, regmap, soc_pct=47.3)
    raw = AsyncModbusTcpClient("127.0.0.1", port=sim.port)
    await raw.connect()
    try:
        soc = await raw.read_holding_registers(40107, count=1, device_id=1)
        sf = await raw.read_holding_registers(40152, count=1, device_id=1)
        assert soc.registers == [473] and sf.registers == [0xFFFF]  # 473 x 10^-1
        marker = await raw.read_holding_registers(40000, count=2, device_id=1)
        assert bytes.fromhex(f"{marker.registers[0]:04x}{marker.registers[1]:04x}") == b"SunS"
    finally:
        raw.close()
    assert await link.read("soc") == pytest.approx(47.3)
    await link.write("discharge_rate_pct", 50)
    await link.write("storage_control_mode", 2)
    assert isinstance(sim, BatterySimulator)
    assert sim.setpoint_w == pytest.approx(-3000)  # 50 % of WChaMax 6000 W


async def test_simulator_rejects_out_of_range_writes(stack: list[object]) -> None:
    regmap = load_register_map(SPECS / "battery_generic.toml")
    sim, link = await _open(stack, regmap)
    with pytest.raises(DeviceRejected, match="exception code 3"):
        await link.write("power_setpoint", 9000)
    with pytest.raises(DeviceRejected):
        await link.write("power_setpoint", -5001)
    assert [r[0] for r in sim.rejected] == ["power_setpoint", "power_setpoint"]
    assert sim.values["power_setpoint"] == 0
    with pytest.raises(PermissionError):
        await link.write("soc", 80)  # read-only in the map: never sent
    await link.write("power_setpoint", 5000)  # the limit itself is fine
    assert sim.values["power_setpoint"] == 5000


async def test_battery_falls_back_to_idle_after_revert_timeout(stack: list[object]) -> None:
    text = (SPECS / "battery_generic.toml").read_text().replace("revert_timeout_s = 60",
                                                                "revert_timeout_s = 0.4")
    regmap = parse_register_map(text)
    sim, link = await _open(stack, regmap, speed=60)
    await link.write("power_setpoint", -2000)
    await asyncio.sleep(0.2)
    assert await link.read("power") == -2000
    soc_before = await link.read("soc")
    await asyncio.sleep(0.6)
    assert await link.read("power") == 0
    assert await link.read("power_setpoint") == 0
    assert isinstance(sim, BatterySimulator) and sim.reverted
    assert soc_before < 50  # it did discharge before it reverted


async def test_battery_soc_integrates_with_efficiency_and_stops_at_limit(
        stack: list[object]) -> None:
    regmap = load_register_map(SPECS / "battery_generic.toml")
    sim = BatterySimulator(regmap, soc_pct=94.0)
    sim.values["power_setpoint"] = 5000
    sim.on_write("power_setpoint", 5000)
    sim.step(36.0, 0.0)  # 5 kW x 36 s x 0.95 = 47.5 Wh = 0.475 %
    assert sim.soc_pct == pytest.approx(94.475)
    for _ in range(10):
        sim.step(36.0, 0.0)
    assert sim.soc_pct == pytest.approx(95.0, abs=0.5)
    assert sim.values["power"] == 0  # full at soc_max: no more charging


async def test_heat_pump_buffer_warms_with_boost_and_cools_when_off() -> None:
    regmap = load_register_map(SPECS / "heat_pump_sg_ready.toml")
    sim = HeatPumpSimulator(regmap, buffer_c=45.0)
    sim.values["sg_ready_state"] = 3
    sim.step(600, 0)
    boosted = sim.buffer_c
    assert boosted > 45.0 and sim.values["power"] == 3000
    sim.values["sg_ready_state"] = 1
    sim.step(600, 0)
    assert sim.buffer_c < boosted and sim.values["power"] == 0


async def test_pv_follows_profile_and_curtails(stack: list[object]) -> None:
    regmap = load_register_map(SPECS / "sunspec_pv_inverter.toml")
    sim, link = await _open(stack, regmap, start=SUMMER_NOON)
    await asyncio.sleep(0.15)
    assert isinstance(sim, PvSimulator)
    free = await link.read("power")
    assert free < -1000  # a June noon produces (negative in S2)
    await link.write("active_power_limit_pct", 10)
    await link.write("limit_enabled", 1)
    await asyncio.sleep(0.15)
    assert await link.read("power") == pytest.approx(-600, abs=1)
    with pytest.raises(DeviceRejected):
        await link.write("active_power_limit_pct", 120)


async def test_meter_reports_site_power_per_phase(stack: list[object]) -> None:
    regmap = load_register_map(SPECS / "grid_meter.toml")
    sim, link = await _open(stack, regmap)
    assert isinstance(sim, MeterSimulator)
    sim.set_site_power([1000.0, -500.0, 200.0])
    await asyncio.sleep(0.15)
    values = await link.read_many(["power_l1", "power_l2", "power_l3", "current_l1"])
    assert [values[f"power_l{i}"] for i in (1, 2, 3)] == pytest.approx([1000, -500, 200])
    assert values["current_l1"] == pytest.approx(1000 / 230, rel=0.01)
    battery = BatterySimulator(load_register_map(SPECS / "battery_generic.toml"))
    battery.values["power"] = 3000.0
    sim.follow([battery], base_load_w=600)
    await asyncio.sleep(0.15)
    assert await link.read("power_l2") == pytest.approx(1200)


async def test_vanished_device_is_unreachable_then_back(stack: list[object]) -> None:
    regmap = load_register_map(SPECS / "grid_meter.toml")
    sim, link = await _open(stack, regmap)
    await sim.stop()
    with pytest.raises(DeviceUnreachable):
        await link.read("power_l1")
    await sim.start()
    await link.connect()
    assert await link.read("power_l1") == 0


def test_rm_setpoints_never_leave_the_device_limits() -> None:
    limits = load_register_map(SPECS / "battery_vendor_b.toml").limits
    assert s2m.battery_setpoint(limits, s2m.BATTERY_CHARGE, 1.0, 50).power_w == 3500
    assert s2m.battery_setpoint(limits, s2m.BATTERY_DISCHARGE, 0.0, 50).power_w == -3000
    clamped = s2m.clamp_battery_power(limits, -9000, 50)
    assert clamped.power_w == -3000 and "clamped" in clamped.note
    assert s2m.clamp_battery_power(limits, 2000, 100).power_w == 0  # full
    assert s2m.clamp_battery_power(limits, -2000, 4).power_w == 0  # empty


async def test_link_keeps_writes_inside_the_maps_valid_range(stack: list[object]) -> None:
    regmap = load_register_map(SPECS / "battery_vendor_b.toml")
    sim, link = await _open(stack, regmap)
    await link.write("power_setpoint", -9000)
    assert sim.values["power_setpoint"] == -3000
    assert sim.rejected == []


def test_time_scale_describes_an_accelerated_device_in_wall_clock_time() -> None:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    battery = load_register_map(SPECS / "battery_generic.toml").limits
    real = s2m.battery_system_description(battery, moment)
    fast = s2m.battery_system_description(battery, moment, time_scale=60)
    rate = real.actuators[0].operation_modes[0].elements[0].fill_rate.end_of_range
    assert rate == pytest.approx(5000 * 0.95 / 10000 * 100 / 3600)  # % per second
    assert fast.actuators[0].operation_modes[0].elements[0].fill_rate.end_of_range \
        == pytest.approx(rate * 60)
    heat_pump = load_register_map(SPECS / "heat_pump_sg_ready.toml").limits
    timers = s2m.heat_pump_system_description(heat_pump, moment, time_scale=60) \
        .actuators[0].timers
    assert [t.duration.root for t in timers] == [10_000, 5_000]  # 600 s and 300 s / 60
