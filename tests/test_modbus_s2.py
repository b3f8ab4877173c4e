"""Modbus RMs against the real CEM S2 server on loopback, with simulated devices behind them.

An S2 instruction sent through the CEM's session registry must end as the right register
write; system descriptions must be accepted; a vanished device must withdraw its flexibility
and come back on its own.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from s2python.common import Duration, InstructionStatus
from s2python.frbc import FRBCInstruction
from s2python.pebc import PEBCInstruction, PEBCPowerEnvelope, PEBCPowerEnvelopeElement

from cem.s2.server import LiveSession, S2Server
from cem.site.config import SiteConfig
from resource_managers.modbus import s2_mapping as s2m
from resource_managers.modbus.config import ModbusConfig
from resource_managers.modbus.register_map import RegisterMap, load_register_map, parse_register_map
from resource_managers.modbus.rm import BatteryRM, HeatPumpRM, ModbusRM, PvRM, resource_manager_for
from resource_managers.modbus.simulator import (
    BatterySimulator,
    HeatPumpSimulator,
    ModbusSimulator,
    PvSimulator,
    simulator_for,
)

SPECS = Path(__file__).parent.parent / "specs" / "modbus"


def now() -> datetime:
    return datetime.now(UTC)


async def eventually(check: Callable[[], Any], within: float = 5.0, what: str = "") -> Any:
    """Poll `check` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


@dataclass
class Site:
    cem: S2Server
    sim: ModbusSimulator
    rm: ModbusRM

    @property
    def live(self) -> LiveSession | None:
        return self.cem.get(str(self.rm.resource_id))

    async def described(self) -> LiveSession:
        """Wait until the CEM holds the RM's flexibility (FRBC SD or PEBC constraints)."""
        def ready() -> LiveSession | None:
            live = self.live
            if live is None or not self.rm.described_session:
                return None
            state = live.state
            if state.of("FRBC").system_description(now()) is not None or state.of("PEBC").power_constraints(now()):
                return live
            return None
        return await eventually(ready, what="the RM's flexibility at the CEM")


@pytest.fixture
async def cem() -> AsyncIterator[S2Server]:
    config = SiteConfig()
    config.server.port = 0
    server = S2Server(config)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def make_site(cem: S2Server) -> AsyncIterator[Callable[..., Any]]:
    made: list[Site] = []

    async def make(regmap: RegisterMap, sim_kwargs: dict[str, Any] | None = None,
                   **rm_kwargs: Any) -> Site:
        sim = simulator_for(regmap, tick_s=0.05, **(sim_kwargs or {}))
        await sim.start()
        options: dict[str, Any] = {"poll_interval_s": 0.1, "backoff_s": (0.1, 0.4),
                                   "s2_backoff_s": (0.1, 0.5), "timeout_s": 0.5} | rm_kwargs
        rm = resource_manager_for(regmap, cem_url=cem.url, host="127.0.0.1", port=sim.port,
                                  **options)
        await rm.start()
        site = Site(cem, sim, rm)
        made.append(site)
        return site

    yield make
    for site in made:
        await site.rm.stop()
        await site.sim.stop()


def frbc_instruction(actuator: uuid.UUID, mode: uuid.UUID, factor: float = 1.0,
                     at: datetime | None = None) -> FRBCInstruction:
    return FRBCInstruction(message_id=uuid.uuid4(), id=uuid.uuid4(), actuator_id=actuator,
                           operation_mode=mode, operation_mode_factor=factor,
                           execution_time=at or now(), abnormal_condition=False)


async def instruct(site: Site, message: Any) -> None:
    result = await site.cem.send_instruction(str(site.rm.resource_id), message)
    assert result.ok, result


