"""Forecasts the planner needs without a device telling it: PV per kWp and a base-load profile.

PV: an hourly per-kWp series (CSV `start_utc,pv_kw_per_kwp`, the Renewables.ninja format),
scaled by the installed kWp. Each PTU takes its hour's mean power (a step profile keeps the
energy of every hour exact). Missing hours are an error naming the first one.

Base load: a simple synthetic shape (not measured data) for a home or an office, scaled to an
annual consumption, in local time of the site. Good enough for scenarios and benchmarks; a real
site forecasts from its meter.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import numpy as np


class ForecastError(ValueError):
    """A forecast cannot be produced; the message names the file, line or time."""


def load_pv_per_kwp(path: Path | str) -> dict[datetime, float]:
    """Read an hourly PV CSV (`start_utc,pv_kw_per_kwp`): hour start (UTC) -> kW per kWp."""
    path = Path(path)
    if not path.exists():
        raise ForecastError(f"{path}: PV file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    series: dict[datetime, float] = {}
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        reader = csv.DictReader(text)
        if not reader.fieldnames or not {"start_utc", "pv_kw_per_kwp"} <= set(reader.fieldnames):
            raise ForecastError(f"{path}: expected columns start_utc,pv_kw_per_kwp, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                when = datetime.fromisoformat(row["start_utc"].strip().replace("Z", "+00:00"))
                value = float(row["pv_kw_per_kwp"])
            except (TypeError, ValueError):
                raise ForecastError(f"{path}:{line}: cannot read {dict(row)}") from None
            if when.tzinfo is None:
                raise ForecastError(f"{path}:{line}: time without timezone")
            series[when.astimezone(UTC)] = max(0.0, value)
    return series


def pv_forecast_w(
    per_kwp: dict[datetime, float], kwp: float, start: datetime, ptu_minutes: int, n_ptus: int
) -> np.ndarray:
    """PV production per PTU in W (>= 0) for `kwp` installed."""
    if start.tzinfo is None:
        raise ForecastError("start needs a timezone")
    start = start.astimezone(UTC)
    out = np.empty(n_ptus, dtype=np.int64)
    for i in range(n_ptus):
        moment = start + timedelta(minutes=ptu_minutes * i)
        hour = moment.replace(minute=0, second=0, microsecond=0)
        if hour not in per_kwp:
            raise ForecastError(f"no PV value for the hour starting {hour.isoformat()}")
        out[i] = round(per_kwp[hour] * kwp * 1000)
    return out


def _home_shape(h: float) -> float:
    """Relative home consumption at local hour h: low at night, morning and evening peaks."""
    return (0.35 + 0.35 * math.exp(-((h - 7.5) ** 2) / 2) + 0.9 * math.exp(-((h - 19) ** 2) / 5)
            + 0.15 * math.exp(-((h - 13) ** 2) / 8))


def _office_shape(h: float, weekday: int) -> float:
    """Relative office consumption: standby at night and weekends, a plateau 8-18 on workdays."""
    if weekday >= 5:
        return 0.25
    day = 1 / (1 + math.exp(-(h - 7.5) * 2)) * 1 / (1 + math.exp((h - 18) * 2))
    return 0.25 + 0.95 * day


def base_load_w(
    annual_kwh: float,
    start: datetime,
    ptu_minutes: int,
    n_ptus: int,
    *,
    profile: Literal["home", "office"] = "home",
    tz: str = "Europe/Amsterdam",
) -> np.ndarray:
    """Base load per PTU in W, shaped by `profile` in local time, averaging annual_kwh / 8760 h."""
    if start.tzinfo is None:
        raise ForecastError("start needs a timezone")
    zone = ZoneInfo(tz)
    # mean of the shape over a week, so that the scale gives the requested annual energy
    week = [
        _home_shape(h / 4) if profile == "home" else _office_shape(h / 4, d)
        for d in range(7) for h in range(96)
    ]
    mean_shape = sum(week) / len(week)
    mean_w = annual_kwh * 1000 / 8760
    out = np.empty(n_ptus, dtype=np.int64)
    for i in range(n_ptus):
        local = (start + timedelta(minutes=ptu_minutes * (i + 0.5))).astimezone(zone)
        h = local.hour + local.minute / 60
        shape = _home_shape(h) if profile == "home" else _office_shape(h, local.weekday())
        out[i] = round(mean_w * shape / mean_shape)
    return out
