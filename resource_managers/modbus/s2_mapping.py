"""Pure translation between a device's register-map limits and S2 messages (no I/O).

- battery   -> FRBC: fill level = SoC (%), modes charge / idle / discharge, fill rates from
               capacity and efficiency; an instruction becomes a W setpoint (clamped).
- heat pump -> FRBC: fill level = buffer temperature (degC), modes off / normal / boost (the
               SG-Ready states), leakage from the heat loss, usage forecast from the heat
               demand, comfort band as fill-level range, minimum run / off times as timers.
- PV        -> PEBC: the production may be capped (lower power limit, production being
               negative in S2), plus a PowerForecast; an envelope becomes WMaxLimPct.
- meter     -> PowerMeasurement per phase.

Every function takes what it needs and a `now`, so tests can call them directly.

`time_scale` (simulated seconds per wall-clock second, 1 for real devices) lets an RM in front
of an accelerated simulator describe the device in wall-clock time: rates are multiplied by
it, durations (timers, forecast elements) divided by it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

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
from s2python.frbc import (
    FRBCActuatorDescription,
    FRBCInstruction,
    FRBCLeakageBehaviour,
    FRBCLeakageBehaviourElement,
    FRBCOperationMode,
    FRBCOperationModeElement,
    FRBCStorageDescription,
    FRBCSystemDescription,
    FRBCUsageForecast,
    FRBCUsageForecastElement,
)
from s2python.generated.gen_s2 import Commodity
from s2python.pebc import (
    PEBCAllowedLimitRange,
    PEBCInstruction,
    PEBCPowerConstraints,
    PEBCPowerEnvelopeConsequenceType,
    PEBCPowerEnvelopeLimitType,
)

from resource_managers.modbus.register_map import Limits

PHASE_QUANTITY = {
    "L1": CommodityQuantity.ELECTRIC_POWER_L1,
    "L2": CommodityQuantity.ELECTRIC_POWER_L2,
    "L3": CommodityQuantity.ELECTRIC_POWER_L3,
    "3-phase": CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC,
}

# Stable ids: the same device describes itself with the same ids in every session.
BATTERY_ACTUATOR = uuid.UUID("6b1c0e2a-0000-4000-8000-000000000001")
BATTERY_CHARGE = uuid.UUID("6b1c0e2a-0000-4000-8000-000000000011")
BATTERY_IDLE = uuid.UUID("6b1c0e2a-0000-4000-8000-000000000012")
BATTERY_DISCHARGE = uuid.UUID("6b1c0e2a-0000-4000-8000-000000000013")
HEAT_PUMP_ACTUATOR = uuid.UUID("6b1c0e2a-0000-4000-8000-000000000002")
HEAT_PUMP_OFF = uuid.UUID("6b1c0e2a-0000-4000-8000-000000000021")
HEAT_PUMP_NORMAL = uuid.UUID("6b1c0e2a-0000-4000-8000-000000000022")
HEAT_PUMP_BOOST = uuid.UUID("6b1c0e2a-0000-4000-8000-000000000023")
MIN_RUN_TIMER = uuid.UUID("6b1c0e2a-0000-4000-8000-000000000031")
MIN_OFF_TIMER = uuid.UUID("6b1c0e2a-0000-4000-8000-000000000032")

HEAT_PUMP_MODE_NAMES = {HEAT_PUMP_OFF: "off", HEAT_PUMP_NORMAL: "normal",
                        HEAT_PUMP_BOOST: "boost"}
BATTERY_MODE_NAMES = {BATTERY_CHARGE: "charge", BATTERY_IDLE: "idle",
                      BATTERY_DISCHARGE: "discharge"}


def _id() -> uuid.UUID:
    return uuid.uuid4()


def _ms(seconds: float) -> Duration:
    return Duration(root=max(0, round(seconds * 1000)))


def _transitions(modes: Sequence[uuid.UUID],
                 timers: dict[tuple[uuid.UUID, uuid.UUID], tuple[list[uuid.UUID],
                                                                 list[uuid.UUID]]] | None = None
                 ) -> list[Transition]:
    """Every mode may follow every other; timers: (from, to) -> (start, blocking)."""
    out = []
    for a in modes:
        for b in modes:
            if a == b:
                continue
            start, blocking = (timers or {}).get((a, b), ([], []))
            out.append(Transition(id=_id(), from_=a, to=b, start_timers=start,
                                  blocking_timers=blocking, transition_costs=None,
                                  transition_duration=None, abnormal_condition_only=False))
    return out


def _mode(mode_id: uuid.UUID, label: str, fill: tuple[float, float],
          rate: tuple[float, float], power: tuple[float, float],
          quantity: CommodityQuantity) -> FRBCOperationMode:
    return FRBCOperationMode(
        id=mode_id, diagnostic_label=label, abnormal_condition_only=False,
        elements=[FRBCOperationModeElement(
            fill_level_range=NumberRange(start_of_range=fill[0], end_of_range=fill[1]),
            fill_rate=NumberRange(start_of_range=rate[0], end_of_range=rate[1]),
            power_ranges=[PowerRange(start_of_range=power[0], end_of_range=power[1],
                                     commodity_quantity=quantity)],
            running_costs=None)])


# --- battery ----------------------------------------------------------------------------------


def battery_system_description(limits: Limits, now: datetime, time_scale: float = 1.0
                               ) -> FRBCSystemDescription:
    """FRBC description of a battery: SoC in %, charge / idle / discharge with power ranges."""
    assert limits.max_charge_w and limits.max_discharge_w and limits.capacity_wh
    quantity = PHASE_QUANTITY[limits.phase]
    soc = (float(limits.soc_min_pct or 0), float(limits.soc_max_pct or 100))
    pct_per_s_per_w = 100 / limits.capacity_wh / 3600 * time_scale
    charge_rate = limits.max_charge_w * limits.charge_efficiency * pct_per_s_per_w
    discharge_rate = limits.max_discharge_w / limits.discharge_efficiency * pct_per_s_per_w
    modes = [
        _mode(BATTERY_CHARGE, "charge", soc, (0.0, charge_rate),
              (0.0, float(limits.max_charge_w)), quantity),
        _mode(BATTERY_IDLE, "idle", soc, (0.0, 0.0), (0.0, 0.0), quantity),
        # s2-python wants start <= end: factor 0 is full discharge, factor 1 is none
        _mode(BATTERY_DISCHARGE, "discharge", soc, (-discharge_rate, 0.0),
              (-float(limits.max_discharge_w), 0.0), quantity),
    ]
    actuator = FRBCActuatorDescription(
        id=BATTERY_ACTUATOR, diagnostic_label="battery inverter",
        supported_commodities=[Commodity.ELECTRICITY], operation_modes=modes,
        transitions=_transitions([m.id for m in modes]), timers=[])
    storage = FRBCStorageDescription(
        diagnostic_label="battery", fill_level_label="SoC %",
        provides_leakage_behaviour=False, provides_fill_level_target_profile=False,
        provides_usage_forecast=False,
        fill_level_range=NumberRange(start_of_range=soc[0], end_of_range=soc[1]))
    return FRBCSystemDescription(message_id=_id(), valid_from=now, actuators=[actuator],
                                 storage=storage)


@dataclass(frozen=True)
class Setpoint:
    """What the RM will write, and why it differs from what was asked (if it does)."""

    power_w: float
    asked_w: float
    note: str = ""


def battery_setpoint(limits: Limits, mode_id: uuid.UUID, factor: float,
                     soc_pct: float | None) -> Setpoint:
    """FRBC mode + factor -> W setpoint (+ charge), clamped to the device's limits and SoC.

    The power is the mode's power range interpolated at the factor (start + f x (end - start)),
    as in the system description: charge 0..max, discharge -max..0.
    """
    factor = min(1.0, max(0.0, factor))
    if mode_id == BATTERY_CHARGE:
        asked = factor * (limits.max_charge_w or 0)
    elif mode_id == BATTERY_DISCHARGE:
        asked = -(1.0 - factor) * (limits.max_discharge_w or 0)
    elif mode_id == BATTERY_IDLE:
        asked = 0.0
    else:
        raise ValueError(f"unknown battery operation mode {mode_id}")
    return clamp_battery_power(limits, asked, soc_pct)


def clamp_battery_power(limits: Limits, asked_w: float, soc_pct: float | None) -> Setpoint:
    """Keep a W setpoint inside max charge/discharge and the SoC band."""
    high = float(limits.max_charge_w or 0)
    low = -float(limits.max_discharge_w or 0)
    power = min(high, max(low, asked_w))
    note = ""
    if power != asked_w:
        note = f"clamped {asked_w:.0f} W to the device's range {low:.0f}..{high:.0f} W"
    if soc_pct is not None:
        if power > 0 and soc_pct >= (limits.soc_max_pct or 100):
            power, note = 0.0, f"SoC {soc_pct:.1f} % is at its maximum: not charging"
        elif power < 0 and soc_pct <= (limits.soc_min_pct or 0):
            power, note = 0.0, f"SoC {soc_pct:.1f} % is at its minimum: not discharging"
    return Setpoint(power_w=round(power), asked_w=asked_w, note=note)


# --- heat pump ---------------------------------------------------------------------------------


def heat_pump_fill_rate(limits: Limits, power_w: float, time_scale: float = 1.0) -> float:
    """Buffer temperature rise in K/s for an electrical power (times the COP)."""
    return power_w * limits.cop / (limits.buffer_heat_capacity_wh_per_k or 1) / 3600 \
        * time_scale


def heat_pump_system_description(limits: Limits, now: datetime, time_scale: float = 1.0
                                 ) -> FRBCSystemDescription:
    """FRBC description of a heat pump on a buffer: off / normal / boost with timers."""
    quantity = PHASE_QUANTITY[limits.phase]
    band = (float(limits.comfort_min_c or 0), float(limits.comfort_max_c or 0))
    normal = float(limits.power_normal_w or 0)
    boost = float(limits.power_boost_w or 0)
    modes = [
        _mode(HEAT_PUMP_OFF, "off (SG-Ready blocked)", band, (0.0, 0.0), (0.0, 0.0), quantity),
        _mode(HEAT_PUMP_NORMAL, "normal (SG-Ready 2)", band,
              (heat_pump_fill_rate(limits, normal, time_scale),) * 2, (normal, normal), quantity),
        _mode(HEAT_PUMP_BOOST, "boost (SG-Ready 3)", band,
              (heat_pump_fill_rate(limits, boost, time_scale),) * 2, (boost, boost), quantity),
    ]
    timers = [Timer(id=MIN_RUN_TIMER, diagnostic_label="minimum run time",
                    duration=_ms(limits.min_run_s / time_scale)),
              Timer(id=MIN_OFF_TIMER, diagnostic_label="minimum off time",
                    duration=_ms(limits.min_off_s / time_scale))]
    on_modes = (HEAT_PUMP_NORMAL, HEAT_PUMP_BOOST)
    rules: dict[tuple[uuid.UUID, uuid.UUID], tuple[list[uuid.UUID], list[uuid.UUID]]] = {}
    for on in on_modes:
        rules[(HEAT_PUMP_OFF, on)] = ([MIN_RUN_TIMER], [MIN_OFF_TIMER])
        rules[(on, HEAT_PUMP_OFF)] = ([MIN_OFF_TIMER], [MIN_RUN_TIMER])
    actuator = FRBCActuatorDescription(
        id=HEAT_PUMP_ACTUATOR, diagnostic_label="heat pump compressor",
        supported_commodities=[Commodity.ELECTRICITY], operation_modes=modes,
        transitions=_transitions([m.id for m in modes], rules), timers=timers)
    storage = FRBCStorageDescription(
        diagnostic_label="buffer tank", fill_level_label="degC",
        provides_leakage_behaviour=True, provides_fill_level_target_profile=False,
        provides_usage_forecast=True,
        fill_level_range=NumberRange(start_of_range=band[0], end_of_range=band[1]))
    return FRBCSystemDescription(message_id=_id(), valid_from=now, actuators=[actuator],
                                 storage=storage)


def heat_pump_leakage(limits: Limits, now: datetime, bins: int = 3, time_scale: float = 1.0
                      ) -> FRBCLeakageBehaviour:
    """Heat lost to the room, in K/s, per slice of the comfort band (warmer loses more)."""
    low, high = float(limits.comfort_min_c or 0), float(limits.comfort_max_c or 0)
    step = (high - low) / bins
    elements = []
    for i in range(bins):
        start, end = low + i * step, low + (i + 1) * step
        middle = (start + end) / 2
        rate = limits.heat_loss_w_per_k * max(0.0, middle - limits.ambient_c) \
            / (limits.buffer_heat_capacity_wh_per_k or 1) / 3600 * time_scale
        elements.append(FRBCLeakageBehaviourElement(
            fill_level_range=NumberRange(start_of_range=start, end_of_range=end),
            leakage_rate=rate))
    return FRBCLeakageBehaviour(message_id=_id(), valid_from=now, elements=elements)


def heat_pump_usage_forecast(limits: Limits, now: datetime, hours: int = 24,
                             outdoor_c: float | None = None, time_scale: float = 1.0
                             ) -> FRBCUsageForecast:
    """The house's heat demand as a buffer temperature drop in K/s, hour by hour."""
    demand = limits.heat_demand_w
    if outdoor_c is not None:  # colder outside: more demand (degree-day scaling around 5 degC)
        demand *= max(0.2, min(2.5, (18.0 - outdoor_c) / 13.0))
    rate = demand / (limits.buffer_heat_capacity_wh_per_k or 1) / 3600 * time_scale
    elements = [FRBCUsageForecastElement(duration=_ms(3600 / time_scale),
                                         usage_rate_expected=rate,
                                         usage_rate_upper_limit=rate * 1.3,
                                         usage_rate_lower_limit=rate * 0.7)
                for _ in range(hours)]
    return FRBCUsageForecast(message_id=_id(), start_time=now, elements=elements)