@pytest.mark.parametrize("map_name,factor,mode,expected_w", [
    ("battery_generic.toml", 0.5, s2m.BATTERY_CHARGE, 2500),
    ("battery_vendor_b.toml", 0.0, s2m.BATTERY_DISCHARGE, -3000),  # full discharge
    ("sunspec_storage.toml", 0.25, s2m.BATTERY_DISCHARGE, -4500),
])
async def test_frbc_instruction_ends_as_the_right_register_write(
        make_site: Callable[..., Any], map_name: str, factor: float, mode: uuid.UUID,
        expected_w: float) -> None:
    regmap = load_register_map(SPECS / map_name)
    site = await make_site(regmap)
    live = await site.described()
    description = live.state.of("FRBC").system_description(now())
    assert description is not None and len(description.actuators[0].operation_modes) == 3
    storage = await eventually(lambda: live.state.of("FRBC").storage_status, what="storage status")
    assert storage.present_fill_level == pytest.approx(50.0)
    instruction = frbc_instruction(s2m.BATTERY_ACTUATOR, mode, factor)
    await instruct(site, instruction)
    sim = site.sim
    assert isinstance(sim, BatterySimulator)
    await eventually(lambda: sim.setpoint_w == pytest.approx(expected_w, abs=1),
                     what=f"setpoint {expected_w} W")
    await eventually(lambda: live.state.instruction_status(instruction.id)
                     == InstructionStatus.SUCCEEDED, what="SUCCEEDED")
    assert sim.rejected == []  # the RM never wrote anything the device refuses
    await eventually(lambda: (m := live.state.latest_measurement()) is not None
                     and m.values[0].value == pytest.approx(expected_w, abs=1),
                     what="the new power in a PowerMeasurement")


async def test_setpoint_is_refreshed_before_the_device_reverts(
        make_site: Callable[..., Any]) -> None:
    text = (SPECS / "battery_generic.toml").read_text().replace("revert_timeout_s = 60",
                                                                "revert_timeout_s = 0.6")
    site = await make_site(parse_register_map(text))
    await site.described()
    await instruct(site, frbc_instruction(s2m.BATTERY_ACTUATOR, s2m.BATTERY_CHARGE, 0.4))
    sim = site.sim
    assert isinstance(sim, BatterySimulator)
    await eventually(lambda: sim.setpoint_w == 2000, what="charging")
    await asyncio.sleep(2.0)  # more than three revert timeouts
    assert not sim.reverted and sim.setpoint_w == 2000
    assert sum(1 for name, _ in sim.writes if name == "power_setpoint") >= 3
    await site.rm.stop()  # a deliberate stop leaves the battery idle
    assert sim.setpoint_w == 0


async def test_vanished_device_withdraws_flexibility_and_recovers(
        make_site: Callable[..., Any]) -> None:
    site = await make_site(load_register_map(SPECS / "battery_generic.toml"))
    live = await site.described()
    await eventually(lambda: live.state.latest_measurement() is not None, what="a measurement")
    await site.sim.stop()
    await eventually(lambda: live.state.of("FRBC").system_description(now()) is None,
                     what="the system description revoked")
    assert not site.rm.device_ok and site.rm.fault
    last = live.state.latest_measurement()
    await asyncio.sleep(0.5)
    assert live.state.latest_measurement() is last  # no measurements without a device
    refused = await site.cem.send_instruction(
        str(site.rm.resource_id),
        frbc_instruction(s2m.BATTERY_ACTUATOR, s2m.BATTERY_CHARGE, 1.0))
    # the CEM no longer has our flexibility (NOT_SENT); if it sent anyway the RM refuses
    assert refused.status in ("NOT_SENT", "TEMPORARY_ERROR"), refused
    await site.sim.start()  # the device comes back on the same port
    await eventually(lambda: live.state.of("FRBC").system_description(now()) is not None,
                     what="the flexibility offered again")
    await eventually(lambda: live.state.latest_measurement() is not last, what="measurements")
    await instruct(site, frbc_instruction(s2m.BATTERY_ACTUATOR, s2m.BATTERY_CHARGE, 1.0))
    sim = site.sim
    assert isinstance(sim, BatterySimulator)
    await eventually(lambda: sim.setpoint_w == 5000, what="charging after recovery")


