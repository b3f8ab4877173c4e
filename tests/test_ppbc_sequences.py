"""PPBC alternative sequences are planned: S2 session -> build_problem -> plan -> ScheduleInstructions.

A power sequence container holds alternatives; the planner picks per container the sequence
that makes the site cheapest, never one whose chain cannot finish by the profile's end time,
and schedules the containers in their order, back to back.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from s2_feed import feeder, uid
from s2python.common import (
    CommodityQuantity,
    ControlType,
    Duration,
    EnergyManagementRole,
    Handshake,
    PowerForecastValue,
    ResourceManagerDetails,
    Role,
    RoleType,
)
from s2python.generated.gen_s2 import Commodity
from s2python.ppbc import (
    PPBCPowerProfileDefinition,
    PPBCPowerSequence,
    PPBCPowerSequenceContainer,
    PPBCPowerSequenceElement,
    PPBCScheduleInstruction,
)
from s2python.s2_parser import S2Parser

from cem.flex.ppbc import ppbc_assets
from cem.flex.ptu import PtuGrid
from cem.flex.site_problem import build_problem, instructions_for_plan
from cem.planner.assets import Plan, Prices
from cem.planner.check import check_plan
from cem.planner.solve import plan_site
from cem.s2.session import S2Session
from cem.site.config import SiteConfig

NOW = datetime(2026, 11, 23, 17, 0, tzinfo=UTC)
L1 = CommodityQuantity.ELECTRIC_POWER_L1
N = 16
CONFIG = SiteConfig.model_validate({"planner": {"horizon_ptus": N}})


feed = feeder(NOW)


def sequence(minutes: int, watts: float, *, abnormal: bool = False) -> PPBCPowerSequence:
    return PPBCPowerSequence(id=uid(), elements=[PPBCPowerSequenceElement(
        duration=Duration(root=minutes * 60_000),
        power_values=[PowerForecastValue(value_expected=watts, commodity_quantity=L1)])],
        is_interruptible=False, max_pause_before=0, abnormal_condition_only=abnormal)


# the washer's wash: "quick" (30 min at 2 kW, 1 kWh, listed first: the RM's preference) or
# "eco" (90 min at 500 W, 0.75 kWh); then a 15 min spin at 400 W
QUICK = sequence(30, 2000)
ECO = sequence(90, 500)
TURBO = sequence(15, 4000, abnormal=True)
SPIN = sequence(15, 400)
WASH = PPBCPowerSequenceContainer(id=uid(), power_sequences=[TURBO, QUICK, ECO])
SPINNING = PPBCPowerSequenceContainer(id=uid(), power_sequences=[SPIN])


def definition(start: datetime, end: datetime) -> PPBCPowerProfileDefinition:
    return PPBCPowerProfileDefinition(message_id=uid(), id=uid(), start_time=start, end_time=end,
                                      power_sequences_containers=[WASH, SPINNING])


def washer_session(profile: PPBCPowerProfileDefinition) -> S2Session:
    session = S2Session()
    session.start(NOW)
    feed(session, Handshake(message_id=uid(), role=EnergyManagementRole.RM,
                            supported_protocol_versions=["0.0.2-beta"]))
    feed(session, ResourceManagerDetails(
        message_id=uid(), resource_id=uid(), name="washer",
        roles=[Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY)],
        instruction_processing_delay=100,
        available_control_types=[ControlType.POWER_PROFILE_BASED_CONTROL],
        provides_forecast=False, provides_power_measurement_types=[L1]))
    feed(session, profile)
    return session


def prices(import_eur: list[float]) -> Prices:
    return Prices(np.array(import_eur, dtype=float), np.zeros(N))


def plan_and_send(session: S2Session, site_prices: Prices
                  ) -> tuple[Plan, list[PPBCScheduleInstruction]]:
    problem, mapping = build_problem({"washer": session.state}, CONFIG, site_prices, [], NOW)
    assert len(problem.profiles) == 1
    plan = plan_site(problem, time_limit_s=1.0)
    assert check_plan(problem, plan) == []
    messages = instructions_for_plan(plan, problem, mapping, NOW)["washer"]
    for message in messages:
        assert session.send(message, NOW).message_type == "PPBC.ScheduleInstruction"
        assert isinstance(S2Parser.parse_as_any_message(message.to_json()), PPBCScheduleInstruction)
    return plan, messages


def chosen(messages: list[PPBCScheduleInstruction]) -> list[str]:
    return [str(m.power_sequence_id) for m in messages]


def test_flat_prices_pick_the_eco_wash_and_spin_after_it() -> None:
    session = washer_session(definition(NOW, NOW + timedelta(hours=4)))
    plan, messages = plan_and_send(session, prices([0.30] * N))
    assert chosen(messages) == [str(ECO.id), str(SPIN.id)]  # 0.75 kWh beats 1 kWh
    wash, spin = messages
    assert [str(m.sequence_container_id) for m in messages] == [str(WASH.id), str(SPINNING.id)]
    assert spin.execution_time - wash.execution_time == timedelta(minutes=90)
    (power,) = plan.power_w.values()
    assert power.sum() == 500 * 6 + 400  # 6 PTUs of eco, one of spin


def test_a_cheap_half_hour_makes_the_quick_wash_cheaper() -> None:
    session = washer_session(definition(NOW, NOW + timedelta(hours=4)))
    cheap = [0.50] * N
    cheap[8:10] = [0.05, 0.05]  # 19:00-19:30
    cheap[10] = 0.10
    plan, messages = plan_and_send(session, prices(cheap))
    assert chosen(messages) == [str(QUICK.id), str(SPIN.id)]
    wash, spin = messages
    assert wash.execution_time == NOW + timedelta(hours=2)
    assert spin.execution_time == NOW + timedelta(hours=2, minutes=30)
    (power,) = plan.power_w.values()
    assert power[8:11].tolist() == [2000, 2000, 400]


def test_a_sequence_that_cannot_finish_in_time_is_never_chosen() -> None:
    # 45 minutes from start to end: quick + spin (45 min) fits, eco + spin (105 min) does not,
    # though eco would be cheaper
    start = NOW + timedelta(hours=1)
    profile = definition(start, start + timedelta(minutes=45))
    session = washer_session(profile)
    _plan, messages = plan_and_send(session, prices([0.30] * N))
    assert chosen(messages) == [str(QUICK.id), str(SPIN.id)]
    assert messages[0].execution_time == start
    assert messages[-1].execution_time + timedelta(minutes=15) <= profile.end_time
    asset, _binding = ppbc_assets("washer", profile, PtuGrid(NOW, 15, N), NOW)
    assert asset is not None and asset.alternatives == []  # eco was not even offered


def test_the_checker_refuses_a_start_outside_the_chosen_shapes_window() -> None:
    session = washer_session(definition(NOW, NOW + timedelta(hours=2)))
    problem, _mapping = build_problem({"washer": session.state}, CONFIG, prices([0.3] * N), [],
                                      NOW)
    plan = plan_site(problem, time_limit_s=1.0)
    (profile,) = problem.profiles
    eco = next(k for k, o in enumerate(profile.options()) if o.profile_w.tolist()[:2] == [500, 500])
    window = profile.options()[eco]
    assert window.latest_start == 8 - 7  # 105 min must end by 19:00
    late = window.latest_start + 1
    plan.profile_choice[profile.id] = eco
    plan.profile_start[profile.id] = late
    shape = np.zeros(N)
    shape[late:late + len(window.profile_w)] = window.profile_w
    plan.power_w[profile.id] = shape
    plan.grid_import_w = shape.copy()
    found = check_plan(problem, plan)
    assert any("outside 0..1" in v for v in found), found
    plan.profile_start[profile.id] = 0  # in the window, but not the eco shape it runs
    assert any("is not its shape" in v for v in check_plan(problem, plan))


def test_an_interrupted_wash_resumes_its_own_sequence_not_an_alternative() -> None:
    from s2python.ppbc import (
        PPBCEndInterruptionInstruction,
        PPBCPowerProfileStatus,
        PPBCPowerSequenceContainerStatus,
    )

    profile = definition(NOW, NOW + timedelta(hours=4))
    status = PPBCPowerProfileStatus(message_id=uid(), sequence_container_status=[
        PPBCPowerSequenceContainerStatus(power_profile_id=str(profile.id),
                                         sequence_container_id=str(WASH.id),
                                         selected_sequence_id=str(ECO.id), progress=None,
                                         status="INTERRUPTED")])
    asset, binding = ppbc_assets("washer", profile, PtuGrid(NOW, 15, N), NOW, status=status)
    assert asset is not None and asset.alternatives == []  # eco it was, eco it stays
    plan = Plan(status="OPTIMAL", power_w={}, grid_import_w=np.zeros(N),
                profile_start={asset.id: 2}, profile_choice={asset.id: 0})
    problem, _ = build_problem({}, CONFIG, prices([0.3] * N), [], NOW)
    resume, spin = binding.instructions(plan, problem, NOW, N)
    assert isinstance(resume, PPBCEndInterruptionInstruction)
    assert str(resume.power_sequence_id) == str(ECO.id)
    assert spin.execution_time - resume.execution_time == timedelta(minutes=90)


def test_the_whole_chain_is_scheduled_once_its_start_is_due() -> None:
    # the spin starts 90 minutes after the eco wash, beyond a one-hour dispatch: it is sent
    # with the wash all the same (once the wash runs, the rest is no longer planned)
    session = washer_session(definition(NOW, NOW + timedelta(hours=4)))
    problem, mapping = build_problem({"washer": session.state}, CONFIG, prices([0.30] * N), [],
                                     NOW)
    plan = plan_site(problem, time_limit_s=1.0)
    (profile,) = problem.profiles
    start = plan.profile_start[profile.id] = 1  # flat prices: any start is as good
    messages = instructions_for_plan(plan, problem, mapping, NOW, until_ptu=4)["washer"]
    assert chosen(messages) == [str(ECO.id), str(SPIN.id)]
    assert messages[1].execution_time == NOW + timedelta(minutes=15 * start + 90)
    # a start beyond the dispatch sends nothing yet
    plan.profile_start[profile.id] = 5
    assert instructions_for_plan(plan, problem, mapping, NOW, until_ptu=4) == {}


def test_a_running_wash_is_followed_by_the_sequence_scheduled_after_it() -> None:
    from s2python.ppbc import PPBCPowerProfileStatus, PPBCPowerSequenceContainerStatus

    long_spin = sequence(30, 600)
    spinning = PPBCPowerSequenceContainer(id=uid(), power_sequences=[SPIN, long_spin])
    profile = PPBCPowerProfileDefinition(
        message_id=uid(), id=uid(), start_time=NOW, end_time=NOW + timedelta(hours=4),
        power_sequences_containers=[WASH, spinning])
    status = PPBCPowerProfileStatus(message_id=uid(), sequence_container_status=[
        PPBCPowerSequenceContainerStatus(power_profile_id=str(profile.id),
                                         sequence_container_id=str(WASH.id),
                                         selected_sequence_id=str(QUICK.id), progress=None,
                                         status="EXECUTING"),
        PPBCPowerSequenceContainerStatus(power_profile_id=str(profile.id),
                                         sequence_container_id=str(spinning.id),
                                         selected_sequence_id=str(long_spin.id), progress=None,
                                         status="SCHEDULED")])
    asset, _binding = ppbc_assets("washer", profile, PtuGrid(NOW, 15, N), NOW, status=status)
    # quick wash from now, then the 30 min spin that was scheduled (not the preferred 15 min)
    assert asset is not None and asset.power_w[:5].tolist() == [2000, 2000, 600, 600, 0]
