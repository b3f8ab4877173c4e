"""`cem demo`: a whole simulated site in one process, on loopback, with the real protocols.

One process runs the real parts, each as it runs in production, only connected on 127.0.0.1:

- the CEM (`cem.app.service.CemService` with the MPC `SiteController`), S2 over websockets;
- the OCPP central system as S2 RMs (one per EVSE), with simulated OCPP 1.6J and 2.0.1 charge
  points (`resource_managers.ocpp_charger.simulator`) and EVs arriving as on a real day at the
  Caltech car park (bundled ACN-Data extract, moved to the site's local clock);
- the Modbus RMs of a battery, a heat pump, PV and the grid meter with their simulators
  (`resource_managers.modbus.site.SimulatedModbusSite`); the meter also counts the chargers.

Time runs `speed` times faster than the wall clock on one process clock (`sitekit.clock`, see
docs/adr/0001-demo-clock.md): the demo switches it to a `ScaledClock` that starts at 06:00 local
time on the day of the site's first congestion window. A `Recorder` samples the simulated
meter and devices (the ground truth, not what the CEM believes) for the live view
(`cem.app.demo_view`), the summary and the report (PNG plots + summary.md + summary.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from cem.app.site_file import SiteFile
from sitekit import clock

logger = logging.getLogger("cem.app.demo")

DEFAULT_SPEED = 1440.0  # a simulated day in one wall-clock minute
DAY_START = clock_time(6, 0)  # local time the simulated day starts
FALLBACK_DAY = date(2019, 10, 8)  # a Tuesday inside the bundled ACN and price extracts
ACN_FIRST, ACN_LAST = date(2019, 10, 1), date(2019, 10, 21)
BASE_LOAD_W = 3000.0
SOURCE_DEMO = Path(__file__).resolve().parents[2] / "specs" / "sites" / "demo.toml"
SAMPLE_WALL_S = 0.05
# how long the guard's cap holds (wall seconds; 24 simulated minutes at 1440x): an EV held back
# within it of a reading at a limit was held for that limit
GUARD_HOLD_WALL_S = 1.0
METER_WALL_S = 0.05  # grid meter: simulator tick and RM poll (wall seconds)



class DemoError(Exception):
    """A problem the user can fix (bad option, busy port); the message says what."""


# --- settings ------------------------------------------------------------------------------------


@dataclass
class DemoSettings:
    """What one demo run does: the simulated day, the speed, when to stop, where to report."""

    start: datetime  # UTC, PTU-aligned
    speed: float
    sim_seconds: float  # how much simulated time the run covers (for the report's axes)
    wall_seconds: float  # when the run stops on its own
    report: Path
    timezone: str

    @property
    def day(self) -> date:
        return self.start.astimezone(ZoneInfo(self.timezone)).date()

    @property
    def n_ptus(self) -> int:
        return max(1, math.ceil(self.sim_seconds / 900))


def with_demo_prices(site: SiteFile) -> SiteFile:
    """The demo plans on the bundled Dutch prices of its day when the site file names no feed."""
    if site.prices.source is None:
        from cem.data import PRICES_2019_10, bundled

        site.prices.csv = bundled(PRICES_2019_10)
    return site


def demo_day(site: SiteFile) -> date:
    """The day the demo replays: that of the first congestion window, else a bundled data day."""
    if site.congestion:
        first = min(site.congestion, key=lambda w: w.start)
        return first.start.astimezone(ZoneInfo(site.site.timezone)).date()
    return FALLBACK_DAY


def settings_for(site: SiteFile, *, duration: float | None, speed: float | None,
                 report: Path) -> DemoSettings:
    """Resolve the options: default speed 1440, default length one simulated day."""
    speed = DEFAULT_SPEED if speed is None else speed
    if not speed > 0 or not math.isfinite(speed):
        raise DemoError(f"--speed {speed:g}: use a number above 0 (1440 runs a day in a minute)")
    if duration is not None and not duration > 0:
        raise DemoError(f"--duration {duration:g}: use a number of seconds above 0")
    zone = ZoneInfo(site.site.timezone)
    start = datetime.combine(demo_day(site), DAY_START, tzinfo=zone).astimezone(UTC)
    wall = duration if duration is not None else 86400.0 / speed
    return DemoSettings(start=start, speed=speed, sim_seconds=wall * speed, wall_seconds=wall,
                        report=report, timezone=site.site.timezone)


# --- EV visits -----------------------------------------------------------------------------------


@dataclass
class Visit:
    """One EV visit of the day (from ACN-Data), on the site's clock."""

    id_tag: str
    arrival: datetime
    departure: datetime
    energy_kwh: float
    source: str


