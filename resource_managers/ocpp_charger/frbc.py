"""S2 FRBC view of one EVSE (pure: state in, s2-python messages out; instruction in, amps out).

The EV is a storage: its fill level is the energy charged this session in kWh, or its state of
charge in % once the EV reports SoC *and* the battery size is known (estimated from energy per
SoC point), since a SoC target without a battery size cannot be turned into energy. The fill
rate is in fill-level units per second (kWh/s or %/s), as S2 defines it.

One actuator with two operation modes:

- "charging": power from the 6 A minimum to the EVSE / EV / cable / card maximum on the phases
  the EVSE charges on: `ELECTRIC.POWER.L1` (or L2, L3) for a 1-phase EVSE,
  `ELECTRIC.POWER.3_PHASE_SYMMETRIC` (the total of the three phases) for a 3-phase one. The
  operation mode factor 0..1 picks a power linearly in that range.
- "idle": 0 W (the charger pauses at 0 A).

With no EV, an EV that stopped drawing while offered current (full), or the charger offline,
only "idle" is offered and the storage range is the level itself: no flexibility. The departure target is an FRBC.FillLevelTargetProfile of two elements: from now to
one minute before the departure any level, in the last minute at least the needed level. It
reads the same whether a CEM takes an element's range as holding over the element (S2) or at
its end (this project's CEM, which also takes the end of the last element as the departure).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from s2python.common import (
    Commodity,
    CommodityQuantity,
    Duration,
    NumberRange,
    PowerMeasurement,
    PowerRange,
    PowerValue,
)
from s2python.frbc import (
    FRBCActuatorDescription,
    FRBCActuatorStatus,
    FRBCFillLevelTargetProfile,
    FRBCFillLevelTargetProfileElement,
    FRBCInstruction,
    FRBCOperationMode,
    FRBCOperationModeElement,
    FRBCStorageDescription,
    FRBCStorageStatus,
    FRBCSystemDescription,
)

from resource_managers.ocpp_charger import limits

CHARGING = "charging"
IDLE = "idle"
KWH_RANGE_MAX = 150.0  # fill level range when the battery size is unknown (kWh charged)
TARGET_HOLD = timedelta(minutes=1)  # length of the "at departure" target element
OVERSTAY = timedelta(hours=1)  # an EV still plugged in after its departure: assume this more


@dataclass(frozen=True)
class EvseFlex:
    """What the S2 side needs to know about an EVSE at one moment."""

    name: str
    online: bool
    has_session: bool
    phases: int
    phase: str  # for 1-phase EVSEs: L1, L2 or L3
    min_current_a: float
    max_current_a: float
    energy_kwh: float = 0.0  # charged this session
    need_kwh: float | None = None  # total wanted this session
    departure: datetime | None = None
    soc: float | None = None
    capacity_kwh: float | None = None
    power_w: tuple[float, float, float] = (0.0, 0.0, 0.0)
    limit_a: float | None = None
    voltage_v: float = limits.VOLTAGE_V
    priority: int = 1  # from the charge card; S2 has no field for it, see system_description
    # the EV stopped drawing while the charger offered current (OCPP SuspendedEV): it is full,
    # or takes no more for its own reasons, so the CEM must not hold power back for it
    ev_full: bool = False
    driver: str | None = None  # the charge card's name (or id tag), for the CEM's page
    needs_source: str = ""  # where the departure and need came from: EV, card, site defaults

    @property
    def flexible(self) -> bool:
        return (self.online and self.has_session and not self.ev_full
                and self.max_current_a >= self.min_current_a)

    @property
    def uses_soc(self) -> bool:
        return self.soc is not None and bool(self.capacity_kwh)

    @property
    def min_power_w(self) -> float:
        return limits.amps_to_watts(self.min_current_a, self.phases, self.voltage_v)

    @property
    def max_power_w(self) -> float:
        return limits.amps_to_watts(limits.round_down_tenth(self.max_current_a), self.phases,
                                    self.voltage_v)

    def fill_level(self) -> float:
        if self.uses_soc:
            return float(self.soc)  # type: ignore[arg-type]
        return self.energy_kwh

    def rate_per_w(self) -> float:
        """Fill level per second per watt of charging."""
        if self.uses_soc:
            return 100.0 / (self.capacity_kwh * 3_600_000)  # type: ignore[operator]
        return 1.0 / 3_600_000

    def target_level(self) -> float | None:
        if self.need_kwh is None:
            return None
        if self.uses_soc:
            missing_kwh = max(0.0, self.need_kwh - self.energy_kwh)
            return min(100.0, float(self.soc) + missing_kwh / self.capacity_kwh * 100)  # type: ignore[arg-type,operator]
        return self.need_kwh

    def level_range(self) -> tuple[float, float]:
        if not self.flexible:  # the level stays where it is (0 without an EV)
            level = self.fill_level()
            return (level, level)
        if self.uses_soc:
            return (0.0, 100.0)
        top = max(KWH_RANGE_MAX, self.energy_kwh, self.need_kwh or 0.0)
        return (0.0, top)


@dataclass(frozen=True)
class FrbcIds:
    """Stable S2 ids of one EVSE's actuator and operation modes (same after every restart)."""

    actuator: str
    charging: str
    idle: str

    @classmethod
    def for_resource(cls, resource_id: uuid.UUID) -> FrbcIds:
        def make(what: str) -> str:
            return str(uuid.uuid5(resource_id, what))

        return cls(actuator=make("actuator"), charging=make(CHARGING), idle=make(IDLE))


