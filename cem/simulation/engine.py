"""Virtual-time physics of the site, the same for every level.

Each PTU a controller gives a setpoint (W) per plugged-in EV. The charger offers
min(setpoint, its EVSE's maximum); an offer below the minimum charging current (~6 A) gives
nothing. Minute by minute the EV takes min(offer, its taper limit at its SoC, what its battery
still takes): above `TAPER_FROM_SOC` % the limit falls linearly from the EVSE's maximum to
`TAPER_END_SHARE` of it at 100 % (`taper_w`), and the EV stops once its real need is in
(its final SoC: full). The battery and arrival SoC of each EV are `inputs.ev_battery`. The fuse
is checked per minute and per phase on the realised power (minus PV, spread over three phases);
GTV and peak per PTU on the 15-minute average. Nothing is clipped: a level that overloads the
fuse is recorded doing so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cem.simulation.inputs import SimInputs

MINUTES_TOLERANCE_A = 0.05  # a fuse minute counts above fuse_a + this (rounding noise)
TAPER_FROM_SOC = 80.0  # % SoC above which an EV takes less than its maximum
TAPER_END_SHARE = 0.15  # ... down to this share of the maximum at 100 %


def taper_w(max_w: np.ndarray | float, soc: np.ndarray | float) -> np.ndarray:
    """The most an EV takes at `soc` % from an EVSE that offers up to `max_w`."""
    above = np.clip((np.asarray(soc, dtype=float) - TAPER_FROM_SOC) / (100.0 - TAPER_FROM_SOC),
                    0.0, 1.0)
    return np.asarray(max_w, dtype=float) * (1.0 - (1.0 - TAPER_END_SHARE) * above)


def taper_hours(energy_wh: np.ndarray, soc: np.ndarray, battery_wh: np.ndarray,
                max_w: np.ndarray) -> np.ndarray:
    """Hours an EV at `soc` % needs for `energy_wh` more at its EVSE's maximum under the taper
    (full power up to `TAPER_FROM_SOC`, then the limit of `taper_w`, integrated exactly)."""
    k = (1.0 - TAPER_END_SHARE) / (100.0 - TAPER_FROM_SOC)  # share of max lost per SoC point
    wh_per_pct = battery_wh / 100.0
    end = np.minimum(soc + energy_wh / wh_per_pct, 100.0)
    bulk = np.clip(TAPER_FROM_SOC, soc, end) - soc
    s0 = np.maximum(soc, TAPER_FROM_SOC) - TAPER_FROM_SOC
    s1 = np.maximum(end, TAPER_FROM_SOC) - TAPER_FROM_SOC
    safe_w = np.maximum(max_w, 1.0)
    taper = wh_per_pct / (safe_w * k) * np.log((1.0 - k * s0) / (1.0 - k * s1))
    return np.asarray(bulk * wh_per_pct / safe_w + taper, dtype=float)


def reachable_wh(inputs: SimInputs) -> np.ndarray:
    """Per session: the most its EV can take in its stay, at its EVSE's maximum from arrival
    to departure, minute by minute under the taper (with `ev_taper`), up to its real need.

    No control delivers more, whatever it knows: with the optimum's plan (which has no taper)
    it bounds what perfect foresight could have given each session."""
    sessions = inputs.sessions
    need = np.array([s.real_need_wh for s in sessions], dtype=float)
    max_w = np.array([s.max_w for s in sessions], dtype=float)
    battery_wh = np.array([s.battery_wh for s in sessions], dtype=float)
    soc0 = np.array([s.arrival_soc for s in sessions], dtype=float)
    minutes = np.array([(s.departure_ptu - s.arrival_ptu) * inputs.ptu_minutes for s in sessions])
    delivered = np.zeros(len(sessions))
    for m in range(int(minutes.max(initial=0))):
        rate = max_w
        if inputs.ev_taper:
            rate = taper_w(max_w, soc0 + delivered / battery_wh * 100)
        step = np.minimum(rate / 60.0, np.maximum(need - delivered, 0.0))
        delivered += np.where(m < minutes, step, 0.0)
    return delivered


@dataclass
class SimState:
    """What the controllers may observe: measured energy so far, who is plugged in, who is full."""

    delivered_wh: np.ndarray  # per session, measured
    last_setpoint_w: np.ndarray
    last_energy_wh: np.ndarray
    seen_full: np.ndarray  # bool: stopped drawing while offered power (full)
    peak_so_far_w: int = 0


class Controller(Protocol):
    """One level of control: setpoints for PTU t from what is observable at its start."""

    name: str
    replan_s: list[float]
    notes: list[str]

    def setpoints(self, t: int, present: np.ndarray, state: SimState) -> np.ndarray:
        """W per session (only entries of `present` sessions are used)."""
        ...


@dataclass
class LevelRun:
    """The realised run of one level."""

    name: str
    ev_w: np.ndarray  # sessions x n_ptus, average W per PTU
    site_w: np.ndarray  # n_ptus, + import / - export (average W per PTU)
    ev_total_w: np.ndarray  # n_ptus
    fuse_minutes: np.ndarray  # n_ptus, minutes above the fuse on some phase
    max_phase_a: np.ndarray  # n_ptus, highest per-minute phase current
    delivered_wh: np.ndarray  # per session
    replan_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    # per session, what a plan made in advance meant to deliver (the optimum's plan, which has
    # no taper: in total an upper bound on what any control delivers under the taper)
    planned_wh: np.ndarray | None = None

    @property
    def achievable_wh(self) -> np.ndarray:
        """Per session: the planned energy where there is a plan, never below what came."""
        if self.planned_wh is None:
            return self.delivered_wh
        return np.maximum(self.planned_wh, self.delivered_wh)


def run_level(inputs: SimInputs, controller: Controller,
              progress: Callable[[int], None] | None = None) -> LevelRun:
    """Run a controller over the whole simulated span through the shared physics."""
    started = time.perf_counter()
    sessions = inputs.sessions
    n_s, n_t = len(sessions), inputs.n_ptus
    dt_h = inputs.dt_h
    minutes = inputs.ptu_minutes
    arrival = np.array([s.arrival_ptu for s in sessions])
    departure = np.array([s.departure_ptu for s in sessions])
    need = np.array([s.real_need_wh for s in sessions], dtype=float)
    max_w = np.array([s.max_w for s in sessions], dtype=float)
    min_w = np.array([s.evse.min_w for s in sessions], dtype=float)
    battery_wh = np.array([s.battery_wh for s in sessions], dtype=float)
    arrival_soc = np.array([s.arrival_soc for s in sessions], dtype=float)
    share = np.array([s.evse.phase_share for s in sessions], dtype=float).reshape(n_s, 3)
    voltage = inputs.config.grid.voltage_v
    fuse_a = inputs.config.grid.fuse_a

    state = SimState(delivered_wh=np.zeros(n_s), last_setpoint_w=np.zeros(n_s),
                     last_energy_wh=np.zeros(n_s), seen_full=np.zeros(n_s, dtype=bool))
    ev_w = np.zeros((n_s, n_t))
    site_w = np.zeros(n_t)
    fuse_minutes = np.zeros(n_t)
    max_phase_a = np.zeros(n_t)
    for t in range(n_t):
        present = (arrival <= t) & (t < departure)
        asked = np.zeros(n_s)
        if present.any():
            asked = np.asarray(controller.setpoints(t, present, state), dtype=float)
        power = np.where(present, np.minimum(np.maximum(asked, 0.0), max_w), 0.0)
        power = np.where(power + 1e-6 < min_w, 0.0, power)
        delivered = state.delivered_wh.copy()
        drawn = np.zeros((minutes, n_s))  # W per minute and session
        for m in range(minutes):
            rate = power
            if inputs.ev_taper:
                rate = np.minimum(power, taper_w(max_w, arrival_soc + delivered / battery_wh * 100))
            step = np.minimum(rate / 60.0, np.maximum(need - delivered, 0.0))
            drawn[m] = np.where(step > 1e-9, rate, 0.0)  # a minute that ends full counts whole
            delivered += step
        energy = delivered - state.delivered_wh
        phase_w = drawn @ share - inputs.pv_w[t] / 3.0  # minutes x 3
        phase_a = np.abs(phase_w) / voltage
        max_phase_a[t] = phase_a.max()
        fuse_minutes[t] = np.count_nonzero(phase_a.max(axis=1) > fuse_a + MINUTES_TOLERANCE_A)
        avg = energy / dt_h
        ev_w[:, t] = avg
        site_w[t] = avg.sum() - inputs.pv_w[t]
        state.seen_full |= present & (power > 0) & (need - delivered <= 0.5)
        state.delivered_wh += energy
        state.last_setpoint_w = np.where(present, power, 0.0)
        state.last_energy_wh = energy
        state.peak_so_far_w = max(state.peak_so_far_w, int(site_w[t]))
        if progress is not None:
            progress(1)
    close = getattr(controller, "close", None)
    if close is not None:
        close()  # level 5 stops the control loop's threads
    return LevelRun(name=controller.name, ev_w=ev_w, site_w=site_w, ev_total_w=ev_w.sum(axis=0),
                    fuse_minutes=fuse_minutes, max_phase_a=max_phase_a,
                    delivered_wh=state.delivered_wh.copy(), replan_s=list(controller.replan_s),
                    notes=list(controller.notes), wall_s=time.perf_counter() - started,
                    planned_wh=getattr(controller, "planned_wh", None))
