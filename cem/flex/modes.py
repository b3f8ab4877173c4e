"""Operation modes as power ranges by factor, and choosing a mode for a planned power.

Shared by FRBC, OMBC and DDBC: S2 maps operation_mode_factor 0..1 linearly onto each mode's
power range (start at 0, end at 1). Choosing a mode for a planned power prefers the active
mode (no transition), then the narrowest covering range; when no mode covers the power, the
nearest reachable power on the zero side is used so an instruction never asks for more than
the plan did. `legal_choice` adds the S2 transition rules: only modes reachable by a listed
transition, and never before a blocking timer has finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


@dataclass
class ModeRange:
    """One operation mode of one actuator at one fill level: power and fill rate by factor."""

    mode_id: str
    power_start: float  # W at factor 0
    power_end: float  # W at factor 1
    fill_rate_start: float
    fill_rate_end: float

    floor_w: float | None = None  # usable power starts here (DDBC: what meets the demand)

    @property
    def lo(self) -> float:
        low = min(self.power_start, self.power_end)
        return low if self.floor_w is None else max(low, self.floor_w)

    @property
    def hi(self) -> float:
        return max(self.power_start, self.power_end)

    def factor_for(self, power_w: float) -> float:
        span = self.power_end - self.power_start
        if abs(span) < 1e-9:
            return 0.0
        return float(min(1.0, max(0.0, (power_w - self.power_start) / span)))

    def power_at(self, factor: float) -> float:
        return self.power_start + factor * (self.power_end - self.power_start)


def pick_mode(ranges: list[ModeRange], power_w: float,
              active: str | None) -> tuple[ModeRange, float]:
    """The mode and factor for `power_w`: exact if a mode covers it, else towards zero."""
    covering = [r for r in ranges if r.lo - 1e-6 <= power_w <= r.hi + 1e-6]
    if covering:
        covering.sort(key=lambda r: (r.mode_id != active, r.hi - r.lo))
        best = covering[0]
        return best, best.factor_for(power_w)
    # nothing covers it: the reachable power closest to power_w on the zero side
    if power_w >= 0:
        below = [r for r in ranges if r.lo <= power_w]
        if below:
            best = max(below, key=lambda r: (min(r.hi, power_w), r.mode_id == active))
            return best, best.factor_for(min(best.hi, power_w))
        best = min(ranges, key=lambda r: r.lo)
        return best, best.factor_for(best.lo)
    above = [r for r in ranges if r.hi >= power_w]
    if above:
        best = min(above, key=lambda r: (max(r.lo, power_w), r.mode_id != active))
        return best, best.factor_for(max(best.lo, power_w))
    best = max(ranges, key=lambda r: r.hi)
    return best, best.factor_for(best.hi)




# a move that waits for a timer goes this long after the timer's end as the CEM knows it: the
# RM started the timer when it carried out the move (its processing delay and the network
# later), and a move a moment early is refused. Against minimum run and off times of minutes.
TIMER_MARGIN = timedelta(seconds=30)


@dataclass
class TransitionRules:
    """S2 transitions and timers of one actuator (or OMBC device), for legal instructions.

    A move between two modes needs a normal (not abnormal_condition_only) transition when the
    RM lists any transitions (none listed: every move is allowed); it must wait until the
    transition's blocking timers have finished; making it starts the transition's timers.
    `running` holds timer id -> finished_at, from the RM's TimerStatus messages and from the
    moves this CEM instructs while building one plan's instructions.
    """

    transitions: list[Any] = field(default_factory=list)
    durations: dict[str, timedelta] = field(default_factory=dict)
    running: dict[str, datetime] = field(default_factory=dict)

    def _find(self, from_mode: str, to_mode: str) -> Any | None:
        for transition in self.transitions:
            if (not transition.abnormal_condition_only and _text(transition.from_) == from_mode
                    and _text(transition.to) == to_mode):
                return transition
        return None

    def allowed(self, from_mode: str | None, to_mode: str) -> bool:
        if from_mode is None or from_mode == to_mode or not self.transitions:
            return True
        return self._find(from_mode, to_mode) is not None

    def free_at(self, from_mode: str | None, to_mode: str, when: datetime) -> datetime:
        """Earliest moment >= `when` the move is not blocked by a running timer (with
        TIMER_MARGIN after its end: the RM's timer started when it carried the move out)."""
        if from_mode is None or from_mode == to_mode:
            return when
        transition = self._find(from_mode, to_mode)
        if transition is None:
            return when
        ends = [self.running[_text(b)] + TIMER_MARGIN for b in transition.blocking_timers
                if _text(b) in self.running]
        return max([when, *ends])

    def make(self, from_mode: str | None, to_mode: str, when: datetime) -> None:
        """Record the move: its start timers run from `when`."""
        if from_mode is None or from_mode == to_mode:
            return
        transition = self._find(from_mode, to_mode)
        if transition is None:
            return
        for timer in transition.start_timers:
            duration = self.durations.get(_text(timer))
            if duration is not None:
                self.running[_text(timer)] = when + duration

    def copy(self) -> TransitionRules:
        return TransitionRules(self.transitions, self.durations, dict(self.running))

    @staticmethod
    def of(transitions: list[Any], timers: list[Any],
           finished_at: dict[str, datetime] | None = None) -> TransitionRules:
        return TransitionRules(list(transitions),
                               {_text(t.id): timedelta(milliseconds=t.duration.root)
                                for t in timers}, dict(finished_at or {}))


def _text(value: Any) -> str:
    return str(getattr(value, "root", value))


def legal_choice(ranges: list[ModeRange], power_w: float, last_mode: str | None,
                 rules: TransitionRules | None, when: datetime,
                 next_change: datetime | None) -> tuple[ModeRange, float, datetime] | None:
    """The mode, factor and moment for `power_w` that the RM will accept, or None to wait.

    Only modes reachable from `last_mode` are considered. If the move is blocked by a timer,
    it happens when the timer ends, unless that is at or after `next_change` (then it is
    skipped and the device stays where it is).
    """
    if rules is not None:
        reachable = [r for r in ranges if rules.allowed(last_mode, r.mode_id)]
        ranges = reachable or ranges
    mode, factor = pick_mode(ranges, power_w, last_mode)
    moment = when
    if rules is not None:
        moment = rules.free_at(last_mode, mode.mode_id, when)
        if next_change is not None and moment >= next_change:
            return None
        rules.make(last_mode, mode.mode_id, moment)
    return mode, factor, moment
