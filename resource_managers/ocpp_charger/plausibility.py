"""Whether what a charger reports can be true, before it reaches a session, a CDR or the CEM.

A charger's meter values are checked against what its EVSE can physically do:

- every number finite and within `sitekit.plausible` (a meter value of ``1e400`` is infinite);
- the energy register (Wh) not negative, not beyond `MAX_REGISTER_WH`, never going backwards
  within a session, and rising no faster than the EVSE's maximum power (its configured current
  x 230 V x phases, x `POWER_SLACK`) over the time since the last reading (on the charger's
  clock or ours, whichever says more, plus `TIME_SLACK_S` and `TIME_SLACK_WALL_S` wall
  seconds for messages that waited), plus `ENERGY_SLACK_WH`: a meterStop of 10^30 Wh is
  refused, not billed;
- power per phase within the EVSE's maximum (x `POWER_SLACK`, + `POWER_SLACK_W`);
- SoC within 0..100 %;
- an EV's charging needs (OCPP 2.0.1): energy 0..1 MWh, currents 0..1000 A, min <= max.

An implausible value is dropped (the reading's other values still count), logged (at most one
line per EVSE per `LOG_EVERY_S`, with a count), and reported in the EVSE's state
(`Evse.implausible`, `Evse.implausible_count`). A session whose meterStart is implausible
starts from the EVSE's last plausible register reading, or, without one, from its first
plausible reading (`EvSession.meter_start_unknown`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from resource_managers.ocpp_charger import limits
from resource_managers.ocpp_charger.evse import Evse
from sitekit import clock
from sitekit.plausible import finite, number_problem

logger = logging.getLogger("resource_managers.ocpp")

MAX_REGISTER_WH = 1e11        # 100 GWh: no charger's lifetime register gets there
POWER_SLACK = 1.25            # meters and chargers overshoot their rating a little
POWER_SLACK_W = 500.0
ENERGY_SLACK_WH = 50.0        # rounding of registers read in kWh
CLOCK_SKEW = timedelta(minutes=5)  # a charger's clock may run this far ahead of ours
TIME_SLACK_S = 60.0           # a reading's timestamp may be this late against its register
TIME_SLACK_WALL_S = 2.0       # ... and this many wall seconds (minutes of a simulated clock)
LOG_EVERY_S = 10.0


def max_power_w(evse: Evse) -> float:
    """The most the EVSE can deliver: its configured current on all its wired phases."""
    config = evse.config
    return limits.amps_to_watts(config.max_current_a, config.phases)


def register_problem(value: float | None) -> str | None:
    """Why an energy register reading (Wh) cannot be one (None: it can)."""
    if value is None:
        return None
    problem = number_problem(value)
    if problem is not None:
        return f"energy register {problem}"
    if value < 0:
        return f"energy register {value:g} Wh is negative"
    if value > MAX_REGISTER_WH:
        return f"energy register {value:g} Wh is beyond any charger's ({MAX_REGISTER_WH:g} Wh)"
    return None


def report(evse: Evse, problem: str, now: float | None = None) -> None:
    """Note an implausible value in the EVSE's state and the log (rate-limited per EVSE)."""
    now = time.monotonic() if now is None else now
    evse.implausible = problem
    evse.implausible_count += 1
    if now - evse.implausible_logged_at < LOG_EVERY_S:
        return
    evse.implausible_logged_at = now
    logger.warning("%s: implausible meter value ignored: %s (%d so far on this EVSE); kept "
                   "out of its session, CDR and the CEM", evse.name, problem,
                   evse.implausible_count)


def judge_reading(evse: Evse, at: datetime, energy_wh: float | None,
                  power_w: tuple[float, float, float] | None, soc: float | None,
                  now: datetime) -> tuple[float | None, tuple[float, float, float] | None,
                                          float | None]:
    """The reading with every implausible value replaced by None (and reported)."""
    most = max_power_w(evse)
    if power_w is not None:
        limit = most * POWER_SLACK + POWER_SLACK_W
        bad = next((p for p in power_w if not finite(p) or abs(p) > limit), None)
        if bad is not None:
            problem = number_problem(bad)
            report(evse, f"power on a phase {problem}" if problem else
                   f"power {bad:g} W on a phase, more than this EVSE's {most / 1000:.1f} kW "
                   "can carry")
            power_w = None
    if soc is not None and (not finite(soc) or not 0 <= soc <= 100):
        report(evse, f"SoC {soc} % is outside 0..100")
        soc = None
    if energy_wh is None:
        return energy_wh, power_w, soc
    problem = register_problem(energy_wh)
    session = evse.session
    if problem is None and session is not None and not session.meter_start_unknown:
        if energy_wh < session.meter_wh - ENERGY_SLACK_WH:
            problem = (f"energy register went back from {session.meter_wh:.0f} to "
                       f"{energy_wh:.0f} Wh within session {session.transaction_id}")
        else:
            # the charger's timestamps, or our own clock if more time passed on it; a
            # register is read a moment before its timestamp is written, and messages wait
            # in queues: some slack (on `cem demo`'s simulated clock that is minutes)
            last = session.meter_at or session.started_at
            moment = min(at, now + CLOCK_SKEW)
            charger_s = (moment - last).total_seconds()
            ours_s = (now - (session.received_at or now)).total_seconds()
            slack_s = TIME_SLACK_S + TIME_SLACK_WALL_S * clock.speed()
            elapsed_h = (max(0.0, charger_s, ours_s) + slack_s) / 3600
            allowed = most * POWER_SLACK * elapsed_h + ENERGY_SLACK_WH
            rise = energy_wh - session.meter_wh
            if rise > allowed:
                problem = (f"energy register rose by {rise:.0f} Wh in "
                           f"{elapsed_h * 3600:.0f} s, more than this EVSE's "
                           f"{most / 1000:.1f} kW can deliver ({allowed:.0f} Wh)")
    if problem is not None:
        report(evse, problem)
        return None, power_w, soc
    return energy_wh, power_w, soc


MAX_NEED_WH = 1e6     # no EV asks for more than a megawatt-hour
MAX_EV_CURRENT_A = 1000.0


def needs_problem(ac: dict[str, object]) -> str | None:
    """Why an EV's AC charging needs (OCPP 2.0.1, snake case) cannot be true (None: they can)."""
    energy = ac.get("energy_amount")
    if energy is not None and (not isinstance(energy, int | float) or not finite(float(energy))
                               or not 0 <= energy <= MAX_NEED_WH):
        return f"energy_amount {energy} Wh is outside 0..{MAX_NEED_WH:g}"
    currents = {}
    for key in ("ev_min_current", "ev_max_current"):
        value = ac.get(key)
        if value is None:
            continue
        if not isinstance(value, int | float) or not finite(float(value)) \
                or not 0 <= value <= MAX_EV_CURRENT_A:
            return f"{key} {value} A is outside 0..{MAX_EV_CURRENT_A:g}"
        currents[key] = float(value)
    if currents.get("ev_min_current", 0.0) > currents.get("ev_max_current", MAX_EV_CURRENT_A):
        return "ev_min_current is above ev_max_current"
    return None
