"""What kind of device an RM is, from what it says in S2 (not from words in its name).

The rule, in the order it is applied:

| the RM says (ResourceManagerDetails, FRBC.StorageDescription)            | kind        |
|--------------------------------------------------------------------------|-------------|
| offers no control type but NOT_CONTROLABLE; roles ENERGY_CONSUMER and    | grid meter  |
| ENERGY_PRODUCER of ELECTRICITY, no ENERGY_STORAGE; measures electric     |             |
| power                                                                    |             |
| FRBC: an actuator supplies HEAT, a role's commodity is HEAT, or the      | heat_pump   |
| storage's fill level is a temperature (fill_level_label °C, degC, K, °F) |             |
| FRBC: a normal operation mode has negative electric power (discharges)   | battery     |
| FRBC: charge-only, and offers a fill-level target profile (a departure   | ev          |
| target: provides_fill_level_target_profile), or its only role is         |             |
| ENERGY_CONSUMER of ELECTRICITY (an EV charger, also with no EV plugged)  |             |
| FRBC: anything else                                                      | storage     |

(The FRBC rows are `cem.flex.frbc.storage_kind`.)

The grid meter measures the whole site: it is not planned as a load; the part of its
measurement no other RM explains becomes the base load, and the guard reads it.

A meter that does not say so in S2 is planned as an ordinary load: its name is not read.
"""

from __future__ import annotations

import logging
from typing import Any

from s2python.common import Commodity, ControlType, RoleType

from cem.flex.ptu import is_electric

logger = logging.getLogger("cem.flex")

_NOT_PLANNED = frozenset({ControlType.NOT_CONTROLABLE, ControlType.NO_SELECTION})


def says_grid_meter(details: Any) -> bool:
    """The S2 rule for the grid meter (see the module docstring)."""
    if details is None or ControlType.NOT_CONTROLABLE not in details.available_control_types:
        return False
    offered = set(details.available_control_types)
    electric = {r.role for r in details.roles or [] if r.commodity == Commodity.ELECTRICITY}
    return (ControlType.NOT_CONTROLABLE in offered and offered <= _NOT_PLANNED
            and {RoleType.ENERGY_CONSUMER, RoleType.ENERGY_PRODUCER} <= electric
            and RoleType.ENERGY_STORAGE not in electric
            and any(is_electric(q) for q in details.provides_power_measurement_types))


def is_grid_meter(state: Any) -> bool:
    """Whether the RM measures the site's grid connection (see the module docstring)."""
    return says_grid_meter(state.details)
