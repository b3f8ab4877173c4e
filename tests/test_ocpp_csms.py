"""OCPP central system end to end on loopback: simulated chargers (1.6J and 2.0.1) -> CSMS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import websockets

from cem.app.site_file import SiteFile, parse_site_file
from resource_managers.ocpp_charger.csms import OcppCentralSystem
from resource_managers.ocpp_charger.records import read_sessions
from resource_managers.ocpp_charger.simulator import SimulatedChargePoint, SimulatedEv
from sitekit import clock

SITE = """
[site]
timezone = "Europe/Amsterdam"
[prices]
flat_import_eur_per_kwh = 0.30
[ev_defaults]
energy_kwh = 15
dwell_hours = 6
[[charge_cards]]
id_tag = "ALICE"
name = "Alice"
priority = 3
energy_kwh = 30
max_current_a = 16
[[charge_cards]]
id_tag = "STOLEN"
allowed = false
[ocpp]
port = 0
safe_limit_a = 8
unknown_cards = "reject"
accept_unknown_charge_points = false
[[ocpp.charge_points]]
id = "CP16"
phases = 3
max_current_a = 32
[[ocpp.charge_points]]
id = "CP201"
phases = 1
phase = "L2"
max_current_a = 32
limit_unit = "W"
[[ocpp.charge_points]]
id = "LOCKED"
password = "s3cret-password"
"""


async def wait_for(condition: Callable[[], object], within_s: float = 5.0) -> None:
    """Poll until condition() is truthy (the system under test works asynchronously)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while not condition():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def make_site(tmp_path: Path, extra: str = "") -> SiteFile:
    site = parse_site_file(SITE + extra)
    site.ocpp.database = tmp_path / "ocpp.db"
    return site


@pytest.fixture
async def csms(tmp_path: Path) -> AsyncIterator[OcppCentralSystem]:
    system = OcppCentralSystem(make_site(tmp_path).ocpp_rm(), port=0)
    await system.start()
    yield system
    await system.stop()


def url(system: OcppCentralSystem) -> str:
    return f"ws://127.0.0.1:{system.port}"


@contextlib.contextmanager
def simulated_clock(speed: float) -> Iterator[None]:
    """The process clock at the chargers' speed (as in `cem demo`): energy that moves `speed`
    times faster than the wall clock is then plausible for the central system."""
    previous = clock.use(clock.ScaledClock(datetime.now(UTC), speed=speed))
    try:
        yield
    finally:
        clock.use(previous)


@pytest.mark.parametrize("version, cp_id", [("1.6", "CP16"), ("2.0.1", "CP201")])
async def test_boot_gets_default_profile_and_session_makes_cdr(
        csms: OcppCentralSystem, version: str, cp_id: str) -> None:
    with simulated_clock(3600):
        await _boot_and_session(csms, version, cp_id)


async def _boot_and_session(csms: OcppCentralSystem, version: str, cp_id: str) -> None:
    config = csms.charge_points[cp_id]
    charger = SimulatedChargePoint(cp_id, url(csms), version=version, phases=config.phases,
                                   phase=config.phase, speed=3600, meter_interval_s=120)
    await charger.connect()
    try:
        # boot: the safe limit as TxDefaultProfile for the whole station
        await wait_for(lambda: charger.station_profiles)
        default = charger.profile_log[0]
        assert default["purpose"] == "TxDefaultProfile" and default["evse_id"] == 0
        if config.limit_unit == "A":
            assert default["limit"] == 8.0 and default["phases"] == 3
        else:
            assert default["limit"] == 8 * 230 * 1 and default["phases"] == 1
        assert charger.limit_a(charger.evses[1]) == pytest.approx(8.0)

        ev = SimulatedEv(capacity_kwh=60, soc=20, phases=3, max_current_a=32)
        assert await charger.plug_in(1, ev, "ALICE", dwell_s=4 * 3600, energy_kwh=25)
        evse = csms.evses[(cp_id, 1)]
        await wait_for(lambda: evse.session is not None)
        session = evse.session
        assert session is not None
        assert session.card is not None and session.priority == 3
        assert evse.max_current_a == 16  # the card's maximum
        if version == "2.0.1":  # the EV's own needs win over the card
            await wait_for(lambda: session.needs_source.startswith("EV"))
            # the EV's 25 kWh more (not the card's 30), on top of what was metered when it
            # said so: at 3600x a busy machine can let a few Wh flow before the message
            assert 25000 - 1 <= session.energy_need_wh <= 25000 + session.energy_wh + 1
        else:
            assert session.energy_need_wh == 30000
        # meter values flow: energy rises, power per phase is read
        await wait_for(lambda: session.energy_wh > 500, within_s=10)
        assert evse.total_power_w > 0
        if config.phases == 1:
            assert evse.power_w[0] == 0 and evse.power_w[1] > 0 and evse.power_w[2] == 0
        await charger.unplug(1)
        await wait_for(lambda: evse.session is None)
    finally:
        await charger.close()
    cdrs = read_sessions(csms.records.path, "closed")
    assert len(cdrs) == 1
    cdr = cdrs[0]
    assert cdr.id_tag == "ALICE" and cdr.card_name == "Alice"
    assert cdr.energy_wh > 500
    assert cdr.cost_eur == pytest.approx(cdr.energy_wh / 1000 * 0.30, rel=1e-6)
    assert cdr.peak_w > 0 and cdr.stopped_at is not None


