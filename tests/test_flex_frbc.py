"""FRBC: realistic EV / battery / heat pump messages -> StorageAsset -> plan -> FRBC.Instruction."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
from s2python.common import (
    CommodityQuantity,
    ControlType,
    Duration,
    NumberRange,
    PowerRange,
    ResourceManagerDetails,
    Role,
    RoleType,
    Timer,
    Transition,
)
from s2python.frbc import (
    FRBCActuatorDescription,
    FRBCActuatorStatus,
    FRBCFillLevelTargetProfile,
    FRBCFillLevelTargetProfileElement,
    FRBCInstruction,
    FRBCLeakageBehaviour,
    FRBCLeakageBehaviourElement,
    FRBCOperationMode,
    FRBCOperationModeElement,
    FRBCStorageDescription,
    FRBCStorageStatus,
    FRBCSystemDescription,
    FRBCTimerStatus,
    FRBCUsageForecast,
    FRBCUsageForecastElement,
)
from s2python.generated.gen_s2 import Commodity
from s2python.s2_parser import S2Parser

from cem.flex.frbc import frbc_storage_asset
from cem.flex.modes import TIMER_MARGIN
from cem.flex.ptu import PtuGrid
from cem.planner.assets import Plan, Prices, Problem, SiteLimits

NOW = datetime(2026, 11, 23, 17, 0, tzinfo=UTC)
GRID = PtuGrid(NOW, 15, 96)
SYM = CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC


def uid() -> str:
    return str(uuid.uuid4())


def mode(power: tuple[float, float], rate: tuple[float, float], *, quantity=SYM,
         abnormal: bool = False, label: str = "") -> FRBCOperationMode:
    return FRBCOperationMode(
        id=uid(), diagnostic_label=label, abnormal_condition_only=abnormal,
        elements=[FRBCOperationModeElement(
            fill_level_range=NumberRange(start_of_range=0, end_of_range=100),
            fill_rate=NumberRange(start_of_range=rate[0], end_of_range=rate[1]),
            power_ranges=[PowerRange(start_of_range=power[0], end_of_range=power[1],
                                     commodity_quantity=quantity)])])


def system_description(modes: list[FRBCOperationMode], label: str, *,
                       transitions=(), timers=(), commodity=Commodity.ELECTRICITY,
                       fill_range=(0.0, 100.0), target_profile: bool = True
                       ) -> FRBCSystemDescription:
    actuator = FRBCActuatorDescription(id=uid(), supported_commodities=[commodity],
                                       operation_modes=modes, transitions=list(transitions),
                                       timers=list(timers))
    return FRBCSystemDescription(
        message_id=uid(), valid_from=NOW - timedelta(minutes=1), actuators=[actuator],
        storage=FRBCStorageDescription(
            diagnostic_label=label, fill_level_label=label, provides_leakage_behaviour=False,
            provides_fill_level_target_profile=target_profile, provides_usage_forecast=False,
            fill_level_range=NumberRange(start_of_range=fill_range[0], end_of_range=fill_range[1])))


def problem_for(asset_count: int = 1) -> Problem:
    n = GRID.n_ptus
    limits = SiteLimits(fuse_a=25, phases=3, voltage_v=230, import_limit_w=np.full(n, 17000),
                        export_limit_w=np.full(n, 17000))
    return Problem(start=NOW, ptu_minutes=15, n_ptus=n, limits=limits,
                   prices=Prices(np.full(n, 0.25), np.zeros(n)))


def ev_messages():
    # 60 kWh EV on a 32 A 3-phase charger: 6 A minimum = 4140 W, 32 A = 22080 W
    rate_max = 22080 / 60000 * 100 / 3600  # % per second at full power
    off = mode((0, 0), (0, 0), label="off")
    charge = mode((4140, 22080), (4140 / 22080 * rate_max, rate_max), label="charge")
    v2g = mode((-11000, 0), (-11000 / 22080 * rate_max, 0), abnormal=True, label="emergency")
    sd = system_description([off, charge, v2g], "EV state of charge (%)")
    target = FRBCFillLevelTargetProfile(
        message_id=uid(), start_time=NOW,
        elements=[FRBCFillLevelTargetProfileElement(
            duration=Duration(root=8 * 3600 * 1000),
            fill_level_range=NumberRange(start_of_range=80, end_of_range=100))])
    status = FRBCStorageStatus(message_id=uid(), present_fill_level=30.0)
    actuator_id = str(sd.actuators[0].id)
    act = FRBCActuatorStatus(message_id=uid(), actuator_id=actuator_id,
                             active_operation_mode_id=str(off.id), operation_mode_factor=0)
    return sd, off, charge, v2g, target, status, {actuator_id: act}


def test_ev_with_6a_minimum_gives_zero_or_min_to_max_domain() -> None:
    sd, _off, _charge, _v2g, target, status, acts = ev_messages()
    asset, _ = frbc_storage_asset("ev-3", sd, GRID, NOW, storage_status=status,
                                  actuator_statuses=acts, target_profile=target)
    assert asset.kind == "ev"
    assert (asset.charge_min_w, asset.charge_max_w) == (4140, 22080)
    assert asset.discharge_max_w == 0  # the emergency (abnormal) mode is not flexibility
    # 600 Wh per % (60 kWh battery)
    assert abs(asset.level_wh - 18000) <= 1 and abs(asset.level_max_wh - 60000) <= 1
    assert asset.available_until == 32 and abs(asset.target_wh - 48000) <= 1
    assert asset.target_profile[-1][0] == 32
    assert asset.phase_share == (1 / 3, 1 / 3, 1 / 3)


def test_ev_plan_becomes_one_instruction_per_change_and_never_abnormal() -> None:
    sd, off, charge, v2g, target, status, acts = ev_messages()
    asset, binding = frbc_storage_asset("ev-3", sd, GRID, NOW, storage_status=status,
                                        actuator_statuses=acts, target_profile=target)
    power = np.zeros(GRID.n_ptus, dtype=np.int64)
    power[2:4] = 11000
    power[4] = 3000  # below the 6 A minimum: must become idle, never more than planned
    power[5] = -5000  # the plan may not discharge; if it did, only the normal modes are used
    plan = Plan(status="OPTIMAL", power_w={asset.id: power}, grid_import_w=power.copy())
    messages = binding.instructions(plan, problem_for(), NOW, 8)
    assert [m.execution_time for m in messages] == [NOW, NOW + timedelta(minutes=30),
                                                    NOW + timedelta(minutes=60)]
    assert [str(m.operation_mode) for m in messages] == [str(off.id), str(charge.id), str(off.id)]
    assert abs(messages[1].operation_mode_factor - (11000 - 4140) / (22080 - 4140)) < 1e-3
    assert all(str(m.operation_mode) != str(v2g.id) for m in messages)
    for message in messages:
        assert str(message.actuator_id) == str(sd.actuators[0].id)
        parsed = S2Parser.parse_as_any_message(message.to_json())
        assert isinstance(parsed, FRBCInstruction) and parsed == message


def test_single_phase_ev_lands_on_its_phase() -> None:
    rate = 7360 / 40000 * 100 / 3600
    sd = system_description([mode((0, 0), (0, 0)),
                             mode((1380, 7360), (1380 / 7360 * rate, rate),
                                  quantity=CommodityQuantity.ELECTRIC_POWER_L2)], "EV SoC")
    asset, _ = frbc_storage_asset("ev-1", sd, GRID, NOW)
    assert asset.phase_share == (0.0, 1.0, 0.0)
    assert asset.charge_min_w == 1380


def test_battery_charges_and_discharges_with_round_trip_efficiency() -> None:
    # 10 kWh battery, 5 kW, 95 % each way: charging 5 kW stores 4.75 kW, discharging 5 kW
    # takes 5.263 kW out of the cells
    charge_rate = 4750 / 10000 * 100 / 3600
    discharge_rate = 5000 / 0.95 / 10000 * 100 / 3600
    sd = system_description([mode((0, 5000), (0, charge_rate), label="charge"),
                             mode((-5000, 0), (-discharge_rate, 0), label="discharge")],
                            "battery SoC")
    asset, binding = frbc_storage_asset("battery-1", sd, GRID, NOW,
                                        storage_status=FRBCStorageStatus(message_id=uid(),
                                                                         present_fill_level=50))
    assert asset.kind == "battery"
    assert (asset.charge_max_w, asset.discharge_max_w) == (5000, 5000)
    assert asset.charge_min_w == 0 and asset.discharge_min_w == 0
    assert abs(asset.discharge_efficiency - 0.95 * 0.95) < 1e-3
    power = np.zeros(GRID.n_ptus, dtype=np.int64)
    power[0] = -2500
    plan = Plan(status="OPTIMAL", power_w={asset.id: power}, grid_import_w=power)
    first = binding.instructions(plan, problem_for(), NOW, 2)[0]
    assert first.operation_mode_factor == 0.5  # -5000 + 0.5 * 5000 = -2500


def test_heat_pump_leakage_usage_and_min_off_timer() -> None:
    # buffer 35..55 degC; on = 2 kW electric raising 0.002 degC/s
    off = mode((0, 0), (0, 0), label="off")
    on = mode((2000, 2000), (0.002, 0.002), label="on")
    min_off = Timer(id=uid(), diagnostic_label="min off", duration=Duration(root=20 * 60 * 1000))
    to_on = Transition(id=uid(), **{"from": str(off.id)}, to=str(on.id), start_timers=[],
                       blocking_timers=[str(min_off.id)], abnormal_condition_only=False)
    to_off = Transition(id=uid(), **{"from": str(on.id)}, to=str(off.id),
                        start_timers=[str(min_off.id)], blocking_timers=[],
                        abnormal_condition_only=False)
    sd = system_description([off, on], "buffer temperature degC", transitions=[to_on, to_off],
                             timers=[min_off], fill_range=(35, 55))
    actuator_id = str(sd.actuators[0].id)
    leakage = FRBCLeakageBehaviour(message_id=uid(), valid_from=NOW, elements=[
        FRBCLeakageBehaviourElement(fill_level_range=NumberRange(start_of_range=35, end_of_range=55),
                                    leakage_rate=0.0002)])
    usage = FRBCUsageForecast(message_id=uid(), start_time=NOW, elements=[
        FRBCUsageForecastElement(duration=Duration(root=3600 * 1000), usage_rate_expected=0.001)])
    timer = FRBCTimerStatus(message_id=uid(), timer_id=str(min_off.id), actuator_id=actuator_id,
                            finished_at=NOW + timedelta(minutes=20))
    status = FRBCActuatorStatus(message_id=uid(), actuator_id=actuator_id,
                                active_operation_mode_id=str(off.id), operation_mode_factor=0)
    asset, binding = frbc_storage_asset(
        "hp-1", sd, GRID, NOW, storage_status=FRBCStorageStatus(message_id=uid(),
                                                                present_fill_level=45),
        actuator_statuses={actuator_id: status}, leakage=leakage, usage_forecast=usage,
        timer_statuses=[timer])
    assert asset.kind == "heat_pump"
    assert asset.charge_min_w == asset.charge_max_w == 2000  # on/off: {0} U {2000}
    wh_per_degc = 2000 / (0.002 * 3600)
    assert abs(asset.level_wh - 10 * wh_per_degc) <= 1 and asset.level_min_wh == 0
    # leakage 0.0002 degC/s all day, usage 0.001 degC/s in the first hour
    assert abs(asset.usage_wh[0] - 0.0012 * 900 * wh_per_degc) <= 1
    assert abs(asset.usage_wh[10] - 0.0002 * 900 * wh_per_degc) <= 1
    assert asset.available_from == 2  # the minimum off time runs until 17:20
    plan_power = np.full(GRID.n_ptus, 2000)
    plan = Plan(status="OPTIMAL", power_w={asset.id: plan_power}, grid_import_w=plan_power)
    messages = binding.instructions(plan, problem_for(), NOW, 4)
    assert len(messages) == 1 and str(messages[0].operation_mode) == str(on.id)


def test_kind_from_what_the_rm_says_in_s2_not_from_names() -> None:
    """Discharging, the fill level's unit, heat, and a fill-level target profile decide."""
    from cem.flex.frbc import storage_kind

    rate = 0.001
    charge_only = [mode((0, 0), (0, 0)), mode((1000, 5000), (rate / 5, rate))]
    both_ways = [mode((0, 5000), (0, rate)), mode((-5000, 0), (-rate, 0))]
    # charge-only with a departure target (it offers a fill-level target profile): an EV
    assert storage_kind(system_description(charge_only, "kWh charged this session")) == "ev"
    # a fill level in degC, or a heat role: a heat pump
    assert storage_kind(system_description(charge_only, "degC")) == "heat_pump"
    assert storage_kind(system_description(charge_only, "°C", target_profile=False)) == "heat_pump"

    def details(role: RoleType, commodity: Commodity = Commodity.ELECTRICITY
                ) -> ResourceManagerDetails:
        return ResourceManagerDetails(
            message_id=uid(), resource_id=uid(), instruction_processing_delay=Duration(root=100),
            roles=[Role(role=role, commodity=commodity)],
            available_control_types=[ControlType.FILL_RATE_BASED_CONTROL],
            provides_forecast=False, provides_power_measurement_types=[SYM])

    assert storage_kind(system_description(charge_only, "level", target_profile=False),
                        details(RoleType.ENERGY_CONSUMER, Commodity.HEAT)) == "heat_pump"
    # it can discharge: a battery, whatever its labels say and whether it has a target
    assert storage_kind(system_description(both_ways, "SoC %")) == "battery"
    assert storage_kind(system_description(both_ways, "level", target_profile=False)) == "battery"
    # charge-only without a target: a storage, unless the RM only consumes electricity (an EV
    # charger with no EV yet)
    assert storage_kind(system_description(charge_only, "level", target_profile=False)) == \
        "storage"
    assert storage_kind(system_description(charge_only, "level", target_profile=False),
                        details(RoleType.ENERGY_STORAGE)) == "storage"
    assert storage_kind(system_description(charge_only, "level", target_profile=False),
                        details(RoleType.ENERGY_CONSUMER)) == "ev"
    # words are not read: "EV" and "battery" in its labels make it neither
    assert storage_kind(system_description(charge_only, "EV battery SoC",
                                           target_profile=False)) == "storage"


