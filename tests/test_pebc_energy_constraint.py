"""PEBC energy constraints are planned: S2 session -> build_problem -> plan -> PEBC.Instruction.

A consumer with a PEBC.EnergyConstraint must get, over the constraint's window, an average
power between its lower and upper average power; the envelopes sent back pin the planned power,
so the RM can (and need only) consume that energy.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from s2_feed import feeder, uid
from s2python.common import (
    CommodityQuantity,
    ControlType,
    EnergyManagementRole,
    Handshake,
    NumberRange,
    PowerMeasurement,
    PowerValue,
    ResourceManagerDetails,
    Role,
    RoleType,
)
from s2python.generated.gen_s2 import Commodity
from s2python.pebc import (
    PEBCAllowedLimitRange,
    PEBCEnergyConstraint,
    PEBCInstruction,
    PEBCPowerConstraints,
    PEBCPowerEnvelopeConsequenceType,
    PEBCPowerEnvelopeLimitType,
)
from s2python.s2_parser import S2Parser

from cem.flex.site_problem import build_problem, instructions_for_plan
from cem.planner.assets import Prices
from cem.planner.check import check_plan
from cem.planner.solve import plan_site
from cem.s2.session import S2Session
from cem.site.config import SiteConfig

NOW = datetime(2026, 11, 23, 17, 7, tzinfo=UTC)  # PTU 0 starts at 17:00
START = datetime(2026, 11, 23, 17, 0, tzinfo=UTC)
WINDOW = (datetime(2026, 11, 23, 18, 0, tzinfo=UTC), datetime(2026, 11, 23, 20, 0, tzinfo=UTC))
SYM = CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC
N = 16
CONFIG = SiteConfig.model_validate({"planner": {"horizon_ptus": N}})


feed = feeder(NOW)


def boiler_session(lower_w: float, upper_w: float, *, max_w: float = 4000,
                   raise_lower: bool = True) -> S2Session:
    """A PEBC consumer (an electric boiler) with an energy constraint for 18:00-20:00."""
    session = S2Session()
    session.start(NOW)
    feed(session, Handshake(message_id=uid(), role=EnergyManagementRole.RM,
                            supported_protocol_versions=["0.0.2-beta"]))
    feed(session, ResourceManagerDetails(
        message_id=uid(), resource_id=uid(), name="boiler",
        roles=[Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY)],
        instruction_processing_delay=100,
        available_control_types=[ControlType.POWER_ENVELOPE_BASED_CONTROL],
        provides_forecast=False, provides_power_measurement_types=[SYM]))
    feed(session, PEBCPowerConstraints(
        message_id=uid(), id=uid(), valid_from=NOW - timedelta(minutes=1), valid_until=None,
        consequence_type=PEBCPowerEnvelopeConsequenceType.DEFER,
        allowed_limit_ranges=[
            PEBCAllowedLimitRange(commodity_quantity=SYM,
                                  limit_type=PEBCPowerEnvelopeLimitType.UPPER_LIMIT,
                                  range_boundary=NumberRange(start_of_range=0, end_of_range=max_w),
                                  abnormal_condition_only=False),
            PEBCAllowedLimitRange(commodity_quantity=SYM,
                                  limit_type=PEBCPowerEnvelopeLimitType.LOWER_LIMIT,
                                  range_boundary=NumberRange(
                                      start_of_range=0, end_of_range=max_w if raise_lower else 0),
                                  abnormal_condition_only=False)]))
    feed(session, PEBCEnergyConstraint(
        message_id=uid(), id=uid(), valid_from=WINDOW[0], valid_until=WINDOW[1],
        lower_average_power=lower_w, upper_average_power=upper_w, commodity_quantity=SYM))
    feed(session, PowerMeasurement(message_id=uid(), measurement_timestamp=NOW, values=[
        PowerValue(commodity_quantity=SYM, value=0.0)]))
    return session


def prices(import_eur: list[float]) -> Prices:
    return Prices(np.array(import_eur), np.zeros(N))


DEAR_CHEAP_DEAR = prices([0.40] * 8 + [0.10] * 4 + [0.40] * 4)  # 19:00-20:00 is cheap


def plan_for(session: S2Session, site_prices: Prices):  # type: ignore[no-untyped-def]
    problem, mapping = build_problem({"boiler": session.state}, CONFIG, site_prices, [], NOW)
    plan = plan_site(problem, time_limit_s=1.0)
    assert check_plan(problem, plan) == []
    return problem, mapping, plan


def window_power(plan, problem) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The planned power of the boiler's energy window, W per PTU."""
    (window,) = [a for a in problem.storage if a.id.startswith("boiler/")]
    return np.asarray(plan.power_w[window.id], dtype=float)


def envelope_energy_wh(instruction: PEBCInstruction, start: datetime, end: datetime
                       ) -> tuple[float, float]:
    """Energy (Wh) between start and end if the RM runs at the envelope's lower / upper limit."""
    (envelope,) = instruction.power_envelopes
    at = instruction.execution_time
    low = high = 0.0
    for element in envelope.power_envelope_elements:
        until = at + timedelta(milliseconds=element.duration.root)
        overlap = (min(until, end) - max(at, start)).total_seconds() / 3600
        if overlap > 0:
            low += element.lower_limit * overlap
            high += element.upper_limit * overlap
        at = until
    return low, high


