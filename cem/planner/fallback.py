"""The rule-based safe plan: used when the solvers return nothing usable.

Deadline first within the limits: every asset starts idle (batteries stay idle, PV is not
curtailed), then EVs and other storage are filled in order of priority and earliest departure,
each into the earliest PTUs with spare capacity under the import limit, congestion and the fuse
on every phase; PV is curtailed only where the export limit (or the fuse on export) needs it.
It uses no solver, so it is always available and always keeps the hard limits.
"""

from __future__ import annotations

from cem.planner.hint import refill, repair_limits
from cem.planner.layout import Dispatch, Layout, empty_dispatch


def fallback_dispatch(lay: Layout) -> Dispatch:
    """Deadline-first dispatch within the hard limits."""
    return fallback_until(lay, None)[0]


def fallback_until(lay: Layout, stop_at: float | None) -> tuple[Dispatch, bool]:
    """`fallback_dispatch`, no asset filled after `stop_at` (a `time.perf_counter` moment):
    the rest stay idle, the limits are kept. True when every asset had its turn."""
    disp = empty_dispatch(lay)
    idle_modes(lay, disp)
    repair_limits(lay, disp)
    whole = refill(lay, disp, by_price=False, deadline_first=True, stop_at=stop_at)
    repair_limits(lay, disp)
    return disp, whole


def idle_modes(lay: Layout, disp: Dispatch) -> None:
    """Mode devices held in the mode nearest to idle (0 W) all horizon; profiles at their
    earliest start (as `empty_dispatch` sets them)."""
    for j, m in enumerate(lay.problem.modes):
        if not m.modes:
            continue
        k = min(range(len(m.modes)), key=lambda x: max(m.modes[x].min_w, 0, -m.modes[x].max_w))
        disp.mode_index[j][:] = k
        if disp.mode_power is not None:
            disp.mode_power[j, :] = min(max(0, m.modes[k].min_w), m.modes[k].max_w)
