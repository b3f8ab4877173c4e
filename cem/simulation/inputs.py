"""Everything a simulation run needs, on one PTU grid: EVSEs, sessions, prices, PV, site limits.

Time. The simulated site lives in its config's timezone (`site.timezone`). ACN sessions keep
their local wall-clock times (arrive 08:12, leave 17:40) and are placed on the same calendar
date in the site's zone (`cem.site.sessions.on_local_clock`): a workplace car park has the same
daily pattern wherever it is. `--start` is a local date of the site; the run covers `--days`
local days from its midnight, plus a tail until the last EV that arrived inside them has left.

Prices and PV are looked up by local date and local time of day. A day the file covers is used
as it is (2019 sessions with the 2015-2023 price file take the 2019 prices of the same dates);
a day it does not cover takes the same month and day of the nearest year the file has (29
February falls back to 28 February), so a 2019 session week with 2023 prices runs on the 2023
prices of the same days of the year. The report lists the mapping used.

Sessions are snapped to the PTU grid (arrival and departure rounded to the nearest PTU boundary,
at least one PTU plugged in), the same for every level, so the levels differ only in control.

What the planner may know of a session (as a real CEM would learn it at plug-in) and what is
true, separately:

- believed energy: the driver's `requested_energy` if the session is `claimed` (entered in the
  app), else the site's `ev_defaults.energy_kwh`;
- believed departure: `estimated_departure` if it is after arrival, else arrival +
  `ev_defaults.dwell_hours` (or `ev_defaults.departure` local time if set);
- real need (what the EV's battery takes, the physics cap): `requested_energy` if claimed (the
  driver's stated need), else `delivered_energy` (what the car took at ACN: no driver input);
- real departure: `departure`.

The EV behind each session (ACN has no battery size or SoC): `ev_battery` gives it a battery of
60 kWh (larger if its need does not fit) and an arrival SoC such that its real need fills it
to a final SoC drawn per session uniformly in 80-100 % (its own charge limit); the physics
tapers its power above 80 % SoC and it stops at that final SoC. A share `ocpp16_share` of the
sessions (seeded per session id, default 0.3) charge behind an OCPP 1.6 charger: neither SoC
nor departure nor energy need reaches the CEM, which is told the site's `ev_defaults`
(`believed_departure(..., ocpp16=True)`, `ev_defaults.energy_kwh`) and learns the rest. Every
draw is `session_draw`: the crc32 of the session id, the same in every run and for every level.
There is no base load: the ACN garages' data is the EV sessions alone.

EVSEs come from `[[ocpp.charge_points]]` of the site config: `id` is the ACN `station_id`,
`max_current_a`, `phases` and `phase` give the EV's power (the EVSE limits the EV; ACN has no
per-car maximum). A session of a station not in the config, or whose station is busy, goes to a
free EVSE; a session finding no free EVSE is left out and counted in the notes.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TypeVar
from zoneinfo import ZoneInfo

import numpy as np

from cem.flex.limits import limits_from_grid
from cem.flex.prices import tariff_prices
from cem.site.config import SiteConfig
from cem.site.departures import Visit
from cem.site.forecast import ForecastError, load_pv_per_kwp
from cem.site.sessions import Session, SessionFileError, load_acn_sessions, on_local_clock
from resource_managers.ocpp_charger.config import OcppConfig
from sitekit.prices import CsvPriceSource, PriceError

T = TypeVar("T")

MIN_CURRENT_A_DEFAULT = 6.0


class SimulationError(ValueError):
    """A simulation cannot run with these inputs; the message says which and why."""


@dataclass(frozen=True)
class Evse:
    """One charging point (connector) of the site."""

    id: str
    phase_share: tuple[float, float, float]
    max_w: int
    min_w: int
    phases: int
    phase: str


HISTORY_DAYS = 28  # the sessions file's visits before the start that level 5 learns from

# The EV's battery (ACN has no battery size or SoC): the real need fills a battery of
# BATTERY_KWH (larger if the need does not fit) from its arrival SoC to its final SoC, drawn per
# session uniformly in FINAL_SOC_PCT (the EV's own charge limit), where the EV stops: full.
BATTERY_KWH = 60.0
FINAL_SOC_PCT = (80.0, 100.0)
OCPP16_SHARE_DEFAULT = 0.3  # share of sessions on OCPP 1.6 chargers (no SoC, departure, energy)


def session_draw(session_id: str, what: str) -> float:
    """A number in [0, 1) fixed by the session id and `what`: the twin's seeded choices (the
    same in every run, for every level, on every machine)."""
    return zlib.crc32(f"{what}:{session_id}".encode()) / 2**32


def ev_battery(session_id: str, need_wh: float) -> tuple[float, float]:
    """(battery Wh, arrival SoC %) of a session's EV: the need fills it to its final SoC."""
    low, high = FINAL_SOC_PCT
    final = low + (high - low) * session_draw(session_id, "final soc")
    capacity = max(BATTERY_KWH * 1000, need_wh * 100.0 / final)
    return capacity, final - need_wh / capacity * 100.0


