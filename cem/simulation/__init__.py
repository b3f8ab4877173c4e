"""Digital twin of a charging site: replay real sessions in virtual time under five levels of control.

`cem simulate` (see `cli.py`) loads a site config, real ACN sessions, day-ahead prices and PV,
maps them onto one PTU grid (`inputs.py`), runs each level's controller against the same
physics (`engine.py`, `levels.py`), computes KPIs (`kpis.py`) and writes a report (`report.py`).
"""
