"""`/metrics` in the Prometheus text format, read from the running site at scrape time.

One collector in a registry of its own (not prometheus-client's global one, so several CEMs
in one process, as in the tests, do not share figures). Nothing is counted on the hot path
beyond what `SiteView` keeps anyway: a scrape reads the control loop, the S2 server and the
view's counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cem.app.web.view import SHORT, SiteView
from sitekit import clock

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SiteCollector(Collector):
    """The site's figures, collected when Prometheus scrapes."""

    def __init__(self, view: SiteView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        view = self.view
        controller = view.controller
        now = clock.now()
        plan = getattr(controller, "plan", None)

        replans = CounterMetricFamily("cem_replans", "Replans made since the CEM started")
        replans.add_metric([], float(getattr(controller, "replans", 0) or 0))
        yield replans
        duration = GaugeMetricFamily("cem_replan_duration_seconds",
                                     "Wall time the last replan took (build, solve, dispatch)")
        last = getattr(controller, "last_replan_s", None)
        if last is not None:
            duration.add_metric([], float(last))
        yield duration
        solve = GaugeMetricFamily("cem_plan_solve_seconds", "Solver time of the plan in force")
        gap = GaugeMetricFamily("cem_plan_gap_ratio",
                                "Gap of the plan in force to the LP bound (0.01 = 1 %)")
        age = GaugeMetricFamily("cem_plan_age_seconds",
                                "Time since the plan in force was made (process clock)")
        status = GaugeMetricFamily("cem_plan_status", "1 for the status of the plan in force",
                                   labels=["status"])
        if plan is not None:
            solve.add_metric([], float(plan.solve_s))
            if plan.gap is not None:
                gap.add_metric([], float(plan.gap))
            status.add_metric([plan.status], 1.0)
        if view.planned_at is not None:
            age.add_metric([], (now - view.planned_at).total_seconds())
        yield from (solve, gap, age, status)

        phases = view.grid_phase_w()
        site = GaugeMetricFamily("cem_site_import_watts",
                                 "Site import now (W, export negative)")
        current = GaugeMetricFamily("cem_site_phase_current_amperes",
                                    "Current per phase now (A)", labels=["phase"])
        fuse = GaugeMetricFamily("cem_site_fuse_amperes", "Main fuse per phase (A)")
        fuse.add_metric([], float(view.config.grid.fuse_a))
        if phases is not None:
            site.add_metric([], float(sum(phases)))
            for i, watts in enumerate(phases):
                current.add_metric([f"L{i + 1}"], watts / view.config.grid.voltage_v)
        yield from (site, current, fuse)

        ptus = view.ptu_averages(now)
        running = next((p for p in reversed(ptus) if not p["settled"]), None)
        settled = next((p for p in reversed(ptus) if p["settled"]), None)
        avg = GaugeMetricFamily("cem_ptu_average_import_kilowatts",
                                "15-minute average import (kW): the running PTU and the last "
                                "settled one", labels=["ptu"])
        limit = GaugeMetricFamily("cem_ptu_import_limit_kilowatts",
                                  "Import limit of the PTU (GTV or congestion window, kW)",
                                  labels=["ptu"])
        for name, ptu in (("running", running), ("settled", settled)):
            if ptu is not None:
                avg.add_metric([name], ptu["avg_kw"])
                limit.add_metric([name], ptu["limit_kw"])
        yield from (avg, limit)

        rms = GaugeMetricFamily("cem_rms_connected", "Connected RMs by control type",
                                labels=["control_type"])
        counts: Counter[str] = Counter()
        live = view.server.rms() if view.server is not None else {}
        for entry in live.values():
            control = getattr(entry, "control_type", None) or "NO_SELECTION"
            counts[SHORT.get(control, control)] += 1
        for control, count in sorted(counts.items()):
            rms.add_metric([control], float(count))
        yield rms

        messages = CounterMetricFamily(
            "cem_s2_reception_status",
            "S2 ReceptionStatus by direction (from_cem: the CEM's answers to RM messages; "
            "from_rm: the RMs' answers to CEM messages, TIMEOUT when none came)",
            labels=["direction", "status"])
        reception = dict(view.reception)
        from_rm = sum(v for (d, _), v in reception.items() if d == "from_rm")
        rejected = sum(v for (d, _), v in reception.items() if d == "from_cem")
        messages_in = int(getattr(view.server, "messages_in", 0) or 0)
        reception["from_cem", "OK"] = max(0, messages_in - from_rm - rejected)
        for (direction, code), count in sorted(reception.items()):
            messages.add_metric([direction, code], float(count))
        yield messages

        guard = CounterMetricFamily("cem_guard_actions", "Times the guard capped loads")
        guard.add_metric([], float(getattr(controller, "guard_count", 0) or 0))
        yield guard
        refused = CounterMetricFamily("cem_instructions_refused",
                                      "Instructions an RM did not accept (ReceptionStatus not OK, "
                                      "no answer, or InstructionStatus REJECTED/ABORTED)")
        refused.add_metric([], float(view.refused))
        yield refused
        lag = GaugeMetricFamily("cem_event_loop_lag_seconds",
                                "Event-loop lag: the longest of the dashboard's last samples")
        if view.lag_s:
            lag.add_metric([], max(view.lag_s))
        yield lag


def metrics_registry(view: SiteView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(view))
    return registry


def render(registry: Any) -> bytes:
    return generate_latest(registry)
