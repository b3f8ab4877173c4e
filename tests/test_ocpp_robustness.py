"""Nothing a charger sends can corrupt the central system: raw OCPP-J frames on loopback.

- EVSE / connector ids beyond the charge point's configured EVSEs get a CALLERROR
  (PropertyConstraintViolation) and create nothing;
- one open session per EVSE: a new StartTransaction closes the one left open, with a reason;
- implausible meter values (meterStart -10^18, meterStop 10^30, a value of 1e400, energy
  rising faster than the EVSE can deliver) are kept out of sessions and CDRs and reported in
  the EVSE's state; the EVSE keeps updating;
- frames that are no OCPP message (binary, too deep, too large) get a CALLERROR where they have
  a message id and are dropped where they have none; the connection stays open;
- unknown charge points are refused by default, with one clear line each; connections and
  failed logins are limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from cem.app.site_file import load_site_file, parse_site_file
from resource_managers.ocpp_charger.config import OcppConfig
from resource_managers.ocpp_charger.csms import OcppCentralSystem
from resource_managers.ocpp_charger.records import read_sessions
from sitekit import clock

SPECS = Path(__file__).resolve().parent.parent / "specs" / "sites"
SITE = """
[prices]
flat_import_eur_per_kwh = 0.30
[ocpp]
port = 0
max_failed_auth_per_minute = 5
[[ocpp.charge_points]]
id = "CP16"
evses = 2
phases = 3
max_current_a = 16
[[ocpp.charge_points]]
id = "CP201"
phases = 3
max_current_a = 32
[[ocpp.charge_points]]
id = "LOCKED"
password = "s3cret-password"
"""
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
WALL = [0.0]  # the process clock's wall seconds since T0: the tests move it with the charger


def at(minutes: float) -> str:
    """A charger timestamp `minutes` after T0, and the process clock moved there too."""
    WALL[0] = max(WALL[0], minutes * 60)
    return (T0 + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


@pytest.fixture
async def csms(tmp_path: Path) -> AsyncIterator[OcppCentralSystem]:
    site = parse_site_file(SITE)
    site.ocpp.database = tmp_path / "ocpp.db"
    WALL[0] = 0.0
    previous = clock.use(clock.ScaledClock(T0, speed=1.0, wall=lambda: WALL[0]))
    system = OcppCentralSystem(site.ocpp_rm(), port=0)
    await system.start()
    try:
        yield system
    finally:
        await system.stop()
        clock.use(previous)


@contextlib.asynccontextmanager
async def charger(system: OcppCentralSystem, cp_id: str = "CP16",
                  protocol: str = "ocpp1.6") -> AsyncIterator[Charger]:
    ws = await websockets.connect(f"ws://127.0.0.1:{system.port}/{cp_id}",
                                  subprotocols=[protocol],  # type: ignore[list-item]
                                  max_size=None)
    try:
        yield Charger(ws)
    finally:
        await ws.close()


class Charger:
    """A raw OCPP-J client: send a frame, read the answer (CSMS calls are answered empty)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.count = 0

    async def call(self, action: str, payload: dict[str, Any]) -> list[Any]:
        self.count += 1
        unique_id = f"m{self.count}"
        return await self.raw(json.dumps([2, unique_id, action, payload]), unique_id)

    async def raw(self, frame: str | bytes, unique_id: str | None) -> list[Any]:
        await self.ws.send(frame)
        return await self.answer(unique_id)

    async def answer(self, unique_id: str | None, within_s: float = 3.0) -> list[Any]:
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), within_s))
            if message[0] == 2:  # the central system's own call (default profile, ...)
                await self.ws.send(json.dumps([3, message[1], {"status": "Accepted"}]))
                continue
            if unique_id is None or message[1] == unique_id:
                return list(message)

    async def nothing_back(self, within_s: float = 0.5) -> bool:
        try:
            await self.answer(None, within_s)
        except TimeoutError:
            return True
        return False

    async def alive(self) -> bool:
        answer = await self.call("Heartbeat", {})
        return answer[0] == 3 and "currentTime" in answer[2]


