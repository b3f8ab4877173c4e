"""The site optimisation: CP-SAT with an LP bound (HiGHS) and a rule-based fallback."""
