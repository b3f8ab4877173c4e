"""The OpenADR 3 VEN against a VTN on loopback (Starlette, changed mid-test): limits appear,
change and go; bad events are refused with a reason; safe mode when the VTN is gone; and the
real SiteController with the real planner keeps the planned import under every limit."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from s2python.common import NumberRange
from s2python.frbc import FRBCFillLevelTargetProfile, FRBCFillLevelTargetProfileElement
from signal_servers import TOKEN, Vtn, serve
from test_control_loop import EvRm, FakeRegistry, config, until

from cem.control.mpc import SiteController
from cem.flex.ptu import floor_to_ptu
from cem.ports import SignalUpdate
from cem.signals.openadr import OpenAdrVen
from cem.site.config import OpenAdrConfig, SiteConfig
from cem.store import Store

EAN = "871685900000000018"


def ven_config(base: str, **changes: Any) -> OpenAdrConfig:
    settings: dict[str, Any] = {
        "vtn_url": base, "client_id": Vtn.CLIENT_ID, "client_secret": Vtn.CLIENT_SECRET,
        "ven_name": "NL-CEM-TEST", "program": "gac-congestion-nl", "targets": [EAN],
        "poll_interval_s": 0.1, "safe_mode_after_s": 0.6, **changes}
    return OpenAdrConfig.model_validate(settings)


def planned_import_within(controller: SiteController, limit_w: float, first: int,
                          last: int) -> bool:
    plan, problem = controller.plan, controller.problem
    assert plan is not None and problem is not None
    share = controller.config.planner.limit_share  # plans keep headroom under the limit
    return bool(np.all(np.asarray(plan.grid_import_w[first:last]) <= limit_w * share + 1)
                and np.all(np.asarray(problem.limits.import_limit_w[first:last]) <= limit_w))


@pytest.fixture
async def vtn() -> AsyncIterator[tuple[Vtn, str]]:
    server = Vtn()
    async with serve(server.app) as (base, _):
        yield server, base


async def test_limits_appear_change_and_go_and_the_plan_keeps_under_them(
        vtn: tuple[Vtn, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cem.control")
    caplog.set_level(logging.INFO, logger="cem.signals")
    server, base = vtn
    store = await Store.open(tmp_path / "cem.db")
    ven = OpenAdrVen(ven_config(base), store=store)
    registry = FakeRegistry()
    controller = SiteController(config(time_limit_s=1.0), registry, store, signals=[ven])
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    try:
        ev = EvRm(registry, "ev-1")
        # the driver wants a full car in 2.5 h: 48 kWh, so the EV charges at up to 22 kW
        registry.feed("ev-1", FRBCFillLevelTargetProfile(
            message_id=str(uuid.uuid4()), start_time=datetime.now(UTC), elements=[
                FRBCFillLevelTargetProfileElement(
                    duration=int(timedelta(hours=2.5).total_seconds() * 1000),
                    fill_level_range=NumberRange(start_of_range=0, end_of_range=100)),
                FRBCFillLevelTargetProfileElement(
                    duration=3_600_000,
                    fill_level_range=NumberRange(start_of_range=100, end_of_range=100))]))
        await until(lambda: ev.instructions() and controller.plan is not None
                    and max(controller.plan.grid_import_w) > 15_000, within=10)
        assert ven.ven_id == "ven-1" and ven.program_id == "prog-gac" and server.tokens_issued
        # the grid operator limits import to 10 kW from the next PTU on, for an hour
        start = floor_to_ptu(datetime.now(UTC), 15) + timedelta(minutes=15)
        server.events = [server.event("evt-1", start, [10.0] * 4)]
        await until(lambda: any("OpenADR event evt-1: import 10 kW" in r.getMessage()
                                and "replan:" in r.getMessage() for r in caplog.records), within=10)
        await until(lambda: planned_import_within(controller, 10_000, 1, 5), within=10)
        assert [(w.source, w.ref) for w in controller.congestion] == [("openadr", "evt-1")] * 4
        # the event changes: 6 kW in its second half
        server.events = [server.event("evt-1", start, [10.0, 10.0, 6.0, 6.0])]
        await until(lambda: planned_import_within(controller, 6_000, 3, 5), within=10)
        assert planned_import_within(controller, 10_000, 1, 3)
        # and is deleted: the limit goes, the EV may charge at full power again
        server.events = []
        await until(lambda: any("event evt-1 was deleted" in r.getMessage() for r in caplog.records),
                    within=10)
        await until(lambda: controller.problem is not None and
                    min(controller.problem.limits.import_limit_w) > 20_000, within=10)
        state = ven.state()
        assert state.ok and state.extra["program_id"] == "prog-gac"
    finally:
        stop.set()
        await task
        await store.close()


async def test_bad_events_are_refused_with_a_reason(vtn: tuple[Vtn, str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cem.signals.openadr")
    server, base = vtn
    start = datetime(2026, 3, 10, 16, tzinfo=UTC)
    good = server.event("ok", start, [12.0])
    server.events = [
        good,
        server.event("prio", start, [5.0], priority=1),
        server.event("watts", start, [5000.0], payloadDescriptors=[
            {"payloadType": "IMPORT_CAPACITY_LIMIT", "units": "W"}]),
        server.event("two", start, [5.0], payloadDescriptors=[
            {"payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KW"},
            {"payloadType": "PRICE", "units": "KWH", "currency": "EUR"}]),
        server.event("order", start, [5.0, 5.0], intervalPeriod=None, intervals=[
            {"id": 0, "intervalPeriod": {"start": "2026-03-10T17:00:00Z", "duration": "PT15M"},
             "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [5.0]}]},
            {"id": 1, "intervalPeriod": {"start": "2026-03-10T16:00:00Z", "duration": "PT15M"},
             "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [5.0]}]}]),
        server.event("other-site", start, [1.0], ean="871685900000000099"),
    ]
    ven = OpenAdrVen(ven_config(base), clock=lambda: start - timedelta(hours=1))
    await ven.poll()
    update = ven.step_done(True)
    assert update is not None and update.congestion is not None
    assert [(w.ref, w.import_limit_kw) for w in update.congestion] == [("ok", 12.0)]
    assert ven.rejected == {
        "prio": "GAC events carry no priority (got 1)",
        "watts": "units must be 'KW', got 'W'",
        "two": "expected one payload descriptor, got 2",
        "order": "interval 1 starts before the one before it ends: intervals must be in "
                 "time order"}
    for event_id in ven.rejected:
        assert any(f"event {event_id}" in r.getMessage() and "refused" in r.getMessage()
                   for r in caplog.records)
    state = ven.state()
    assert not state.ok and "4 event(s) refused" in state.detail


async def test_safe_mode_when_the_vtn_is_gone_never_no_limit(tmp_path: Path) -> None:
    server = Vtn(version="3.0.1")  # {type, values} targets, a bearer token instead of OAuth
    now = floor_to_ptu(datetime.now(UTC), 15)
    server.events = [server.event("evt-9", now + timedelta(hours=2), [9.0] * 4),
                     server.event("safe", now - timedelta(days=1), [7.0], duration="P9999Y",
                              name="SAFE_MODE")]
    published: list[SignalUpdate] = []
    async with serve(server.app) as (base, _):
        ven = OpenAdrVen(ven_config(base, version="3.0.1", token=TOKEN, client_id=None,
                                    client_secret=None))
        task = asyncio.create_task(ven.run(published.append))
        await until(lambda: published)
        assert [w.ref for w in published[-1].congestion or ()] == ["evt-9"] * 4
        assert ven.safe_mode_kw == 7.0 and ven.state().ok  # known, not applied
        assert server.tokens_issued == 0
    # the VTN is gone (connection refused): the known limits hold, then safe mode applies
    await until(lambda: ven.last_error is not None)
    assert ven.state().extra["safe_mode"] is False
    assert "last known limits still hold" in ven.state().detail
    await until(lambda: ven.state().extra["safe_mode"], within=5)
    last = published[-1]
    assert last.reason == "OpenADR safe mode: VTN unreachable, import <= 7 kW"
    safe = [w for w in last.congestion or () if w.ref == "safe-mode:safe"]
    assert safe and safe[0].import_limit_kw == 7.0
    assert safe[0].start <= datetime.now(UTC) and safe[0].end > datetime.now(UTC) + timedelta(
        days=1)
    assert [w.ref for w in last.congestion or ()].count("evt-9") == 4  # still in force
    assert "SAFE MODE since" in ven.state().detail
    # the VTN comes back: safe mode ends
    async with serve(server.app) as (base2, _):
        ven.base = base2
        await until(lambda: not ven.state().extra["safe_mode"], within=5)
        assert published[-1].reason == "OpenADR: the VTN answers again, safe mode ended"
        assert all(w.ref == "evt-9" for w in published[-1].congestion or ())
    task.cancel()


def test_plain_http_is_only_allowed_to_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        SiteConfig.model_validate({"openadr": {
            "vtn_url": "http://vtn.example/openadr3", "token": TOKEN, "ven_name": "x",
            "program": "p"}})
    with pytest.raises(ValueError, match="EAN18"):
        SiteConfig.model_validate({"openadr": {
            "vtn_url": "https://vtn.example/openadr3", "token": TOKEN, "ven_name": "x",
            "program": "p", "targets": ["1234"]}})
    ok = SiteConfig.model_validate({"openadr": {
        "vtn_url": "http://127.0.0.1:8080/openadr3", "token": TOKEN, "ven_name": "x",
        "program": "p"}})
    assert ok.openadr is not None and ok.openadr.version == "3.1.0"