async def test_out_of_range_reading_is_a_fault(make_site: Callable[..., Any]) -> None:
    site = await make_site(load_register_map(SPECS / "battery_generic.toml"))
    live = await site.described()
    site.sim.overrides["soc"] = 250.0  # a broken sensor
    await eventually(lambda: not site.rm.device_ok, what="the fault noticed")
    assert "soc = 250" in (site.rm.fault or "")
    await eventually(lambda: live.state.of("FRBC").system_description(now()) is None,
                     what="flexibility withdrawn")
    site.sim.overrides.clear()
    await eventually(lambda: live.state.of("FRBC").system_description(now()) is not None,
                     what="flexibility back")


@pytest.mark.parametrize("map_name", ["heat_pump_sg_ready.toml",
                                      "heat_pump_sg_ready_relays.toml"])
async def test_heat_pump_modes_timers_and_forecasts(make_site: Callable[..., Any],
                                                    map_name: str) -> None:
    """SG-Ready as a state register or as two relays: the same modes, timers and forecasts."""
    site = await make_site(load_register_map(SPECS / map_name), {"buffer_c": 45.0})
    live = await site.described()
    state = live.state
    await eventually(lambda: state.of("FRBC").usage_forecast is not None, what="usage forecast")
    assert state.of("FRBC").leakage_behaviour(now()) is not None
    description = state.of("FRBC").system_description(now())
    assert description is not None
    assert description.storage.fill_level_range.start_of_range == 40.0
    assert len(description.actuators[0].timers) == 2
    rm = site.rm
    assert isinstance(rm, HeatPumpRM)
    boost = frbc_instruction(s2m.HEAT_PUMP_ACTUATOR, s2m.HEAT_PUMP_BOOST)
    assert isinstance(site.sim, HeatPumpSimulator)
    sim = site.sim
    await instruct(site, boost)  # normal -> boost: no timer involved
    await eventually(lambda: sim.sg_state() == 3, what="SG-Ready 3")
    await instruct(site, frbc_instruction(s2m.HEAT_PUMP_ACTUATOR, s2m.HEAT_PUMP_OFF))
    await eventually(lambda: sim.sg_state() == 1, what="SG-Ready 1")
    if map_name.endswith("relays.toml"):  # boost -> off opened relay 2 before closing relay 1
        relays = [(n, v) for n, v in sim.writes if n.startswith("sg_ready_relay")]
        assert relays[-2:] == [("sg_ready_relay_2", 0.0), ("sg_ready_relay_1", 1.0)], relays
    await eventually(lambda: state.of("FRBC").timer_statuses(), what="the minimum off timer")
    too_soon = frbc_instruction(s2m.HEAT_PUMP_ACTUATOR, s2m.HEAT_PUMP_NORMAL)
    await instruct(site, too_soon)
    await eventually(lambda: state.instruction_status(too_soon.id)
                     == InstructionStatus.REJECTED, what="on again rejected (minimum off time)")
    assert sim.sg_state() == 1
    later = frbc_instruction(s2m.HEAT_PUMP_ACTUATOR, s2m.HEAT_PUMP_NORMAL,
                             at=now() + timedelta(seconds=400))
    await instruct(site, later)
    await eventually(lambda: state.instruction_status(later.id) == InstructionStatus.ACCEPTED,
                     what="on after the minimum off time accepted")
    assert isinstance(rm, HeatPumpRM)


async def test_pv_curtails_only_when_instructed(make_site: Callable[..., Any]) -> None:
    regmap = load_register_map(SPECS / "sunspec_pv_inverter.toml")
    site = await make_site(regmap, {"start": datetime(2019, 6, 11, 11, tzinfo=UTC)})
    live = await site.described()
    await eventually(lambda: live.state.power_forecast() is not None, what="PV forecast")
    sim = site.sim
    assert isinstance(sim, PvSimulator)
    await asyncio.sleep(0.3)
    assert sim.values["limit_enabled"] == 0 and sim.power_w < -4000  # free production
    assert not any(name == "active_power_limit_pct" for name, _ in sim.writes)
    rm = site.rm
    assert isinstance(rm, PvRM) and rm.constraints_id is not None
    instruction = PEBCInstruction(
        message_id=uuid.uuid4(), id=uuid.uuid4(), execution_time=now(),
        abnormal_condition=False, power_constraints_id=rm.constraints_id,
        power_envelopes=[PEBCPowerEnvelope(
            id="envelope-1", commodity_quantity=s2m.PHASE_QUANTITY["3-phase"],
            power_envelope_elements=[PEBCPowerEnvelopeElement(
                duration=Duration(root=1500), upper_limit=0, lower_limit=-1500)])])
    await instruct(site, instruction)
    await eventually(lambda: sim.values["limit_enabled"] == 1
                     and sim.values["active_power_limit_pct"] == 25.0, what="WMaxLimPct 25 %")
    await eventually(lambda: sim.power_w == pytest.approx(-1500, abs=1), what="curtailed")
    await eventually(lambda: sim.values["limit_enabled"] == 0, within=4,
                     what="curtailment lifted when the envelope ends")