def heat_pump_sg_state(limits: Limits, mode_id: uuid.UUID) -> int:
    """FRBC operation mode -> SG-Ready state to write."""
    if mode_id == HEAT_PUMP_OFF:
        return limits.sg_ready_off
    if mode_id == HEAT_PUMP_NORMAL:
        return limits.sg_ready_normal
    if mode_id == HEAT_PUMP_BOOST:
        return limits.sg_ready_boost
    raise ValueError(f"unknown heat pump operation mode {mode_id}")


#: SG-Ready's two relay inputs (relay 1, relay 2) per operation mode, as the BWP label defines
#: them: (1, 0) blocked, (0, 0) normal, (0, 1) switch-on recommended; (1, 1) is forced on
SG_READY_RELAYS: dict[uuid.UUID, tuple[bool, bool]] = {
    HEAT_PUMP_OFF: (True, False), HEAT_PUMP_NORMAL: (False, False),
    HEAT_PUMP_BOOST: (False, True)}


def heat_pump_mode_of_relays(relay_1: bool, relay_2: bool) -> uuid.UUID:
    """SG-Ready relays read back -> FRBC operation mode (forced on counts as boost)."""
    if relay_1 and not relay_2:
        return HEAT_PUMP_OFF
    if not relay_1 and not relay_2:
        return HEAT_PUMP_NORMAL
    return HEAT_PUMP_BOOST


