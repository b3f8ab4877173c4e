"""What the central system knows of one EVSE and the transaction on it.

Shared by the central system (`csms`) and the S2 side of each EVSE (`s2_evse`), which
reaches the central system only through the `CentralSystem` protocol below.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from resource_managers.ocpp_charger.config import ChargeCard, ChargePoint, OcppRmConfig
from sitekit import clock

logger = logging.getLogger("resource_managers.ocpp")


def _now() -> datetime:
    """The process clock (`sitekit.clock`: real time, or the demo's simulated time)."""
    return clock.now()


@dataclass
class EvSession:
    """A running transaction on one EVSE, with what is known about the EV and its driver."""

    record_id: int
    transaction_id: str
    id_tag: str | None
    card: ChargeCard | None
    started_at: datetime
    meter_start_wh: float
    meter_wh: float
    departure: datetime
    energy_need_wh: float
    priority: int
    needs_source: str  # "site defaults", "charge card <name>", "EV (NotifyEVChargingNeeds)"
    card_max_current_a: float | None = None
    ev_max_current_a: float | None = None
    ev_min_current_a: float | None = None
    cable_max_current_a: float | None = None
    soc: float | None = None
    soc_first: tuple[float, float] | None = None  # (soc %, energy Wh) at the first SoC reading
    limit_a: float | None = None
    seq_no: int = 0
    ev_full: bool = False  # the EV stopped drawing while offered current (SuspendedEV)
    full_since: datetime | None = None  # when it was taken as full (process clock)
    times_full: int = 0  # taken as full since it last drew: each offer again waits longer
    charging_state: str = ""  # the charger's last word: Charging, SuspendedEV, ...
    meter_at: datetime | None = None  # when the energy register was last read (plausibly)
    received_at: datetime | None = None  # ... and when that reading arrived (our clock)
    meter_start_unknown: bool = False  # meterStart was implausible: the first reading rebases

    @property
    def energy_wh(self) -> float:
        return max(0.0, self.meter_wh - self.meter_start_wh)

    @property
    def capacity_kwh(self) -> float | None:
        """Battery size estimated from energy per SoC percent (needs 3 points of SoC rise)."""
        if self.soc is None or self.soc_first is None:
            return None
        soc0, energy0 = self.soc_first
        if self.soc - soc0 < 3:
            return None
        return (self.energy_wh - energy0) / (self.soc - soc0) / 10  # Wh per % -> kWh


@dataclass
class Evse:
    """One EVSE (a connector that can charge one EV) of a charge point."""

    cp_id: str
    evse_id: int
    config: ChargePoint
    version: str = ""
    vendor: str | None = None  # from the charger's BootNotification
    model: str | None = None
    online: bool = False
    status: str = "Unknown"
    plugged: bool = False
    power_w: tuple[float, float, float] = (0.0, 0.0, 0.0)
    session: EvSession | None = None
    phases_in_use: int | None = None  # an EV may charge on fewer phases than the EVSE has
    phase_in_use: str | None = None  # the phase a 1-phase EV charges on
    changed_at: datetime = field(default_factory=_now)
    register_wh: float | None = None  # last plausible energy register reading (any session)
    implausible: str | None = None  # the last implausible value the charger reported, and why
    implausible_count: int = 0
    implausible_logged_at: float = float("-inf")

    @property
    def key(self) -> tuple[str, int]:
        return (self.cp_id, self.evse_id)

    @property
    def name(self) -> str:
        return f"{self.cp_id}/{self.evse_id}"

    @property
    def resource_id(self) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"ocpp-evse:{self.cp_id}:{self.evse_id}")

    @property
    def phases(self) -> int:
        return self.phases_in_use or self.config.phases

    @property
    def phase(self) -> str:
        """The phase of a 1-phase EVSE, or of the 1-phase EV on a 3-phase EVSE."""
        return self.phase_in_use or self.config.phase

    def learn_phases(self, power_w: tuple[float, float, float]) -> None:
        """Tell from the meter how many phases the EV charges on (3-phase EVSEs only)."""
        total = sum(power_w)
        if self.config.phases != 3 or total < 1000:
            return
        live = [i for i, p in enumerate(power_w) if p > 0.2 * total]
        phases = 1 if len(live) == 1 else 3
        if phases != self.phases:
            logger.info("%s: the EV charges on %d phase(s)", self.name, phases)
        self.phases_in_use = phases
        self.phase_in_use = ("L1", "L2", "L3")[live[0]] if phases == 1 else None

    @property
    def max_current_a(self) -> float:
        """The most this EVSE may take now: EVSE, card, EV and cable limits, whichever is lowest."""
        values = [self.config.max_current_a]
        if self.session is not None:
            values += [v for v in (self.session.card_max_current_a, self.session.ev_max_current_a,
                                   self.session.cable_max_current_a) if v]
        return min(values)

    @property
    def total_power_w(self) -> float:
        return sum(self.power_w)


@dataclass
class LimitResult:
    """What became of a requested current limit."""

    accepted: bool
    amps: float
    detail: str



class CentralSystem(Protocol):
    """What the S2 side of an EVSE needs from the central system."""

    config: OcppRmConfig
    evses: dict[tuple[str, int], Evse]

    def add_listener(self, listener: Callable[[Evse], None]) -> None: ...

    def offer_again(self, evse: Evse, now: datetime) -> bool: ...

    async def set_current(self, cp_id: str, evse_id: int, amps: float) -> LimitResult: ...

    async def clear_tx_profile(self, evse: Evse) -> None: ...
