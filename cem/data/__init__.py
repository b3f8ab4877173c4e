"""Small real-data extracts shipped with the package (see README.md in this folder)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ACN_SITES = ("caltech", "jpl")
PRICES_2019_10 = "nl_day_ahead_2019-10.csv"
PRICES_2023_07 = "nl_day_ahead_2023-07.csv"
PV_2019_10 = "nl_pv_per_kwp_2019-10.csv"
PV_2019_07 = "nl_pv_per_kwp_2019-07.csv"


def bundled(name: str) -> Path:
    """Path of a bundled data file, e.g. bundled("nl_day_ahead_2019-10.csv")."""
    path = Path(str(resources.files("cem.data").joinpath(name)))
    if not path.exists():
        raise FileNotFoundError(f"no bundled data file {name!r} in {path.parent}")
    return path


def acn_file(site: str) -> Path:
    """Bundled ACN sessions (2019-10-01 .. 2019-10-21) of 'caltech' or 'jpl'."""
    if site not in ACN_SITES:
        raise ValueError(f"unknown ACN site {site!r}; use one of {ACN_SITES}")
    return bundled(f"acn_{site}_2019-10-01_2019-10-21.csv")
