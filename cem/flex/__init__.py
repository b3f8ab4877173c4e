"""S2 flexibility per control type: S2 state to planner assets, plans back to instructions."""
