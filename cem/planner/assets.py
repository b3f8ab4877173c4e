"""What the planner plans: device-neutral assets, site limits and prices, and the plan.

This is the contract between `cem/flex/` (S2 state -> assets, plan -> S2 instructions), the
scenario files (`cem plan`) and the optimisation (`cem/planner/model.py`). Units are integer
W and Wh, time is PTU indices 0..n_ptus-1 from `Problem.start`; power is positive for
consumption (import) and negative for production, as in S2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

PhaseShare = tuple[float, float, float]
"""Share of an asset's power on L1, L2, L3 (sums to 1): (1/3,1/3,1/3) or (1,0,0) etc."""

THREE_PHASE: PhaseShare = (1 / 3, 1 / 3, 1 / 3)

MIN_FIRST_PTU_SHARE = 0.05
"""The least share of PTU 0 a plan counts on: a replan in the last seconds of a PTU must not
make PTU 0 last (almost) nothing."""


def single_phase(phase: str) -> PhaseShare:
    """Phase share of a 1-phase asset on L1, L2 or L3."""
    return {"L1": (1.0, 0.0, 0.0), "L2": (0.0, 1.0, 0.0), "L3": (0.0, 0.0, 1.0)}[phase]


@dataclass
class StorageAsset:
    """Anything with a fill level: an EV, a battery, a heat pump's buffer, a generic FRBC.

    Power domain per PTU while available: {0} U [charge_min_w, charge_max_w] and, when it can
    discharge, [-discharge_max_w, -discharge_min_w]. The fill level is kept in Wh (thermal Wh
    for a heat pump): level[t+1] = level[t] + h[t] * (charge_efficiency * charge[t]
    - discharge[t] / discharge_efficiency) - usage_wh[t], where h[t] is the PTU's length in
    hours (PTU 0 only its `Problem.first_ptu_share`, which also scales usage_wh[0]).
    """

    id: str
    kind: str  # "ev", "battery", "heat_pump" or "storage"
    charge_max_w: int
    charge_min_w: int = 0
    discharge_max_w: int = 0
    discharge_min_w: int = 0
    charge_efficiency: float = 1.0  # level Wh per electrical Wh (COP for a heat pump)
    discharge_efficiency: float = 1.0
    level_wh: int = 0  # at the start of available_from
    level_min_wh: int = 0
    level_max_wh: int = 10**9
    usage_wh: np.ndarray | None = None  # per PTU, taken from the level (demand, leakage)
    available_from: int = 0  # first PTU it can take power (EV arrival)
    available_until: int | None = None  # first PTU it cannot (EV departure); None = horizon end
    target_wh: int | None = None  # level wanted at available_until (EV departure target)
    target_profile: list[tuple[int, int, int]] = field(default_factory=list)  # (ptu, lo, hi)
    # EUR per Wh below the lower side of the milestone at that PTU, where it is not the
    # asset's unmet-target weight (a safe-departure milestone priced at the value of a kWh)
    milestone_eur_per_wh: dict[int, float] = field(default_factory=dict)
    priority: int = 1  # higher is served first when limits bind
    phase_share: PhaseShare = THREE_PHASE
    step_w: int = 1  # power resolution (e.g. 0.1 A * 230 V * phases)


@dataclass
class FixedLoad:
    """Power that is not controlled: base load, a NOT_CONTROLABLE RM's forecast."""

    id: str
    power_w: np.ndarray  # per PTU, + consumption / - production
    phase_share: PhaseShare = THREE_PHASE


@dataclass
class Curtailable:
    """Production that may be curtailed (PV behind a PEBC RM)."""

    id: str
    production_w: np.ndarray  # per PTU, >= 0, the available production
    curtailable: bool = True
    phase_share: PhaseShare = THREE_PHASE


@dataclass
class PowerMode:
    id: str
    min_w: int
    max_w: int


@dataclass
class ModeAsset:
    """A device with operation modes and a power range per mode (OMBC, DDBC)."""

    id: str
    modes: list[PowerMode]
    current_mode: str | None = None
    min_on_ptus: int = 0  # from S2 timers
    phase_share: PhaseShare = THREE_PHASE


@dataclass
class ProfileOption:
    """One shape a ShiftableProfile may run, with the start window that shape allows."""

    profile_w: np.ndarray  # per PTU of the profile
    earliest_start: int
    latest_start: int


@dataclass
class ShiftableProfile:
    """A power profile that must run once, starting in a window (PPBC).

    `alternatives` are other shapes it may run instead (a PPBC profile's alternative power
    sequences), each with its own start window, since a longer shape must start earlier to
    finish in time. The planner runs exactly one shape once: option 0 is `profile_w` in
    [earliest_start, latest_start], option k is `alternatives[k - 1]` (`Plan.profile_choice`).
    """

    id: str
    profile_w: np.ndarray  # per PTU of the profile
    earliest_start: int
    latest_start: int
    phase_share: PhaseShare = THREE_PHASE
    alternatives: list[ProfileOption] = field(default_factory=list)

    def options(self) -> list[ProfileOption]:
        """Every shape it may run: option 0 (its own) first, then the alternatives."""
        return [ProfileOption(self.profile_w, self.earliest_start, self.latest_start),
                *self.alternatives]