async def start(cp: Charger, meter_start: float, connector: int = 1,
                minutes: float = 0) -> list[Any]:
    return await cp.call("StartTransaction", {"connectorId": connector, "idTag": "ANY",
                                              "meterStart": meter_start,
                                              "timestamp": at(minutes)})


async def meter(cp: Charger, tx: int, energy: str | float, minutes: float,
                connector: int = 1) -> list[Any]:
    value = energy if isinstance(energy, str) else f"{energy:g}"
    return await cp.call("MeterValues", {"connectorId": connector, "transactionId": tx,
                                         "meterValue": [{"timestamp": at(minutes),
                                                         "sampledValue": [{"value": value}]}]})


# --- EVSE ids ---------------------------------------------------------------------------------


async def test_an_unknown_connector_gets_a_callerror_and_creates_nothing(
        csms: OcppCentralSystem) -> None:
    before = set(csms.evses)
    async with charger(csms) as cp:
        for action, payload in [
                ("StatusNotification", {"connectorId": 999, "errorCode": "NoError",
                                        "status": "Available"}),
                ("StatusNotification", {"connectorId": 3, "errorCode": "NoError",
                                        "status": "Preparing"}),
                ("StartTransaction", {"connectorId": 3, "idTag": "ANY", "meterStart": 0,
                                      "timestamp": at(0)}),
                ("MeterValues", {"connectorId": 7, "meterValue": [
                    {"timestamp": at(0), "sampledValue": [{"value": "5"}]}]})]:
            answer = await cp.call(action, payload)
            assert answer[0] == 4 and answer[2] == "PropertyConstraintViolation", answer
            assert "configured EVSE" in answer[3]
        ok = await cp.call("StatusNotification", {"connectorId": 2, "errorCode": "NoError",
                                                  "status": "Available"})
        assert ok[0] == 3
        assert await cp.alive()
    async with charger(csms, "CP201", "ocpp2.0.1") as cp:
        answer = await cp.call("StatusNotification", {
            "timestamp": at(0), "connectorStatus": "Occupied", "evseId": 999, "connectorId": 1})
        assert answer[0] == 4 and answer[2] == "PropertyConstraintViolation"
    assert set(csms.evses) == before  # CP16/1, CP16/2, CP201/1, LOCKED/1: nothing new
    assert ("CP16", 999) not in csms.evses and ("CP201", 999) not in csms.evses


# --- sessions ---------------------------------------------------------------------------------


async def test_one_open_session_per_evse(csms: OcppCentralSystem) -> None:
    async with charger(csms) as cp:
        txs = []
        for i in range(16):
            answer = await start(cp, meter_start=1000 + i, minutes=i)
            assert answer[0] == 3
            txs.append(answer[2]["transactionId"])
        assert len(set(txs)) == 16
    rows = read_sessions(csms.records.path)
    open_rows = [r for r in rows if r.state == "open"]
    assert [r.transaction_id for r in open_rows] == [str(txs[-1])]
    closed = [r for r in rows if r.state == "closed"]
    assert len(closed) == 15
    assert all(r.stop_reason is not None and r.stop_reason.startswith("superseded: the charger "
               "started transaction") for r in closed)
    assert csms.evses[("CP16", 1)].session is not None
    assert csms.evses[("CP16", 1)].session.transaction_id == str(txs[-1])  # type: ignore[union-attr]


