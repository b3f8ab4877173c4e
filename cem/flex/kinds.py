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

One fallback is left for RMs that do not say enough yet: a NOT_CONTROLABLE RM (or one with no
control type selected) whose name or model says "meter" is taken as the grid meter, and a
warning "guessed from the name" is logged once per RM. Our own Modbus meter RM needs it until
it declares both roles (resource_managers/modbus/rm.py `MeterRM`: roles ENERGY_CONSUMER and
ENERGY_PRODUCER of ELECTRICITY).
"""

from __future__ import annotations

import logging
from typing import Any

from s2python.common import Commodity, ControlType, RoleType

from cem.flex.ptu import is_electric

logger = logging.getLogger("cem.flex")

_NOT_PLANNED = frozenset({ControlType.NOT_CONTROLABLE, ControlType.NO_SELECTION})
_guessed: set[str] = set()  # RMs already reported as a meter guessed from the name


def says_grid_meter(details: Any) -> bool:
    """The S2 rule for the grid meter (see the module docstring)."""
    if details is None:
        return False
    offered = set(details.available_control_types)
    electric = {r.role for r in details.roles or [] if r.commodity == Commodity.ELECTRICITY}
    return (ControlType.NOT_CONTROLABLE in offered and offered <= _NOT_PLANNED
            and {RoleType.ENERGY_CONSUMER, RoleType.ENERGY_PRODUCER} <= electric
            and RoleType.ENERGY_STORAGE not in electric
            and any(is_electric(q) for q in details.provides_power_measurement_types))


def is_grid_meter(state: Any, rm_id: str = "") -> bool:
    """Whether the RM measures the site's grid connection (see the module docstring)."""
    details = state.details
    if details is None:
        return False
    if says_grid_meter(details):
        return True
    control = state.control_type
    if control is not None and control not in _NOT_PLANNED:
        return False
    text = " ".join(filter(None, [details.name, details.model])).lower()
    if "meter" not in text:
        return False
    key = rm_id or str(details.resource_id)
    if key not in _guessed:
        _guessed.add(key)
        logger.warning("RM %s (%s): taken as the grid meter, guessed from the name; it should "
                       "say so in S2 (roles ENERGY_CONSUMER and ENERGY_PRODUCER of ELECTRICITY, "
                       "NOT_CONTROLABLE only)", details.name or "", key)
    return True