async def test_meter_reports_every_phase_at_least_once_a_second(
        make_site: Callable[..., Any]) -> None:
    site = await make_site(load_register_map(SPECS / "grid_meter.toml"),
                           poll_interval_s=None)
    site.sim.set_site_power([2300.0, 1150.0, -460.0])
    live = await eventually(lambda: site.live, what="meter session")
    assert live.control_type is not None and "NOT_CONTROLABLE" in str(live.control_type)
    await eventually(lambda: live.state.latest_measurement() is not None, what="a measurement")
    stamps = set()
    for _ in range(25):  # 2.5 s
        stamps.add(live.state.latest_measurement().measurement_timestamp)
        await asyncio.sleep(0.1)
    assert len(stamps) >= 2
    values = {v.commodity_quantity.value: v.value for v in live.state.latest_measurement().values}
    assert values == {"ELECTRIC.POWER.L1": 2300.0, "ELECTRIC.POWER.L2": 1150.0,
                      "ELECTRIC.POWER.L3": -460.0}


def test_rm_classes_match_device_classes() -> None:
    regmap = load_register_map(SPECS / "battery_generic.toml")
    assert isinstance(resource_manager_for(regmap, cem_url="ws://127.0.0.1:1"), BatteryRM)
    with pytest.raises(ValueError, match="needs a 'pv' register map"):
        PvRM(regmap, cem_url="ws://127.0.0.1:1")


async def test_each_device_says_in_s2_what_kind_of_device_it_is(cem: S2Server) -> None:
    """ResourceManagerDetails tell the four apart without their names: roles with commodity,
    control types offered, power measurement types (the CEM recognises kinds from these)."""
    from s2python.common import Commodity, CommodityQuantity, ControlType, RoleType

    from resource_managers.modbus.site import SimulatedModbusSite

    site = SimulatedModbusSite.from_config(ModbusConfig(), cem_url=cem.url,
                                           rm_options={"poll_interval_s": 0.1})
    await site.start()
    try:
        await eventually(lambda: len(cem.rms()) == 4 and all(
            d.rm.described_session for d in site.devices), what="four described RMs")
        said = {}
        for device in site.devices:
            details = cem.get(str(device.rm.resource_id)).state.details  # type: ignore[union-attr]
            said[device.plan.device] = (
                {(r.role, r.commodity) for r in details.roles},
                set(details.available_control_types),
                set(details.provides_power_measurement_types), details.model)
    finally:
        await site.stop()
    electricity = Commodity.ELECTRICITY
    phases = {CommodityQuantity.ELECTRIC_POWER_L1, CommodityQuantity.ELECTRIC_POWER_L2,
              CommodityQuantity.ELECTRIC_POWER_L3}
    assert said["meter"][:3] == ({(RoleType.ENERGY_CONSUMER, electricity),
                                  (RoleType.ENERGY_PRODUCER, electricity)},
                                 {ControlType.NOT_CONTROLABLE}, phases)
    assert said["battery"][:2] == ({(RoleType.ENERGY_STORAGE, electricity)},
                                   {ControlType.FILL_RATE_BASED_CONTROL})
    assert said["pv"][:2] == ({(RoleType.ENERGY_PRODUCER, electricity)},
                              {ControlType.POWER_ENVELOPE_BASED_CONTROL})
    assert said["heat-pump"][:2] == ({(RoleType.ENERGY_CONSUMER, electricity),
                                      (RoleType.ENERGY_PRODUCER, Commodity.HEAT)},
                                     {ControlType.FILL_RATE_BASED_CONTROL})
    for kind in ("battery", "pv", "heat-pump"):  # each measures what it draws or feeds in
        assert len(said[kind][2]) == 1 and said[kind][2] <= phases | {
            CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC}
    assert said["heat-pump"][3] == "Air-water 8 kW, SG-Ready"  # the register map's model


