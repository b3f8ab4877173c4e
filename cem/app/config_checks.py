"""Checks across settings that pydantic field rules cannot see on their own."""

from __future__ import annotations

import itertools
from pathlib import Path

from cem.app.site_file import SiteFile
from sitekit.config import ConfigProblem


def missing_grid(config: SiteFile, file: Path) -> list[ConfigProblem]:
    """`cem run` plans against the grid connection: a file without `[grid]` would silently run
    on the defaults (25 A, 17 kW), which are no one's connection."""
    if "grid" in config.model_fields_set:
        return []
    return [ConfigProblem(
        path="grid", message="missing: the grid connection is not set",
        hint="add a [grid] section with fuse_a, phases, voltage_v, import_limit_kw and "
             f"export_limit_kw for this site (see `cem init` or the README) to {file.name}")]


def check_site_semantics(config: SiteFile) -> list[ConfigProblem]:
    """Return problems that make a valid-looking site config unsafe or useless."""
    problems: list[ConfigProblem] = []
    grid = config.grid
    fuse_kw = grid.fuse_a * grid.voltage_v * grid.phases / 1000
    if grid.import_limit_kw > fuse_kw * 1.0001:
        problems.append(ConfigProblem(
            path="grid.import_limit_kw",
            message=f"GTV {grid.import_limit_kw:g} kW exceeds what the fuse carries "
                    f"({grid.fuse_a:g} A x {grid.phases} x {grid.voltage_v:g} V = {fuse_kw:.1f} kW)",
            hint="lower import_limit_kw or check fuse_a / phases",
        ))
    windows = sorted(config.congestion, key=lambda w: w.start)
    for i, (a, b) in enumerate(itertools.pairwise(windows)):
        if b.start < a.end:
            problems.append(ConfigProblem(
                path=f"congestion[{i + 1}]",
                message=f"window {b.start.isoformat()}..{b.end.isoformat()} overlaps the one "
                        f"before it",
                hint="merge overlapping windows into one with the lower limit",
            ))
    if config.ocpp.safe_limit_a and 0 < config.ocpp.safe_limit_a < config.ev_defaults.min_current_a:
        problems.append(ConfigProblem(
            path="ocpp.safe_limit_a",
            message=f"{config.ocpp.safe_limit_a:g} A is below the EV minimum current "
                    f"({config.ev_defaults.min_current_a:g} A): chargers would not charge at all",
            hint="use 0 (pause) or at least the minimum current",
        ))
    for i, cp in enumerate(config.ocpp.charge_points):
        if cp.max_current_a > grid.fuse_a:
            problems.append(ConfigProblem(
                path=f"ocpp.charge_points[{i}].max_current_a",
                message=f"{cp.max_current_a:g} A is more than the site fuse ({grid.fuse_a:g} A)",
                hint="a charger cannot draw more than the main fuse",
            ))
    problems += _modbus_map_problems(config)
    if config.server.host not in ("127.0.0.1", "localhost", "::1") and not config.server.tokens:
        problems.append(ConfigProblem(
            path="server.tokens",
            message=f"the server listens on {config.server.host} without RM tokens: anyone on "
                    "the network can connect as a resource manager",
            hint="add [[server.tokens]] entries, or listen on 127.0.0.1",
        ))
    return problems


def _modbus_map_problems(config: SiteFile) -> list[ConfigProblem]:
    """Register maps of the configured Modbus devices: valid and for the right device class."""
    from resource_managers.modbus.register_map import register_map_problems

    problems: list[ConfigProblem] = []
    for i, device in enumerate(config.modbus.devices):
        if not device.map.exists():
            continue  # check_referenced_files reports a missing file
        for text in register_map_problems(device.map, device.device):
            problems.append(ConfigProblem(path=f"modbus.devices[{i}].map",
                                          message=f"{device.map.name}: {text}",
                                          hint="see the register maps in specs/modbus/"))
    return problems