def test_instructions_wait_for_minimum_run_and_off_timers() -> None:
    off = mode((0, 0), (0, 0), label="off")
    on = mode((2000, 2000), (0.002, 0.002), label="on")
    min_run = Timer(id=uid(), diagnostic_label="min run", duration=Duration(root=30 * 60_000))
    min_off = Timer(id=uid(), diagnostic_label="min off", duration=Duration(root=20 * 60_000))
    to_on = Transition(id=uid(), **{"from": str(off.id)}, to=str(on.id),
                       start_timers=[str(min_run.id)], blocking_timers=[str(min_off.id)],
                       abnormal_condition_only=False)
    to_off = Transition(id=uid(), **{"from": str(on.id)}, to=str(off.id),
                        start_timers=[str(min_off.id)], blocking_timers=[str(min_run.id)],
                        abnormal_condition_only=False)
    sd = system_description([off, on], "buffer degC", transitions=[to_on, to_off],
                            timers=[min_run, min_off], fill_range=(35, 55))
    actuator_id = str(sd.actuators[0].id)
    running = FRBCTimerStatus(message_id=uid(), timer_id=str(min_run.id), actuator_id=actuator_id,
                              finished_at=NOW + timedelta(minutes=20))
    status = FRBCActuatorStatus(message_id=uid(), actuator_id=actuator_id,
                                active_operation_mode_id=str(on.id), operation_mode_factor=0)
    asset, binding = frbc_storage_asset(
        "hp-1", sd, GRID, NOW, storage_status=FRBCStorageStatus(message_id=uid(),
                                                                present_fill_level=45),
        actuator_statuses={actuator_id: status}, timer_statuses=[running])
    power = np.zeros(GRID.n_ptus, dtype=np.int64)
    power[3] = 2000  # on at 17:45 for one PTU only
    plan = Plan(status="OPTIMAL", power_w={asset.id: power}, grid_import_w=power)
    messages = binding.instructions(plan, problem_for(), NOW, 8)
    got = [(m.execution_time - NOW, str(m.operation_mode)) for m in messages]
    minutes = timedelta(minutes=1)
    # not before the minimum run time ends (TIMER_MARGIN after it, as the RM's timer may have
    # started a moment later); the 20 min off time ended at 17:40:30; then it runs its 30
    # minutes: off at 18:15:30, not 18:00
    assert got == [(20 * minutes + TIMER_MARGIN, str(off.id)), (45 * minutes, str(on.id)),
                   (75 * minutes + TIMER_MARGIN, str(off.id))]
    (cap,) = binding.capped_instructions(0, NOW)
    assert cap.execution_time == NOW + 20 * minutes + TIMER_MARGIN  # the guard waits too