def power_quantities(flex: EvseFlex) -> list[CommodityQuantity]:
    """The commodity quantities of the power ranges: one phase, or 3-phase symmetric."""
    if flex.phases == 3:
        return [CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC]
    return [CommodityQuantity(f"ELECTRIC.POWER.{flex.phase}")]


def measured_quantities(phases: int, phase: str) -> list[CommodityQuantity]:
    if phases == 3:
        return [CommodityQuantity.ELECTRIC_POWER_L1, CommodityQuantity.ELECTRIC_POWER_L2,
                CommodityQuantity.ELECTRIC_POWER_L3]
    return [CommodityQuantity(f"ELECTRIC.POWER.{phase}")]


def _mode(mode_id: str, label: str, flex: EvseFlex, lo_w: float, hi_w: float) -> FRBCOperationMode:
    level_lo, level_hi = flex.level_range()
    return FRBCOperationMode(
        id=mode_id, diagnostic_label=label, abnormal_condition_only=False,
        elements=[FRBCOperationModeElement(
            fill_level_range=NumberRange(start_of_range=level_lo, end_of_range=level_hi),
            fill_rate=NumberRange(start_of_range=lo_w * flex.rate_per_w(),
                                  end_of_range=hi_w * flex.rate_per_w()),
            power_ranges=[PowerRange(start_of_range=lo_w, end_of_range=hi_w, commodity_quantity=q)
                          for q in power_quantities(flex)],
        )],
    )


def system_description(flex: EvseFlex, ids: FrbcIds, now: datetime) -> FRBCSystemDescription:
    """The EVSE as an FRBC storage: charging range while an EV is there, else idle only."""
    modes = [_mode(ids.idle, "idle (paused, 0 A)", flex, 0.0, 0.0)]
    if flex.flexible:
        modes.insert(0, _mode(
            ids.charging, f"charging {flex.min_current_a:g}-{limits.round_down_tenth(flex.max_current_a):g} A "
            f"on {flex.phases} phase(s)", flex, round(flex.min_power_w), round(flex.max_power_w)))
        # S2 has no priority field: the label carries it as "priority N" for the CEM to read
        label = f"EV charging, priority {flex.priority}" + (", SoC known" if flex.uses_soc else "")
        # free text too: who charges and where the departure came from, for the CEM's page
        label += (f", driver {flex.driver.replace(',', ' ')}" if flex.driver else "") + (
            f", needs from {flex.needs_source.replace(',', ' ')}" if flex.needs_source else "")
    elif not flex.online:
        label = "charger offline: no flexibility"
    elif not flex.has_session:
        label = "no EV plugged in: no flexibility"
    else:
        label = "EV cannot take the minimum current: no flexibility"
    level_lo, level_hi = flex.level_range()
    return FRBCSystemDescription(
        message_id=uuid.uuid4(), valid_from=now,
        actuators=[FRBCActuatorDescription(
            id=ids.actuator, diagnostic_label=f"EVSE {flex.name}",
            supported_commodities=[Commodity.ELECTRICITY], operation_modes=modes,
            transitions=[], timers=[])],
        storage=FRBCStorageDescription(
            diagnostic_label=label,
            fill_level_label="SoC %" if flex.uses_soc else "kWh charged this session",
            provides_leakage_behaviour=False,
            provides_fill_level_target_profile=flex.flexible and flex.departure is not None,
            provides_usage_forecast=False,
            fill_level_range=NumberRange(start_of_range=level_lo, end_of_range=level_hi)),
    )


