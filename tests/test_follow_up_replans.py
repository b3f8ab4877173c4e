"""Follow-up replans: a plan far above its bound asks for the next replan at once.

When the LP runs out of time (a congestion window that moved the optimum far, a cold start
at a thousand EVs) the plan in force can be tens of percent above its bound; waiting for the
next event to replan would leave it in force for minutes. The controller asks for a replan
at once, gives it three times the time limit (the LP goes on from its basis), at most
`planner.follow_up_replans` in a row. The site is the congestion fast path's: real S2 RMs
over websockets to the real S2 server, the real planner; only the LP's running out of time
is staged (it cannot be made to happen on cue), by a planner that reports its plan as
40 % above its bound while it is given the site's own time limit.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

from test_congestion_fast_path import GatedPlanner, open_site

from cem.planner.assets import Plan, Problem

FOLLOW_UP = "the LP goes on"


class StarvedPlanner(GatedPlanner):
    """The real planner, whose plans come back as if the LP had run out of time 40 % above
    the bound: the first `starved` of those made with the site's time limit (5 s), or every
    plan (None)."""

    def __init__(self, starved: int | None) -> None:
        super().__init__()
        self.starved = starved
        self.time_limits: list[float] = []

    def __call__(self, problem: Problem, **kwargs: Any) -> Plan:
        plan = super().__call__(problem, **kwargs)
        self.time_limits.append(kwargs["time_limit_s"])
        if self.starved is None:
            return dataclasses.replace(plan, gap=0.4, lp_solved=False)
        if kwargs["time_limit_s"] == 5.0 and self.starved > 0:
            self.starved -= 1
            return dataclasses.replace(plan, gap=0.4, lp_solved=False)
        return plan


def follow_ups(reasons: list[str]) -> list[str]:
    return [r for r in reasons if r.startswith(FOLLOW_UP)]


async def test_a_plan_far_above_its_bound_is_replanned_at_once_with_more_time(tmp_path: Path) -> None:
    planner = StarvedPlanner(starved=1)
    async for controller, _controls, _ in open_site(tmp_path, True, planner):
        await controller.replan(["the test"])
        asked = controller.take_reasons()
        assert follow_ups(asked) == [f"{FOLLOW_UP} (1 of 3): the plan is 40.0% above its bound"]
        await controller.replan(asked)
        # the follow-up had three times the site's time limit, and its plan (the LP solved)
        # asks for nothing more
        assert planner.time_limits == [5.0, 15.0]
        assert controller.take_reasons() == []
        # the store's plans say why each was made: the page and `cem plans` show it
        db = sqlite3.connect(tmp_path / "cem.db")
        rows = db.execute("SELECT gap, payload FROM plans ORDER BY plan_id").fetchall()
        db.close()
        assert [json.loads(p)["reasons"] for _g, p in rows] == [["the test"], asked]
        assert rows[0][0] == 0.4 and rows[1][0] < 0.01


async def test_follow_ups_stop_after_the_configured_number_in_a_row(tmp_path: Path) -> None:
    planner = StarvedPlanner(starved=None)  # the LP never gets there, even with more time
    async for controller, _controls, _ in open_site(tmp_path, True, planner,
                                                    follow_up_replans=2):
        await controller.replan(["the test"])
        asked = follow_ups(controller.take_reasons())
        assert len(asked) == 1 and "(1 of 2)" in asked[0]
        await controller.replan(asked)
        asked = follow_ups(controller.take_reasons())
        assert len(asked) == 1 and "(2 of 2)" in asked[0]
        await controller.replan(asked)
        assert controller.take_reasons() == []  # two in a row, no third
        assert planner.time_limits == [5.0, 15.0, 15.0]
        # another reason to replan starts the count anew, and gets the site's time limit
        await controller.replan(["an EV arrived"])
        asked = follow_ups(controller.take_reasons())
        assert len(asked) == 1 and "(1 of 2)" in asked[0]
        assert planner.time_limits[-1] == 5.0


async def test_follow_up_replans_can_be_turned_off(tmp_path: Path) -> None:
    planner = StarvedPlanner(starved=1)
    async for controller, _controls, _ in open_site(tmp_path, True, planner, follow_up_replans=0):
        await controller.replan(["the test"])
        assert controller.take_reasons() == []
        assert planner.time_limits == [5.0]