async def test_cards_blocked_and_unknown_are_refused(csms: OcppCentralSystem) -> None:
    charger = SimulatedChargePoint("CP16", url(csms), version="1.6")
    await charger.connect()
    try:
        assert not await charger.plug_in(1, SimulatedEv(), "STOLEN")
        assert not await charger.plug_in(1, SimulatedEv(), "NOBODY")
        assert csms.evses[("CP16", 1)].session is None
    finally:
        await charger.close()


async def test_basic_auth_and_unknown_charge_points(csms: OcppCentralSystem) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await SimulatedChargePoint("LOCKED", url(csms), password="wrong").connect()
    assert refused.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as no_password:
        await SimulatedChargePoint("LOCKED", url(csms)).connect()
    assert no_password.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as unknown:
        await SimulatedChargePoint("STRANGER", url(csms)).connect()
    assert unknown.value.response.status_code == 403
    good = SimulatedChargePoint("LOCKED", url(csms), password="s3cret-password")
    await good.connect()
    try:
        await wait_for(lambda: good.station_profiles)
    finally:
        await good.close()


async def test_tls_with_basic_auth_is_security_profile_2(
        tmp_path: Path, self_signed: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    """With ocpp.tls_cert / tls_key the central system serves wss only; the charge point's
    password still decides who gets in."""
    caplog.set_level(logging.INFO, logger="resource_managers.ocpp")
    cert, key = self_signed
    site = make_site(tmp_path)
    site.ocpp.tls_cert, site.ocpp.tls_key = cert, key
    system = OcppCentralSystem(site.ocpp_rm(), port=0)
    await system.start()
    try:
        assert system.scheme == "wss" and "listening on wss://" in caplog.text
        trust = ssl.create_default_context(cafile=str(cert))
        secure = f"wss://127.0.0.1:{system.port}"
        with pytest.raises(websockets.InvalidStatus) as refused:
            await SimulatedChargePoint("LOCKED", secure, password="wrong",
                                       ssl_context=trust).connect()
        assert refused.value.response.status_code == 401
        with pytest.raises((websockets.InvalidMessage, websockets.InvalidHandshake, OSError,
                            EOFError)):
            await SimulatedChargePoint("LOCKED", f"ws://127.0.0.1:{system.port}",
                                       password="s3cret-password").connect()  # no TLS
        with pytest.raises(ssl.SSLCertVerificationError):
            await SimulatedChargePoint("LOCKED", secure, password="s3cret-password").connect()
        good = SimulatedChargePoint("LOCKED", secure, password="s3cret-password",
                                    ssl_context=trust)
        await good.connect()
        try:
            await wait_for(lambda: good.station_profiles)  # booted, default profile set
        finally:
            await good.close()
    finally:
        await system.stop()


def test_tls_files_for_the_central_system_are_checked(tmp_path: Path) -> None:
    """A certificate without its key is a config error with its path; `cem rm ocpp` with a
    file that is no certificate ends with a clear message, not a traceback."""
    from typer.testing import CliRunner

    from cem.app.cli import app
    from sitekit.config import ConfigError

    with pytest.raises(ConfigError) as half:
        parse_site_file("[ocpp]\ntls_cert = 'ocpp.crt'\n")
    assert "tls_cert and tls_key go together" in half.value.report() and "ocpp" in half.value.report()
    config = tmp_path / "site.toml"
    (tmp_path / "ocpp.crt").write_text("not a certificate")
    (tmp_path / "ocpp.key").write_text("not a key")
    config.write_text("[ocpp]\nport = 0\ntls_cert = 'ocpp.crt'\ntls_key = 'ocpp.key'\n"
                      f"database = '{tmp_path / 'ocpp.db'}'\n")
    result = CliRunner().invoke(app, ["rm", "ocpp", "-c", str(config), "--cem",
                                      "ws://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert "cannot use the TLS certificate" in result.output and "Traceback" not in result.output
    missing = tmp_path / "missing.toml"
    missing.write_text("[ocpp]\ntls_cert = 'nope.crt'\ntls_key = 'nope.key'\n")
    checked = CliRunner().invoke(app, ["config", "check", str(missing)])
    assert checked.exit_code != 0 and "ocpp.tls_cert" in checked.output
    simulated = CliRunner().invoke(app, ["sim", "chargers", "--csms", "wss://127.0.0.1:9",
                                         "--ca", str(tmp_path / "ocpp.crt")])
    assert simulated.exit_code == 2 and "cannot use --ca" in simulated.output


async def test_unknown_subprotocol_is_refused(csms: OcppCentralSystem,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{url(csms)}/CP16", subprotocols=["ocpp1.5"])  # type: ignore[list-item]
    assert refused.value.response.status_code == 400
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(f"{url(csms)}/CP16")
    assert "offers ocpp1.5" in caplog.text and "offers no OCPP subprotocol" in caplog.text


@pytest.mark.parametrize("protocol", ["ocpp1.6", "ocpp2.0.1"])
async def test_malformed_frames_get_call_errors(csms: OcppCentralSystem, protocol: str) -> None:
    async with websockets.connect(f"{url(csms)}/CP16", subprotocols=[protocol]) as ws:  # type: ignore[list-item]
        # a payload that breaks the schema: the library's FormationViolation / FormatViolation
        await ws.send(json.dumps([2, "m1", "BootNotification", {"chargePointVendor": 7}]))
        answer = json.loads(await ws.recv())
        assert answer[0] == 4 and answer[1] == "m1"
        assert answer[2] in ("TypeConstraintViolation", "FormationViolation", "FormatViolation")
        # a field the schema does not allow: each version's own name for the error
        await ws.send(json.dumps([2, "m2", "Heartbeat", {"extra": 1}]))
        answer = json.loads(await ws.recv())
        assert answer[:2] == [4, "m2"]
        assert answer[2] == ("FormationViolation" if protocol == "ocpp1.6" else "FormatViolation")
        # a required field missing
        await ws.send(json.dumps([2, "m2b", "Authorize", {}]))
        answer = json.loads(await ws.recv())
        assert answer[:3] == [4, "m2b", "ProtocolError"]
        # an unknown action
        await ws.send(json.dumps([2, "m3", "MakeCoffee", {}]))
        answer = json.loads(await ws.recv())
        assert answer[:3] == [4, "m3", "NotImplemented"]  # OCPP-J: action not known
        await ws.send(json.dumps([2, "m4", "DataTransfer", {"vendorId": "x"}]))
        answer = json.loads(await ws.recv())
        assert answer[:3] == [4, "m4", "NotSupported"]  # known, not handled here
        # not JSON at all: answered with message id -1
        await ws.send("this is not json")
        answer = json.loads(await ws.recv())
        assert answer[0] == 4 and answer[1] == "-1"
        assert answer[2] == ("FormationViolation" if protocol == "ocpp1.6" else "RpcFrameworkError")
        # a frame without its parts
        await ws.send(json.dumps([2, "m5"]))
        answer = json.loads(await ws.recv())
        assert answer[:2] == [4, "m5"]


async def test_restart_keeps_cdrs_and_closes_open_session_from_meter(tmp_path: Path) -> None:
    with simulated_clock(3600):
        await _restart_keeps_cdrs(tmp_path)


async def _restart_keeps_cdrs(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    system = OcppCentralSystem(site.ocpp_rm(), port=0)
    await system.start()
    charger = SimulatedChargePoint("CP16", url(system), version="1.6", speed=3600,
                                   meter_interval_s=60)
    await charger.connect()
    await charger.plug_in(1, SimulatedEv(soc=10), "ALICE")
    evse = system.evses[("CP16", 1)]
    await wait_for(lambda: evse.session is not None and evse.session.energy_wh > 300, within_s=10)
    metered = evse.session.energy_wh  # type: ignore[union-attr]
    # the CSMS dies with the session open (no clean stop of the charger's session)
    await charger.close()
    await system.stop()
    assert read_sessions(site.ocpp.database, "open")

    restarted = OcppCentralSystem(site.ocpp_rm(), port=0)
    await restarted.start()
    try:
        cdrs = read_sessions(site.ocpp.database, "closed")
        assert len(cdrs) == 1 and not read_sessions(site.ocpp.database, "open")
        assert cdrs[0].energy_wh >= metered and "restart" in (cdrs[0].stop_reason or "")
        assert cdrs[0].cost_eur > 0
        # the charger comes back and stops the transaction itself: the CDR takes its meter reading
        again = SimulatedChargePoint("CP16", url(restarted), version="1.6")
        again.evses[1] = charger.evses[1]
        await again.connect()
        try:
            meter_stop = again.evses[1].meter_wh
            await again.unplug(1)
            await wait_for(lambda: read_sessions(site.ocpp.database, "closed")[0].stop_reason
                           == "EVDisconnected")
            final = read_sessions(site.ocpp.database)
            assert len(final) == 1
            assert final[0].energy_wh == pytest.approx(meter_stop - final[0].meter_start_wh, abs=1)
        finally:
            await again.close()
    finally:
        await restarted.stop()


def test_basic_auth_header_format() -> None:
    """Sanity check of the header our simulator sends (user = charge point id)."""
    token = base64.b64encode(b"LOCKED:s3cret-password").decode()
    assert base64.b64decode(token).decode().partition(":")[0] == "LOCKED"