def fill_level_target(flex: EvseFlex, now: datetime) -> FRBCFillLevelTargetProfile | None:
    """Departure target: anything until the EV leaves, at least the need from then on."""
    target = flex.target_level()
    if not flex.flexible or flex.departure is None or target is None:
        return None
    level_lo, level_hi = flex.level_range()
    # past the departure and still plugged in: the driver is late, not gone; keep charging
    # towards the need over the next hour rather than squeezing it into one minute
    departure = flex.departure if flex.departure > now + TARGET_HOLD else now + OVERSTAY
    until = max(departure - now - TARGET_HOLD, timedelta(seconds=1))
    target = min(max(target, flex.fill_level()), level_hi)
    return FRBCFillLevelTargetProfile(
        message_id=uuid.uuid4(), start_time=now,
        elements=[
            FRBCFillLevelTargetProfileElement(
                duration=Duration.from_timedelta(until),
                fill_level_range=NumberRange(start_of_range=level_lo, end_of_range=level_hi)),
            FRBCFillLevelTargetProfileElement(
                duration=Duration.from_timedelta(TARGET_HOLD),
                fill_level_range=NumberRange(start_of_range=target, end_of_range=level_hi)),
        ])


def target_runs_out(target: FRBCFillLevelTargetProfile) -> datetime:
    """When the target's "at departure" element starts: an EV still plugged in then is
    overstaying, and the RM tells the CEM its need again (for the next hour)."""
    span = sum((e.duration.to_timedelta() for e in target.elements), timedelta())
    return target.start_time + span - TARGET_HOLD


def storage_status(flex: EvseFlex) -> FRBCStorageStatus:
    return FRBCStorageStatus(message_id=uuid.uuid4(), present_fill_level=flex.fill_level())


def actuator_status(flex: EvseFlex, ids: FrbcIds) -> FRBCActuatorStatus:
    charging = flex.flexible and (flex.limit_a is None or flex.limit_a > 0)
    factor = 0.0
    if charging and flex.max_power_w > flex.min_power_w:
        amps = flex.limit_a if flex.limit_a is not None else flex.max_current_a
        watts = limits.amps_to_watts(amps, flex.phases, flex.voltage_v)
        factor = min(1.0, max(0.0, (watts - flex.min_power_w) / (flex.max_power_w - flex.min_power_w)))
    return FRBCActuatorStatus(message_id=uuid.uuid4(), actuator_id=ids.actuator,
                              active_operation_mode_id=ids.charging if charging else ids.idle,
                              operation_mode_factor=factor)


def power_measurement(flex: EvseFlex, now: datetime) -> PowerMeasurement:
    """Measured power per phase (all zero without a session or when offline)."""
    live = flex.online
    values = []
    for quantity in measured_quantities(flex.phases, flex.phase):
        index = int(quantity.value[-1]) - 1
        values.append(PowerValue(commodity_quantity=quantity,
                                 value=round(flex.power_w[index], 1) if live else 0.0))
    return PowerMeasurement(message_id=uuid.uuid4(), measurement_timestamp=now, values=values)


class InstructionProblem(ValueError):
    """An FRBC.Instruction this EVSE cannot carry out; the message says why."""


def instruction_current(flex: EvseFlex, ids: FrbcIds, instruction: FRBCInstruction) -> float:
    """The current (A) an instruction asks for: 0 for idle, else the factor's power / phases."""
    mode = str(instruction.operation_mode)
    if str(instruction.actuator_id) != ids.actuator:
        raise InstructionProblem(f"unknown actuator {instruction.actuator_id}")
    if mode == ids.idle:
        return 0.0
    if mode != ids.charging:
        raise InstructionProblem(f"unknown operation mode {mode}")
    if not flex.flexible:
        raise InstructionProblem("no EV to charge" if flex.online else "charger offline")
    factor = min(1.0, max(0.0, float(instruction.operation_mode_factor)))
    watts = flex.min_power_w + factor * (flex.max_power_w - flex.min_power_w)
    return limits.charging_current(limits.watts_to_amps(watts, flex.phases, flex.voltage_v),
                                   flex.max_current_a, flex.min_current_a)