@dataclass
class VisitOutcome:
    """What happened to a visit: where it charged and how much it got."""

    visit: Visit
    where: str = ""  # "CP/EVSE", or "" when every EVSE was busy
    version: str = ""
    need_kwh: float | None = None  # what the CEM was told (EV's request, or site defaults)
    cem_departure: datetime | None = None  # the departure the CEM plans for
    room_kwh: float = 0.0  # what the battery could take
    feasible_kwh: float = 0.0  # what the EVSE could deliver at full power in the stay
    delivered_kwh: float = 0.0
    offered_kwh: float = 0.0  # what the charger allowed in the stay (its current limits)
    refused_kwh: float = 0.0  # of that, what the EV did not take (taper, battery full)
    held_kwh: float = 0.0  # after the first offer: what full current would have added
    held_at_limit_kwh: float = 0.0  # of that, while the site ran at its limits (see Recorder)
    held_by_ptu: dict[int, float] = field(default_factory=dict)  # kWh per PTU of the day
    # of that, kWh per PTU held within the guard's hold of a reading at 85 % of a limit
    held_near_limit_by_ptu: dict[int, float] = field(default_factory=dict)
    waited_s: float | None = None  # simulated seconds from plug-in to the first offer
    left: bool = False

    @property
    def target_kwh(self) -> float:
        """The energy that counts as met: the need, capped by battery room and full power."""
        need = self.need_kwh if self.need_kwh is not None else self.visit.energy_kwh
        return min(need, self.room_kwh, self.feasible_kwh)

    @property
    def met(self) -> bool:
        return self.delivered_kwh >= self.target_kwh * 0.98 - 0.05

    @property
    def left_early(self) -> bool:
        """The EV left before the departure the CEM planned for (an OCPP 1.6 EV does not say
        when it leaves: the CEM assumes the site's default dwell time)."""
        return self.cem_departure is not None and \
            self.visit.departure < self.cem_departure - timedelta(minutes=1)

    @property
    def ev_limited(self) -> bool:
        """Missed, but the charger offered enough: had the EV taken all it was offered, the
        target would have been met. The EV itself held back (its charger tapers near a full
        battery, or the battery was full), not the CEM."""
        return not self.met and self.delivered_kwh + self.refused_kwh >= self._met_at

    @property
    def stay_limited(self) -> bool:
        """Missed a need that full power for the whole stay could not give, although the
        charger offered full current from its first instruction to the departure, except
        while the site ran at its limits: what was lost is the wait for that first
        instruction (`waited_s`) and what the limits did not leave."""
        need = self.need_kwh if self.need_kwh is not None else self.visit.energy_kwh
        return (not self.met and min(need, self.room_kwh) > self.feasible_kwh
                and self.held_kwh - self.held_at_limit_kwh <= 0.02 * self.feasible_kwh + 0.05)

    @property
    def site_limited(self) -> bool:
        """Missed, but by less than the site's limits held it back (`held_at_limit_kwh`: in
        PTUs at 85 % of a limit, or under the guard's cap after a reading at one), and held
        back hardly at all otherwise: the fuse, the GTV or a congestion window left too
        little, with other EVs to share it."""
        return (not self.met and self.held_at_limit_kwh >= 0.01
                and self.delivered_kwh + self.held_at_limit_kwh >= self._met_at
                and self.held_kwh - self.held_at_limit_kwh <= 0.02 * self.target_kwh + 0.05)

    @property
    def _met_at(self) -> float:
        return self.target_kwh * 0.98 - 0.05

    @property
    def outcome(self) -> str:
        """Why the visit ended as it did: met; left-early (before the departure the CEM
        knew); ev-limited (the EV took less than offered); stay-limited (the need was more
        than full power for the stay gives, and full power was offered); site-limited (the
        site's limits held it back by more than it lacked); missed (the CEM)."""
        if self.met:
            return "met"
        if self.left_early:
            return "left-early"
        if self.ev_limited:
            return "ev-limited"
        if self.stay_limited:
            return "stay-limited"
        if self.site_limited:
            return "site-limited"
        return "missed"

    def reason(self, speed: float) -> str:
        """The outcome in plain words, with the figures it rests on."""
        wait = ""
        if self.waited_s is not None:
            wait = (f"first charging instruction {self.waited_s / 60:.0f} min after plug-in "
                    f"({self.waited_s / speed:.2f} s of wall time)")
        kind = self.outcome
        if kind == "met":
            return ""
        if kind == "left-early":
            return "left before the departure the CEM planned for (OCPP 1.6 EVs do not say)"
        if kind == "ev-limited":
            return (f"the EV took {self.delivered_kwh:.2f} of the {self.offered_kwh:.2f} kWh "
                    "offered (it tapers above 80 % SoC)")
        if kind == "stay-limited":
            limits = ""
            if self.held_at_limit_kwh >= 0.01:
                limits = (f", except {self.held_at_limit_kwh:.2f} kWh while the site ran at its "
                          "limits")
            return (f"full power for the whole stay gives {self.feasible_kwh:.2f} kWh, less "
                    f"than the need; full current was offered from the {wait}{limits}")
        if kind == "site-limited":
            return (f"the site's limits held it {self.held_at_limit_kwh:.2f} kWh below full "
                    f"current (a PTU at 85 % of its fuse or import limit, or under the guard's "
                    f"cap), more than the {self._met_at - self.delivered_kwh:.2f} kWh it "
                    f"lacked; {self.held_kwh - self.held_at_limit_kwh:.2f} kWh held otherwise, "
                    f"after the {wait or 'first instruction'}")
        return (f"offered {self.offered_kwh:.2f} kWh, {self.held_kwh:.2f} kWh below full "
                f"current after the {wait or 'first instruction'}; "
                f"{self.held_at_limit_kwh:.2f} kWh of that while the site ran at 85 % or more "
                "of its fuse or import limit (a PTU's average, or a reading the guard acted on)")