def sent_instruction(session: S2Session, plan, problem, mapping) -> PEBCInstruction:  # type: ignore[no-untyped-def]
    (message,) = instructions_for_plan(plan, problem, mapping, NOW)["boiler"]
    out = session.send(message, NOW)  # the session accepts it as a valid PEBC.Instruction
    assert out.message_type == "PEBC.Instruction"
    parsed = S2Parser.parse_as_any_message(message.to_json())
    assert isinstance(parsed, PEBCInstruction)
    return parsed


def test_window_energy_goes_to_the_cheap_hour_within_the_bounds() -> None:
    session = boiler_session(lower_w=1500, upper_w=2500)
    problem, mapping, plan = plan_for(session, DEAR_CHEAP_DEAR)
    power = window_power(plan, problem)
    assert "boiler/energy-0" not in plan.shortfall
    average = power[4:12].mean()  # PTUs 4..11 are 18:00-20:00
    assert 1500 <= average <= 2500
    assert power[:4].sum() == 0 and power[12:].sum() == 0  # nothing outside the window
    assert power[4:8].sum() == 0  # the dear hour is left out: 3 kWh fit in the cheap hour
    assert (power <= 4000).all()

    instruction = sent_instruction(session, plan, problem, mapping)
    low_wh, high_wh = envelope_energy_wh(instruction, *WINDOW)
    # pinned to the plan: the RM may consume the planned energy and no other
    assert low_wh == high_wh == power[4:12].sum() * 0.25
    assert 1500 * 2 <= low_wh <= 2500 * 2
    (envelope,) = instruction.power_envelopes
    assert str(envelope.commodity_quantity.value) == SYM.value
    assert all(0 <= e.lower_limit <= e.upper_limit <= 4000
               for e in envelope.power_envelope_elements)


def test_negative_prices_fill_the_window_only_up_to_its_upper_average() -> None:
    session = boiler_session(lower_w=1000, upper_w=2000)
    cheap = prices([0.30] * 4 + [-0.20] * 8 + [0.30] * 4)  # paid to consume in the window
    problem, mapping, plan = plan_for(session, cheap)
    power = window_power(plan, problem)
    assert 1990 <= power[4:12].mean() <= 2000  # as much as allowed, not more
    low_wh, high_wh = envelope_energy_wh(sent_instruction(session, plan, problem, mapping),
                                         *WINDOW)
    assert 1990 * 2 <= low_wh <= high_wh <= 2000 * 2


def test_an_upper_limit_only_envelope_still_lets_the_rm_take_the_energy() -> None:
    # the CEM may only cap this boiler (LOWER_LIMIT fixed at 0): the envelope caps it at the
    # plan, which leaves room for at least the lower energy
    session = boiler_session(lower_w=1500, upper_w=2500, raise_lower=False)
    problem, mapping, plan = plan_for(session, DEAR_CHEAP_DEAR)
    low_wh, high_wh = envelope_energy_wh(sent_instruction(session, plan, problem, mapping),
                                         *WINDOW)
    assert low_wh == 0
    assert 1500 * 2 <= high_wh <= 2500 * 2


def test_a_window_it_cannot_fill_is_a_reported_shortfall_and_the_checker_wants_one() -> None:
    session = boiler_session(lower_w=3000, upper_w=3500, max_w=2000)  # 2 kW cannot average 3
    problem, _mapping, plan = plan_for(session, DEAR_CHEAP_DEAR)
    power = window_power(plan, problem)
    assert (power[4:12] == 2000).all()  # all it can
    short = plan.shortfall["boiler/energy-0"]
    assert 1990 <= short.energy_wh <= 2010  # 6 kWh wanted, 4 kWh possible
    del plan.shortfall["boiler/energy-0"]
    assert any("below its target" in v for v in check_plan(problem, plan))


def test_the_checker_refuses_more_than_the_upper_average() -> None:
    session = boiler_session(lower_w=1500, upper_w=2500)
    problem, _mapping, plan = plan_for(session, DEAR_CHEAP_DEAR)
    window = "boiler/energy-0"
    plan.power_w[window] = plan.power_w[window].copy()
    plan.power_w[window][4:12] = 3000  # 6 kWh > 2.5 kW x 2 h
    plan.grid_import_w = plan.grid_import_w.copy()
    plan.grid_import_w[4:12] = 3000
    assert any(v.startswith(f"{window}: level") and "above level_max" in v
               for v in check_plan(problem, plan))


def test_constraints_on_production_are_noted_and_not_planned() -> None:
    session = boiler_session(lower_w=-2000, upper_w=0)
    problem, mapping = build_problem({"boiler": session.state}, CONFIG, DEAR_CHEAP_DEAR, [], NOW)
    assert problem.storage == []
    assert any("not planned" in note for note in mapping.notes)


def test_a_window_without_a_lower_bound_asks_for_nothing() -> None:
    session = boiler_session(lower_w=0, upper_w=2000)
    problem, _mapping, plan = plan_for(session, DEAR_CHEAP_DEAR)
    assert (window_power(plan, problem) == 0).all()  # positive prices: nothing to consume
    assert plan.shortfall == {}
