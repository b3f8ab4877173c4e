"""Grid connection + congestion windows -> the planner's per-PTU `SiteLimits`.

The GTV (contracted import capacity) and the export limit hold every PTU. A congestion window
lowers the import (and/or export) limit in every PTU it overlaps, even partly: kW-max and
congestion are settled per 15-minute average, and a PTU that is half inside a window must not
exceed the window's limit in its first half, which a per-PTU plan can only promise by applying
the limit to the whole PTU. Overlapping windows: the lowest limit wins. A window limit never
raises the GTV. The fuse stays a per-phase current limit (the planner checks it per phase).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

import numpy as np

from cem.planner.assets import SiteLimits
from cem.site.config import CongestionWindow, GridConfig, SiteConfig


def ptu_span(start: datetime, ptu_minutes: int, n_ptus: int, window_start: datetime,
             window_end: datetime) -> tuple[int, int]:
    """PTU indices [first, last) that overlap [window_start, window_end), clipped to the horizon."""
    ptu_s = ptu_minutes * 60
    first = int((window_start - start).total_seconds() // ptu_s)
    last = -int(-(window_end - start).total_seconds() // ptu_s)  # ceil
    return max(0, first), min(n_ptus, last)


def limits_from_grid(
    grid: GridConfig,
    windows: Iterable[CongestionWindow],
    start: datetime,
    ptu_minutes: int,
    n_ptus: int,
    *,
    planning_share: float = 1.0,
    fuse_production_credit: float = 1.0,
) -> SiteLimits:
    """Per-PTU import/export limits (W) from the grid connection and congestion windows.

    The values are the hard limits; `planning_share` is the part of the fuse and the import
    limit a plan may use (see `SiteLimits.planning_share`).
    """
    if start.tzinfo is None:
        raise ValueError("start needs a timezone")
    import_w = np.full(n_ptus, round(grid.import_limit_kw * 1000), dtype=np.int64)
    export_w = np.full(n_ptus, round(grid.export_limit_kw * 1000), dtype=np.int64)
    for window in windows:
        first, last = ptu_span(start, ptu_minutes, n_ptus, window.start, window.end)
        if first >= last:
            continue
        if window.import_limit_kw is not None:
            import_w[first:last] = np.minimum(import_w[first:last], round(window.import_limit_kw * 1000))
        if window.export_limit_kw is not None:
            export_w[first:last] = np.minimum(export_w[first:last], round(window.export_limit_kw * 1000))
    return SiteLimits(
        fuse_a=grid.fuse_a,
        phases=grid.phases,
        voltage_v=grid.voltage_v,
        import_limit_w=import_w,
        export_limit_w=export_w,
        peak_price_eur_per_kw=grid.peak_price_eur_per_kw,
        peak_so_far_w=round(grid.peak_so_far_kw * 1000),
        fuse_production_credit=fuse_production_credit,
        planning_share=planning_share,
    )


def site_limits(
    config: SiteConfig,
    start: datetime,
    n_ptus: int | None = None,
    extra_windows: Iterable[CongestionWindow] = (),
    *,
    planning_share: float = 1.0,
    fuse_production_credit: float = 1.0,
) -> SiteLimits:
    """SiteLimits for a site config from `start` (planner PTU length and horizon by default).

    `extra_windows` are congestion windows known at run time (e.g. added with
    `cem congestion add`) on top of those in the config.
    """
    n = config.planner.horizon_ptus if n_ptus is None else n_ptus
    windows = [*config.congestion, *extra_windows]
    return limits_from_grid(config.grid, windows, start, config.planner.ptu_minutes, n,
                            planning_share=planning_share,
                            fuse_production_credit=fuse_production_credit)


def horizon_end(start: datetime, ptu_minutes: int, n_ptus: int) -> datetime:
    """End of the horizon."""
    return start + timedelta(minutes=ptu_minutes * n_ptus)