def test_a_heat_pump_kept_on_by_its_minimum_run_time_is_planned_on_until_then() -> None:
    """The plan must not count on switching a heat pump off that its RM will not switch off
    yet: until the PTU after its minimum run time ends it is a fixed load, and the storage
    enters the plan from then on at the level that run brings it to."""
    from cem.planner.check import check_plan
    from cem.planner.solve import plan_site

    off = mode((0, 0), (0, 0), label="off")
    on = mode((2000, 2000), (0.002, 0.002), label="on")
    min_run = Timer(id=uid(), diagnostic_label="min run", duration=Duration(root=30 * 60_000))
    to_off = Transition(id=uid(), **{"from": str(on.id)}, to=str(off.id), start_timers=[],
                        blocking_timers=[str(min_run.id)], abnormal_condition_only=False)
    to_on = Transition(id=uid(), **{"from": str(off.id)}, to=str(on.id),
                       start_timers=[str(min_run.id)], blocking_timers=[],
                       abnormal_condition_only=False)
    sd = system_description([off, on], "buffer degC", transitions=[to_on, to_off],
                            timers=[min_run], fill_range=(35, 55))
    actuator_id = str(sd.actuators[0].id)
    running = FRBCTimerStatus(message_id=uid(), timer_id=str(min_run.id), actuator_id=actuator_id,
                              finished_at=NOW + timedelta(minutes=20))
    status = FRBCActuatorStatus(message_id=uid(), actuator_id=actuator_id,
                                active_operation_mode_id=str(on.id), operation_mode_factor=0)
    usage = FRBCUsageForecast(message_id=uid(), start_time=NOW, elements=[
        FRBCUsageForecastElement(duration=Duration(root=4 * 3600 * 1000),
                                 usage_rate_expected=0.001)])
    asset, binding = frbc_storage_asset(
        "hp-1", sd, GRID, NOW, storage_status=FRBCStorageStatus(message_id=uid(),
                                                                present_fill_level=45),
        actuator_statuses={actuator_id: status}, usage_forecast=usage, timer_statuses=[running])
    wh_per_degc = 2000 / (0.002 * 3600)
    assert asset.available_from == 2  # the run time ends at 17:20: planned from 17:30
    held = binding.held_load
    assert held is not None and list(held.power_w[:3]) == [2000, 2000, 0]
    # 30 minutes on (+3.6 degC) and 30 minutes of usage (-1.8 degC) from 45 degC
    assert abs(asset.level_wh - (10 + 3.6 - 1.8) * wh_per_degc) <= 2
    # heat is cheapest now: the plan still cannot have more than the heat pump's 2 kW in PTU 0,
    # and what it plans for PTU 0 and 1 is the held run, within the limits
    problem = problem_for()
    problem.prices.import_eur_per_kwh[:] = np.linspace(0.1, 0.5, GRID.n_ptus)
    problem.storage, problem.fixed = [asset], [held]
    plan = plan_site(problem, time_limit_s=1.0)
    assert list(plan.grid_import_w[:2]) == [2000, 2000]
    assert (plan.power_w["hp-1"][:2] == 0).all()
    assert check_plan(problem, plan) == []
