"""Operation modes as power ranges by factor, and choosing a mode for a planned power.

Shared by FRBC, OMBC and DDBC: S2 maps operation_mode_factor 0..1 linearly onto each mode's
power range (start at 0, end at 1). Choosing a mode for a planned power prefers the active
mode (no transition), then the narrowest covering range; when no mode covers the power, the
nearest reachable power on the zero side is used so an instruction never asks for more than
the plan did.
"""

from __future__ import annotations

from dataclasses import dataclass


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


