"""NOT_CONTROLABLE as a plug-in: no messages of its own, no state, nothing to plan.

The RM is planned as a fixed load from its PowerForecast or PowerMeasurement
(`cem.flex.not_controlable`), or, when it is the grid meter, read for the base load
(`cem.flex.kinds`); both are `cem.flex.site_problem`'s, for every RM whose plug-in adds nothing.
"""

from __future__ import annotations

from typing import Any

from s2python.common import ControlType

from cem.control_types.base import PluginBase


class NoState:
    """A control type without state of its own."""

    def snapshot(self) -> dict[str, Any]:
        return {}


class NotControlablePlugin(PluginBase[NoState]):
    control_type = ControlType.NOT_CONTROLABLE
    name = "NOT_CONTROLABLE"
    state_class = NoState


PLUGIN = NotControlablePlugin()