def is_ocpp16(session_id: str, share: float) -> bool:
    """Whether the session's EV charges on an OCPP 1.6 charger (seeded, `share` of them)."""
    return session_draw(session_id, "ocpp16") < share


def evse_rm_name(evse_id: str) -> str:
    """The name the twin's RM of an EVSE gives itself (and the live loop records visits by)."""
    return f"EV charger {evse_id}"


@dataclass
class SimSession:
    """A session on the simulation's PTU grid, with what is believed and what is true."""

    index: int
    session_id: str
    station_id: str
    evse: Evse
    arrival_ptu: int
    departure_ptu: int  # first PTU the EV is gone (real)
    believed_departure_ptu: int
    real_need_wh: int
    believed_need_wh: int
    claimed: bool
    arrival: datetime  # UTC, unsnapped (for the report)
    departure: datetime
    battery_wh: float = BATTERY_KWH * 1000  # the EV's battery (ev_battery)
    arrival_soc: float = 0.0  # % at plug-in; the real need fills it to its final SoC
    ocpp16: bool = False  # its charger reports neither SoC, departure nor energy need

    @property
    def max_w(self) -> int:
        return self.evse.max_w

    @property
    def ev_class(self) -> str:
        """Class by real need, for the per-class energy plot."""
        kwh = self.real_need_wh / 1000
        return "small (<10 kWh)" if kwh < 10 else ("medium (10-25 kWh)" if kwh < 25 else "large (>=25 kWh)")


@dataclass
class SimInputs:
    """The whole run on one grid of `n_ptus` PTUs from `t0`, with look-ahead for the planner."""

    config: SiteConfig
    t0: datetime  # UTC, local midnight of the first day
    ptu_minutes: int
    n_ptus: int  # simulated PTUs (days plus the tail)
    n_day_ptus: int  # PTUs of the requested days
    day_starts: list[int]  # PTU index of each local midnight (the requested days)
    days: list[date]
    evses: list[Evse]
    sessions: list[SimSession]
    import_eur_per_kwh: np.ndarray  # n_ptus + look-ahead
    export_eur_per_kwh: np.ndarray
    pv_w: np.ndarray  # n_ptus + look-ahead, >= 0
    import_limit_w: np.ndarray  # n_ptus + look-ahead
    export_limit_w: np.ndarray
    fuse_w_per_phase: float
    pv_kwp: float
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wholesale_eur_per_mwh: np.ndarray | None = None  # n_ptus + look-ahead, before the tariff
    ocpp: OcppConfig = field(default_factory=OcppConfig)  # the OCPP RM's section of the site file
    # the visits of the sessions file that ended before the run, as the store of a CEM that ran
    # the site before would hold them (level 5 learns departures from them)
    history: list[Visit] = field(default_factory=list)
    # what level 5's PV RM forecasts: the actual PV ("perfect") or the PV of the same time the
    # day before ("persistence", a naive day-ahead forecast); the measurement is always actual
    pv_forecast: str = "perfect"
    pv_forecast_w: np.ndarray | None = None  # n_ptus + look-ahead, with "persistence"
    ev_taper: bool = True  # EVs take less than offered above 80 % SoC (engine.taper_w)
    ocpp16_share: float = 0.0

    @property
    def dt_h(self) -> float:
        return self.ptu_minutes / 60

    @property
    def n_total(self) -> int:
        return len(self.import_eur_per_kwh)

    def ptu_start(self, index: int) -> datetime:
        return self.t0 + timedelta(minutes=self.ptu_minutes * int(index))


