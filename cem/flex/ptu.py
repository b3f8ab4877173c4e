"""The PTU grid the flexibility layer maps S2 onto, and what every control type shares.

S2 describes time as a start time plus elements with a duration in milliseconds; the planner
works on a fixed grid of PTUs from `Problem.start`. `sample_rate` turns the first into the
second (time-weighted average per PTU). Phase shares come from the S2 commodity quantities:
`ELECTRIC.POWER.L1/L2/L3` put power on one phase, `ELECTRIC.POWER.3_PHASE_SYMMETRIC` is read
as the *total* power, split equally over the three phases.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import numpy as np
from s2python.common import CommodityQuantity
from s2python.generated.gen_s2 import ID

from cem.planner.assets import MIN_FIRST_PTU_SHARE, THREE_PHASE, PhaseShare, Plan, Problem

ELECTRIC = {
    CommodityQuantity.ELECTRIC_POWER_L1: (1.0, 0.0, 0.0),
    CommodityQuantity.ELECTRIC_POWER_L2: (0.0, 1.0, 0.0),
    CommodityQuantity.ELECTRIC_POWER_L3: (0.0, 0.0, 1.0),
    CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC: THREE_PHASE,
}


@dataclass(frozen=True)
class PtuGrid:
    """Where PTU 0 starts, how long a PTU is and how many there are."""

    start: datetime
    ptu_minutes: int
    n_ptus: int

    @property
    def ptu_s(self) -> float:
        return self.ptu_minutes * 60.0

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.ptu_minutes * self.n_ptus)

    def ptu_start(self, index: int) -> datetime:
        return self.start + timedelta(minutes=self.ptu_minutes * index)

    def share_ahead(self, now: datetime) -> float:
        """The share of PTU 0 still ahead of `now` (`Problem.first_ptu_share`), kept in
        [MIN_FIRST_PTU_SHARE, 1]: a replan in the last seconds of a PTU still plans it."""
        ptu = timedelta(minutes=self.ptu_minutes)
        return min(max((self.start + ptu - now) / ptu, MIN_FIRST_PTU_SHARE), 1.0)

    def index_floor(self, moment: datetime) -> int:
        """PTU that contains `moment` (may be <0 or >=n_ptus)."""
        return math.floor((moment - self.start).total_seconds() / self.ptu_s)

    def index_ceil(self, moment: datetime) -> int:
        """First PTU that starts at or after `moment`."""
        return math.ceil((moment - self.start).total_seconds() / self.ptu_s - 1e-9)

    @staticmethod
    def of(problem: Problem) -> PtuGrid:
        return PtuGrid(problem.start, problem.ptu_minutes, problem.n_ptus)


def floor_to_ptu(moment: datetime, ptu_minutes: int) -> datetime:
    """The start of the PTU containing `moment` (PTUs are aligned to the hour)."""
    minute = (moment.minute // ptu_minutes) * ptu_minutes if ptu_minutes <= 60 else 0
    return moment.replace(minute=minute, second=0, microsecond=0)


def sample_rate(
    grid: PtuGrid,
    start_time: datetime,
    durations_ms: Sequence[int],
    values: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Time-weighted average of a step profile per PTU, and the covered share of each PTU.

    Returns (average over the covered part, coverage 0..1). PTUs the profile does not touch
    get average 0 and coverage 0, so callers can fill them with something better.
    """
    n = grid.n_ptus
    weighted = np.zeros(n)
    covered = np.zeros(n)
    t0 = (start_time - grid.start).total_seconds()
    ptu_s = grid.ptu_s
    for duration_ms, value in zip(durations_ms, values, strict=True):
        t1 = t0 + duration_ms / 1000.0
        first = max(0, math.floor(t0 / ptu_s))
        last = min(n - 1, math.ceil(t1 / ptu_s) - 1)
        for k in range(first, last + 1):
            overlap = min(t1, (k + 1) * ptu_s) - max(t0, k * ptu_s)
            if overlap > 0:
                weighted[k] += value * overlap
                covered[k] += overlap
        t0 = t1
    average = np.divide(weighted, covered, out=np.zeros(n), where=covered > 0)
    return average, covered / ptu_s