@dataclass
class SiteLimits:
    fuse_a: float
    phases: int
    voltage_v: float
    import_limit_w: np.ndarray  # per PTU: GTV combined with congestion windows
    export_limit_w: np.ndarray  # per PTU, >= 0
    peak_price_eur_per_kw: float = 0.0
    peak_so_far_w: int = 0
    # share of forecast production the fuse may count on as headroom: 1.0 for a known profile
    # (offline scenarios), 0.0 live, where a cloud must never push a phase over its fuse
    fuse_production_credit: float = 1.0
    # share of the fuse and of the import limit a plan may use: live plans keep headroom for
    # forecast errors between replans (`planner.limit_share`); 1.0 offline. The values above
    # stay the hard limits (what the guard protects); the planner reads the `planned_*` ones.
    planning_share: float = 1.0

    @property
    def fuse_w_per_phase(self) -> float:
        """The hard fuse limit per phase, W."""
        return self.fuse_a * self.voltage_v

    @property
    def planned_fuse_a(self) -> float:
        """The fuse current a plan may use per phase."""
        return self.fuse_a * self.planning_share

    @property
    def planned_fuse_w_per_phase(self) -> float:
        return self.planned_fuse_a * self.voltage_v

    @property
    def planned_import_limit_w(self) -> np.ndarray:
        """Per PTU, the import a plan may use (whole watts, rounded down)."""
        if self.planning_share == 1.0:
            return np.asarray(self.import_limit_w)
        return np.floor(np.asarray(self.import_limit_w) * self.planning_share).astype(np.int64)


@dataclass
class Prices:
    import_eur_per_kwh: np.ndarray  # per PTU
    export_eur_per_kwh: np.ndarray  # per PTU (revenue per kWh exported)


@dataclass
class Problem:
    start: datetime
    ptu_minutes: int
    n_ptus: int
    limits: SiteLimits
    prices: Prices
    storage: list[StorageAsset] = field(default_factory=list)
    fixed: list[FixedLoad] = field(default_factory=list)
    curtailable: list[Curtailable] = field(default_factory=list)
    modes: list[ModeAsset] = field(default_factory=list)
    profiles: list[ShiftableProfile] = field(default_factory=list)
    # share of PTU 0 still ahead (0 < share <= 1): a live replan at `now` starts part-way
    # through PTU 0, so only that part of it can still move energy; 1.0 for a plan that
    # starts on a PTU boundary (scenarios, the simulator)
    first_ptu_share: float = 1.0

    def ptu_start(self, index: int) -> datetime:
        return self.start + timedelta(minutes=self.ptu_minutes * index)


@dataclass
class Shortfall:
    energy_wh: int
    reason: str  # e.g. "window too short at max power", "site limits bind"


@dataclass
class Plan:
    status: str  # OPTIMAL, FEASIBLE, FALLBACK, INFEASIBLE
    power_w: dict[str, np.ndarray]  # asset id -> W per PTU (+ consumption)
    grid_import_w: np.ndarray  # per PTU, + import / - export
    curtailed_w: dict[str, np.ndarray] = field(default_factory=dict)  # PV id -> W per PTU
    level_wh: dict[str, np.ndarray] = field(default_factory=dict)  # storage id -> level per PTU
    mode: dict[str, list[str | None]] = field(default_factory=dict)  # ModeAsset -> mode per PTU
    profile_start: dict[str, int] = field(default_factory=dict)  # ShiftableProfile -> start
    profile_choice: dict[str, int] = field(default_factory=dict)  # ShiftableProfile -> option
    shortfall: dict[str, Shortfall] = field(default_factory=dict)
    energy_cost_eur: float = 0.0
    peak_cost_eur: float = 0.0
    peak_w: int = 0
    cost_eur: float = 0.0  # energy + peak
    lp_bound_eur: float | None = None  # LP lower bound on objective_eur
    # the LP optimum (True), or a bound from row prices of an LP not solved in time (False)
    lp_solved: bool = False
    # what lp_bound_eur is: "LP" (its optimum), "prices" (row prices, `dual_bound`), "EVs"
    # (the EVs' own problems at site-row prices, `decompose`), or None (no bound)
    bound_from: str | None = None
    gap: float | None = None
    build_s: float = 0.0
    lp_solve_s: float = 0.0
    solve_s: float = 0.0
    lp_iterations: int = 0  # simplex iterations of the LP relaxation
    lp_warm: bool = False  # the LP started from the previous replan's basis
    notes: list[str] = field(default_factory=list)
    # the stages skipped or cut short to keep the time limit, each "stage: why"
    skipped: list[str] = field(default_factory=list)
    stage_s: dict[str, float] = field(default_factory=dict)  # wall seconds per stage timed
    # cost_eur + unmet-target penalties + tie-breaks: the objective the LP bound and gap refer to
    objective_eur: float = 0.0