def demo_visits(settings: DemoSettings) -> list[Visit]:
    """The day's EV visits at the Caltech car park, on the same local clock times at the site."""
    from cem.site.sessions import bundled_acn_sessions, on_local_clock

    acn_zone = ZoneInfo("America/Los_Angeles")
    day = settings.day
    source_day = day if ACN_FIRST <= day <= ACN_LAST else FALLBACK_DAY
    sessions = [s for s in bundled_acn_sessions("caltech")
                if s.arrival.astimezone(acn_zone).date() == source_day]
    moved = on_local_clock(sessions, day, settings.timezone)
    end = settings.start + timedelta(seconds=settings.sim_seconds)
    visits = [Visit(id_tag=f"ACN-{i + 1:03d}", arrival=s.arrival, departure=s.departure,
                    energy_kwh=round(s.energy_kwh, 2), source=s.session_id)
              for i, s in enumerate(sorted(moved, key=lambda s: s.arrival))
              if settings.start <= s.arrival < end and s.energy_kwh > 0]
    return visits


# --- sampling the simulated site ----------------------------------------------------------------


@dataclass
class Sample:
    """The simulated site at one moment (W, + consumption)."""

    at: datetime
    phase_w: tuple[float, float, float]
    devices_w: dict[str, float]
    evse_w: dict[str, float]
    soc_pct: float | None
    buffer_c: float | None