async def test_implausible_meter_values_stay_out_of_sessions_and_cdrs(
        csms: OcppCentralSystem) -> None:
    evse = csms.evses[("CP16", 1)]
    async with charger(csms) as cp:
        answer = await start(cp, meter_start=-10**18)
        assert answer[0] == 3  # the EV still charges
        tx = answer[2]["transactionId"]
        assert (evse.implausible or "").startswith("meterStart of transaction")
        assert "-1e+18" in (evse.implausible or "")
        # the first plausible reading is where the session counts from
        assert (await meter(cp, tx, 50_000, minutes=1))[0] == 3
        session = evse.session
        assert session is not None and session.meter_start_wh == 50_000
        # 10 minutes at most 16 A x 3 x 230 V = 11 kW: 1840 Wh is fine, 10^6 Wh is not
        await meter(cp, tx, 51_840, minutes=11)
        assert session.energy_wh == pytest.approx(1840)
        for value in ("1e400", "NaN", "-Infinity", "1000000"):
            await meter(cp, tx, value, minutes=12)
        assert session.energy_wh == pytest.approx(1840)
        assert "rose by" in (evse.implausible or "")
        assert evse.implausible_count == 5
        # the EVSE still takes its next plausible reading (no OverflowError for good)
        await meter(cp, tx, 52_500, minutes=16)
        assert session.energy_wh == pytest.approx(2500)
        # a register going backwards within the session is not believed either
        await meter(cp, tx, 40_000, minutes=17)
        assert session.energy_wh == pytest.approx(2500)
        stop = await cp.call("StopTransaction", {"transactionId": tx, "meterStop": 10**30,
                                                 "timestamp": at(20), "reason": "Local"})
        assert stop[0] == 3
    cdr = read_sessions(csms.records.path, "closed")[0]
    assert cdr.energy_wh == pytest.approx(2500)
    assert cdr.cost_eur == pytest.approx(2.5 * 0.30)
    assert "meterStop 1e+30 Wh implausible" in (cdr.stop_reason or "")
    assert evse.session is None


async def test_power_and_soc_that_cannot_be_are_dropped(csms: OcppCentralSystem) -> None:
    evse = csms.evses[("CP16", 1)]
    async with charger(csms) as cp:
        tx = (await start(cp, meter_start=100))[2]["transactionId"]
        sampled = [{"value": "3000", "measurand": "Power.Active.Import", "unit": "W"},
                   {"value": "55", "measurand": "SoC"}]
        await cp.call("MeterValues", {"connectorId": 1, "transactionId": tx, "meterValue": [
            {"timestamp": at(1), "sampledValue": sampled}]})
        assert evse.total_power_w == pytest.approx(3000)
        bad = [{"value": "9e9", "measurand": "Power.Active.Import", "unit": "W"},
               {"value": "250", "measurand": "SoC"}]
        await cp.call("MeterValues", {"connectorId": 1, "transactionId": tx, "meterValue": [
            {"timestamp": at(2), "sampledValue": bad}]})
        assert evse.total_power_w == pytest.approx(3000)
        assert evse.session is not None and evse.session.soc == 55
        assert evse.implausible_count == 2


# --- frames -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol,violation", [("ocpp1.6", "FormationViolation"),
                                                ("ocpp2.0.1", "FormatViolation")])
