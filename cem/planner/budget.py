"""The time of one plan shared out among its stages (`plan_site`'s deadline kept on a busy machine).

Each stage that does not stop at a deadline by itself (the plan from the decomposition's
point, the scoring and check of the plan sent, CP-SAT's model build, ...) has a cost per
storage-PTU measured on the project's 2-core machine at load ~2 (`COST_S_PER_CELL`). What it
costs now is that times `pace`: how much slower than that the stages of this plan timed so far
ran (the machine at load 6-8 runs them 1.5-3 x slower). A stage starts only when its estimate
and those of the stages that must follow it fit in what is left of the deadline, and the
stages that stop by themselves (the decomposition's price steps, the bound's branch and bound,
the refill, HiGHS) are given the deadline less what must follow them (`until`). What was
skipped for time is said (`skipped`), and every timed stage's wall seconds are kept (`stage_s`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# wall seconds per storage-PTU on the 2-core machine at load ~2 (the bench's mixed car park
# with live milestones, 1000-5000 EVs: 26k-129k storage-PTUs)
COST_S_PER_CELL: dict[str, float] = {
    "layout": 2.5e-7,  # build_layout (5000 EVs: 0.03 s)
    "LP arrays": 5.5e-7,  # BuiltLp.of (5000 EVs: 0.07 s)
    # the master's point laid out, `laxity.least_laxity_plan` and its scoring (5000 EVs:
    # 0.24-0.32 s; round 10: the other assets rounded on their own layout, 0.7 x that)
    "plan from the point": 1.4e-6,
    # the plan sent: `to_plan`, its scoring and `check_plan` (5000 EVs: 0.07-0.11 s)
    "plan and check": 8e-7,
    # `hint.refill` of the plan from the point: its least (its set-up and the scoring of what
    # it refilled, 0.1-0.14 s at 5000 EVs at load ~5 when cut short at once)
    "refill": 4e-7,
    "repair": 3.5e-6,  # `hint.round_and_repair` of an LP answer (1000 EVs: 0.07-0.13 s)
    # the branch and bound of the EVs' minimum power in the bound: its first two rounds, which
    # it always takes (5000 EVs: 0.06-0.1 s at load 5, 4421 of the 4423 EUR it adds in 0.15 s)
    "min power": 7e-7,
    # the bound from the EVs' problems at a solved LP's prices and their minimum power
    # (1000 EVs: 0.06 s)
    "min power at the LP's prices": 2.5e-6,
    "CP-SAT model": 5.5e-5,  # `model.build_model` (1000 EVs: 1.5 s; 100: 0.13 s)
    # one answer of the EVs' problems at new prices and the master's next prices
    # (`decompose.lagrangian_bound`: 0.044 s at 2000 EVs, 0.07 s at 5000; round 10, the
    # primal simplex, one sort per EV and the EVs in buckets by window: 0.35-0.45 x that,
    # measured beside the old in the same minutes)
    "price step": 1.6e-7,
}
# the stages that always run to their end: their wall seconds against their estimate set the
# pace (the others stop at a deadline of their own and would read faster than they are)
PACE_STAGES = frozenset({"layout", "LP arrays", "plan from the point", "plan and check",
                         "repair", "CP-SAT model"})
# what any stage costs besides its size (Python's and numpy's calls), s
COST_S_FIXED = 0.01
COST_S_FIXED_OF = {"price step": 0.012}  # (HiGHS's two small LPs)
# an estimate is this many times the measured cost at the current pace: the pace itself is
# known only from the stages so far, and the load moves within a plan
SAFETY = 1.15
# before any stage is timed the machine is taken to be this much slower than at load ~2
PACE_PRIOR = 1.3
PRIOR_WEIGHT_S = 0.05  # the prior counts as this many seconds of stages timed at that pace


class Budget:
    """The deadline of one plan (a `time.perf_counter` moment), its size in storage-PTUs and
    the pace of the stages timed so far."""

    def __init__(self, deadline: float, cells: int) -> None:
        self.deadline = deadline
        self.cells = max(int(cells), 1)
        self.skipped: list[str] = []
        self.stage_s: dict[str, float] = {}
        self._expected = PRIOR_WEIGHT_S
        self._taken = PRIOR_WEIGHT_S * PACE_PRIOR

    @property
    def pace(self) -> float:
        """How many times slower than at load ~2 the timed stages ran (at least 1)."""
        return max(self._taken / self._expected, 1.0)

    def left(self) -> float:
        """Seconds to the deadline (negative past it)."""
        return self.deadline - time.perf_counter()

    def _quiet(self, stage: str) -> float:
        """A stage's seconds at load ~2."""
        return COST_S_PER_CELL[stage] * self.cells + COST_S_FIXED_OF.get(stage, COST_S_FIXED)

    def cost(self, *stages: str) -> float:
        """The estimated seconds of `stages` one after the other, now."""
        return sum(SAFETY * self.pace * self._quiet(s) for s in stages)

    def in_steps(self, step: str, *after: str) -> float:
        """The time of `after` as a number of `step`s (each as long as it measures itself):
        what a stage of many steps keeps for what follows it, at its own pace."""
        return SAFETY * sum(self._quiet(s) for s in after) / self._quiet(step)

    def until(self, *after: str) -> float:
        """The moment by which a stage must end to leave `after` their time."""
        return self.deadline - self.cost(*after)

    def fits(self, stage: str, *after: str) -> bool:
        """Whether `stage` and then `after` fit in what is left."""
        return self.left() >= self.cost(stage, *after)

    def skip(self, stage: str, why: str) -> None:
        """Say that `stage` was skipped (or cut short) for time."""
        self.skipped.append(f"{stage}: {why}")

    def took(self, stage: str, seconds: float) -> None:
        """Keep a stage's wall seconds; one of `PACE_STAGES` also sets the pace."""
        self.stage_s[stage] = self.stage_s.get(stage, 0.0) + seconds
        if stage in PACE_STAGES:
            self._expected += self._quiet(stage)
            self._taken += seconds

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Time the block as `stage` (`took`)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.took(stage, time.perf_counter() - began)