async def test_simulated_site_brings_four_rms_and_a_meter_that_sums_them(cem: S2Server
                                                                         ) -> None:
    from resource_managers.modbus.site import SimulatedModbusSite

    site = SimulatedModbusSite.from_config(
        ModbusConfig(), cem_url=cem.url, base_load_w=600, speed=10,
        pv_start=datetime(2019, 6, 11, 11, tzinfo=UTC),
        rm_options={"poll_interval_s": 0.1})
    await site.start()
    try:
        await eventually(lambda: len(cem.rms()) == 4 and all(
            d.rm.described_session for d in site.devices), what="four described RMs")
        battery = next(d for d in site.devices if d.plan.device == "battery")
        await instruct(Site(cem, battery.simulator, battery.rm),
                       frbc_instruction(s2m.BATTERY_ACTUATOR, s2m.BATTERY_CHARGE, 1.0))
        meter = site.meter
        assert meter is not None
        others = [d.simulator for d in site.devices if d.simulator is not meter]

        def summed() -> bool:
            expected = 600 + sum(s.power_w for s in others)
            return battery.simulator.power_w == 5000 and abs(sum(meter.phase_w) - expected) < 50

        await eventually(summed, what="the meter summing the site")
    finally:
        await site.stop()
    assert site.devices == []


async def test_exception_responses_and_timeouts_withdraw_then_recover(
        make_site: Callable[..., Any]) -> None:
    from pymodbus.constants import ExcCodes

    site = await make_site(load_register_map(SPECS / "grid_meter.toml"))
    live = await eventually(lambda: site.live, what="meter session")
    await eventually(lambda: site.rm.device_ok, what="meter polled")
    site.sim.fail_with = ExcCodes.DEVICE_FAILURE
    await eventually(lambda: not site.rm.device_ok, what="exception response noticed")
    assert "refused" in (site.rm.fault or "")
    site.sim.fail_with = None
    await eventually(lambda: site.rm.device_ok, what="recovered after exceptions")
    site.sim.answer_delay_s = 2.0  # longer than the RM's timeout
    await eventually(lambda: not site.rm.device_ok, what="timeout noticed")
    assert "no answer" in (site.rm.fault or "")
    site.sim.answer_delay_s = 0.0
    await eventually(lambda: site.rm.device_ok, within=8, what="recovered after timeouts")
    last = live.state.latest_measurement()
    await eventually(lambda: live.state.latest_measurement() is not last, what="measurements")


async def test_battery_goes_idle_when_the_cem_stays_away(cem: S2Server,
                                                         make_site: Callable[..., Any]) -> None:
    site = await make_site(load_register_map(SPECS / "battery_generic.toml"), cem_grace_s=0.5)
    await site.described()
    await instruct(site, frbc_instruction(s2m.BATTERY_ACTUATOR, s2m.BATTERY_DISCHARGE, 0.0))
    sim = site.sim
    assert isinstance(sim, BatterySimulator)
    await eventually(lambda: sim.setpoint_w == -5000, what="discharging")
    await cem.stop()
    await eventually(lambda: sim.setpoint_w == 0, what="idle without a CEM")


