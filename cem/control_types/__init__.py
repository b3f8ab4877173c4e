"""The S2 control types the CEM knows: one plug-in each, in one registry (`PLUGINS`).

A plug-in brings a control type's session rules, its per-type state and its flex binding
(the interface: `cem.control_types.base.ControlTypePlugin`). The S2 session, the RM state,
the site problem and the control loop reach a control type only through its plug-in.

How to add a control type (one package, this one):

1. Write ``cem/control_types/<type>.py``: a state class (read-only accessors, ``snapshot()``),
   and a plug-in class deriving from `PluginBase` with ``control_type``, ``name``,
   ``snapshot_key``, ``message_types``, ``instruction_types`` (and ``referable_types`` for
   objects a RevokeObject names by message id); ``receive`` judges and applies each message
   (raise `Rejected`, or `content(...)` for INVALID_CONTENT; return the `StateChanged` kind),
   ``check_instruction`` and ``revoke`` as the type needs; ``add_assets`` turns the state into
   planner assets with bindings (`cem.flex.ptu.FlexBinding`: plan -> instructions,
   ``can_cap`` for the guard) and ``instruction_power_w`` says what an instruction draws.
   Its flexibility model may use `cem.flex.ptu` and `cem.flex.modes`.
2. Add its ``PLUGIN`` to `PLUGINS` below, at its place in the default order of preference.
"""

from __future__ import annotations

from typing import Any

from s2python.common import ControlType

from cem.control_types import ddbc, frbc, not_controlable, ombc, pebc, ppbc
from cem.control_types.base import ControlTypePlugin

PLUGINS: tuple[ControlTypePlugin[Any], ...] = (
    frbc.PLUGIN, ppbc.PLUGIN, ombc.PLUGIN, ddbc.PLUGIN, pebc.PLUGIN, not_controlable.PLUGIN)
"""Every control type, in the default order of preference (NOT_CONTROLABLE is selected only
when an RM offers nothing else)."""

BY_CONTROL_TYPE: dict[ControlType, ControlTypePlugin[Any]] = {p.control_type: p for p in PLUGINS}
OWNER: dict[str, ControlTypePlugin[Any]] = {
    t: p for p in PLUGINS for t in p.message_types | p.instruction_types}
"""Message type -> the plug-in whose messages (RM -> CEM) or instructions (CEM -> RM) it is."""
INSTRUCTION_TYPES: frozenset[str] = frozenset(t for p in PLUGINS for t in p.instruction_types)
REFERABLE_TYPES: frozenset[str] = frozenset(t for p in PLUGINS for t in p.referable_types)
DEFAULT_PREFERENCE: tuple[str, ...] = tuple(
    p.name for p in PLUGINS if p.control_type != ControlType.NOT_CONTROLABLE)
NAMES: dict[str, ControlType] = {p.name: p.control_type for p in PLUGINS}
"""Short name (as in the config) -> control type."""


def plugin_for(control_type: ControlType | str | None) -> ControlTypePlugin[Any] | None:
    """The plug-in of a control type (given as ControlType, its value or its short name);
    None for NO_SELECTION, None or an unknown name."""
    if control_type is None:
        return None
    if isinstance(control_type, ControlType):
        return BY_CONTROL_TYPE.get(control_type)
    key = str(control_type).strip().upper()
    if key in NAMES:
        return BY_CONTROL_TYPE[NAMES[key]]
    try:
        return BY_CONTROL_TYPE.get(ControlType(key))
    except ValueError:
        return None
