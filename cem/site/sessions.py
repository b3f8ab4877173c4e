"""EV charging sessions in the ACN-Data CSV format: load them, move them to another site's clock.

The ACN files (Caltech, JPL) hold one row per session with local times and offsets. A Dutch
scenario reuses them by keeping the wall-clock time of day (arrive 08:12, leave 17:40) and
placing it on another day in another zone (`on_local_clock`), because that is what the driver
pattern of a workplace car park looks like wherever it is.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

ACN_COLUMNS = (
    "arrival",
    "departure",
    "requested_energy (kWh)",
    "delivered_energy (kWh)",
    "station_id",
    "session_id",
    "estimated_departure",
    "claimed",
)


class SessionFileError(ValueError):
    """A sessions file cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Session:
    """One charging session: plugged in at `arrival`, unplugged at `departure` (aware times)."""

    session_id: str
    station_id: str
    arrival: datetime
    departure: datetime
    requested_kwh: float | None  # what the driver asked for (None when not claimed / empty)
    delivered_kwh: float
    estimated_departure: datetime | None = None
    claimed: bool = False

    @property
    def energy_kwh(self) -> float:
        """Energy need for planning: the driver's request if given, else what was delivered."""
        if self.requested_kwh is not None and self.requested_kwh > 0:
            return self.requested_kwh
        return self.delivered_kwh

    @property
    def dwell_h(self) -> float:
        return (self.departure - self.arrival).total_seconds() / 3600


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _time(value: str, what: str, where: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise SessionFileError(f"{where}: {what} {value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise SessionFileError(f"{where}: {what} {value!r} has no UTC offset")
    return parsed


def load_acn_sessions(path: Path | str) -> list[Session]:
    """Read an ACN-Data sessions CSV (plain or .gz), sorted by arrival.

    Rows whose departure is not after arrival are skipped (they carry no flexibility);
    unreadable rows raise SessionFileError naming the line.
    """
    path = Path(path)
    if not path.exists():
        raise SessionFileError(f"{path}: file not found")
    sessions: list[Session] = []
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ACN_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SessionFileError(f"{path}: missing column(s) {missing}; expected {list(ACN_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            arrival = _time(row["arrival"], "arrival", where)
            departure = _time(row["departure"], "departure", where)
            if departure <= arrival:
                continue
            try:
                requested = float(row["requested_energy (kWh)"]) if row["requested_energy (kWh)"] else None
                delivered = float(row["delivered_energy (kWh)"] or 0.0)
            except ValueError:
                raise SessionFileError(f"{where}: energy is not a number") from None
            estimated = row["estimated_departure"].strip()
            sessions.append(
                Session(
                    session_id=row["session_id"],
                    station_id=row["station_id"],
                    arrival=arrival,
                    departure=departure,
                    requested_kwh=requested,
                    delivered_kwh=delivered,
                    estimated_departure=_time(estimated, "estimated_departure", where) if estimated else None,
                    claimed=row["claimed"].strip().lower() == "true",
                )
            )
    sessions.sort(key=lambda s: s.arrival)
    return sessions


def bundled_acn_sessions(site: str = "both") -> list[Session]:
    """The bundled ACN sessions of 2019-10-01 .. 2019-10-21: 'caltech', 'jpl' or 'both'."""
    from cem.data import ACN_SITES, acn_file

    sites = ACN_SITES if site == "both" else (site,)
    sessions = [s for name in sites for s in load_acn_sessions(acn_file(name))]
    sessions.sort(key=lambda s: s.arrival)
    return sessions


def on_local_clock(sessions: Iterable[Session], day: date, tz: str = "Europe/Amsterdam") -> list[Session]:
    """Move sessions to `day` in zone `tz`, keeping each arrival's local wall-clock time.

    Dwell time is kept (a session that ran past midnight still does). Times come back in UTC.
    """
    zone = ZoneInfo(tz)
    moved = []
    for s in sessions:
        wall = s.arrival.replace(tzinfo=None)
        arrival = datetime.combine(day, wall.time(), tzinfo=zone).astimezone(UTC)
        shift = arrival - s.arrival
        estimated = (s.estimated_departure + shift).astimezone(UTC) if s.estimated_departure else None
        moved.append(replace(s, arrival=arrival, departure=(s.departure + shift).astimezone(UTC),
                             estimated_departure=estimated))
    return moved


def sessions_between(sessions: Iterable[Session], start: datetime, end: datetime) -> list[Session]:
    """Sessions plugged in at some moment in [start, end)."""
    return [s for s in sessions if s.arrival < end and s.departure > start]
