"""The model-predictive control loop: when to replan, dispatch, and the fast guard."""