def heat_pump_mode_of(limits: Limits, sg_state: int) -> uuid.UUID:
    """SG-Ready state read back -> FRBC operation mode (4 = forced on counts as boost)."""
    if sg_state == limits.sg_ready_off:
        return HEAT_PUMP_OFF
    if sg_state == limits.sg_ready_normal:
        return HEAT_PUMP_NORMAL
    return HEAT_PUMP_BOOST


# --- PV ------------------------------------------------------------------------------------------


def pv_power_constraints(limits: Limits, now: datetime,
                         valid_until: datetime | None = None) -> PEBCPowerConstraints:
    """PEBC: production can be capped anywhere between 0 and the rated power."""
    quantity = PHASE_QUANTITY[limits.phase]
    rated = float(limits.rated_power_w or 0)
    return PEBCPowerConstraints(
        message_id=_id(), id=_id(), valid_from=now, valid_until=valid_until,
        consequence_type=PEBCPowerEnvelopeConsequenceType.VANISH,
        allowed_limit_ranges=[
            PEBCAllowedLimitRange(commodity_quantity=quantity,
                                  limit_type=PEBCPowerEnvelopeLimitType.UPPER_LIMIT,
                                  range_boundary=NumberRange(start_of_range=0.0,
                                                             end_of_range=0.0),
                                  abnormal_condition_only=False),
            PEBCAllowedLimitRange(commodity_quantity=quantity,
                                  limit_type=PEBCPowerEnvelopeLimitType.LOWER_LIMIT,
                                  range_boundary=NumberRange(start_of_range=-rated,
                                                             end_of_range=0.0),
                                  abnormal_condition_only=False),
        ])


