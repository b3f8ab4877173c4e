"""What ships with the package: its version, the `specs` folder, and `cem init`'s starter file.

In a source checkout `specs/` sits beside the `cem` package; in an installed wheel the build
copies it into the package (`cem/specs`, see setup.py), so example sites, register maps and the
demo site are found either way.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import cem

DISTRIBUTION = "s2-cem"


def version() -> str:
    """The installed distribution's version (the package's own when run from a checkout)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return cem.__version__


def specs_folder() -> Path:
    """The `specs` folder: inside the installed package, else beside it in a checkout."""
    package = Path(cem.__file__).resolve().parent
    for candidate in (package / "specs", package.parent / "specs"):
        if (candidate / "sites").is_dir():
            return candidate
    raise FileNotFoundError(f"no specs folder in {package} or beside it: reinstall the package")


def starter_site(maps: Path) -> str:
    """A site file that runs as it is: a home connection, no devices yet (commented examples)."""
    battery = (maps / "battery_generic.toml").as_posix()
    meter = (maps / "grid_meter.toml").as_posix()
    return f'''# A site file for `cem run --config site.toml`; `cem config check site.toml` checks it.
# Relative paths are relative to this file. Every setting: README "Configuration reference".

[site]
name = "My site"
timezone = "Europe/Amsterdam"    # IANA zone: local times of tariffs, departures, the logs

[server]                          # where resource managers connect over S2 (websocket)
host = "127.0.0.1"                # another address needs [[server.tokens]]
port = 8765

[store]
path = "cem.db"                   # SQLite; a lock file beside it keeps a second CEM out

# The grid connection: set these to your own. The plan never exceeds them.
[grid]
fuse_a = 25                       # main fuse per phase, A
phases = 3
voltage_v = 230
import_limit_kw = 17              # contracted capacity (GTV), 15-minute average
export_limit_kw = 17

[prices]
# csv = "prices.csv"              # day-ahead EUR/MWh (start_utc,price_eur_per_mwh), or:
# feed = "energyzero"             # live Dutch day-ahead prices (no key needed)
flat_import_eur_per_kwh = 0.25    # without prices: one flat price

[http]                            # the dashboard, API and metrics (http://127.0.0.1:8080/)
enabled = true
port = 8080

[planner]
ptu_minutes = 15
horizon_ptus = 96
time_limit_s = 1.0

# EV chargers over OCPP 1.6J / 2.0.1 (`cem run` then runs the central system too):
# [ocpp]
# host = "0.0.0.0"
# port = 9000
# database = "ocpp.db"
# [[ocpp.charge_points]]
# id = "CP-1"
# password = "a-long-random-password"

# Modbus TCP devices, one S2 resource manager each (register maps shipped with the CEM):
# [[modbus.devices]]
# name = "battery"
# device = "battery"
# map = "{battery}"
# host = "192.0.2.10"
# port = 502
# device_id = 1
#
# [[modbus.devices]]
# name = "grid meter"
# device = "meter"
# map = "{meter}"
# host = "192.0.2.11"
# port = 502
'''


def write_starter(folder: Path, *, force: bool = False) -> Path:
    """Write `folder/site.toml` (creating the folder); FileExistsError unless `force`."""
    target = Path(folder) / "site.toml"
    if target.exists() and not force:
        raise FileExistsError(str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(starter_site(specs_folder() / "modbus"), encoding="utf-8")
    return target