def phase_share(quantities: Iterable[tuple[CommodityQuantity | str, float]]) -> PhaseShare:
    """Phase share from (commodity quantity, magnitude) pairs; 3-phase when unknown."""
    shares = np.zeros(3)
    present = np.zeros(3)  # used when every magnitude is zero
    for quantity, magnitude in quantities:
        share = _phase_of(quantity)
        if share is not None:
            shares += np.asarray(share) * abs(magnitude)
            present += np.asarray(share)
    if shares.sum() <= 0:
        shares = present
    total = shares.sum()
    if total <= 0:
        return THREE_PHASE
    normalised = shares / total
    return (float(normalised[0]), float(normalised[1]), float(normalised[2]))


def electric_total(power_values: Iterable[Any], attr: str = "value") -> float | None:
    """Sum of the electric power values in a list of S2 PowerValue-like objects, or None."""
    total = 0.0
    found = False
    for value in power_values:
        if _is_electric(value.commodity_quantity):
            total += float(getattr(value, attr))
            found = True
    return total if found else None


@functools.lru_cache(maxsize=256)
def _is_electric(quantity: Any) -> bool:
    # cached: the enum lookup costs ~20 us, and a 1000-RM replan asks ~30k times
    try:
        return CommodityQuantity(quantity) in ELECTRIC
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)
def _phase_of(quantity: Any) -> Any:
    try:
        return ELECTRIC.get(CommodityQuantity(quantity))
    except ValueError:
        return None


def is_electric(quantity: Any) -> bool:
    """True for the four ELECTRIC.POWER.* commodity quantities."""
    return _is_electric(quantity)


def new_id() -> str:
    """A fresh S2 id as text."""
    return str(uuid.uuid4())


def new_uuid() -> uuid.UUID:
    """A fresh S2 id for the fields s2-python types as UUID (message ids, instruction ids): a
    random (version 4) UUID, as `uuid.uuid4` makes, from randomness read for many at a time
    (`uuid4` reads the OS's per id: a system call each, two per instruction)."""
    with _random_lock:
        if not _random_ints:
            data = os.urandom(16 * _RANDOM_BATCH)
            _random_ints.extend(int.from_bytes(data[k:k + 16], "big")
                                for k in range(0, len(data), 16))
        value = _random_ints.pop()
    return uuid.UUID(int=value, version=4)   # (sets the version and variant bits)


_RANDOM_BATCH = 256  # ids' randomness read at a time
_random_ints: list[int] = []
_random_lock = threading.Lock()  # (the planning thread and the event loop both make ids)


def new_schema_id() -> ID:
    """A fresh S2 id for the fields s2-python types as the schema's ``ID``."""
    return ID(root=new_id())


def as_uuid(value: Any) -> uuid.UUID:
    """An id the CEM uses inside (a UUID, or one as text: the session translates every id the
    RM sends to a UUID) as s2-python types it."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(sid(value))


class FlexBinding(Protocol):
    """What ties a planner asset back to its RM: turns plan rows into S2 instructions.

    `instructions` covers PTUs [0, until_ptu) of the plan, one instruction per change.
    `capped_instructions` is for the guard: the instruction(s) that hold the RM at or below
    `cap_w` (consumption) from `now`, or None when this RM cannot be capped that way;
    `can_cap` says whether the guard may try (a producer or a profile that is not running
    interruptibly cannot be turned down).
    """

    rm_id: str
    asset_id: str
    control_type: str
    priority: int
    phase_share: PhaseShare

    def instructions(self, plan: Plan, problem: Problem, now: datetime,
                     until_ptu: int) -> list[Any]: ...

    def capped_instructions(self, cap_w: float, now: datetime) -> list[Any] | None: ...

    def can_cap(self) -> bool: ...

    def power_range_w(self) -> tuple[float, float]: ...


def sid(value: Any) -> str:
    """An S2 id as text, whether s2-python gives a UUID, a str or a generated `ID` root model."""
    value = getattr(value, "root", value)
    if type(value) is uuid.UUID:
        return _uuid_text(value)
    return str(value)


# the text of a UUID, made once: a 1000-RM replan asks for the same ids ~30k times (2 us each)
_uuid_text = functools.lru_cache(maxsize=1 << 16)(str)


def uuid_int(value: Any) -> int:
    """An S2 id as the integer of its UUID (a UUID's own `int`: no text made nor hashed);
    text that is not a UUID gets its text's hash (the CEM's ids are UUIDs)."""
    value = getattr(value, "root", value)
    if type(value) is uuid.UUID:
        return value.int
    try:
        return uuid.UUID(str(value)).int
    except ValueError:
        return hash(str(value))