@dataclass(frozen=True)
class Curtailment:
    """One step of a PEBC envelope as the inverter sees it."""

    start: datetime
    end: datetime
    max_production_w: float  # positive W; the rated power means no curtailment


def pv_curtailment_steps(limits: Limits, instruction: PEBCInstruction) -> list[Curtailment]:
    """PEBC envelope -> production caps over time (the lower limit caps production)."""
    rated = float(limits.rated_power_w or 0)
    steps: list[Curtailment] = []
    for envelope in instruction.power_envelopes:
        moment = instruction.execution_time
        for element in envelope.power_envelope_elements:
            end = moment + timedelta(milliseconds=element.duration.root)
            cap = min(rated, max(0.0, -float(element.lower_limit)))
            steps.append(Curtailment(start=moment, end=end, max_production_w=cap))
            moment = end
    steps.sort(key=lambda s: s.start)
    return steps


def pv_limit_pct(limits: Limits, max_production_w: float) -> float:
    """Production cap in W -> WMaxLimPct (0..100, 0.1 % steps)."""
    rated = float(limits.rated_power_w or 1)
    return round(min(100.0, max(0.0, max_production_w / rated * 100)), 1)


def pv_forecast(limits: Limits, now: datetime, per_kwp_by_hour: Sequence[float],
                hours: int = 24, time_scale: float = 1.0,
                device_now: datetime | None = None) -> PowerForecast:
    """Expected production for the next hours from a per-kWp profile by UTC hour of day.

    `device_now` is the device's own clock when it differs from `now` (a simulator replaying
    another day); elements follow its hours, the forecast's start_time stays in wall time.
    """
    quantity = PHASE_QUANTITY[limits.phase]
    kwp = (limits.rated_power_w or 0) / 1000
    device_now = device_now or now
    device_start = device_now.replace(minute=0, second=0, microsecond=0)
    start = now - (device_now - device_start) / time_scale
    elements = []
    for h in range(hours):
        hour = (device_start + timedelta(hours=h)).hour
        expected = -per_kwp_by_hour[hour] * kwp * 1000
        elements.append(PowerForecastElement(
            duration=_ms(3600 / time_scale),
            power_values=[PowerForecastValue(value_expected=round(expected),
                                             value_lower_limit=round(expected * 1.3),
                                             value_upper_limit=0.0,
                                             commodity_quantity=quantity)]))
    return PowerForecast(message_id=_id(), start_time=start, elements=elements)


