"""What the dashboard and the API show of a running site, read from the running parts.

`SiteView` sits beside the control loop and reads it; it changes nothing of it but the EV
modes (through `cem.control.ev_modes.EvModes`) and congestion windows (through the store, as
`cem congestion add` does). Once per `[http] push_interval_s` (wall time) it samples the site
power, notices new replans and guard actions (the decisions list), and, when anybody listens,
builds one snapshot that every page and API reader shares. The per-EV "why" texts are
recomputed only when the plan, the PTU, the guard, the modes or the congestion windows change
(`cem.control.explain`).

Counters for `/metrics` (S2 ReceptionStatus per direction, instructions refused, each RM's last
message) come from one listener on the S2 server's events: a dict write per event.

Times shown are the process clock's (`sitekit.clock`: the demo's simulated time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from cem.control.ev_modes import EvModes
from cem.control.explain import EvExplanation, Window, explain_evs, ptu_at, windows_of
from cem.ports import (
    Connected,
    Disconnected,
    InstructionStatusChanged,
    MessageRejected,
    ReceptionConfirmed,
    ReceptionFailed,
    RegistryEvent,
    RmEvent,
    StateChanged,
)
from cem.site.config import SiteConfig
from sitekit import clock

logger = logging.getLogger("cem.web")

SHORT = {"FILL_RATE_BASED_CONTROL": "FRBC", "POWER_ENVELOPE_BASED_CONTROL": "PEBC",
         "POWER_PROFILE_BASED_CONTROL": "PPBC", "OPERATION_MODE_BASED_CONTROL": "OMBC",
         "DEMAND_DRIVEN_BASED_CONTROL": "DDBC", "NOT_CONTROLABLE": "NOT_CONTROLABLE",
         "NO_SELECTION": "none"}
KIND_NAMES = {"ev": "EV charger", "battery": "battery", "heat_pump": "heat pump",
              "storage": "storage", "pv": "PV", "load": "load", "modes": "mode device",
              "profile": "profile device", "ddbc": "demand-driven device",
              "flexible load": "flexible load", "meter": "grid meter"}
_DRIVER = re.compile(r"\bdriver ([^,]+)")
_NEEDS = re.compile(r"\bneeds from ([^,]+)")
FRBC = "FILL_RATE_BASED_CONTROL"
STACK_SINGLE_MAX = 12  # plans with more assets are stacked per kind, not per device


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _frbc(entry: Any) -> Any:
    """The FRBC state of a live RM (`RmState.of`), or None when FRBC is not its control type."""
    state = getattr(entry, "state", None)
    if state is None or str(getattr(state.control_type, "value", state.control_type)) != FRBC:
        return None
    return state.of(FRBC)


@dataclass
class Decision:
    """One thing the CEM decided: a replan, a fallback, a guard action, an operator's change."""

    at: datetime
    kind: str  # replan, fallback, guard, congestion (the fast path's cut), operator
    text: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"at": iso(self.at), "kind": self.kind, "text": self.text, "detail": self.detail}


