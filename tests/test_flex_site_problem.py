"""Real S2 sessions (sans-I/O) -> build_problem -> plan -> instructions the session can send."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
from s2python.common import (
    CommodityQuantity,
    ControlType,
    EnergyManagementRole,
    Handshake,
    NumberRange,
    PowerMeasurement,
    PowerRange,
    PowerValue,
    ResourceManagerDetails,
    Role,
    RoleType,
)
from s2python.frbc import (
    FRBCActuatorDescription,
    FRBCOperationMode,
    FRBCOperationModeElement,
    FRBCStorageDescription,
    FRBCStorageStatus,
    FRBCSystemDescription,
)
from s2python.generated.gen_s2 import Commodity

from cem.flex.site_problem import build_problem, instructions_for_plan
from cem.planner.assets import Plan
from cem.s2.session import S2Session
from cem.site.config import CongestionWindow, SiteConfig

NOW = datetime(2026, 11, 23, 17, 7, tzinfo=UTC)
L = CommodityQuantity


def uid() -> str:
    return str(uuid.uuid4())


def connect(name: str, control_types: list[ControlType],
            measures: list[CommodityQuantity],
            roles: tuple[RoleType, ...] = (RoleType.ENERGY_CONSUMER,)) -> S2Session:
    session = S2Session()
    session.start(NOW)
    feed(session, Handshake(message_id=uid(), role=EnergyManagementRole.RM,
                            supported_protocol_versions=["0.0.2-beta"]))
    feed(session, ResourceManagerDetails(
        message_id=uid(), resource_id=uid(), name=name,
        roles=[Role(role=role, commodity=Commodity.ELECTRICITY) for role in roles],
        instruction_processing_delay=100, available_control_types=control_types,
        provides_forecast=False, provides_power_measurement_types=measures))
    return session


def feed(session: S2Session, message) -> None:  # type: ignore[no-untyped-def]
    outs = session.receive(message.to_json(), NOW)
    statuses = [json.loads(o.text) for o in outs if o.message_type == "ReceptionStatus"]
    assert all(s["status"] == "OK" for s in statuses), statuses


def ev_session() -> tuple[S2Session, FRBCSystemDescription]:
    session = connect("EV charger 3", [ControlType.FILL_RATE_BASED_CONTROL],
                      [L.ELECTRIC_POWER_3_PHASE_SYMMETRIC])
    rate = 22080 / 60000 * 100 / 3600

    def frbc_mode(power: tuple[float, float], fill_rate: tuple[float, float]) -> FRBCOperationMode:
        return FRBCOperationMode(id=uid(), abnormal_condition_only=False, elements=[
            FRBCOperationModeElement(
                fill_level_range=NumberRange(start_of_range=0, end_of_range=100),
                fill_rate=NumberRange(start_of_range=fill_rate[0], end_of_range=fill_rate[1]),
                power_ranges=[PowerRange(start_of_range=power[0], end_of_range=power[1],
                                         commodity_quantity=L.ELECTRIC_POWER_3_PHASE_SYMMETRIC)])])

    sd = FRBCSystemDescription(
        message_id=uid(), valid_from=NOW - timedelta(seconds=5),
        actuators=[FRBCActuatorDescription(
            id=uid(), supported_commodities=[Commodity.ELECTRICITY], transitions=[], timers=[],
            operation_modes=[frbc_mode((0, 0), (0, 0)),
                             frbc_mode((4140, 22080), (4140 / 22080 * rate, rate))])],
        storage=FRBCStorageDescription(
            diagnostic_label="EV", fill_level_label="SoC %", provides_leakage_behaviour=False,
            provides_fill_level_target_profile=True, provides_usage_forecast=False,
            fill_level_range=NumberRange(start_of_range=0, end_of_range=100)))
    feed(session, sd)
    feed(session, FRBCStorageStatus(message_id=uid(), present_fill_level=20))
    feed(session, PowerMeasurement(message_id=uid(), measurement_timestamp=NOW, values=[
        PowerValue(commodity_quantity=L.ELECTRIC_POWER_3_PHASE_SYMMETRIC, value=4140)]))
    return session, sd


BOTH_WAYS = (RoleType.ENERGY_CONSUMER, RoleType.ENERGY_PRODUCER)


def meter_session(grid_w: float, name: str = "connection point",
                  roles: tuple[RoleType, ...] = BOTH_WAYS,
                  control_types: tuple[ControlType, ...] = (ControlType.NOT_CONTROLABLE,)
                  ) -> S2Session:
    """A grid meter as S2 describes one: NOT_CONTROLABLE only, importing and exporting."""
    session = connect(name, list(control_types),
                      [L.ELECTRIC_POWER_L1, L.ELECTRIC_POWER_L2, L.ELECTRIC_POWER_L3], roles)
    feed(session, PowerMeasurement(message_id=uid(), measurement_timestamp=NOW, values=[
        PowerValue(commodity_quantity=q, value=grid_w / 3)
        for q in (L.ELECTRIC_POWER_L1, L.ELECTRIC_POWER_L2, L.ELECTRIC_POWER_L3)]))
    return session


def test_site_problem_from_real_sessions_and_back_to_sendable_instructions() -> None:
    config = SiteConfig.model_validate({"planner": {"horizon_ptus": 16}})
    ev, sd = ev_session()
    meter = meter_session(5640)  # 4140 W EV + 1500 W the meter sees and nobody explains
    window = CongestionWindow(start=datetime(2026, 11, 23, 18, 0, tzinfo=UTC),
                              end=datetime(2026, 11, 23, 19, 0, tzinfo=UTC), import_limit_kw=8)
    problem, mapping = build_problem({"ev-3": ev.state, "meter": meter.state}, config, None,
                                     [window], NOW)
    assert problem.start == datetime(2026, 11, 23, 17, 0, tzinfo=UTC) and problem.n_ptus == 16
    # live plans keep planner.limit_share (98 %) of the GTV and the congestion limit
    limits = problem.limits
    assert limits.planned_import_limit_w[3] == 16660 and limits.planned_import_limit_w[4] == 7840
    assert abs(limits.planned_fuse_a - 25 * 0.98) < 1e-9
    # and the limits themselves stay what the guard protects
    assert limits.import_limit_w[3] == 17000 and limits.import_limit_w[4] == 8000
    assert limits.fuse_a == 25
    (ev_asset,) = problem.storage
    assert ev_asset.charge_min_w == 4140 and ev_asset.level_wh == 12000
    assert mapping.meter_rm == "meter"
    assert [f.id for f in problem.fixed] == ["base-load"] and problem.fixed[0].power_w[0] == 1500
    assert mapping.summary() == "1 EV"

    power = np.full(16, 11000)
    plan = Plan(status="FEASIBLE", power_w={"ev-3": power}, grid_import_w=power + 1500)
    instructions = instructions_for_plan(plan, problem, mapping, NOW, until_ptu=4)
    (message,) = instructions["ev-3"]
    assert str(message.actuator_id) == str(sd.actuators[0].id)
    out = ev.send(message, NOW)  # the session accepts it as a valid FRBC.Instruction
    assert out.message_type == "FRBC.Instruction" and out.awaits_status


def test_the_grid_meter_is_known_from_what_it_says_in_s2() -> None:
    config = SiteConfig.model_validate({"planner": {"horizon_ptus": 4}})
    ev, _ = ev_session()

    def meter_of(**rms: S2Session) -> str | None:
        _problem, mapping = build_problem({k: s.state for k, s in rms.items()}, config, None,
                                          [], NOW)
        return mapping.meter_rm

    # NOT_CONTROLABLE only, consumer and producer of electricity, measures it: the meter,
    # whatever it is called
    assert meter_of(ev=ev, m=meter_session(5640, name="Modbus 10.0.0.7/1")) == "m"
    # a consumer only, a producer only (PV), or one that also offers a control type: not
    assert meter_of(ev=ev, m=meter_session(5640, roles=(RoleType.ENERGY_CONSUMER,))) is None
    assert meter_of(ev=ev, m=meter_session(-3000, roles=(RoleType.ENERGY_PRODUCER,))) is None
    assert meter_of(ev=ev, m=meter_session(5640, control_types=(
        ControlType.NOT_CONTROLABLE, ControlType.POWER_ENVELOPE_BASED_CONTROL))) is None
    assert meter_of(ev=ev, m=meter_session(5640, roles=(*BOTH_WAYS, RoleType.ENERGY_STORAGE))) \
        is None
    # an RM that calls itself a meter but does not say so in S2 is not taken for one: its
    # name is not read (it is planned as a load)
    named = meter_session(5640, name="grid meter", roles=(RoleType.ENERGY_CONSUMER,))
    assert meter_of(ev=ev, named=named) is None


def test_real_planner_plans_the_ev_within_the_congestion_window() -> None:
    from cem.planner.check import check_plan
    from cem.planner.solve import plan_site

    config = SiteConfig.model_validate({"planner": {"horizon_ptus": 16}})
    ev, sd = ev_session()
    target = {"message_type": "FRBC.FillLevelTargetProfile", "message_id": uid(),
              "start_time": NOW.isoformat(), "elements": [
                  {"duration": 3 * 3600 * 1000,
                   "fill_level_range": {"start_of_range": 60, "end_of_range": 100}}]}
    outs = ev.receive(json.dumps(target), NOW)
    assert json.loads(outs[0].text)["status"] == "OK"
    window = CongestionWindow(start=datetime(2026, 11, 23, 18, 0, tzinfo=UTC),
                              end=datetime(2026, 11, 23, 19, 0, tzinfo=UTC), import_limit_kw=5)
    problem, mapping = build_problem({"ev-3": ev.state}, config, None, [window], NOW)
    plan = plan_site(problem, time_limit_s=1.0)
    assert check_plan(problem, plan) == []
    power = plan.power_w["ev-3"]
    assert (power[4:8] <= 5000).all()  # the window holds
    assert ((power == 0) | (power >= 4140)).all()  # the 6 A minimum holds
    # 40 % of 60 kWh by 20:07 (the target lands on the 20:15 boundary)
    assert plan.level_wh["ev-3"][12] >= 36000 - 1
    messages = instructions_for_plan(plan, problem, mapping, NOW)["ev-3"]
    modes = {str(m.id) for m in sd.actuators[0].operation_modes}
    assert all(str(m.operation_mode) in modes for m in messages)
    assert len(messages) < 16  # one per change, not one per PTU


def _planned_levels(stay_minutes: int, target_soc: float, ptus: int) -> dict[int, np.ndarray]:
    """Planned EV levels (Wh) per finish margin (0 and 30 min) at prices falling towards the
    departure: an EV at 20 % of 60 kWh that wants `target_soc` % after `stay_minutes`."""
    from cem.planner.assets import Prices
    from cem.planner.solve import plan_site

    ev, _ = ev_session()
    target = {"message_type": "FRBC.FillLevelTargetProfile", "message_id": uid(),
              "start_time": NOW.isoformat(), "elements": [
                  {"duration": stay_minutes * 60 * 1000,
                   "fill_level_range": {"start_of_range": target_soc, "end_of_range": 100}}]}
    assert json.loads(ev.receive(json.dumps(target), NOW)[0].text)["status"] == "OK"
    falling = np.linspace(0.40, 0.10, ptus)
    levels = {}
    for margin in (0, 30):
        config = SiteConfig.model_validate(
            {"planner": {"horizon_ptus": ptus, "ev_finish_margin_minutes": margin}})
        problem, _ = build_problem({"ev-3": ev.state}, config, Prices(falling, falling * 0),
                                   [], NOW)
        levels[margin] = plan_site(problem, time_limit_s=1.0).level_wh["ev-3"]
    return levels


def test_live_plans_finish_ev_targets_before_the_departure() -> None:
    """Prices fall towards the departure: without a margin the EV finishes on the last PTU."""
    levels = _planned_levels(3 * 60, 60, 16)
    ends = {m: int(np.argmax(lv >= 36000 - 1)) for m, lv in levels.items()}  # first PTU on target
    assert all(lv[12] >= 36000 - 1 for lv in levels.values())  # the departure target is met
    assert ends[30] <= 10 < ends[0]  # 30 minutes early: done by the end of PTU 10 (19:45)


def test_the_finish_margin_shrinks_but_stays_when_the_departure_is_near() -> None:
    """30 minutes before a departure a 30-minute margin no longer fits: the EV still finishes a
    PTU early (the last plans before a departure are the ones reality upsets most)."""
    levels = _planned_levels(30, 23, 8)  # leaves at 17:37: PTUs 17:00, 17:15, 17:30
    ends = {m: int(np.argmax(lv >= 13800 - 1)) for m, lv in levels.items()}
    # cheapest last PTU without a margin; with one, the first PTU (1.8 kWh fit in its 8
    # minutes left at the 16.7 kW import limit)
    assert ends == {0: 2, 30: 0}
