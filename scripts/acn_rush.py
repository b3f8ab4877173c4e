"""A synthetic morning rush on an ACN site, as a sessions CSV for `cem simulate`.

The real sessions of the month before the rush day (the history the CEM learns departures
from) and, on the rush day, one EV per EVSE arriving uniformly between 07:00 and 08:00 local,
each asking 10-25 kWh (claimed, its real need, delivered in full by the uncontrolled site)
and typing 17:00; the early leavers go after 1.5-2.5 h, the others between 16:30 and 18:00.
Drawn with Python's `random.Random(seed)` (per EV: arrival, [early?], stay or departure,
need), so a seed gives the same file on every machine.

    python scripts/acn_rush.py --seed 7 --early-every 5 --out /tmp/jpl_rush7.csv
    python scripts/acn_rush.py --seed 11 --station-stride 3 --out /tmp/jpl_rush11.csv

The first is round 7's seed 7 (every fifth EV leaves early, 11 of 52), the second its
seed 11 (each EV leaves early with probability 0.2, 6 of 52), byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import math
import random
import sys
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", default="jpl", choices=["jpl", "caltech"])
    ap.add_argument("--day", default="2019-10-22", help="the rush day, YYYY-MM-DD (Sep-Dec 2019)")
    ap.add_argument("--history-days", type=int, default=32,
                    help="days of real sessions before the rush day")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--early-every", type=int, default=0,
                    help="every k-th EV leaves early (0: each with --early-share)")
    ap.add_argument("--early-share", type=float, default=0.2)
    ap.add_argument("--station-stride", type=int, default=1,
                    help="EV i takes station (stride * i) mod #stations")
    ap.add_argument("--sessions", type=Path, default=None,
                    help="the real sessions (default: ../shared/data/acn_<site>_2019-09_2019-12.csv.gz)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    source = a.sessions or DATA / f"acn_{a.site}_2019-09_2019-12.csv.gz"
    if not source.exists():
        print(f"error: no sessions file {source} (give --sessions)", file=sys.stderr)
        return 2
    try:
        day = date.fromisoformat(a.day)
    except ValueError:
        print(f"error: --day {a.day!r} is not YYYY-MM-DD", file=sys.stderr)
        return 2
    if a.history_days < 1:
        print("error: --history-days must be at least 1", file=sys.stderr)
        return 2
    if not a.out.parent.is_dir():
        print(f"error: no folder {a.out.parent} for --out", file=sys.stderr)
        return 2
    first = day - timedelta(days=a.history_days)
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [r for r in reader if first <= date.fromisoformat(r[0][:10]) < day]
    stations = sorted({r[4] for r in rows})
    if not stations:
        print(f"error: no sessions in {source} between {first} and {day}", file=sys.stderr)
        return 2
    if a.station_stride < 1 or math.gcd(a.station_stride, len(stations)) != 1:
        print(f"error: --station-stride {a.station_stride} must be >= 1 and share no factor "
              f"with {len(stations)} stations", file=sys.stderr)
        return 2
    tz = ZoneInfo("America/Los_Angeles")
    seven = datetime.combine(day, time(7), tz)
    half_four = datetime.combine(day, time(16, 30), tz)
    typed = datetime.combine(day, time(17), tz)
    rng = random.Random(a.seed)
    for i in range(len(stations)):
        arrival = seven + timedelta(seconds=rng.random() * 3600)
        early = (i % a.early_every == 0) if a.early_every > 0 else rng.random() < a.early_share
        x = rng.random()
        departure = (arrival + timedelta(hours=1.5 + x)) if early \
            else half_four + timedelta(hours=1.5 * x)
        need = round(10 + 15 * rng.random(), 3)
        station = stations[(a.station_stride * i) % len(stations)]
        rows.append([str(arrival), str(departure), str(need), str(need), station, f"rush_{i}",
                     str(typed), "True"])
    with a.out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    print(f"{a.out}: {len(rows) - len(stations)} real sessions from {first}, "
          f"{len(stations)} rush EVs on {day}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