@dataclass
class Recorder:
    """Samples the simulators (ground truth) and keeps per-PTU energy, peaks and prices."""

    settings: DemoSettings
    import_price: np.ndarray  # EUR/kWh per PTU
    export_price: np.ndarray
    import_limit_w: np.ndarray  # GTV or congestion limit per PTU
    fuse_a: float
    voltage_v: float
    samples: list[Sample] = field(default_factory=list)
    energy_wh: dict[str, np.ndarray] = field(default_factory=dict)  # series -> Wh per PTU
    import_wh: np.ndarray = field(init=False)  # Wh per PTU
    export_wh: np.ndarray = field(init=False)
    covered_s: np.ndarray = field(init=False)  # simulated seconds of each PTU sampled
    max_phase_a: np.ndarray = field(init=False)
    over_fuse_s: float = 0.0  # simulated seconds with a phase above the fuse
    worst: Sample | None = None  # the sample with the highest phase current
    _last: datetime | None = None

    def __post_init__(self) -> None:
        n = self.settings.n_ptus
        self.import_wh = np.zeros(n)
        self.export_wh = np.zeros(n)
        self.covered_s = np.zeros(n)
        self.max_phase_a = np.zeros(n)

    def ptu_of(self, moment: datetime) -> int:
        return int((moment - self.settings.start).total_seconds() // 900)

    def add(self, sample: Sample) -> None:
        previous, self._last = self._last, sample.at
        self.samples.append(sample)
        t = self.ptu_of(sample.at)
        amps = max(abs(p) for p in sample.phase_w) / self.voltage_v
        if 0 <= t < self.settings.n_ptus:
            if self.worst is None or \
                    amps > max(abs(p) for p in self.worst.phase_w) / self.voltage_v:
                self.worst = sample
            self.max_phase_a[t] = max(self.max_phase_a[t], amps)
        if previous is None or sample.at <= previous:
            return
        if amps > self.fuse_a + 1e-6:
            self.over_fuse_s += (sample.at - previous).total_seconds()
        grid = sum(sample.phase_w)
        # the sample stands for the interval since the previous one; an interval across a
        # PTU boundary counts in both PTUs, each its part (the settled 15-minute averages)
        begin = previous
        while begin < sample.at:
            p = self.ptu_of(begin)
            end = min(sample.at, self.settings.start + timedelta(seconds=900 * (p + 1)))
            dt = (end - begin).total_seconds()
            begin = end
            if not 0 <= p < self.settings.n_ptus:
                continue
            self.covered_s[p] += dt
            if grid >= 0:
                self.import_wh[p] += grid * dt / 3600
            else:
                self.export_wh[p] += -grid * dt / 3600
            for name, watts in {"grid": grid, **sample.devices_w}.items():
                series = self.energy_wh.setdefault(name, np.zeros(self.settings.n_ptus))
                series[p] += watts * dt / 3600

    # --- figures --------------------------------------------------------------------------

    def at_limit(self, t: int, share: float = 0.85) -> bool:
        """Whether the site ran at `share` of a limit in PTU t: its 15-minute average import
        near the GTV or congestion limit, or a phase near the fuse."""
        if not 0 <= t < self.settings.n_ptus or self.covered_s[t] <= 0:
            return False
        mean_w = (self.import_wh[t] - self.export_wh[t]) * 3600 / self.covered_s[t]
        return bool(mean_w >= share * self.import_limit_w[t]
                    or self.max_phase_a[t] >= share * self.fuse_a)

    def at_limit_now(self, sample: Sample, share: float = 0.85) -> bool:
        """Whether one reading is at `share` of a limit: the import near the limit of its PTU
        or a phase near the fuse (what the guard acts on, before any average)."""
        t = self.ptu_of(sample.at)
        if not 0 <= t < self.settings.n_ptus:
            return False
        amps = max(abs(w) for w in sample.phase_w) / self.voltage_v
        return bool(sum(sample.phase_w) >= share * self.import_limit_w[t]
                    or amps >= share * self.fuse_a)

    def complete_ptus(self) -> int:
        """PTUs fully covered by samples (the last one may be cut off)."""
        full = np.nonzero(self.covered_s >= 900 * 0.9)[0]
        return int(full[-1]) + 1 if len(full) else 0

    def average_kw(self, name: str) -> np.ndarray:
        """Mean power per PTU (kW) of a series over the covered part of each PTU."""
        wh = self.energy_wh.get(name, np.zeros(self.settings.n_ptus))
        covered = np.maximum(self.covered_s, 1e-9)
        return np.where(self.covered_s > 0, wh * 3.6 / covered, np.nan)

    def totals(self) -> dict[str, float]:
        """Energy, cost, peak and how close the site came to its limits."""
        imp = self.import_wh / 1000
        exp = self.export_wh / 1000
        cost = float(np.sum(imp * self.import_price) - np.sum(exp * self.export_price))
        n_full = self.complete_ptus()
        mean_kw = np.where(self.covered_s > 0, (self.import_wh - self.export_wh) * 3.6
                           / np.maximum(self.covered_s, 1e-9), 0.0)
        full = mean_kw[:n_full] if n_full else mean_kw[:0]
        limits = self.import_limit_w[:n_full] / 1000
        over = [i for i in range(len(full)) if full[i] > limits[i] + 1e-6]
        peak_ptu = int(np.argmax(full)) if len(full) else -1
        headroom = [limits[i] - full[i] for i in range(len(full))]
        return {
            "import_kwh": float(np.sum(imp)),
            "export_kwh": float(np.sum(exp)),
            "cost_eur": cost,
            "peak_kw": float(full[peak_ptu]) if peak_ptu >= 0 else 0.0,
            "peak_limit_kw": float(limits[peak_ptu]) if peak_ptu >= 0 else 0.0,
            "min_headroom_kw": float(min(headroom)) if headroom else 0.0,
            "ptus_over_limit": float(len(over)),
            "max_phase_a": float(np.max(self.max_phase_a)) if self.samples else 0.0,
            "over_fuse_minutes": self.over_fuse_s / 60,
            "fuse_a": self.fuse_a,
            "ptus": float(n_full),
        }


# --- the run ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def process_clock(settings: DemoSettings) -> Iterator[clock.ScaledClock]:
    """Switch the process to the demo's simulated clock."""
    scaled = clock.ScaledClock(settings.start, settings.speed)
    previous = clock.use(scaled)
    try:
        yield scaled
    finally:
        clock.use(previous)


class DemoSite:
    """Every part of the demo, started and stopped in order."""

    def __init__(self, site: SiteFile, settings: DemoSettings) -> None:
        self.site = site
        self.settings = settings
        self.service: Any = None
        self.csms: Any = None
        self.stations: list[Any] = []
        self.modbus: Any = None
        self.visits = demo_visits(settings)
        self.outcomes: list[VisitOutcome] = []
        self.recorder = self._recorder()
        self.stop_event = asyncio.Event()
        self.stopped_by: str = ""
        self.max_rms = 0  # RMs connected at once, at most
        self.started_wall = time.monotonic()
        self._tasks: list[asyncio.Task[Any]] = []
        self._congestion_key: tuple[Any, ...] = ()
        self._limit_seen_wall = -math.inf  # when a reading was last at a limit (wall clock)

    def _recorder(self) -> Recorder:
        from cem.flex.limits import site_limits
        from cem.flex.prices import ptu_prices
        from sitekit.prices import CsvPriceSource

        cfg = self.site
        n = self.settings.n_ptus
        source = CsvPriceSource(cfg.prices.csv) if cfg.prices.csv is not None else None
        prices = ptu_prices(source, cfg.prices, self.settings.start, 15, n, fill="previous").prices
        limits = site_limits(cfg, self.settings.start, n)
        return Recorder(self.settings, np.asarray(prices.import_eur_per_kwh, dtype=float),
                        np.asarray(prices.export_eur_per_kwh, dtype=float),
                        np.asarray(limits.import_limit_w, dtype=float), cfg.grid.fuse_a,
                        cfg.grid.voltage_v)

    # --- parts ------------------------------------------------------------------------------

    @property
    def controller(self) -> Any:
        return self.service.controller if self.service is not None else None

    def charger_phase_w(self) -> tuple[float, float, float]:
        """All EV chargers together, per phase (W): an extra load on the grid meter."""
        total = [0.0, 0.0, 0.0]
        for station in self.stations:
            for evse in station.evses.values():
                for i, watts in enumerate(evse.power_per_phase()):
                    total[i] += watts
        return (total[0], total[1], total[2])

    async def start(self) -> None:
        from cem.app.service import CemService, ServiceError
        from cem.control.mpc import SiteController
        from resource_managers.modbus.simulator import load_pv_profile
        from resource_managers.modbus.site import SimulatedModbusSite
        from resource_managers.ocpp_charger.csms import OcppCentralSystem
        from resource_managers.ocpp_charger.simulator import stations_for_site

        cfg = self.site
        speed = self.settings.speed

        def controller(service: Any) -> SiteController:
            from cem.signals import configured_sources

            signals = configured_sources(service.config, service.store, clock=clock.now,
                                         congestion_poll_s=2.0)
            site_controller = SiteController(service.config, service.server, service.store,
                                             signals=signals, clock=clock.now,
                                             guard_hold_s=GUARD_HOLD_WALL_S)
            return site_controller

        self.service = CemService(cfg, controller_factory=controller)
        try:
            await self.service.start()
        except ServiceError as exc:
            raise DemoError(str(exc)) from None
        url = self.service.server.url
        logger.info("demo: CEM on %s, simulated day %s from %s local, speed %gx", url,
                    self.settings.day, DAY_START.strftime("%H:%M"), speed)

        self.csms = OcppCentralSystem(cfg.ocpp_rm(), url, port=0 if cfg.ocpp.port == 0 else None)
        try:
            await self.csms.start()
        except OSError as exc:
            raise DemoError(f"cannot start the OCPP central system on {cfg.ocpp.host}:"
                            f"{cfg.ocpp.port}: {exc.strerror or exc}") from None
        ocpp_url = f"ws://{cfg.ocpp.host}:{self.csms.port}"
        # meter values about 5 times per wall second at most, at least every 5 simulated minutes
        meter_s = min(300.0, max(30.0, speed * 0.2))
        self.stations = stations_for_site(cfg.ocpp.charge_points, ocpp_url, speed=speed, meter_interval_s=meter_s)

        times, _ = load_pv_profile()
        local = self.settings.start
        pv_start = times[0] + timedelta(hours=local.hour, minutes=local.minute)
        self.modbus = SimulatedModbusSite.from_config(
            cfg.modbus, cem_url=url, speed=speed, base_load_w=BASE_LOAD_W, pv_start=pv_start,
            extra_loads=[self.charger_phase_w],
            rm_options={"time_scale": 1.0, "poll_interval_s": 0.25})
        try:
            await self.modbus.start()
        except OSError as exc:
            raise DemoError(f"cannot start the simulated Modbus devices: "
                            f"{exc.strerror or exc}") from None
        for device in self.modbus.devices:
            if device.plan.device == "meter":
                # the guard acts on every grid meter reading: at 1440x a 0.25 s poll is six
                # simulated minutes between readings, so the meter sums the site and is read
                # every METER_WALL_S (72 simulated seconds), as a real meter's 1-5 s would be
                device.simulator.tick_s = METER_WALL_S
                device.rm.poll_interval_s = METER_WALL_S
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._fleet(), name="demo-fleet"),
                       loop.create_task(self._sample(), name="demo-sampler")]

    async def stop(self) -> None:
        """Chargers and EVs first, then the CEM (it closes every S2 session with the reason),
        then the RMs and the simulated devices."""
        self.stop_event.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 10)
        if self.service is not None:
            reason = f"demo ended: {self.stopped_by or 'stopped'}"
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.service.stop(reason), 15)
        if self.csms is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.csms.stop(), 10)
        if self.modbus is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.modbus.stop(), 10)

    # --- EVs ----------------------------------------------------------------------------------

    def _free_evse(self, start_index: int) -> tuple[Any, Any] | None:
        order = self.stations[start_index:] + self.stations[:start_index]
        for station in order:
            if not station.booted.is_set():
                continue
            for evse in station.evses.values():
                if evse.ev is None:
                    return station, evse
        return None

    async def _wait(self, sim_seconds: float) -> bool:
        """Wait simulated seconds; False when the demo stops meanwhile."""
        if sim_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), clock.to_wall(sim_seconds))
        return not self.stop_event.is_set()

    async def _fleet(self) -> None:
        from resource_managers.ocpp_charger.simulator import Arrival, ev_for, keep_connected

        links = [asyncio.ensure_future(keep_connected(s, self.stop_event)) for s in self.stations]
        leaving: list[asyncio.Task[None]] = []
        try:
            for index, visit in enumerate(self.visits):
                if not await self._wait((visit.arrival - clock.now()).total_seconds()):
                    break
                free = self._free_evse(index % max(1, len(self.stations)))
                outcome = VisitOutcome(visit)
                self.outcomes.append(outcome)
                if free is None:
                    logger.info("demo: EV %s arrives, every EVSE is busy: it drives on",
                                visit.id_tag)
                    outcome.left = True
                    continue
                station, evse = free
                dwell = (visit.departure - visit.arrival).total_seconds()
                ev = ev_for(Arrival(0.0, dwell, visit.energy_kwh, "", visit.id_tag), index)
                outcome.where = f"{station.cp_id}/{evse.evse_id}"
                outcome.version = station.version
                outcome.room_kwh = ev.capacity_kwh * (100 - ev.soc) / 100
                phases = min(ev.phases, evse.phases)
                amps = min(ev.max_current_a, evse.max_current_a)
                outcome.feasible_kwh = amps * 230 * phases * dwell / 3600 / 1000
                try:
                    ok = await station.plug_in(evse.evse_id, ev, visit.id_tag, dwell_s=dwell,
                                               energy_kwh=visit.energy_kwh)
                except Exception as exc:  # a charger mid-reconnect: the EV drives on
                    logger.warning("demo: EV %s could not start on %s: %r", visit.id_tag,
                                   outcome.where, exc)
                    ok = False
                if not ok:
                    outcome.where, outcome.left = "", True
                    with contextlib.suppress(Exception):
                        await station.unplug(evse.evse_id)
                    continue
                leaving.append(asyncio.ensure_future(self._leave(station, evse, dwell, outcome)))
            await self.stop_event.wait()
        finally:
            for task in [*leaving, *links]:
                task.cancel()
            await asyncio.gather(*leaving, *links, return_exceptions=True)
            for station in self.stations:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(station.close(), 5)

    def session_of(self, station: Any, evse: Any) -> Any:
        if self.csms is None:
            return None
        state = self.csms.evses.get((station.cp_id, evse.evse_id))
        return state.session if state is not None else None

    def _note_progress(self, station: Any, evse: Any, outcome: VisitOutcome) -> None:
        outcome.delivered_kwh = max(0.0, evse.meter_wh - evse.meter_start_wh) / 1000
        outcome.offered_kwh = evse.offered_wh / 1000
        outcome.refused_kwh = evse.refused_wh / 1000
        outcome.held_kwh = evse.held_wh / 1000
        if evse.plugged_at is not None and evse.first_offer_at is not None:
            outcome.waited_s = (evse.first_offer_at - evse.plugged_at).total_seconds()
        session = self.session_of(station, evse)
        if session is not None:
            outcome.need_kwh = session.energy_need_wh / 1000
            outcome.cem_departure = session.departure

    async def _leave(self, station: Any, evse: Any, dwell_s: float, outcome: VisitOutcome) -> None:
        """Unplug the EV at the visit's departure on the process clock. Each wait is measured
        from the clock, not added up: a loop that wakes late (a busy machine, 24 simulated
        minutes a wall second) would otherwise keep the EV past its departure."""
        leave_at = outcome.visit.arrival + timedelta(seconds=dwell_s)
        # note progress while it charges (the view shows it)
        while (left_s := (leave_at - clock.now()).total_seconds()) > 0:
            if not await self._wait(min(900.0, left_s)):
                self._note_progress(station, evse, outcome)
                return
            self._note_progress(station, evse, outcome)
        self._note_progress(station, evse, outcome)
        await station.booted.wait()
        try:
            await station.unplug(evse.evse_id)
        except Exception as exc:
            logger.warning("demo: %s/%d: the EV left but the stop failed: %r", station.cp_id,
                           evse.evse_id, exc)
        # the energy up to the moment it left (unplugging runs the physics up to it)
        outcome.delivered_kwh = max(0.0, evse.meter_wh - evse.meter_start_wh) / 1000
        outcome.offered_kwh, outcome.refused_kwh = evse.offered_wh / 1000, evse.refused_wh / 1000
        outcome.held_kwh = evse.held_wh / 1000
        outcome.left = True

    # --- sampling --------------------------------------------------------------------------------

    def sample(self) -> Sample:
        meter = self.modbus.meter if self.modbus is not None else None
        devices: dict[str, float] = {}
        soc = buffer = None
        if self.modbus is not None:
            for device in self.modbus.devices:
                sim = device.simulator
                if device.plan.device == "meter":
                    continue
                devices[device.plan.name] = float(sim.power_w)
                if device.plan.device == "battery":
                    soc = float(getattr(sim, "soc_pct", 0.0))
                if device.plan.device == "heat-pump":
                    buffer = float(getattr(sim, "buffer_c", 0.0))
        evse_w = {f"{s.cp_id}/{e.evse_id}": float(e.power_w)
                  for s in self.stations for e in s.evses.values()}
        devices["EV chargers"] = sum(evse_w.values())
        devices["base load"] = BASE_LOAD_W
        phases = tuple(meter.phase_w) if meter is not None else self.charger_phase_w()
        return Sample(clock.now(), (float(phases[0]), float(phases[1]), float(phases[2])),
                      devices, evse_w, soc, buffer)

    def _follow_congestion(self) -> None:
        """Windows added while the demo runs (`cem congestion add --db <report>/cem-demo.db`)
        count in the limits the report checks, as they do for the CEM."""
        from cem.flex.limits import site_limits

        rows = list(getattr(self.controller, "congestion", None) or [])
        key = tuple((r.source, r.ref, r.start, r.end, r.import_limit_kw) for r in rows)
        if key == self._congestion_key:
            return
        self._congestion_key = key
        limits = site_limits(self.site, self.settings.start, self.settings.n_ptus, rows)
        self.recorder.import_limit_w = np.asarray(limits.import_limit_w, dtype=float)

    def _note_held(self) -> None:
        """Book what each plugged-in EV was held below full current in the PTU it was, and
        apart what it was held within the guard's hold of a reading at a limit (the guard's
        cap lasts until the next plan; the PTU's average may stay below the limit)."""
        t = self.recorder.ptu_of(clock.now())
        samples = self.recorder.samples
        if samples and self.recorder.at_limit_now(samples[-1]):
            self._limit_seen_wall = time.monotonic()
        near_limit = time.monotonic() - self._limit_seen_wall <= GUARD_HOLD_WALL_S
        for outcome, _station, _evse in self.live_visits():
            seen = sum(outcome.held_by_ptu.values())
            if outcome.held_kwh > seen:
                more = outcome.held_kwh - seen
                outcome.held_by_ptu[t] = outcome.held_by_ptu.get(t, 0.0) + more
                if near_limit:
                    near = outcome.held_near_limit_by_ptu
                    near[t] = near.get(t, 0.0) + more

    def judge_visits(self) -> None:
        """After the run: how much of what each EV was held back was for the limits: all of it
        in PTUs at a limit, and in the others what came within the guard's hold of a reading
        at one."""
        for outcome in self.outcomes:
            outcome.held_at_limit_kwh = sum(
                kwh if self.recorder.at_limit(t) else outcome.held_near_limit_by_ptu.get(t, 0.0)
                for t, kwh in outcome.held_by_ptu.items())

    async def _sample(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._follow_congestion()
                self.recorder.add(self.sample())
                self._note_held()
            except Exception:
                logger.exception("demo: sampling the site failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), SAMPLE_WALL_S)

    # --- what the view needs ------------------------------------------------------------------

    def rm_rows(self) -> list[tuple[str, str]]:
        """(name, control type) of every RM connected to the CEM."""
        server = self.service.server if self.service is not None else None
        if server is None:
            return []
        rows = []
        for entry in server.rms().values():
            control = entry.control_type or getattr(entry.session.state, "control_type", None)
            control = getattr(control, "value", control) or "-"
            rows.append((entry.name or entry.rm_id or "?", str(control)))
        return sorted(rows)

    def live_visits(self) -> list[tuple[VisitOutcome, Any, Any]]:
        """Visits plugged in now, with their station and EVSE."""
        out = []
        for outcome in self.outcomes:
            if outcome.left or not outcome.where:
                continue
            cp_id, evse_id = outcome.where.split("/")
            station = next((s for s in self.stations if s.cp_id == cp_id), None)
            if station is None:
                continue
            evse = station.evses[int(evse_id)]
            self._note_progress(station, evse, outcome)
            out.append((outcome, station, evse))
        return out


# --- entry point ---------------------------------------------------------------------------------


def _configure_logging(report: Path) -> Path:
    log_file = report / "demo.log"
    handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for noisy in ("websockets", "ocpp", "s2python", "aiosqlite", "pymodbus", "matplotlib",
                  "cem.s2.websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return log_file


def _prepare_report(report: Path) -> None:
    try:
        report.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoError(f"cannot create the report folder {report}: {exc.strerror or exc}") from None
    for name in ("cem-demo.db", "ocpp-demo.db"):
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (report / f"{name}{suffix}").unlink()


async def run_demo(site: SiteFile, settings: DemoSettings,
                   on_tick: Callable[[DemoSite], None] | None = None,
                   tick_wall_s: float = 0.25) -> DemoSite:
    """Run the whole site until the time is up or SIGINT/SIGTERM; returns it for the summary."""
    demo = DemoSite(site, settings)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(name: str) -> None:
        if not demo.stopped_by:
            demo.stopped_by = f"{name} received"
        demo.stop_event.set()

    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await demo.start()
        deadline = demo.started_wall + settings.wall_seconds
        while not demo.stop_event.is_set():
            demo.max_rms = max(demo.max_rms, len(demo.rm_rows()))
            if on_tick is not None:
                on_tick(demo)
            left = deadline - time.monotonic()
            if left <= 0:
                demo.stopped_by = f"{settings.wall_seconds:g} s of wall time are up"
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(demo.stop_event.wait(), min(tick_wall_s, left))
    finally:
        await demo.stop()
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    return demo
