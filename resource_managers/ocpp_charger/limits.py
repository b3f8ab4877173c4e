"""Charging limits and OCPP charging profiles (pure functions, no I/O).

Why here: the same rules hold for both OCPP versions and for the S2 mapping. A current limit is
rounded *down* to 0.1 A (OCPP 1.6 schemas take one decimal; rounding up could cross the fuse),
is never between 0 and the 6 A minimum (IEC 61851: a charger cannot hold less than 6 A, 0 A
pauses), and is sent in A or in W (per charge point config) with the number of phases the
EVSE charges on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sitekit import clock

VOLTAGE_V = 230.0
MIN_CURRENT_A = 6.0

TX_DEFAULT_PROFILE_ID = 1
TX_PROFILE_ID_BASE = 100  # TxProfile id = base + EVSE id: one TxProfile per EVSE, replaced in place


def round_down_tenth(value: float) -> float:
    """Round a current down to 0.1 A (tolerating float noise such as 15.999999999)."""
    return math.floor(value * 10 + 1e-6) / 10


def charging_current(amps: float, max_current_a: float, min_current_a: float = MIN_CURRENT_A) -> float:
    """A limit the charger can follow: 0 (pause), or in [min, max] in steps of 0.1 A.

    Anything below half the minimum pauses; between that and the minimum is raised to the
    minimum (the EV charges slightly more than asked, the alternative is not charging at all).
    """
    max_a = round_down_tenth(max_current_a)
    if amps <= 0 or max_a < min_current_a:
        return 0.0
    if amps < min_current_a:
        return min_current_a if amps >= min_current_a / 2 else 0.0
    return min(max_a, max(min_current_a, round_down_tenth(amps)))


def amps_to_watts(amps: float, phases: int, voltage_v: float = VOLTAGE_V) -> float:
    return amps * voltage_v * phases


def watts_to_amps(watts: float, phases: int, voltage_v: float = VOLTAGE_V) -> float:
    return watts / (voltage_v * phases)


@dataclass(frozen=True)
class ProfileLimit:
    """One limit as sent to a charger: the value in its unit and the phases it applies to."""

    amps: float
    unit: Literal["A", "W"]
    phases: int

    @property
    def value(self) -> float:
        if self.unit == "A":
            return round(self.amps, 1)
        return float(round(amps_to_watts(self.amps, self.phases)))

    def describe(self) -> str:
        if self.unit == "A":
            return f"{self.amps:.1f} A on {self.phases} phase(s)"
        return f"{self.value:.0f} W ({self.amps:.1f} A on {self.phases} phase(s))"


def _period(limit: ProfileLimit) -> dict[str, Any]:
    return {"start_period": 0, "limit": limit.value, "number_phases": limit.phases}


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def tx_default_profile_v16(limit: ProfileLimit) -> dict[str, Any]:
    """OCPP 1.6 TxDefaultProfile for connector 0 (all connectors): holds when the CSMS is gone."""
    return {
        "charging_profile_id": TX_DEFAULT_PROFILE_ID,
        "stack_level": 0,
        "charging_profile_purpose": "TxDefaultProfile",
        "charging_profile_kind": "Relative",
        "charging_schedule": {"charging_rate_unit": limit.unit,
                              "charging_schedule_period": [_period(limit)]},
    }


def tx_profile_v16(evse_id: int, transaction_id: int, limit: ProfileLimit,
                   now: datetime | None = None) -> dict[str, Any]:
    """OCPP 1.6 TxProfile for one running transaction, valid from now on."""
    start = (now or clock.now()) - timedelta(seconds=5)  # tolerate a charger clock behind
    return {
        "charging_profile_id": TX_PROFILE_ID_BASE + evse_id,
        "transaction_id": transaction_id,
        "stack_level": 1,
        "charging_profile_purpose": "TxProfile",
        "charging_profile_kind": "Absolute",
        "charging_schedule": {"charging_rate_unit": limit.unit, "start_schedule": _iso(start),
                              "charging_schedule_period": [_period(limit)]},
    }


def tx_default_profile_v201(limit: ProfileLimit) -> dict[str, Any]:
    """OCPP 2.0.1 TxDefaultProfile for EVSE 0 (the whole station)."""
    return {
        "id": TX_DEFAULT_PROFILE_ID,
        "stack_level": 0,
        "charging_profile_purpose": "TxDefaultProfile",
        "charging_profile_kind": "Relative",
        "charging_schedule": [{"id": TX_DEFAULT_PROFILE_ID, "charging_rate_unit": limit.unit,
                               "charging_schedule_period": [_period(limit)]}],
    }


def tx_profile_v201(evse_id: int, transaction_id: str, limit: ProfileLimit,
                    now: datetime | None = None) -> dict[str, Any]:
    """OCPP 2.0.1 TxProfile bound to a transaction id."""
    start = (now or clock.now()) - timedelta(seconds=5)
    profile_id = TX_PROFILE_ID_BASE + evse_id
    return {
        "id": profile_id,
        "stack_level": 1,
        "charging_profile_purpose": "TxProfile",
        "charging_profile_kind": "Absolute",
        "transaction_id": transaction_id,
        "charging_schedule": [{"id": profile_id, "charging_rate_unit": limit.unit,
                               "start_schedule": _iso(start),
                               "charging_schedule_period": [_period(limit)]}],
    }
