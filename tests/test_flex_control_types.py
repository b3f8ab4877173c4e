"""PEBC, OMBC, DDBC, PPBC and NOT_CONTROLABLE: S2 messages -> asset -> plan -> valid instructions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
from s2python.common import (
    CommodityQuantity,
    Duration,
    NumberRange,
    PowerForecast,
    PowerForecastElement,
    PowerForecastValue,
    PowerMeasurement,
    PowerRange,
    PowerValue,
    Timer,
    Transition,
)
from s2python.ddbc import (
    DDBCActuatorDescription,
    DDBCInstruction,
    DDBCOperationMode,
    DDBCSystemDescription,
)
from s2python.generated.gen_s2 import Commodity
from s2python.ombc import OMBCInstruction, OMBCOperationMode, OMBCStatus, OMBCSystemDescription
from s2python.pebc import (
    PEBCAllowedLimitRange,
    PEBCInstruction,
    PEBCPowerConstraints,
    PEBCPowerEnvelopeConsequenceType,
    PEBCPowerEnvelopeLimitType,
)
from s2python.ppbc import (
    PPBCPowerProfileDefinition,
    PPBCPowerProfileStatus,
    PPBCPowerSequence,
    PPBCPowerSequenceContainer,
    PPBCPowerSequenceContainerStatus,
    PPBCPowerSequenceElement,
    PPBCScheduleInstruction,
    PPBCStartInterruptionInstruction,
)
from s2python.s2_parser import S2Parser

from cem.flex.ddbc import ddbc_mode_assets
from cem.flex.modes import TIMER_MARGIN
from cem.flex.not_controlable import fixed_load
from cem.flex.ombc import ombc_mode_asset
from cem.flex.pebc import pebc_asset
from cem.flex.ppbc import ppbc_assets
from cem.flex.ptu import PtuGrid, sid
from cem.planner.assets import Curtailable, FixedLoad, Plan, Prices, Problem, SiteLimits

NOW = datetime(2026, 11, 23, 11, 5, tzinfo=UTC)  # 5 minutes into a PTU
START = datetime(2026, 11, 23, 11, 0, tzinfo=UTC)
GRID = PtuGrid(START, 15, 96)
SYM = CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC
L1 = CommodityQuantity.ELECTRIC_POWER_L1


def uid() -> str:
    return str(uuid.uuid4())


def problem() -> Problem:
    n = GRID.n_ptus
    return Problem(start=START, ptu_minutes=15, n_ptus=n,
                   limits=SiteLimits(25, 3, 230, np.full(n, 17000), np.full(n, 17000)),
                   prices=Prices(np.full(n, 0.2), np.zeros(n)))


def round_trip(message):  # type: ignore[no-untyped-def]
    parsed = S2Parser.parse_as_any_message(message.to_json())
    assert type(parsed) is type(message) and parsed.to_json_dict() == message.to_json_dict()
    return parsed


def forecast(values_w: list[float], quantity=SYM) -> PowerForecast:
    return PowerForecast(message_id=uid(), start_time=START, elements=[
        PowerForecastElement(duration=Duration(root=3600 * 1000), power_values=[
            PowerForecastValue(value_expected=v, commodity_quantity=quantity)]) for v in values_w])


def test_not_controlable_forecast_and_measurement_become_a_fixed_load() -> None:
    measurement = PowerMeasurement(message_id=uid(), measurement_timestamp=NOW, values=[
        PowerValue(commodity_quantity=L1, value=900.0)])
    load = fixed_load("fridge", GRID, forecast=forecast([500, 700], L1), measurement=measurement)
    assert isinstance(load, FixedLoad)
    assert load.power_w[0] == 900  # now: what is measured
    assert load.power_w[1] == 500 and load.power_w[4] == 700
    assert load.power_w[20] == 900  # beyond the forecast: the measurement held flat
    assert load.phase_share == (1.0, 0.0, 0.0)


def pv_constraints() -> PEBCPowerConstraints:
    return PEBCPowerConstraints(
        message_id=uid(), id=uid(), valid_from=START, valid_until=None,
        consequence_type=PEBCPowerEnvelopeConsequenceType.VANISH,
        allowed_limit_ranges=[
            PEBCAllowedLimitRange(commodity_quantity=SYM,
                                  limit_type=PEBCPowerEnvelopeLimitType.UPPER_LIMIT,
                                  range_boundary=NumberRange(start_of_range=0, end_of_range=0),
                                  abnormal_condition_only=False),
            PEBCAllowedLimitRange(commodity_quantity=SYM,
                                  limit_type=PEBCPowerEnvelopeLimitType.LOWER_LIMIT,
                                  range_boundary=NumberRange(start_of_range=-10000,
                                                             end_of_range=0),
                                  abnormal_condition_only=False)])


def test_pebc_pv_is_curtailable_and_curtailment_becomes_a_lower_limit() -> None:
    constraints = pv_constraints()
    asset, binding, _ = pebc_asset("pv-1", GRID, NOW, constraints=constraints,
                                   forecast=forecast([-6000, -8000, -8000]))
    assert isinstance(asset, Curtailable) and asset.curtailable
    assert asset.production_w[0] == 6000 and asset.production_w[4] == 8000
    curtailed = np.zeros(GRID.n_ptus, dtype=np.int64)
    curtailed[4:6] = 3000
    plan = Plan(status="OPTIMAL", power_w={}, grid_import_w=np.zeros(GRID.n_ptus),
                curtailed_w={"pv-1": curtailed})
    (instruction,) = binding.instructions(plan, problem(), NOW, 8)
    round_trip(instruction)
    assert isinstance(instruction, PEBCInstruction)
    assert str(instruction.power_constraints_id) == str(constraints.id)
    (envelope,) = instruction.power_envelopes
    lows = [(e.duration.root, e.lower_limit) for e in envelope.power_envelope_elements]
    # 10 min left of PTU 0 + PTUs 1-3 at 6 kW, then 2 PTUs capped at 5 kW, then 8 kW again
    assert lows == [(10 * 60_000 + 3 * 900_000, -6000), (2 * 900_000, -5000),
                    (2 * 900_000, -8000)]
    assert all(e.upper_limit == 0 for e in envelope.power_envelope_elements)
    assert sum(d for d, _ in lows) == 10 * 60_000 + 7 * 900_000


def test_ombc_modes_min_on_time_and_instructions() -> None:
    off = OMBCOperationMode(id=uid(), power_ranges=[PowerRange(start_of_range=0, end_of_range=0,
                                                              commodity_quantity=SYM)],
                            abnormal_condition_only=False)
    low = OMBCOperationMode(id=uid(), power_ranges=[PowerRange(start_of_range=1000,
                                                              end_of_range=3000,
                                                              commodity_quantity=SYM)],
                            abnormal_condition_only=False)
    turbo = OMBCOperationMode(id=uid(), power_ranges=[PowerRange(start_of_range=9000,
                                                                end_of_range=9000,
                                                                commodity_quantity=SYM)],
                              abnormal_condition_only=True)
    min_on = Timer(id=uid(), duration=Duration(root=30 * 60 * 1000))
    sd = OMBCSystemDescription(
        message_id=uid(), valid_from=START, operation_modes=[off, low, turbo],
        transitions=[
            Transition(id=uid(), **{"from": str(off.id)}, to=str(low.id),
                       start_timers=[str(min_on.id)], blocking_timers=[],
                       abnormal_condition_only=False),
            Transition(id=uid(), **{"from": str(low.id)}, to=str(off.id), start_timers=[],
                       blocking_timers=[str(min_on.id)], abnormal_condition_only=False)],
        timers=[min_on])
    status = OMBCStatus(message_id=uid(), active_operation_mode_id=str(off.id),
                        operation_mode_factor=0)
    asset, binding = ombc_mode_asset("pump", sd, GRID, status=status)
    assert [m.id for m in asset.modes] == [str(off.id), str(low.id)]  # never the abnormal one
    assert asset.min_on_ptus == 2 and asset.current_mode == str(off.id)
    power = np.zeros(GRID.n_ptus)
    power[1:3] = 2000
    modes = [str(off.id)] * GRID.n_ptus
    modes[1:3] = [str(low.id)] * 2
    plan = Plan(status="OPTIMAL", power_w={"pump": power}, grid_import_w=power,
                mode={"pump": modes})
    messages = binding.instructions(plan, problem(), NOW, 6)
    assert [str(m.operation_mode_id) for m in messages] == [str(off.id), str(low.id), str(off.id)]
    assert messages[1].operation_mode_factor == 0.5
    assert messages[1].execution_time == START + timedelta(minutes=15)
    for m in messages:
        assert isinstance(round_trip(m), OMBCInstruction)
    # one PTU on is shorter than the 30 min minimum on-time: off waits for the timer
    power[2] = 0
    modes[2] = str(off.id)
    messages = binding.instructions(plan, problem(), NOW, 6)
    assert [(m.execution_time - START, str(m.operation_mode_id)) for m in messages] == [
        (timedelta(minutes=5), str(off.id)), (timedelta(minutes=15), str(low.id)),
        (timedelta(minutes=45) + TIMER_MARGIN, str(off.id))]  # just after the on-time ends


def test_ddbc_modes_meet_the_demand_and_instruct_the_actuator() -> None:
    def ddbc_mode(power: tuple[float, float], supply: tuple[float, float],
                  abnormal: bool = False) -> DDBCOperationMode:
        return DDBCOperationMode(  # s2-python 0.11 wants `Id` and a list of supply ranges
            id=(mode_id := uid()), Id=mode_id, power_ranges=[PowerRange(start_of_range=power[0], end_of_range=power[1],
                                               commodity_quantity=SYM)],
            supply_range=[NumberRange(start_of_range=supply[0], end_of_range=supply[1])],
            abnormal_condition_only=abnormal)

    small = ddbc_mode((500, 1500), (0, 100))     # cannot supply 150
    big = ddbc_mode((1000, 4000), (0, 300))      # 150 needs 2500 W
    backup = ddbc_mode((6000, 6000), (0, 500), abnormal=True)
    actuator = DDBCActuatorDescription(id=uid(), supported_commodites=[Commodity.ELECTRICITY],
                                       operation_modes=[small, big, backup], transitions=[],
                                       timers=[])
    sd = DDBCSystemDescription(message_id=uid(), valid_from=START, actuators=[actuator],
                               present_demand_rate=NumberRange(start_of_range=150,
                                                               end_of_range=150),
                               provides_average_demand_rate_forecast=False)
    ((asset, binding),) = ddbc_mode_assets("vent", sd, GRID, NOW)
    assert [(m.id, m.min_w, m.max_w) for m in asset.modes] == [(sid(big.Id), 2500, 4000)]
    power = np.full(GRID.n_ptus, 2500.0)
    plan = Plan(status="OPTIMAL", power_w={asset.id: power}, grid_import_w=power,
                mode={asset.id: [sid(big.Id)] * GRID.n_ptus})
    (message,) = binding.instructions(plan, problem(), NOW, 4)
    assert isinstance(round_trip(message), DDBCInstruction)
    assert str(message.actuator_id) == str(actuator.id)
    assert str(message.operation_mode_id) == sid(big.Id) and message.operation_mode_factor == 0.5


def washing_machine() -> tuple[PPBCPowerProfileDefinition, list[PPBCPowerSequenceContainer]]:
    def seq(values: list[tuple[int, float]], interruptible: bool = False,
            abnormal: bool = False) -> PPBCPowerSequence:
        return PPBCPowerSequence(id=uid(), elements=[
            PPBCPowerSequenceElement(duration=Duration(root=minutes * 60_000), power_values=[
                PowerForecastValue(value_expected=w, commodity_quantity=L1)])
            for minutes, w in values], is_interruptible=interruptible, max_pause_before=0,
            abnormal_condition_only=abnormal)

    heat = PPBCPowerSequenceContainer(id=uid(), power_sequences=[
        seq([(15, 2000)], abnormal=True), seq([(30, 2000)])])
    spin = PPBCPowerSequenceContainer(id=uid(), power_sequences=[seq([(15, 400)], True)])
    definition = PPBCPowerProfileDefinition(
        message_id=uid(), id=uid(), start_time=START, end_time=START + timedelta(hours=6),
        power_sequences_containers=[heat, spin])
    return definition, [heat, spin]


def test_ppbc_profile_is_shiftable_and_start_becomes_schedule_instructions() -> None:
    definition, (heat, spin) = washing_machine()
    asset, binding = ppbc_assets("washer", definition, GRID, NOW)
    assert asset is not None and asset.profile_w.tolist() == [2000, 2000, 400]
    assert (asset.earliest_start, asset.latest_start) == (0, 21)
    assert asset.phase_share == (1.0, 0.0, 0.0)
    plan = Plan(status="OPTIMAL", power_w={}, grid_import_w=np.zeros(GRID.n_ptus),
                profile_start={asset.id: 8})
    messages = binding.instructions(plan, problem(), NOW, 96)
    assert [m.execution_time for m in messages] == [START + timedelta(hours=2),
                                                    START + timedelta(hours=2, minutes=30)]
    assert [str(m.sequence_container_id) for m in messages] == [str(heat.id), str(spin.id)]
    assert str(messages[0].power_sequence_id) == str(heat.power_sequences[1].id)  # normal one
    for m in messages:
        assert isinstance(round_trip(m), PPBCScheduleInstruction)
        assert str(m.power_profile_id) == str(definition.id)


def test_ppbc_executing_profile_is_fixed_and_the_guard_may_interrupt_it() -> None:
    definition, (heat, spin) = washing_machine()
    status = PPBCPowerProfileStatus(message_id=uid(), sequence_container_status=[
        PPBCPowerSequenceContainerStatus(power_profile_id=str(definition.id),
                                         sequence_container_id=str(heat.id),
                                         selected_sequence_id=str(heat.power_sequences[1].id),
                                         progress=None, status="FINISHED"),
        PPBCPowerSequenceContainerStatus(power_profile_id=str(definition.id),
                                         sequence_container_id=str(spin.id),
                                         selected_sequence_id=str(spin.power_sequences[0].id),
                                         progress=None, status="EXECUTING")])
    asset, binding = ppbc_assets("washer", definition, GRID, NOW, status=status)
    assert isinstance(asset, FixedLoad)
    # s2-python 0.11 cannot carry `progress`: the spin is taken to run its 15 min from now
    assert asset.power_w[:3].tolist() == [267, 133, 0]
    (pause,) = binding.capped_instructions(0, NOW)
    assert isinstance(round_trip(pause), PPBCStartInterruptionInstruction)


def test_real_planner_on_pv_pump_and_washer_gives_valid_instructions() -> None:
    from cem.planner.check import check_plan
    from cem.planner.solve import plan_site

    site = problem()
    site.limits.export_limit_w[:] = 2000  # PV must be curtailed to 2 kW export
    definition, _ = washing_machine()
    washer, washer_binding = ppbc_assets("washer", definition, GRID, NOW)
    pv, pv_binding, _ = pebc_asset("pv-1", GRID, NOW, constraints=pv_constraints(),
                                   forecast=forecast([-6000, -8000, -8000]))
    off = OMBCOperationMode(id=uid(), power_ranges=[PowerRange(
        start_of_range=0, end_of_range=0, commodity_quantity=SYM)], abnormal_condition_only=False)
    low = OMBCOperationMode(id=uid(), power_ranges=[PowerRange(
        start_of_range=1000, end_of_range=3000, commodity_quantity=SYM)],
        abnormal_condition_only=False)
    pump, pump_binding = ombc_mode_asset("pump", OMBCSystemDescription(
        message_id=uid(), valid_from=START, operation_modes=[off, low], transitions=[],
        timers=[]), GRID)
    site.profiles.append(washer)
    site.curtailable.append(pv)
    site.modes.append(pump)
    plan = plan_site(site, time_limit_s=1.0)
    assert plan.status in ("OPTIMAL", "FEASIBLE") and check_plan(site, plan) == []
    messages = [m for b in (washer_binding, pv_binding, pump_binding)
                for m in b.instructions(plan, site, NOW, GRID.n_ptus)]
    kinds = {m.message_type for m in messages}
    assert kinds == {"PPBC.ScheduleInstruction", "PEBC.Instruction", "OMBC.Instruction"}
    for message in messages:
        round_trip(message)
    (pebc,) = [m for m in messages if m.message_type == "PEBC.Instruction"]
    # the envelope lets through at most what the plan keeps after curtailment
    kept = -(pv.production_w[0] - plan.curtailed_w.get("pv-1", np.zeros(1))[0])
    assert pebc.power_envelopes[0].power_envelope_elements[0].lower_limit == kept