async def test_malformed_frames_never_close_the_connection(
        csms: OcppCentralSystem, protocol: str, violation: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resource_managers.ocpp")
    cp_id = "CP16" if protocol == "ocpp1.6" else "CP201"
    async with charger(csms, cp_id, protocol) as cp:
        # binary: random bytes are dropped; a call in a binary frame is answered
        await cp.ws.send(os.urandom(300))
        assert await cp.nothing_back()
        answer = await cp.raw(json.dumps([2, "bin1", "Heartbeat", {}]).encode(), "bin1")
        assert answer[:3] == [4, "bin1", violation] and "binary" in answer[3]
        # 50,000 deep: answered when its id can be read, dropped when not
        deep = '[2,"deep1","Heartbeat",' + "[" * 50_000 + "]" * 50_000 + "]"
        answer = await cp.raw(deep, "deep1")
        assert answer[:3] == [4, "deep1", violation] and "nested" in answer[3]
        await cp.ws.send("[" * 50_000 + "]" * 50_000)
        assert await cp.nothing_back()
        # too large: 300 kB
        large = json.dumps([2, "big1", "DataTransfer", {"vendorId": "x",
                                                        "data": "y" * 300_000}])
        answer = await cp.raw(large, "big1")
        assert answer[:3] == [4, "big1", violation] and "bytes" in answer[3]
        # a broken answer (CallResult) is never answered
        await cp.ws.send('[3, "nobody-asked", ')
        assert await cp.nothing_back()
        assert await cp.alive()
    assert "Traceback" not in caplog.text
    lines = [r for r in caplog.records if "no OCPP message" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]  # one line per 10 s


# --- who may connect --------------------------------------------------------------------------


def test_unknown_charge_points_are_refused_by_default_but_in_the_demo_and_example() -> None:
    assert OcppConfig().accept_unknown_charge_points is False
    assert parse_site_file("[ocpp]\n").ocpp.accept_unknown_charge_points is False
    for name in ("demo.toml", "example.toml"):
        assert load_site_file(SPECS / name).ocpp.accept_unknown_charge_points is True


async def test_each_refused_charge_point_gets_one_clear_line(
        csms: OcppCentralSystem, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resource_managers.ocpp")
    for cp_id in ["STRANGER"] * 5 + ["OTHER"]:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"ws://127.0.0.1:{csms.port}/{cp_id}",
                                     subprotocols=["ocpp1.6"])  # type: ignore[list-item]
        assert refused.value.response.status_code == 403
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "charger 'STRANGER' from 127.0.0.1 refused: not in ocpp.charge_points" in lines[0]
    assert "accept_unknown_charge_points is false" in lines[0]
    assert "charger 'OTHER'" in lines[1]
    summary = csms.admission.flush(csms.admission.clock() + 61)
    assert summary is not None and "6 connection attempt(s) refused" in summary
    assert "5 unknown charge point 'STRANGER'" in summary


async def test_wrong_passwords_are_limited_per_address(csms: OcppCentralSystem) -> None:
    import base64

    def login(password: str) -> dict[str, str]:
        token = base64.b64encode(f"LOCKED:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    codes = []
    for _ in range(8):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"ws://127.0.0.1:{csms.port}/LOCKED",
                                     subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                                     additional_headers=login("guess"))
        codes.append(refused.value.response.status_code)
    assert codes == [401] * 5 + [429] * 3


async def test_connections_beyond_the_cap_get_503(tmp_path: Path) -> None:
    site = parse_site_file(SITE.replace("max_failed_auth_per_minute = 5",
                                        "max_connections = 2"))
    site.ocpp.database = tmp_path / "ocpp.db"
    system = OcppCentralSystem(site.ocpp_rm(), port=0)
    await system.start()
    try:
        async with charger(system, "CP16"), charger(system, "CP201", "ocpp2.0.1"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(f"ws://127.0.0.1:{system.port}/LOCKED",
                                         subprotocols=["ocpp1.6"])  # type: ignore[list-item]
            assert refused.value.response.status_code == 503
    finally:
        await system.stop()


async def test_charging_needs_that_cannot_be_true_are_rejected(csms: OcppCentralSystem) -> None:
    evse = csms.evses[("CP201", 1)]
    async with charger(csms, "CP201", "ocpp2.0.1") as cp:
        started = await cp.call("TransactionEvent", {
            "eventType": "Started", "timestamp": at(0), "triggerReason": "Authorized",
            "seqNo": 0, "transactionInfo": {"transactionId": "tx-1"}, "evse": {"id": 1},
            "idToken": {"idToken": "ANY", "type": "ISO14443"}})
        assert started[0] == 3 and evse.session is not None
        need = evse.session.energy_need_wh
        for ac in ({"energyAmount": 2_000_000_000, "evMinCurrent": 6, "evMaxCurrent": 32,
                    "evMaxVoltage": 400},
                   {"energyAmount": 10_000, "evMinCurrent": 6, "evMaxCurrent": -5,
                    "evMaxVoltage": 400},
                   {"energyAmount": 10_000, "evMinCurrent": 40, "evMaxCurrent": 32,
                    "evMaxVoltage": 400}):
            answer = await cp.call("NotifyEVChargingNeeds", {
                "evseId": 1, "chargingNeeds": {"requestedEnergyTransfer": "AC_three_phase",
                                               "acChargingParameters": ac}})
            assert answer[:2] == [3, answer[1]] and answer[2]["status"] == "Rejected", answer
        assert evse.session.energy_need_wh == need
        assert evse.session.ev_max_current_a is None
        assert "NotifyEVChargingNeeds" in (evse.implausible or "")