def evses_from_config(config: SiteConfig, station_ids: list[str],
                      ocpp: OcppConfig | None = None) -> tuple[list[Evse], list[str]]:
    """EVSEs of `[[ocpp.charge_points]]`; without any, one 3x16 A EVSE per station in the data."""
    voltage = config.grid.voltage_v
    min_a = config.ev_defaults.min_current_a or MIN_CURRENT_A_DEFAULT
    notes: list[str] = []
    evses: list[Evse] = []
    for cp in (ocpp or OcppConfig()).charge_points:
        share = (1 / 3, 1 / 3, 1 / 3) if cp.phases == 3 else {
            "L1": (1.0, 0.0, 0.0), "L2": (0.0, 1.0, 0.0), "L3": (0.0, 0.0, 1.0)}[cp.phase]
        for k in range(cp.evses):
            evse_id = cp.id if cp.evses == 1 else f"{cp.id}-{k + 1}"
            max_w = round(cp.max_current_a * voltage * cp.phases)
            evses.append(Evse(evse_id, share, max_w, min(max_w, round(min_a * voltage * cp.phases)),
                              cp.phases, cp.phase if cp.phases == 1 else "L1-L3"))
    if not evses:
        for sid in sorted(set(station_ids)):
            max_w = round(16 * voltage * 3)
            evses.append(Evse(sid, (1 / 3, 1 / 3, 1 / 3), max_w, round(min_a * voltage * 3), 3, "L1-L3"))
        notes.append(f"the site config lists no [[ocpp.charge_points]]: one 3x16 A EVSE per station "
                     f"of the data ({len(evses)})")
    return evses, notes


def believed_departure(s: Session, config: SiteConfig, *, ocpp16: bool = False) -> datetime:
    """The departure the CEM is told: the driver's estimate, else (and always behind an OCPP 1.6
    charger, which has no way to pass it on) the site's EV defaults."""
    if not ocpp16 and s.estimated_departure is not None and s.estimated_departure > s.arrival:
        return s.estimated_departure
    if config.ev_defaults.departure is not None:
        zone = ZoneInfo(config.site.timezone)
        local = s.arrival.astimezone(zone)
        believed = datetime.combine(local.date(), config.ev_defaults.departure, tzinfo=zone)
        return believed + timedelta(days=1) if believed <= s.arrival else believed
    return s.arrival + timedelta(hours=config.ev_defaults.dwell_hours)


def history_visits(raw: list[Session], config: SiteConfig, before: datetime, days: int,
                   evse_names: dict[str, str], ocpp16_share: float = 0.0) -> list[Visit]:
    """Visits of the `days` before `before` that ended by then, as the live loop records them
    (EVSE by its RM's name, the departure the CEM was told, the real departure); an OCPP 1.6
    visit without a departure or need (the loop knows its charger's were only the defaults)."""
    since = before - timedelta(days=days)
    out = []
    for raw_session in raw:
        s = on_local_clock([raw_session], raw_session.arrival.date(), config.site.timezone)[0]
        if not (since <= s.arrival and s.departure <= before):
            continue
        old = is_ocpp16(s.session_id, ocpp16_share)
        requested = (s.requested_kwh or 0.0) * 1000 if s.claimed else 0.0
        typed = None if old else believed_departure(s, config).astimezone(UTC)
        # what the EV took: its real need as the twin defines it (the request where the driver
        # made one, else what ACN delivered), as a CEM that served it before would have seen it
        took = requested if requested > 0 else s.delivered_kwh * 1000
        out.append(Visit(evse_names.get(s.station_id, s.station_id), s.arrival.astimezone(UTC),
                         s.departure.astimezone(UTC), typed,
                         None if old or not s.claimed else requested, took))
    return out


