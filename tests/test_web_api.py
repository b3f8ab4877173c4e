"""The HTTP API of a running CEM, through real HTTP on loopback (httpx).

A real `CemService` (S2 server, control loop, store, HTTP server) with the OCPP central system
and two simulated charge points (OCPP 1.6J and 2.0.1) whose EVs charge behind a 3 x 16 A fuse.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from cem.app.service import CemService
from cem.app.site_file import parse_site_file
from cem.app.web.api import create_app
from cem.control.mpc import site_controller_for
from cem.store import Store
from resource_managers.ocpp_charger.csms import OcppCentralSystem
from resource_managers.ocpp_charger.simulator import SimulatedChargePoint, SimulatedEv

TOKEN = "web-test-token-0123456789"
SITE = f"""
[site]
name = "Web test site"
[server]
port = 0
[http]
port = 0
push_interval_s = 0.2
[[http.tokens]]
name = "operator"
token = "{TOKEN}"
[grid]
fuse_a = 16
phases = 3
import_limit_kw = 11
[planner]
time_limit_s = 0.5
replan_min_interval_s = 0.2
horizon_ptus = 16
[ev_defaults]
energy_kwh = 30
dwell_hours = 3
[ocpp]
port = 0
[[ocpp.charge_points]]
id = "CP-A"
max_current_a = 32
[[ocpp.charge_points]]
id = "CP-B"
max_current_a = 32
[[charge_cards]]
id_tag = "ALICE"
name = "Alice"
energy_kwh = 25
"""
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def wait_for(condition: Callable[[], Any], within_s: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while True:
        result = await condition()
        if result:
            return result
        if loop.time() > end:
            raise AssertionError(f"not in time: {what}")
        await asyncio.sleep(0.1)


@dataclass
class RunningSite:
    cem: CemService
    client: httpx.AsyncClient
    chargers: list[SimulatedChargePoint]
    store_path: Path


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[RunningSite]:
    config = parse_site_file(SITE)
    config.store.path = tmp_path / "cem.db"
    config.ocpp.database = tmp_path / "ocpp.db"
    cem = CemService(config, controller_factory=site_controller_for)
    await cem.start()
    assert cem.web is not None
    csms = OcppCentralSystem(config.ocpp_rm(), cem.server.url, port=0)
    await csms.start()
    url = f"ws://127.0.0.1:{csms.port}"
    chargers = [SimulatedChargePoint("CP-A", url, version="1.6", meter_interval_s=2),
                SimulatedChargePoint("CP-B", url, version="2.0.1", meter_interval_s=2)]
    client = httpx.AsyncClient(base_url=cem.web.url, timeout=10)
    try:
        for charger, card in zip(chargers, ("ALICE", "BOB"), strict=True):
            await charger.connect()
            await charger.plug_in(1, SimulatedEv(capacity_kwh=75, soc=20, phases=3,
                                                 max_current_a=32), card,
                                  dwell_s=3 * 3600, energy_kwh=30)

        async def two_evs() -> bool:
            rows = (await client.get("/api/evs")).json()
            return len(rows) == 2 and all(r["why"] for r in rows)

        await wait_for(two_evs, 40, "both EVs planned and explained")
        yield RunningSite(cem, client, chargers, config.store.path)
    finally:
        await client.aclose()
        for charger in chargers:
            await charger.close()
        await csms.stop()
        await cem.stop()


async def test_reads_show_the_running_site(site: RunningSite) -> None:
    client = site.client
    evs = (await client.get("/api/evs")).json()
    alice = next(e for e in evs if e["driver"] == "Alice")
    # what the card says reaches the page: the driver, the need, and where the departure came from
    assert alice["departure_source"] == "charge card Alice"
    assert alice["target_kwh"] == pytest.approx(25, abs=0.5)
    assert alice["evse"].endswith("CP-A/1") and alice["mode"] == "smart"
    assert {e["code"] for e in evs} <= {"fuse", "full", "import_limit", "enough",
                                        "cheaper_later"}
    # the fuse (16 A, 3 phases) is less than two EVs want: the page says which limit holds them
    assert any("fuse" in e["why"] or "import limit" in e["why"] for e in evs), evs

    rms = (await client.get("/api/rms")).json()
    assert [r["control_type"] for r in rms] == ["FRBC", "FRBC"]
    assert all(r["connected"] and r["kind"] == "EV charger" and r["last_message"] for r in rms)

    plan = (await client.get("/api/plan")).json()
    assert plan["n"] == 16 and len(plan["import_limit_w"]) == 16
    assert plan["import_limit_w"][0] == 11000
    assert any(any(w > 0 for w in s["w"]) for s in plan["series"])

    prices = (await client.get("/api/prices")).json()
    assert len(prices) == 16 and prices[0]["import_eur_per_kwh"] == pytest.approx(0.25)

    state = (await client.get("/api/state")).json()
    assert state["site"]["name"] == "Web test site" and state["site"]["fuse_a"] == 16
    assert len(state["evs"]) == 2 and len(state["rms"]) == 2
    assert state["health"]["ok"] is True
    assert any(d["kind"] in ("replan", "fallback") for d in state["decisions"])

    health = await client.get("/healthz")
    assert health.status_code == 200 and health.json()["ok"] is True

    metrics = (await client.get("/metrics")).text
    assert 'cem_rms_connected{control_type="FRBC"} 2.0' in metrics
    assert "cem_replans_total" in metrics and "cem_plan_solve_seconds" in metrics
    assert 'cem_s2_reception_status_total{direction="from_rm",status="OK"}' in metrics
    assert "cem_guard_actions_total" in metrics and "cem_instructions_refused_total" in metrics

    docs = await client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    assert (await client.get("/docs-assets/swagger-ui-bundle.js")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    assert "/api/evs/{evse}/mode" in schema["paths"] and "/api/congestion" in schema["paths"]

    sessions = (await client.get("/api/sessions")).json()
    assert {s["id_tag"] for s in sessions} == {"ALICE", "BOB"}
    cdrs = await client.get("/api/cdrs", params={"format": "csv"})
    assert cdrs.headers["content-type"].startswith("text/csv")
    assert next(csv.reader(io.StringIO(cdrs.text)))[:3] == ["cp_id", "evse_id", "transaction_id"]
    assert (await client.get("/api/cdrs")).json() == []


async def test_server_sent_events_push_state_and_plan(site: RunningSite) -> None:
    seen: dict[str, dict[str, Any]] = {}
    async with site.client.stream("GET", "/api/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event is not None:
                data = json.loads(line.split(":", 1)[1])
                if event == "state" and "state" in seen:
                    assert data["tick"] > seen["state"]["tick"]  # a fresh sample each push
                    seen["state2"] = data
                seen.setdefault(event, data)
                if {"state", "plan", "state2"} <= set(seen):
                    break
    assert len(seen["state"]["evs"]) == 2 and seen["plan"]["n"] == 16


async def test_a_congestion_window_from_the_api_changes_the_plan_and_the_why(
        site: RunningSite) -> None:
    client = site.client
    now = datetime.now(UTC)
    body = {"start": (now - timedelta(minutes=5)).isoformat(),
            "end": (now + timedelta(hours=2)).isoformat(), "import_limit_kw": 5}
    # writes need the token; bad requests say what is wrong, as JSON
    refused = await client.post("/api/congestion", json=body)
    assert refused.status_code == 401 and "bearer token" in refused.json()["error"]
    wrong = await client.post("/api/congestion", headers=AUTH,
                              json={**body, "end": body["start"]})
    assert wrong.status_code == 422 and "end must be later than start" in wrong.json()["error"]
    naive = await client.post("/api/congestion", headers=AUTH,
                              json={**body, "start": "2030-01-01T10:00:00"})
    assert naive.status_code == 422 and "offset" in naive.json()["error"]
    garbage = await client.post("/api/congestion", headers=AUTH, content=b"{not json")
    assert garbage.status_code == 422 and garbage.json()["error"]
    no_limit = await client.post("/api/congestion", headers=AUTH,
                                 json={"start": body["start"], "end": body["end"]})
    assert no_limit.status_code == 422 and "import_limit_kw" in no_limit.json()["error"]

    added = await client.post("/api/congestion", headers=AUTH, json=body)
    assert added.status_code == 201, added.text
    window_id = added.json()["id"]
    listed = (await client.get("/api/congestion")).json()
    assert [(w["id"], w["source"], w["import_limit_kw"]) for w in listed] == [
        (window_id, "api", 5)]

    async def held_by_congestion() -> list[dict[str, Any]]:
        evs = (await client.get("/api/evs")).json()
        return [e for e in evs if e["code"] == "congestion"]

    held = await wait_for(held_by_congestion, 20, "an EV held by the congestion window")
    local_end = datetime.fromisoformat(body["end"]).astimezone(
        site.cem.web.view.zone).strftime("%H:%M")
    assert f"congestion window until {local_end}" in held[0]["why"]
    assert "from api" in held[0]["why"]
    plan = (await client.get("/api/plan")).json()
    assert plan["import_limit_w"][0] == 5000 and max(plan["grid_w"][:1]) <= 5000

    # a limit in force now capped the plan at once, before its replan: the decisions say so
    async def fast_path() -> list[dict[str, Any]]:
        decisions = (await client.get("/api/state")).json()["decisions"]
        return [d for d in decisions if d["kind"] == "congestion"]

    cut = await wait_for(fast_path, 20, "the congestion fast path in the decisions")
    assert "5 kW" in cut[0]["text"] and "replan follows" in cut[0]["detail"]
    # the store has it, as `cem congestion add` would have put it
    async with await Store.open(site.store_path) as store:
        rows = await store.list_congestion()
    assert [(r.window_id, r.source) for r in rows] == [(window_id, "api")]

    gone = await client.post("/api/congestion", headers=AUTH,
                             json={"action": "remove", "id": window_id})
    assert gone.status_code == 200
    missing = await client.post("/api/congestion", headers=AUTH,
                                json={"action": "remove", "id": window_id})
    assert missing.status_code == 404 and f"id {window_id}" in missing.json()["error"]


async def test_ev_modes_from_the_api_steer_the_charger_and_survive_a_restart(
        site: RunningSite) -> None:
    client = site.client
    alice = next(e for e in (await client.get("/api/evs")).json() if e["driver"] == "Alice")
    evse = alice["evse"].split()[-1]  # "CP-A/1", as an operator names it
    bad = await client.post(f"/api/evs/{evse}/mode", headers=AUTH, json={"mode": "turbo"})
    assert bad.status_code == 422 and "mode" in bad.json()["error"]
    mixed = await client.post(f"/api/evs/{evse}/mode", headers=AUTH,
                              json={"mode": "paused", "min_kwh": 3})
    assert mixed.status_code == 422 and "min_kwh goes with mode 'smart'" in mixed.json()["error"]
    unknown = await client.post("/api/evs/CP-Z/9/mode", headers=AUTH, json={"mode": "paused"})
    assert unknown.status_code == 404 and "CP-Z/9" in unknown.json()["error"]
    assert any(name.endswith("CP-A/1") for name in unknown.json()["known"])
    no_token = await client.post(f"/api/evs/{evse}/mode", json={"mode": "paused"})
    assert no_token.status_code == 401

    paused = await client.post(f"/api/evs/{evse}/mode", headers=AUTH, json={"mode": "paused"})
    assert paused.status_code == 200, paused.text
    charger = site.chargers[0]

    async def alice_paused() -> bool:
        row = next(e for e in (await client.get("/api/evs")).json() if e["driver"] == "Alice")
        # applied by the next replan: the plan gives her nothing and the charger gets 0 A
        return row["mode"] == "paused" and row["code"] == "paused" and \
            row["planned_kwh"] == 0 and charger.limit_a(charger.evses[1]) == 0

    await wait_for(alice_paused, 20, "Alice planned at 0 kWh and her charger limited to 0 A")
    row = next(e for e in (await client.get("/api/evs")).json() if e["driver"] == "Alice")
    assert row["why"].startswith("paused by the operator") and row["power_w"] == 0

    now = await client.post(f"/api/evs/{alice['rm_id']}/mode", headers=AUTH,
                            json={"mode": "charge_now"})
    assert now.status_code == 200

    async def alice_charging() -> bool:
        row = next(e for e in (await client.get("/api/evs")).json() if e["driver"] == "Alice")
        return row["mode"] == "charge_now" and charger.limit_a(charger.evses[1]) >= 6

    await wait_for(alice_charging, 20, "Alice's charger raised again")
    decisions = (await client.get("/api/state")).json()["decisions"]
    assert any(d["kind"] == "operator" and "charge now" in d["text"] for d in decisions)
    # the store keeps the mode, so a restarted CEM applies it again
    await site.cem.store.flush()
    async with await Store.open(site.store_path) as store:
        kept = await store.list_ev_modes()
    assert [(rm, mode) for rm, mode, *_ in kept] == [(alice["rm_id"], "charge_now")]


async def test_reads_from_other_hosts_need_a_token(tmp_path: Path) -> None:
    """The real app, reached in process as if from another host (no network needed)."""
    config = parse_site_file(SITE)
    config.store.path = tmp_path / "cem.db"
    config.server.port = 0
    cem = CemService(config, controller_factory=site_controller_for)
    await cem.start()
    try:
        app = create_app(cem.web.view)
        transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://cem") as remote:
            refused = await remote.get("/api/state")
            assert refused.status_code == 401 and "token" in refused.json()["error"]
            assert (await remote.get("/api/state", headers=AUTH)).status_code == 200
            wrong = await remote.get("/api/rms", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            lost = await remote.get("/api/nothing-here", headers=AUTH)
            assert lost.status_code == 404 and "/docs" in lost.json()["error"]
    finally:
        await cem.stop()


def test_a_busy_dashboard_port_ends_cem_run_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = tmp_path / "site.toml"
        config.write_text(f'[server]\nport = 0\n[store]\npath = "{tmp_path / "cem.db"}"\n'
                          f"[http]\nport = {port}\n[grid]\nfuse_a = 25\n")
        run = subprocess.run([sys.executable, "-m", "cem.app.cli", "run", "--config",
                              str(config)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert f"cannot serve the dashboard on 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr


def test_bench_s2_compares_the_cem_without_and_with_an_open_dashboard() -> None:
    run = subprocess.run([sys.executable, "-m", "cem.app.cli", "bench", "s2", "--rms", "20",
                          "--messages", "10", "--rate", "200", "--http", "--json"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    without, with_page = report["without_http"], report["with_http"]
    for result in (without, with_page):
        assert result["messages_acknowledged"] == 200 and result["not_ok"] == 0
        assert result["cem_exit_code"] == 0 and not result["errors"]
    assert without["http"] is False and without["dashboard_reads"] == 0
    # the page loaded its five files and read its stream while the RMs sent messages
    assert with_page["http"] is True and with_page["dashboard_reads"] >= 5
    assert with_page["dashboard_events"] >= 1
    assert report["cpu_added_percent_of_a_core"] == pytest.approx(
        (with_page["cem_cpu_share_message_phase"] - without["cem_cpu_share_message_phase"])
        * 100, abs=0.01)


async def test_health_says_why_without_a_control_loop(tmp_path: Path) -> None:
    config = parse_site_file(SITE)
    config.store.path = tmp_path / "cem.db"
    cem = CemService(config)  # S2 server and store, but no control loop
    await cem.start()
    try:
        async with httpx.AsyncClient(base_url=cem.web.url, timeout=10) as client:
            health = await client.get("/healthz")
            assert health.status_code == 503
            assert health.json() == {"ok": False, "reason": "no control loop is running"}
            mode = await client.post("/api/evs/CP-A/1/mode", headers=AUTH, json={"mode": "paused"})
            assert mode.status_code == 409 and "no control loop" in mode.json()["error"]
            assert (await client.get("/api/plan")).status_code == 404
    finally:
        await cem.stop()