async def test_cem_flex_layer_plans_our_devices_and_its_instructions_land(cem: S2Server
                                                                          ) -> None:
    """build_problem sees battery, heat pump, PV and meter; a plan becomes register writes."""
    import numpy as np

    from cem.flex.site_problem import build_problem, instructions_for_plan
    from cem.planner.assets import Plan
    from resource_managers.modbus.site import SimulatedModbusSite

    site = SimulatedModbusSite.from_config(
        ModbusConfig(), cem_url=cem.url, pv_start=datetime(2019, 6, 11, 11, tzinfo=UTC),
        rm_options={"poll_interval_s": 0.1})
    await site.start()
    try:
        await eventually(lambda: len(cem.rms()) == 4 and all(
            d.rm.described_session for d in site.devices) and all(
            live.state.latest_measurement() is not None for live in cem.rms().values()),
            what="four described RMs with measurements")
        states = {rm_id: live.state for rm_id, live in cem.rms().items()}
        problem, mapping = build_problem(states, SiteConfig(), None, [], now())
        kinds = sorted(s.kind for s in problem.storage)
        assert kinds == ["battery", "heat_pump"]
        battery = next(s for s in problem.storage if s.kind == "battery")
        assert battery.charge_max_w == 5000 and battery.discharge_max_w == 5000
        assert len(problem.curtailable) == 1
        assert problem.curtailable[0].production_w[1] > 1000  # forecast on the PV's clock
        assert mapping.meter_rm is not None
        n = problem.n_ptus
        pv = problem.curtailable[0]
        plan = Plan(status="FEASIBLE", grid_import_w=np.zeros(n),
                    power_w={s.id: np.full(n, -2000 if s.kind == "battery" else 3000)
                             for s in problem.storage},
                    curtailed_w={pv.id: np.maximum(pv.production_w - 1000, 0)})
        for rm_id, messages in instructions_for_plan(plan, problem, mapping, now(),
                                                      until_ptu=1).items():
            for message in messages:
                assert (await cem.send_instruction(rm_id, message)).ok
        sims = {d.plan.device: d.simulator for d in site.devices}
        await eventually(lambda: sims["battery"].values["power_setpoint"] == -2000,
                         what="battery discharging 2000 W")
        await eventually(lambda: sims["heat-pump"].values["sg_ready_state"] == 3,
                         what="heat pump boosting")
        await eventually(lambda: sims["pv"].values["limit_enabled"] == 1
                         and abs(sims["pv"].power_w + 1000) < 2, what="PV capped at 1 kW")
    finally:
        await site.stop()


async def test_revoked_future_instruction_never_reaches_the_device(
        make_site: Callable[..., Any]) -> None:
    from s2python.common import RevokableObjects, RevokeObject

    site = await make_site(load_register_map(SPECS / "battery_generic.toml"))
    live = await site.described()
    later = frbc_instruction(s2m.BATTERY_ACTUATOR, s2m.BATTERY_CHARGE, 1.0,
                             at=now() + timedelta(seconds=1.0))
    await instruct(site, later)
    await eventually(lambda: live.state.instruction_status(later.id)
                     == InstructionStatus.ACCEPTED, what="accepted")
    await instruct(site, RevokeObject(message_id=uuid.uuid4(),
                                      object_type=RevokableObjects.FRBC_Instruction,
                                      object_id=later.id))
    await eventually(lambda: live.state.instruction_status(later.id)
                     == InstructionStatus.REVOKED, what="REVOKED")
    await asyncio.sleep(1.2)
    assert not any(name == "power_setpoint" for name, _ in site.sim.writes)


async def test_a_nan_reading_marks_the_meter_faulty_and_never_reaches_the_cem(
        make_site: Callable[..., Any]) -> None:
    """A float32 register holding NaN (a meter mid-reset) is a device fault: the RM stops
    sending measurements instead of handing the CEM a NaN."""
    site = await make_site(load_register_map(SPECS / "grid_meter.toml"))
    site.sim.set_site_power([1000.0, 2000.0, 3000.0])  # type: ignore[attr-defined]
    live = await eventually(lambda: site.live if site.live is not None
                            and site.live.state.latest_measurement() is not None else None,
                            what="the meter's first measurement")
    site.sim.overrides["power_l2"] = float("nan")
    await eventually(lambda: not site.rm.device_ok, what="the NaN noticed as a fault")
    assert "power_l2 is not a number (NaN)" in (site.rm.fault or "")
    seen = live.state.latest_measurement()
    await asyncio.sleep(0.5)  # several polls
    assert live.state.latest_measurement() is seen  # nothing new, and nothing NaN
    assert all(math.isfinite(v.value) for v in seen.values)
    site.sim.overrides.clear()
    await eventually(lambda: site.rm.device_ok, what="the meter trusted again")
