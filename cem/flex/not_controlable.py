"""NOT_CONTROLABLE (and any RM's forecast) -> FixedLoad: power the planner must live with.

Per PTU: the RM's PowerForecast (expected values, summed over the electric commodity
quantities) where it covers the PTU; elsewhere the last measurement held flat (the best guess
without a forecast). PTU 0 uses the measurement when there is one: it is what flows now.
"""

from __future__ import annotations

import numpy as np
from s2python.common import PowerForecast, PowerMeasurement

from cem.flex.ptu import PtuGrid, electric_total, is_electric, phase_share, sample_rate
from cem.planner.assets import FixedLoad, PhaseShare


def forecast_power_w(grid: PtuGrid, forecast: PowerForecast | None,
                     measurement: PowerMeasurement | None) -> tuple[np.ndarray, PhaseShare]:
    """Expected power per PTU (W, + consumption) and the phase share it lands on."""
    measured = electric_total(measurement.values) if measurement is not None else None
    power = np.full(grid.n_ptus, measured or 0.0)
    pairs: list[tuple[str, float]] = []
    if measurement is not None:
        pairs += [(v.commodity_quantity, v.value) for v in measurement.values
                  if is_electric(v.commodity_quantity)]
    if forecast is not None and forecast.elements:
        values = [electric_total(e.power_values, "value_expected") or 0.0 for e in forecast.elements]
        average, coverage = sample_rate(grid, forecast.start_time,
                                        [e.duration.root for e in forecast.elements], values)
        covered = coverage > 0.5
        power[covered] = average[covered]
        if not pairs:
            pairs += [(v.commodity_quantity, v.value_expected) for e in forecast.elements
                      for v in e.power_values if is_electric(v.commodity_quantity)]
    if measured is not None and grid.n_ptus:
        power[0] = measured
    return power, phase_share(pairs)


def fixed_load(rm_id: str, grid: PtuGrid, *, forecast: PowerForecast | None = None,
               measurement: PowerMeasurement | None = None) -> FixedLoad:
    """The RM's power as a FixedLoad (W per PTU, + consumption / - production)."""
    power, share = forecast_power_w(grid, forecast, measurement)
    return FixedLoad(id=rm_id, power_w=np.round(power).astype(np.int64), phase_share=share)