# --- measurements -------------------------------------------------------------------------------


def power_measurement(values: dict[CommodityQuantity, float], now: datetime
                      ) -> PowerMeasurement:
    """A PowerMeasurement with one value per commodity quantity (W, S2 sign)."""
    return PowerMeasurement(
        message_id=_id(), measurement_timestamp=now,
        values=[PowerValue(commodity_quantity=q, value=round(v, 1)) for q, v in values.items()])


def device_power_measurement(limits: Limits, power_w: float, now: datetime) -> PowerMeasurement:
    """A device's power on the phase(s) it connects to."""
    return power_measurement({PHASE_QUANTITY[limits.phase]: power_w}, now)


def meter_measurement(phase_w: Sequence[float], now: datetime) -> PowerMeasurement:
    """The connection point's power per phase (import positive)."""
    quantities = (CommodityQuantity.ELECTRIC_POWER_L1, CommodityQuantity.ELECTRIC_POWER_L2,
                  CommodityQuantity.ELECTRIC_POWER_L3)
    return power_measurement(dict(zip(quantities, phase_w, strict=False)), now)


__all__ = [
    "BATTERY_ACTUATOR", "BATTERY_CHARGE", "BATTERY_DISCHARGE", "BATTERY_IDLE",
    "HEAT_PUMP_ACTUATOR", "HEAT_PUMP_BOOST", "HEAT_PUMP_NORMAL", "HEAT_PUMP_OFF",
    "MIN_OFF_TIMER", "MIN_RUN_TIMER", "FRBCInstruction", "Setpoint",
]