def parse_start(text: str) -> date:
    """`--start` as a date, or a clear error."""
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise SimulationError(f"--start {text!r} is not a date; write YYYY-MM-DD, e.g. 2019-10-07") from None


class DayMapper:
    """Maps a local day of the simulation to a local day a data file covers (see module doc)."""

    def __init__(self, covered: set[date], what: str) -> None:
        self.covered = covered
        self.years = sorted({d.year for d in covered})
        self.what = what
        self.used: dict[date, date] = {}

    def __call__(self, day: date) -> date:
        if day in self.used:
            return self.used[day]
        if day in self.covered:
            self.used[day] = day
            return day
        for year in sorted(self.years, key=lambda y: (abs(y - day.year), -y)):
            try:
                candidate = day.replace(year=year)
            except ValueError:  # 29 February
                candidate = date(year, 2, 28)
            if candidate in self.covered:
                self.used[day] = candidate
                return candidate
        span = f"{min(self.covered)} .. {max(self.covered)}" if self.covered else "nothing"
        raise SimulationError(f"the {self.what} file has no data for {day} nor for "
                              f"{day:%m-%d} of another year (it covers {span})")

    def describe(self) -> str:
        if not self.used:
            return "not used"
        same = all(a == b for a, b in self.used.items())
        first, last = min(self.used), max(self.used)
        if same:
            return f"same dates ({first} .. {last})"
        return (f"by day of year: {first} .. {last} use {self.used[first]} .. {self.used[last]} "
                f"(the file does not cover the sessions' dates)")


def _covered_days(series: dict[datetime, float], zone: ZoneInfo) -> set[date]:
    """Local days with at least 20 hourly values."""
    count: dict[date, int] = {}
    for when in series:
        day = when.astimezone(zone).date()
        count[day] = count.get(day, 0) + 1
    return {d for d, c in count.items() if c >= 20}


def _hourly_lookup(series: dict[datetime, float], times: list[datetime], zone: ZoneInfo,
                   mapper: DayMapper, what: str) -> np.ndarray:
    """Value of the hour containing each (mapped) local time; DST gaps take the nearest hour."""
    keys = sorted(series)
    out = np.empty(len(times), dtype=float)
    for i, moment in enumerate(times):
        local = moment.astimezone(zone)
        day = mapper(local.date())
        shifted = datetime.combine(day, local.time(), tzinfo=zone).replace(fold=local.fold).astimezone(UTC)
        hour = shifted.replace(minute=0, second=0, microsecond=0)
        value = series.get(hour)
        if value is None:
            k = bisect.bisect_left(keys, hour)
            near = [keys[j] for j in (k - 1, k) if 0 <= j < len(keys)]
            near = [t for t in near if abs((t - hour).total_seconds()) <= 2 * 3600]
            if not near:
                raise SimulationError(f"the {what} file has no value near {hour.isoformat()} "
                                      f"(for simulated time {moment.isoformat()})")
            value = series[min(near, key=lambda t: abs((t - hour).total_seconds()))]
        out[i] = value
    return out


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def _snap(moment: datetime, t0: datetime, ptu_s: float) -> int:
    return round((moment - t0).total_seconds() / ptu_s)


def _read(path: Path, loader: Callable[[Path], T], format_error: type[Exception], what: str) -> T:
    """`loader(path)`; a bad or unreadable file becomes a SimulationError that says which."""
    try:
        return loader(path)
    except format_error as exc:
        raise SimulationError(str(exc)) from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SimulationError(f"{path}: cannot read the {what}: {exc}") from None