class SiteView:
    """The running site, read for the page, the API and the metrics."""

    def __init__(self, config: SiteConfig, server: Any, store: Any, controller: Any) -> None:
        self.config = config
        self.server = server
        self.store = store
        self.controller = controller
        self.zone = ZoneInfo(config.site.timezone)
        self.modes = EvModes(store)
        self.started_at = clock.now()
        self.started_mono = time.monotonic()
        # site power: one point per bucket of the process clock, the last history_hours
        self.bucket_s = 60.0
        keep = int(config.http.history_hours * 3600 / self.bucket_s) + 2
        self.history: deque[tuple[float, float, float, float, float, int]] = deque(maxlen=keep)
        self.decisions: deque[Decision] = deque(maxlen=200)
        self.reception: Counter[tuple[str, str]] = Counter()  # (direction, status) -> count
        self.refused = 0  # instructions the RMs did not take
        self.last_message: dict[str, tuple[datetime, str]] = {}
        self.connected_at: dict[str, datetime] = {}
        self.guard_log: deque[tuple[datetime, Any]] = deque(maxlen=100)
        self.tick = 0
        self.planned_at: datetime | None = None
        self._plan_obj: Any = None
        self._seen_replans = 0
        self._seen_guard = 0
        self._seen_cuts = 0
        self._seen_plan_id = 0
        self._explain_key: tuple[Any, ...] | None = None
        self._explained: dict[str, EvExplanation] = {}
        self._snapshot: tuple[int, dict[str, Any], str] | None = None
        self._plan_json: tuple[Any, str] | None = None
        self._known_rms: list[Any] = []
        self._known_rms_at = -math.inf
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.listeners = 0  # open SSE streams
        self.lag_s: deque[float] = deque(maxlen=600)  # event-loop lag per tick
        self._phases: tuple[float, float, float] | None = None  # the last sample's
        self._kinds: tuple[Any, dict[str, str]] = (None, {})  # per mapping: rm id -> kind

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self.controller is not None and hasattr(self.controller, "ev_modes"):
            await self.modes.load()
            self.controller.ev_modes = self.modes
        if self.server is not None and hasattr(self.server, "add_listener"):
            self.server.add_listener(self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cem-web-view")

    async def stop(self) -> None:
        self._stop.set()
        self._wake_all()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def wait_tick(self, within_s: float) -> bool:
        """Wait for the next sample (True), or `within_s` s / the end (False)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await asyncio.wait_for(future, within_s)
            return not self._stop.is_set()
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(future)

    def _wake_all(self) -> None:
        for future in self._waiters:
            if not future.done():
                future.set_result(None)

    async def _run(self) -> None:
        interval = self.config.http.push_interval_s
        due = time.monotonic()
        while not self._stop.is_set():
            due += interval
            try:
                self.sample()
                await self._observe()
            except Exception:
                logger.exception("dashboard sample failed")
            self.tick += 1
            if self.listeners:
                with contextlib.suppress(Exception):
                    await self.snapshot_text_async()  # built once, for every open page
            self._wake_all()
            delay = due - time.monotonic()
            if delay < 0:
                due = time.monotonic()
                delay = 0.0
            began = time.monotonic()
            await asyncio.sleep(delay)
            self.lag_s.append(max(0.0, time.monotonic() - began - delay))

    # --- S2 events (hot path: one call per event) --------------------------------------------

    def _on_event(self, event: RegistryEvent) -> None:
        if isinstance(event, RmEvent):
            inner = event.event
            if isinstance(inner, StateChanged):
                if event.rm_id is not None:
                    self.last_message[event.rm_id] = (event.at, inner.message_type or inner.kind)
            elif isinstance(inner, ReceptionConfirmed):
                self.reception["from_rm", "OK"] += 1
            elif isinstance(inner, ReceptionFailed):
                self.reception["from_rm", inner.status] += 1
                if inner.message_type.endswith("Instruction"):
                    self.refused += 1
            elif isinstance(inner, MessageRejected):
                self.reception["from_cem", inner.status] += 1
            elif isinstance(inner, InstructionStatusChanged) and inner.status in ("REJECTED",
                                                                                  "ABORTED"):
                self.refused += 1
        elif isinstance(event, Connected):
            pass
        elif isinstance(event, Disconnected) and event.rm_id is not None:
            self.last_message.setdefault(event.rm_id, (clock.now(), "disconnected"))

    # --- sampling --------------------------------------------------------------------------

    def grid_phase_w(self) -> tuple[float, float, float] | None:
        controller = self.controller
        if controller is None or not hasattr(controller, "grid_phase_w"):
            return None
        return controller.grid_phase_w()

    def sample(self) -> None:
        """Add the site's power now to the history (one point per minute of the clock)."""
        phases = self._phases = self.grid_phase_w()
        if phases is None:
            return
        now = clock.now().timestamp()
        bucket = now - now % self.bucket_s
        total = float(sum(phases))
        if self.history and self.history[-1][0] == bucket:
            b, w, l1, l2, l3, k = self.history[-1]
            self.history[-1] = (b, (w * k + total) / (k + 1), (l1 * k + phases[0]) / (k + 1),
                                (l2 * k + phases[1]) / (k + 1), (l3 * k + phases[2]) / (k + 1),
                                k + 1)
        else:
            self.history.append((bucket, total, phases[0], phases[1], phases[2], 1))

    async def _observe(self) -> None:
        """Turn new replans and guard actions into decisions."""
        controller = self.controller
        if controller is None:
            return
        now = clock.now()
        replans = int(getattr(controller, "replans", 0))
        if replans != self._seen_replans or controller.plan is not self._plan_obj:
            # a plan cut to a new limit by the fast path is no new replan (listed below)
            cut_only = replans == self._seen_replans and \
                int(getattr(controller, "limit_cut_count", 0)) != self._seen_cuts
            self._seen_replans = replans
            self._plan_obj = controller.plan
            self.planned_at = now
            if not cut_only:
                await self._new_plans(now)
        count = int(getattr(controller, "guard_count", 0))
        if count != self._seen_guard:
            fresh = min(count - self._seen_guard, len(controller.guard_actions))
            self._seen_guard = count
            for decision in list(controller.guard_actions)[-fresh:] if fresh > 0 else []:
                self.guard_log.append((now, decision))
                capped = ", ".join(f"{self._name(a)} to {w / 1000:.1f} kW"
                                   for a, w in decision.caps.items())
                self.decisions.append(Decision(now, "guard", decision.reason,
                                               f"capped {capped or 'nothing it could cap'}"))
        cuts = int(getattr(controller, "limit_cut_count", 0))
        if cuts != self._seen_cuts:
            fresh = min(cuts - self._seen_cuts, len(getattr(controller, "limit_cuts", ())))
            self._seen_cuts = cuts
            for text in list(controller.limit_cuts)[-fresh:] if fresh > 0 else []:
                what, _, detail = text.partition(": ")
                self.decisions.append(Decision(now, "congestion", what, detail))

    async def _new_plans(self, now: datetime) -> None:
        plan = self.controller.plan
        rows: list[tuple[Any, ...]] = []
        if self.store is not None:
            with contextlib.suppress(Exception):
                rows = await self.store.query(
                    "SELECT plan_id, status, reason, solve_s, gap FROM plans WHERE plan_id > ?"
                    " ORDER BY plan_id DESC LIMIT 20", (self._seen_plan_id,))
        if rows:
            self._seen_plan_id = int(rows[0][0])
            for plan_id, status, reason, solve_s, gap in reversed(rows):
                kind = "fallback" if status == "FALLBACK" else "replan"
                detail = f"plan {plan_id}: {str(status).lower()}"
                if solve_s is not None:
                    detail += f", solved in {solve_s:.2f} s"
                if gap is not None:
                    detail += f", gap {gap * 100:.1f} %"
                if kind == "fallback" and plan is not None and plan.notes and \
                        plan_id == self._seen_plan_id:
                    detail += f" ({plan.notes[0]})"
                self.decisions.append(Decision(now, kind, reason or "replan", detail))
        elif plan is not None:
            kind = "fallback" if plan.status == "FALLBACK" else "replan"
            detail = plan.notes[0] if kind == "fallback" and plan.notes else plan.status.lower()
            self.decisions.append(Decision(now, kind, "replan", detail))

    def note(self, text: str, detail: str = "") -> None:
        """An operator's change through the API, for the decisions list."""
        self.decisions.append(Decision(clock.now(), "operator", text, detail))

    # --- reading the parts -------------------------------------------------------------------

    def _name(self, asset_or_rm: str) -> str:
        rm_id = asset_or_rm
        mapping = getattr(self.controller, "mapping", None)
        if mapping is not None and asset_or_rm in mapping.bindings:
            rm_id = mapping.bindings[asset_or_rm].rm_id
        entry = self.server.get(rm_id) if self.server is not None else None
        name = getattr(entry, "name", None)
        return name or rm_id[:8]

    def limits_now(self, now: datetime) -> dict[str, Any]:
        grid = self.config.grid
        problem = getattr(self.controller, "problem", None)
        import_kw = grid.import_limit_kw
        if problem is not None:
            t = ptu_at(problem, now)
            import_kw = float(np.asarray(problem.limits.import_limit_w)[t]) / 1000
        return {"fuse_a": grid.fuse_a, "phases": grid.phases, "voltage_v": grid.voltage_v,
                "gtv_kw": grid.import_limit_kw, "import_limit_kw": round(import_kw, 3),
                "export_limit_kw": grid.export_limit_kw,
                "limit_share": self.config.planner.limit_share}

    def congestion_windows(self) -> list[Window]:
        """Every source's congestion windows as the control loop has them (config, store,
        OpenADR, ...), each with its source; the config's alone without a control loop."""
        if self.controller is None or not hasattr(self.controller, "congestion"):
            return windows_of(self.config.congestion, "config")
        return windows_of(list(self.controller.congestion), "config")

    def explanations(self, now: datetime) -> dict[str, EvExplanation]:
        controller = self.controller
        problem = getattr(controller, "problem", None)
        plan = getattr(controller, "plan", None)
        mapping = getattr(controller, "mapping", None)
        if problem is None or plan is None or mapping is None:
            return {}
        windows = self.congestion_windows()
        guard = tuple(list(self.guard_log))
        t = ptu_at(problem, now)
        recent = tuple(a for a, _ in guard if now - a <= self._guard_hold())
        # id() alone may be reused by the next plan once the old one is freed
        key = (id(plan), getattr(controller, "replans", 0), getattr(controller, "plan_id", None),
               t, recent, self.modes.version,
               tuple((w.start, w.end, w.import_limit_kw) for w in windows))
        if key != self._explain_key:
            self._explained = explain_evs(
                problem, plan, mapping, now, zone=self.zone, guard_actions=guard,
                guard_hold=self._guard_hold(), congestion=windows, modes=self.modes.modes,
                departures=self._departures(mapping))
            self._explain_key = key
        return self._explained

    def _guard_hold(self) -> timedelta:
        return timedelta(minutes=self.config.planner.ptu_minutes)

    def _departures(self, mapping: Any) -> dict[str, datetime]:
        """The departure each EV's RM gave (the end of its fill-level target profile)."""
        out = {}
        for rm_id in list(mapping.rm_assets):
            frbc = _frbc(self.server.get(rm_id) if self.server is not None else None)
            profile = frbc.fill_level_target_profile if frbc is not None else None
            if profile is None:
                continue
            with contextlib.suppress(Exception):
                span = sum((e.duration.to_timedelta() for e in profile.elements), timedelta())
                out[rm_id] = profile.start_time + span
        return out

    def in_force(self, rm_id: str, now: datetime) -> str:
        dispatcher = getattr(self.controller, "dispatcher", None)
        if dispatcher is None:
            return ""
        try:
            current = dispatcher.in_force(rm_id, now)
        except Exception:
            return ""
        parts = []
        for sent in current.values():
            message = sent.message
            text = message.message_type
            mode = getattr(message, "operation_mode", None)
            factor = getattr(message, "operation_mode_factor", None)
            if mode is not None:
                text += f" mode {self._mode_label(rm_id, mode, now)}"
                if factor is not None:
                    text += f" x{float(factor):.2f}"
            if sent.execution_time is not None:
                text += f" since {sent.execution_time.astimezone(self.zone):%H:%M}"
            parts.append(text)
        return "; ".join(parts)

    def _mode_label(self, rm_id: str, mode_id: Any, now: datetime) -> str:
        frbc = _frbc(self.server.get(rm_id) if self.server is not None else None)
        with contextlib.suppress(Exception):
            sd = frbc.system_description(now) if frbc is not None else None
            if sd is not None:
                for actuator in sd.actuators:
                    for m in actuator.operation_modes:
                        if str(getattr(m.id, "root", m.id)) == str(getattr(mode_id, "root",
                                                                           mode_id)):
                            return m.diagnostic_label or str(mode_id)[:8]
        return str(getattr(mode_id, "root", mode_id))[:8]

    async def known_rms(self) -> list[Any]:
        """RMs the store knows (also those not connected now), refreshed every 10 s."""
        if self.store is None:
            return []
        if time.monotonic() - self._known_rms_at > 10.0:
            self._known_rms_at = time.monotonic()
            with contextlib.suppress(Exception):
                self._known_rms = await self.store.list_rms()
        return self._known_rms

    def rm_rows(self, now: datetime) -> list[dict[str, Any]]:
        controller = self.controller
        mapping = getattr(controller, "mapping", None)
        problem = getattr(controller, "problem", None)
        kind_of = self._rm_kinds(mapping, problem)
        plan = getattr(controller, "plan", None)
        t = ptu_at(problem, now) if problem is not None else 0
        rows = []
        live = dict(self.server.rms()) if self.server is not None else {}
        for rm_id, entry in live.items():
            kind = kind_of.get(rm_id, "unknown")
            last = self.last_message.get(rm_id)
            measured = None
            with contextlib.suppress(Exception):
                m = entry.state.latest_measurement()
                if m is not None:
                    measured = round(sum(v.value for v in m.values
                                         if "POWER" in str(v.commodity_quantity.value)))
            planned = self._planned_w(rm_id, t, plan, mapping)
            control = getattr(entry, "control_type", None) or ""
            rows.append({
                "rm_id": rm_id, "name": entry.name or rm_id[:8],
                "kind": KIND_NAMES.get(kind, kind), "control_type": SHORT.get(control, control),
                "connected": True,  # event times are UTC already
                "last_message_at": last[0].isoformat() if last else None,
                "last_message": last[1] if last else None,
                "measured_w": measured, "planned_w": None if planned is None else round(planned),
                "instruction": self.in_force(rm_id, now),
            })
        seen = set(live)
        for row in self._known_rms:
            if row.rm_id in seen:
                continue
            rows.append({"rm_id": row.rm_id, "name": row.name or row.rm_id[:8], "kind": "",
                         "control_type": SHORT.get(row.control_type or "", row.control_type),
                         "connected": False,
                         "last_message_at": iso(datetime.fromtimestamp(row.last_message_at, UTC))
                         if row.last_message_at else None,
                         "last_message": "disconnected", "measured_w": None, "planned_w": None,
                         "instruction": ""})
        rows.sort(key=lambda r: (not r["connected"], r["kind"], r["name"]))
        return rows

    @staticmethod
    def _planned_w(rm_id: str, t: int, plan: Any, mapping: Any) -> float | None:
        """The plan's power for this RM in PTU t (as `SiteController.planned_w`, with the
        PTU worked out once for all RMs)."""
        if plan is None or mapping is None:
            return None
        total, found = 0.0, False
        for asset_id in mapping.rm_assets.get(rm_id, ()):
            row = plan.power_w.get(asset_id)
            if row is not None and t < len(row):
                total += float(row[t])
                found = True
            held = getattr(mapping.bindings.get(asset_id), "held_load", None)
            if held is not None and t < len(held.power_w):
                total += float(held.power_w[t])
        return total if found else None

    def _rm_kinds(self, mapping: Any, problem: Any) -> dict[str, str]:
        """What kind of device each RM is, per plan (worked out once per mapping)."""
        if mapping is None:
            return {}
        if self._kinds[0] is mapping:
            return self._kinds[1]
        kinds = {s.id: s.kind for s in problem.storage} if problem is not None else {}
        out = {}
        for rm_id, assets in list(mapping.rm_assets.items()):
            out[rm_id] = next((kinds[a] for a in assets if a in kinds), None) or (
                "pv" if any("pv" in a for a in assets) else ("load" if assets else "unknown"))
        if mapping.meter_rm is not None:
            out[mapping.meter_rm] = "meter"
        self._kinds = (mapping, out)
        return out

    def ev_rows(self, now: datetime) -> list[dict[str, Any]]:
        controller = self.controller
        problem = getattr(controller, "problem", None)
        mapping = getattr(controller, "mapping", None)
        if problem is None or mapping is None:
            return []
        why = self.explanations(now)
        rows = []
        for asset in problem.storage:
            if asset.kind != "ev":
                continue
            binding = mapping.bindings.get(asset.id)
            rm_id = binding.rm_id if binding is not None else asset.id
            mode = self.modes.get(rm_id)
            if asset.charge_max_w <= 0 and mode is None:
                continue  # no EV on this charger
            entry = self.server.get(rm_id) if self.server is not None else None
            label, fill_label = self._labels(entry, now)
            driver = _DRIVER.search(label)
            needs = _NEEDS.search(label)
            ex = why.get(asset.id)
            departure = ex.departure if ex is not None else None
            rows.append({
                "rm_id": rm_id, "evse": getattr(entry, "name", None) or rm_id[:8],
                "driver": driver.group(1).strip() if driver else None,
                "priority": asset.priority,
                "charged_kwh": round(asset.level_wh / 1000, 2),
                "level_unit": fill_label or "kWh",
                "target_kwh": None if asset.target_wh is None else round(asset.target_wh / 1000,
                                                                         2),
                "departure": iso(departure),
                "departure_source": needs.group(1).strip() if needs else (
                    "the RM's target" if departure is not None else "none given"),
                "planned_kwh": round(ex.planned_wh / 1000, 2) if ex is not None else None,
                "power_w": round(ex.power_w) if ex is not None else None,
                "current_a": ex.current_a if ex is not None else None,
                "mode": mode.mode if mode is not None else "smart",
                "min_kwh": mode.min_kwh if mode is not None else None,
                "why": ex.text if ex is not None else "",
                "next": ex.next_text if ex is not None else "",
                "code": ex.code if ex is not None else "",
                "limit": ex.limit if ex is not None else None,
                "next_charge": iso(ex.next_charge) if ex is not None else None,
                "shortfall_kwh": round(ex.shortfall_wh / 1000, 2) if ex is not None else 0.0,
            })
        rows.sort(key=lambda r: r["evse"])
        return rows

    @staticmethod
    def _labels(entry: Any, now: datetime) -> tuple[str, str]:
        frbc = _frbc(entry)
        with contextlib.suppress(Exception):
            sd = frbc.system_description(now) if frbc is not None else None
            if sd is not None:
                return sd.storage.diagnostic_label or "", sd.storage.fill_level_label or ""
        return "", ""

    def ptu_averages(self, now: datetime) -> list[dict[str, Any]]:
        """Settled 15-minute averages of the history, and the running one, against the limit."""
        ptu_s = self.config.planner.ptu_minutes * 60
        sums: dict[float, tuple[float, int]] = {}
        for bucket, watts, *_ in list(self.history):
            start = bucket - bucket % ptu_s
            total, count = sums.get(start, (0.0, 0))
            sums[start] = (total + watts, count + 1)
        current = now.timestamp() - now.timestamp() % ptu_s
        out = []
        for start, (total, count) in sorted(sums.items()):
            moment = datetime.fromtimestamp(start, UTC)
            out.append({"start": iso(moment), "avg_kw": round(total / count / 1000, 3),
                        "limit_kw": round(self._import_limit_kw(moment), 3),
                        "settled": start < current})
        return out

    def _import_limit_kw(self, moment: datetime) -> float:
        limit = self.config.grid.import_limit_kw
        for w in self.congestion_windows():
            if w.start <= moment < w.end and w.import_limit_kw is not None:
                limit = min(limit, w.import_limit_kw)
        return limit

    def health(self, now: datetime) -> tuple[bool, str]:
        controller = self.controller
        if controller is None:
            return False, "no control loop is running"
        task = getattr(controller, "_task", None)
        if task is not None and task.done():
            return False, "the control loop has stopped"
        ptu_s = self.config.planner.ptu_minutes * 60
        limit_s = 2 * ptu_s + 4 * self.config.planner.time_limit_s * clock.speed() + 60
        if self.planned_at is None:
            waited = (now - self.started_at).total_seconds()
            if waited > limit_s:
                return False, f"no plan yet after {waited:.0f} s"
            return True, "starting: no plan yet"
        age = (now - self.planned_at).total_seconds()
        if age > limit_s:
            return False, (f"the plan is stale: made {age / 60:.0f} min ago (expected a "
                           f"replan every PTU of {ptu_s / 60:.0f} min)")
        return True, f"plan {self._seen_plan_id or ''} made {age:.0f} s ago".replace("  ", " ")

    # --- what the page gets --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows but the history and the plan chart; shared per tick."""
        if self._snapshot is not None and self._snapshot[0] == self.tick:
            return self._snapshot[1]
        now = clock.now()
        phases = self._phases if self._phases is not None else self.grid_phase_w()
        controller = self.controller
        problem = getattr(controller, "problem", None)
        prices = None
        if problem is not None:
            t = ptu_at(problem, now)
            prices = {"import_eur_per_kwh": float(problem.prices.import_eur_per_kwh[t]),
                      "export_eur_per_kwh": float(problem.prices.export_eur_per_kwh[t])}
        ok, why = self.health(now)
        ptus = self.ptu_averages(now)
        running = next((p for p in reversed(ptus) if not p["settled"]), None)
        voltage = self.config.grid.voltage_v
        snap = {
            "now": iso(now), "tick": self.tick,
            "site": {"name": self.config.site.name, "timezone": self.config.site.timezone,
                     **self.limits_now(now)},
            "power": None if phases is None else {
                "import_w": round(sum(phases)), "phase_w": [round(p) for p in phases],
                "phase_a": [round(p / voltage, 1) for p in phases],
                "ptu_avg_kw": running["avg_kw"] if running else None,
                "ptu_limit_kw": running["limit_kw"] if running else None},
            "point": list(self.history[-1][:5]) if self.history else None,
            "plan": self.plan_summary(now),
            "prices": prices,
            "rms": self.rm_rows(now),
            "evs": self.ev_rows(now),
            "congestion": [{"start": iso(w.start), "end": iso(w.end),
                            "import_limit_kw": w.import_limit_kw, "source": w.source,
                            "active": w.start <= now < w.end}
                           for w in self.congestion_windows() if w.end > now],
            "decisions": [d.to_json() for d in list(self.decisions)[-40:]][::-1],
            "health": {"ok": ok, "reason": why},
            "ptu_averages": ptus,
        }
        self._snapshot = (self.tick, snap, "")
        return snap

    async def snapshot_text_async(self) -> str:
        """The snapshot as JSON text, built in a worker thread (at 1000 RMs it is ~25 ms of
        Python: on the event loop that would hold S2 answers back as long); redone on the loop
        should the parts change under it (RuntimeError), as the control loop does."""
        if self._snapshot is not None and self._snapshot[0] == self.tick and self._snapshot[2]:
            return self._snapshot[2]
        try:
            return await asyncio.to_thread(self.snapshot_text)
        except RuntimeError:
            return self.snapshot_text()

    def snapshot_text(self) -> str:
        snap = self.snapshot()
        assert self._snapshot is not None
        if not self._snapshot[2]:
            self._snapshot = (self._snapshot[0], snap, json.dumps(snap, separators=(",", ":")))
        return self._snapshot[2]

    def plan_summary(self, now: datetime) -> dict[str, Any] | None:
        controller = self.controller
        plan = getattr(controller, "plan", None)
        if plan is None:
            return None
        age = (now - self.planned_at).total_seconds() if self.planned_at else None
        return {"plan_id": getattr(controller, "plan_id", None), "status": plan.status,
                "cost_eur": round(plan.cost_eur, 2),
                "gap": None if plan.gap is None else round(plan.gap, 4),
                "solve_s": round(plan.solve_s, 3), "replans": controller.replans,
                "replan_s": None if controller.last_replan_s is None else round(
                    controller.last_replan_s, 3),
                "made_at": iso(self.planned_at), "age_s": None if age is None else round(age),
                "notes": plan.notes[:3],
                "key": f"{id(plan)}-{controller.replans}"}

    def history_json(self) -> list[list[float]]:
        return [[b, round(w), round(a), round(c), round(d)] for b, w, a, c, d, _ in self.history]

    def plan_key(self) -> tuple[int, int] | None:
        """Changes when the plan in force changes."""
        plan = getattr(self.controller, "plan", None)
        return None if plan is None else (id(plan), int(getattr(self.controller, "replans", 0)))

    def plan_text(self) -> str | None:
        """The plan chart as JSON text (made once per plan)."""
        plan = getattr(self.controller, "plan", None)
        if plan is None:
            return None
        if self._plan_json is None or self._plan_json[0] is not plan:
            chart = self.plan_chart()
            if chart is None:
                return None
            self._plan_json = (plan, json.dumps(chart, separators=(",", ":")))
        return self._plan_json[1]

    def plan_chart(self) -> dict[str, Any] | None:
        """The plan over the horizon, stacked per device (per kind on large sites), with the
        limits and prices per PTU."""
        controller = self.controller
        plan = getattr(controller, "plan", None)
        problem = getattr(controller, "problem", None)
        mapping = getattr(controller, "mapping", None)
        if plan is None or problem is None:
            return None
        n = problem.n_ptus
        rows: dict[str, np.ndarray] = {}
        labels: dict[str, str] = {}
        kinds: dict[str, str] = {}
        for group, kind_of in ((problem.storage, lambda a: a.kind), (problem.modes, lambda a:
                               "modes"), (problem.profiles, lambda a: "profile")):
            for asset in group:
                row = plan.power_w.get(asset.id)
                if row is not None:
                    rows[asset.id] = np.asarray(row[:n], dtype=float)
                    kinds[asset.id] = kind_of(asset)
        for fixed in problem.fixed:
            rows[fixed.id] = np.asarray(fixed.power_w[:n], dtype=float)
            kinds[fixed.id] = "base load" if fixed.id == "base-load" else "load"
        for pv in problem.curtailable:
            cut = plan.curtailed_w.get(pv.id)
            prod = np.asarray(pv.production_w[:n], dtype=float)
            rows[pv.id] = -(prod - (np.asarray(cut[:n], dtype=float) if cut is not None else 0))
            kinds[pv.id] = "pv"
        for asset_id in rows:
            rm_id = mapping.bindings[asset_id].rm_id if mapping is not None and \
                asset_id in mapping.bindings else asset_id.split(":")[0]
            labels[asset_id] = self._name(rm_id) if asset_id != "base-load" else "base load"
        if len(rows) > STACK_SINGLE_MAX:
            grouped: dict[str, np.ndarray] = {}
            for asset_id, row in rows.items():
                name = KIND_NAMES.get(kinds[asset_id], kinds[asset_id])
                name = "EVs" if kinds[asset_id] == "ev" else name
                grouped[name] = grouped.get(name, np.zeros(n)) + row
            series = [{"name": k, "kind": k, "w": [round(x) for x in v]}
                      for k, v in grouped.items()]
        else:
            series = [{"name": labels[a], "kind": kinds[a], "w": [round(x) for x in row]}
                      for a, row in rows.items()]
        series = [s for s in series if any(s["w"])]
        limits = problem.limits
        chart = {
            "start": iso(problem.start), "ptu_minutes": problem.ptu_minutes, "n": n,
            "series": series,
            "grid_w": [round(float(x)) for x in plan.grid_import_w[:n]],
            "import_limit_w": [round(float(x)) for x in limits.import_limit_w[:n]],
            "planned_import_limit_w": [round(float(x)) for x in
                                       limits.planned_import_limit_w[:n]],
            "export_limit_w": [round(float(x)) for x in limits.export_limit_w[:n]],
            "fuse_w": round(limits.fuse_w_per_phase * limits.phases),
            "import_eur_per_kwh": [round(float(x), 4) for x in
                                   problem.prices.import_eur_per_kwh[:n]],
            "export_eur_per_kwh": [round(float(x), 4) for x in
                                   problem.prices.export_eur_per_kwh[:n]],
            "status": plan.status, "plan_id": getattr(controller, "plan_id", None),
            "key": f"{id(plan)}-{getattr(controller, 'replans', 0)}",
        }
        return chart
