"""Virtual-time physics of the site, the same for every level.

Each PTU a controller gives a setpoint (W) per plugged-in EV. The EV takes
min(setpoint, its EVSE's maximum, what its real battery still takes): a setpoint below the EV's
minimum charging current gives nothing (an EV does not charge below ~6 A). It charges at that
power from the start of the PTU until it is full, so a PTU's energy is
min(power * 15 min, remaining need). The fuse is checked per minute and per phase on that
realised power (minus PV, spread over three phases); GTV and peak per PTU on the 15-minute
average. Nothing is clipped: a level that overloads the fuse is recorded doing so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cem.simulation.inputs import SimInputs

MINUTES_TOLERANCE_A = 0.05  # a fuse minute counts above fuse_a + this (rounding noise)


@dataclass
class SimState:
    """What the controllers may observe: measured energy so far, who is plugged in, who is full."""

    delivered_wh: np.ndarray  # per session, measured
    last_setpoint_w: np.ndarray
    last_energy_wh: np.ndarray
    seen_full: np.ndarray  # bool: took clearly less than its setpoint (the EV stopped: full)
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
    share = np.array([s.evse.phase_share for s in sessions], dtype=float).reshape(n_s, 3)
    voltage = inputs.config.grid.voltage_v
    fuse_a = inputs.config.grid.fuse_a
    minute_index = np.arange(minutes, dtype=float)[:, None]

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
        remaining = np.maximum(need - state.delivered_wh, 0.0)
        energy = np.minimum(power * dt_h, remaining)
        on_minutes = np.divide(energy, power / 60.0, out=np.zeros(n_s), where=power > 0)
        on = minute_index < np.ceil(on_minutes - 1e-9)[None, :]  # minutes x sessions
        phase_w = (on * power[None, :]) @ share - inputs.pv_w[t] / 3.0  # minutes x 3
        phase_a = np.abs(phase_w) / voltage
        max_phase_a[t] = phase_a.max()
        fuse_minutes[t] = np.count_nonzero(phase_a.max(axis=1) > fuse_a + MINUTES_TOLERANCE_A)
        avg = energy / dt_h
        ev_w[:, t] = avg
        site_w[t] = avg.sum() - inputs.pv_w[t]
        state.seen_full |= present & (power > 0) & (energy < 0.9 * power * dt_h)
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
                    notes=list(controller.notes), wall_s=time.perf_counter() - started)