def load_inputs(config: SiteConfig, sessions_file: Path, prices_file: Path, pv_file: Path | None,
                start: date, days: int, pv_kwp: float, *,
                ocpp: OcppConfig | None = None, pv_forecast: str = "perfect",
                ev_taper: bool = True, ocpp16_share: float = OCPP16_SHARE_DEFAULT) -> SimInputs:
    """Read and map every input of a run; raise SimulationError on any user mistake."""
    if pv_forecast not in ("perfect", "persistence"):
        raise SimulationError(f"--pv-forecast {pv_forecast!r}: use perfect or persistence")
    if not 0.0 <= ocpp16_share <= 1.0:
        raise SimulationError(f"--ocpp16-share {ocpp16_share:g}: give a share from 0 to 1")
    pv_forecast_w: np.ndarray | None = None
    zone = ZoneInfo(config.site.timezone)
    ptu_minutes = config.planner.ptu_minutes
    ptu_s = ptu_minutes * 60.0
    horizon = config.planner.horizon_ptus
    notes: list[str] = []

    raw_sessions = _read(sessions_file, load_acn_sessions, SessionFileError, "sessions file")
    if not raw_sessions:
        raise SimulationError(f"{sessions_file}: no sessions in the file")
    price_source = _read(prices_file, CsvPriceSource, PriceError, "price file")
    pv_series: dict[datetime, float] | None = None
    if pv_file is not None:
        pv_series = _read(pv_file, load_pv_per_kwp, ForecastError, "PV file")
        if not pv_series:
            raise SimulationError(f"{pv_file}: no PV values in the file")

    day_list = [start + timedelta(days=k) for k in range(days)]
    t0 = _local_midnight(start, zone)
    t_end = _local_midnight(start + timedelta(days=days), zone)
    day_starts = [round((_local_midnight(d, zone) - t0).total_seconds() / ptu_s) for d in day_list]
    n_day_ptus = round((t_end - t0).total_seconds() / ptu_s)

    moved: list[Session] = []
    for s in raw_sessions:
        local_day = s.arrival.date()  # the session's own local date (ACN times carry their offset)
        m = on_local_clock([s], local_day, config.site.timezone)[0]
        if t0 <= m.arrival < t_end:
            moved.append(m)
    if not moved:
        first = raw_sessions[0].arrival.date()
        last = raw_sessions[-1].arrival.date()
        raise SimulationError(f"{sessions_file}: no session arrives between {start} and "
                              f"{start + timedelta(days=days - 1)} (the file has {first} .. {last})")

    station_ids = [s.station_id for s in moved]
    evses, evse_notes = evses_from_config(config, station_ids, ocpp)
    notes += evse_notes
    by_id = {e.id: e for e in evses}
    busy_until: dict[str, int] = {}
    sessions: list[SimSession] = []
    moved.sort(key=lambda s: (s.arrival, s.session_id))
    unknown = relocated = dropped = 0
    default_need_wh = round(config.ev_defaults.energy_kwh * 1000)
    for s in moved:
        arrival_ptu = max(0, _snap(s.arrival, t0, ptu_s))
        departure_ptu = max(arrival_ptu + 1, _snap(s.departure, t0, ptu_s))
        evse = by_id.get(s.station_id)
        if evse is None or busy_until.get(evse.id, -1) > arrival_ptu:
            if evse is None:
                unknown += 1
            else:
                relocated += 1
            free = [e for e in evses if busy_until.get(e.id, -1) <= arrival_ptu]
            if not free:
                dropped += 1
                continue
            evse = free[0]
        busy_until[evse.id] = departure_ptu
        old = is_ocpp16(s.session_id, ocpp16_share)
        believed_dep = believed_departure(s, config, ocpp16=old)
        believed_ptu = max(arrival_ptu + 1, _snap(believed_dep, t0, ptu_s))
        requested_wh = round((s.requested_kwh or 0.0) * 1000)
        if s.claimed and requested_wh > 0:
            real_need, believed_need = requested_wh, requested_wh
        else:
            real_need, believed_need = round(s.delivered_kwh * 1000), default_need_wh
        if old:
            believed_need = default_need_wh  # the RM only knows the site's defaults
        battery_wh, arrival_soc = ev_battery(s.session_id, max(0, real_need))
        sessions.append(SimSession(
            index=len(sessions), session_id=s.session_id, station_id=s.station_id, evse=evse,
            arrival_ptu=arrival_ptu, departure_ptu=departure_ptu,
            believed_departure_ptu=believed_ptu, real_need_wh=max(0, real_need),
            believed_need_wh=max(0, believed_need), claimed=s.claimed,
            arrival=s.arrival.astimezone(UTC), departure=s.departure.astimezone(UTC),
            battery_wh=battery_wh, arrival_soc=arrival_soc, ocpp16=old))
    if unknown:
        notes.append(f"{unknown} session(s) of stations not in the config were placed on a free EVSE")
    if relocated:
        notes.append(f"{relocated} session(s) found their station busy and were moved to a free EVSE")
    if dropped:
        notes.append(f"{dropped} session(s) found no free EVSE and were left out")
    if not sessions:
        raise SimulationError("no session could be placed on an EVSE")
    history = history_visits(raw_sessions, config, t0, HISTORY_DAYS,
                             {e.id: evse_rm_name(e.id) for e in evses}, ocpp16_share)
    n_old = sum(s.ocpp16 for s in sessions)
    if n_old:
        notes.append(f"{n_old} of {len(sessions)} session(s) on OCPP 1.6 chargers (share "
                     f"{ocpp16_share:g}): no SoC, departure or energy need reaches the CEM")
    if history:
        notes.append(f"history: {len(history)} visit(s) of the {HISTORY_DAYS} days before the "
                     f"start, in level 5's store before it runs")

    n_ptus = max(n_day_ptus, max(s.departure_ptu for s in sessions))
    n_total = n_ptus + horizon
    times = [t0 + timedelta(seconds=ptu_s * i) for i in range(n_total)]

    if price_source.first is None or price_source.last is None:
        raise SimulationError("the price file has no prices")
    price_series = dict(price_source.day_ahead_eur_per_mwh(price_source.first, price_source.last
                                                           + timedelta(hours=1)))
    price_mapper = DayMapper(_covered_days(price_series, zone), "price")
    wholesale = _hourly_lookup(price_series, times, zone, price_mapper, "price")
    prices = tariff_prices(wholesale, config.prices, n_total)
    if pv_series is not None:
        pv_mapper = DayMapper(_covered_days(pv_series, zone), "PV")
        pv_w = np.rint(_hourly_lookup(pv_series, times, zone, pv_mapper, "PV") * pv_kwp * 1000)
        pv_w = np.maximum(pv_w, 0).astype(np.int64)
        if pv_forecast == "persistence":
            day_before = [t - timedelta(days=1) for t in times]
            pv_forecast_w = np.maximum(np.rint(_hourly_lookup(
                pv_series, day_before, zone, DayMapper(_covered_days(pv_series, zone), "PV"),
                "PV") * pv_kwp * 1000), 0).astype(np.int64)
    else:
        pv_mapper = None
        pv_w = np.zeros(n_total, dtype=np.int64)
        pv_kwp = 0.0
    limits = limits_from_grid(config.grid, config.congestion, t0, ptu_minutes, n_total)
    files = {
        "sessions": str(sessions_file),
        "prices": f"{prices_file} (mapped {price_mapper.describe()})",
        "pv": (f"{pv_file} x {pv_kwp:g} kWp (mapped {pv_mapper.describe()}); level 5's forecast: "
               f"{'the day before' if pv_forecast_w is not None else 'the actual PV'}"
               if pv_mapper else "none"),
    }
    return SimInputs(
        config=config, t0=t0, ptu_minutes=ptu_minutes, n_ptus=n_ptus, n_day_ptus=n_day_ptus,
        day_starts=day_starts, days=day_list, evses=evses, sessions=sessions,
        import_eur_per_kwh=np.asarray(prices.import_eur_per_kwh, dtype=float),
        export_eur_per_kwh=np.asarray(prices.export_eur_per_kwh, dtype=float),
        pv_w=pv_w, import_limit_w=np.asarray(limits.import_limit_w, dtype=np.int64),
        export_limit_w=np.asarray(limits.export_limit_w, dtype=np.int64),
        fuse_w_per_phase=config.grid.fuse_a * config.grid.voltage_v,
        pv_kwp=pv_kwp, files=files, notes=notes,
        wholesale_eur_per_mwh=np.asarray(wholesale, dtype=float), ocpp=ocpp or OcppConfig(),
        history=history, pv_forecast=pv_forecast if pv_forecast_w is not None else "perfect",
        pv_forecast_w=pv_forecast_w, ev_taper=ev_taper, ocpp16_share=ocpp16_share)
