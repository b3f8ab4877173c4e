"""OCPP RM <-> CEM over S2 on loopback: simulated chargers -> CSMS -> S2 -> the CEM's S2 server.

The CEM side is the project's real S2 server (cem/s2/server.py); instructions are sent to the RM
the way the control loop does (`server.send_instruction`), so each test controls what is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from s2python.common import CommodityQuantity, InstructionStatus
from s2python.frbc import FRBCInstruction

from cem.app.site_file import SiteFile, parse_site_file
from cem.s2.server import LiveSession, S2Server
from resource_managers.ocpp_charger.csms import ENERGY, OcppCentralSystem
from resource_managers.ocpp_charger.frbc import CHARGING, IDLE
from resource_managers.ocpp_charger.simulator import SimulatedChargePoint, SimulatedEv
from sitekit import clock

SITE = """
[server]
port = 0
[ev_defaults]
energy_kwh = 20
dwell_hours = 5
[ocpp]
port = 0
safe_limit_a = 8
accept_unknown_charge_points = true  # the tests' chargers beyond CP16 / CP201
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
"""


async def wait_for(condition: Callable[[], object], within_s: float = 8.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while not condition():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def make_site(tmp_path: Path) -> SiteFile:
    site = parse_site_file(SITE)
    site.ocpp.database = tmp_path / "ocpp.db"
    site.store.path = tmp_path / "cem.db"
    return site


@pytest.fixture
async def cem_and_csms(tmp_path: Path) -> AsyncIterator[tuple[S2Server, OcppCentralSystem]]:
    site = make_site(tmp_path)
    server = S2Server(site)
    await server.start()
    csms = OcppCentralSystem(site.ocpp_rm(), server.url, port=0)
    await csms.start()
    yield server, csms
    await csms.stop()
    await server.stop()


def live(server: S2Server, name: str) -> LiveSession | None:
    return next((s for s in server.sessions() if s.name == name
                 and s.control_type == "FILL_RATE_BASED_CONTROL"), None)


def description(entry: LiveSession) -> Any:
    return entry.state.of("FRBC").system_description(clock.now())  # the RMs' clock, maybe simulated


def mode_ids(entry: LiveSession) -> dict[str, Any]:
    sd = description(entry)
    actuator = sd.actuators[0]
    return {str(m.diagnostic_label).split(" ")[0]: m for m in actuator.operation_modes} | {
        "actuator": actuator.id}


def instruction(entry: LiveSession, mode: str, factor: float) -> FRBCInstruction:
    modes = mode_ids(entry)
    return FRBCInstruction(message_id=uuid.uuid4(), id=uuid.uuid4(),
                           actuator_id=modes["actuator"], operation_mode=modes[mode].id,
                           operation_mode_factor=factor, execution_time=datetime.now(UTC),
                           abnormal_condition=False)


def factor_for(amps: float, phases: int) -> float:
    lo, hi = 6 * 230 * phases, 32 * 230 * phases
    return (amps * 230 * phases - lo) / (hi - lo)


@contextlib.asynccontextmanager
async def described_charger(csms_pair: tuple[S2Server, OcppCentralSystem], cp_id: str,
                            **charger: Any) -> AsyncIterator[tuple[SimulatedChargePoint,
                                                                   LiveSession]]:
    """A simulated charger, connected, once the CEM holds its EVSE 1's FRBC description."""
    server, csms = csms_pair
    station = SimulatedChargePoint(cp_id, f"ws://127.0.0.1:{csms.port}", **charger)
    await station.connect()
    try:
        name = f"EV charger {cp_id}/1"
        await wait_for(lambda: live(server, name) is not None and description(live(server, name)))
        entry = live(server, name)
        assert entry is not None
        yield station, entry
    finally:
        await station.close()


@pytest.mark.parametrize("version, cp_id, phases", [("1.6", "CP16", 3), ("2.0.1", "CP201", 1)])
async def test_frbc_flexibility_and_instructions_become_profiles(
        cem_and_csms: tuple[S2Server, OcppCentralSystem], version: str, cp_id: str,
        phases: int) -> None:
    server = cem_and_csms[0]
    # the CEM selected FRBC; without an EV there is no flexibility
    async with described_charger(cem_and_csms, cp_id, version=version, phases=phases,
                                 phase="L2", speed=600, meter_interval_s=30) as (charger, entry):
        sd = description(entry)
        assert [m.diagnostic_label.split(" ")[0] for m in sd.actuators[0].operation_modes] == [IDLE]

        # an EV arrives: a charging mode from 6 A to 32 A on the EVSE's phases, and a target
        await charger.plug_in(1, SimulatedEv(soc=20, phases=3), "SOMEONE", dwell_s=3 * 3600,
                              energy_kwh=12)
        await wait_for(lambda: CHARGING in mode_ids(entry))
        charging = mode_ids(entry)[CHARGING]
        power = charging.elements[0].power_ranges[0]
        if phases == 3:
            assert power.commodity_quantity == CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC
        else:
            assert power.commodity_quantity == CommodityQuantity.ELECTRIC_POWER_L2
        assert (power.start_of_range, power.end_of_range) == (6 * 230 * phases, 32 * 230 * phases)
        await wait_for(lambda: entry.state.of("FRBC").fill_level_target_profile is not None)
        target = entry.state.of("FRBC").fill_level_target_profile
        expected_need = 12.0 if version == "2.0.1" else 20.0  # EV's own need, else site default
        await wait_for(lambda: entry.state.of("FRBC").fill_level_target_profile
                       .elements[-1].fill_level_range.start_of_range == pytest.approx(expected_need))
        assert target is not None
        # measurements arrive per phase
        await wait_for(lambda: any(m.value_w > 0 for m in entry.state.measured_power().values()))

        # FRBC.Instruction charging at a factor meaning 10.37 A -> 10.3 A TxProfile, obeyed
        charger.profile_log.clear()
        order = instruction(entry, CHARGING, factor_for(10.37, phases))
        result = await server.send_instruction(entry.rm_id or "", order)
        assert result.ok
        await wait_for(lambda: entry.state.instruction_status(order.id) == InstructionStatus.STARTED)
        profile = charger.profile_log[-1]
        assert profile["purpose"] == "TxProfile" and profile["phases"] == phases
        if version == "1.6":
            assert profile["unit"] == "A" and profile["limit"] == pytest.approx(10.3)
        else:  # this charge point takes limits in W: 10.3 A x 230 V x 1 phase
            assert profile["unit"] == "W" and profile["limit"] == pytest.approx(10.3 * 230)
        await wait_for(lambda: charger.evses[1].current_a == pytest.approx(10.3))

        # charging mode never goes below the 6 A minimum; idle pauses at 0 A
        low = instruction(entry, CHARGING, 0.0)
        await server.send_instruction(entry.rm_id or "", low)
        await wait_for(lambda: entry.state.instruction_status(low.id) == InstructionStatus.STARTED)
        assert charger.limit_a(charger.evses[1]) == pytest.approx(6.0)
        pause = instruction(entry, IDLE, 0.0)
        await server.send_instruction(entry.rm_id or "", pause)
        await wait_for(lambda: entry.state.instruction_status(pause.id) == InstructionStatus.STARTED)
        await wait_for(lambda: charger.evses[1].current_a == 0)
        assert all(p["limit"] == 0 or p["limit"] >= 6 for p in charger.profile_log
                   if p["unit"] == "A")
        for p in charger.profile_log:  # 0.1 A resolution
            amps = p["limit"] / (230 * p["phases"]) if p["unit"] == "W" else p["limit"]
            assert abs(amps * 10 - round(amps * 10)) < 1e-6

        # the EV leaves: no flexibility again
        await charger.unplug(1)
        await wait_for(lambda: CHARGING not in mode_ids(entry))


async def test_rejected_profile_becomes_rejected_instruction(
        cem_and_csms: tuple[S2Server, OcppCentralSystem]) -> None:
    server, csms = cem_and_csms
    charger = SimulatedChargePoint("CP16", f"ws://127.0.0.1:{csms.port}", version="1.6",
                                   reject_profiles=True)
    await charger.connect()
    try:
        await charger.plug_in(1, SimulatedEv(), "SOMEONE")
        await wait_for(lambda: live(server, "EV charger CP16/1") is not None
                       and CHARGING in mode_ids(live(server, "EV charger CP16/1")))
        entry = live(server, "EV charger CP16/1")
        assert entry is not None
        order = instruction(entry, CHARGING, 0.5)
        await server.send_instruction(entry.rm_id or "", order)
        await wait_for(lambda: entry.state.instruction_status(order.id) == InstructionStatus.REJECTED)
        assert charger.profile_log[-1]["purpose"] == "TxProfile"
        assert not charger.profile_log[-1]["accepted"]
    finally:
        await charger.close()


async def test_offline_charger_withdraws_flexibility_and_resumes(
        cem_and_csms: tuple[S2Server, OcppCentralSystem]) -> None:
    server, csms = cem_and_csms
    url = f"ws://127.0.0.1:{csms.port}"
    charger = SimulatedChargePoint("CP16", url, version="1.6", speed=600, meter_interval_s=30)
    await charger.connect()
    await charger.plug_in(1, SimulatedEv(), "SOMEONE")
    name = "EV charger CP16/1"
    await wait_for(lambda: live(server, name) is not None and CHARGING in mode_ids(live(server, name)))
    entry = live(server, name)
    assert entry is not None
    tx = csms.evses[("CP16", 1)].session.transaction_id  # type: ignore[union-attr]
    await charger.disconnect()
    await wait_for(lambda: CHARGING not in mode_ids(entry))
    assert "offline" in description(entry).storage.diagnostic_label
    await charger.connect()  # the same transaction is still running on the charger
    try:
        await wait_for(lambda: CHARGING in mode_ids(entry))
        session = csms.evses[("CP16", 1)].session
        assert session is not None and session.transaction_id == tx
    finally:
        await charger.close()


async def test_losing_the_cem_falls_back_to_the_default_profile(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    server = S2Server(site)
    await server.start()
    csms = OcppCentralSystem(site.ocpp_rm(), server.url, port=0)
    await csms.start()
    charger = SimulatedChargePoint("CP16", f"ws://127.0.0.1:{csms.port}", version="1.6")
    await charger.connect()
    try:
        await charger.plug_in(1, SimulatedEv(), "SOMEONE")
        name = "EV charger CP16/1"
        await wait_for(lambda: live(server, name) is not None
                       and CHARGING in mode_ids(live(server, name)))
        entry = live(server, name)
        assert entry is not None
        order = instruction(entry, CHARGING, 1.0)
        await server.send_instruction(entry.rm_id or "", order)
        await wait_for(lambda: charger.limit_a(charger.evses[1]) == pytest.approx(32))
        await server.stop()  # the CEM goes away
        await wait_for(lambda: charger.limit_a(charger.evses[1]) == pytest.approx(8))  # safe limit
    finally:
        await charger.close()
        await csms.stop()


async def test_single_phase_ev_on_three_phase_evse_is_seen_from_the_meter(
        cem_and_csms: tuple[S2Server, OcppCentralSystem]) -> None:
    server, csms = cem_and_csms
    charger = SimulatedChargePoint("CP16", f"ws://127.0.0.1:{csms.port}", version="1.6",
                                   speed=600, meter_interval_s=30)
    await charger.connect()
    try:
        await charger.plug_in(1, SimulatedEv(phases=1, max_current_a=32), "SOMEONE")
        name = "EV charger CP16/1"

        def single_phase_range() -> bool:
            entry = live(server, name)
            if entry is None or CHARGING not in mode_ids(entry):
                return False
            power = mode_ids(entry)[CHARGING].elements[0].power_ranges[0]
            return power.commodity_quantity == CommodityQuantity.ELECTRIC_POWER_L1 and \
                power.end_of_range == 32 * 230

        await wait_for(single_phase_range)
        entry = live(server, name)
        assert entry is not None
        order = instruction(entry, CHARGING, factor_for(13, 1))
        await server.send_instruction(entry.rm_id or "", order)
        await wait_for(lambda: charger.profile_log[-1]["purpose"] == "TxProfile")
        assert charger.profile_log[-1]["phases"] == 1
        assert charger.profile_log[-1]["limit"] == pytest.approx(13.0)
    finally:
        await charger.close()


@pytest.mark.parametrize("version, cp_id, phases", [("1.6", "CP16", 3), ("2.0.1", "CP201", 1)])
async def test_an_ev_that_stops_drawing_while_offered_current_is_full(
        cem_and_csms: tuple[S2Server, OcppCentralSystem], version: str, cp_id: str,
        phases: int) -> None:
    """SuspendedEV (1.6 StatusNotification, 2.0.1 TransactionEvent charging state): the EV
    takes no more, so the RM withdraws its flexibility and the CEM stops holding power for it."""
    server, csms = cem_and_csms
    async with described_charger(cem_and_csms, cp_id, version=version, phases=phases,
                                 phase="L2", speed=600, meter_interval_s=30) as (charger, entry):
        # nearly full: 0.3 % of 10 kWh is 30 Wh, a few simulated seconds at 8 A or more
        await charger.plug_in(1, SimulatedEv(capacity_kwh=10, soc=99.7, phases=3), "SOMEONE",
                              dwell_s=3 * 3600, energy_kwh=12)
        await wait_for(lambda: CHARGING in mode_ids(entry))
        order = instruction(entry, CHARGING, factor_for(16, phases))
        await server.send_instruction(entry.rm_id or "", order)
        # the EV fills up and stops drawing while 16 A is offered: the charger says so ...
        await wait_for(lambda: charger.evses[1].state_told == "SuspendedEV")
        evse = next(e for e in csms.evses_of(cp_id) if e.evse_id == 1)
        await wait_for(lambda: evse.session is not None and evse.session.ev_full)
        # ... and the CEM is offered nothing more to plan for it, while the session goes on
        await wait_for(lambda: CHARGING not in mode_ids(entry))
        storage = description(entry).storage.fill_level_range
        assert storage.start_of_range == storage.end_of_range
        assert evse.session is not None and evse.session.energy_wh > 0
        # the CEM pauses it: the charger now offers nothing (SuspendedEVSE); still full
        pause = instruction(entry, IDLE, 0.0)
        await server.send_instruction(entry.rm_id or "", pause)
        await wait_for(lambda: charger.evses[1].state_told == "SuspendedEVSE")
        await asyncio.sleep(0.2)
        assert evse.session is not None and evse.session.ev_full
        assert CHARGING not in mode_ids(entry)


@contextlib.asynccontextmanager
async def a_car_on_a_simulated_clock(
        csms_pair: tuple[S2Server, OcppCentralSystem], cp_id: str, speed: float, stay_h: float
        ) -> AsyncIterator[tuple[SimulatedChargePoint, LiveSession, SimulatedEv, Any]]:
    """A 2.0.1 charger whose EV (60 kWh at 40 %, 30 kWh wanted) plugs in; the process clock
    and the charger run `speed` times faster than real time meanwhile."""
    csms = csms_pair[1]
    previous = clock.use(clock.ScaledClock(datetime.now(UTC), speed=speed))
    try:
        async with described_charger(csms_pair, cp_id, version="2.0.1", phases=3, speed=speed,
                                     meter_interval_s=30) as (charger, entry):
            car = SimulatedEv(capacity_kwh=60, soc=40, phases=3)
            await charger.plug_in(1, car, "SOMEONE", dwell_s=stay_h * 3600, energy_kwh=30)
            evse = next(e for e in csms.evses_of(cp_id) if e.evse_id == 1)
            yield charger, entry, car, evse
    finally:
        clock.use(previous)


async def test_an_ev_that_only_paused_is_offered_power_again(
        cem_and_csms: tuple[S2Server, OcppCentralSystem]) -> None:
    """A car that stops drawing on its own (its timer, battery conditioning) looks full and the
    CEM pauses it. Half an hour later, its need not met, the RM offers it to the CEM again and
    it charges; once it says it is full (SoC), it is never offered again."""
    from resource_managers.ocpp_charger.csms import RETRY_FULL_AFTER

    server = cem_and_csms[0]
    async with a_car_on_a_simulated_clock(cem_and_csms, "CP301", 1200, 8) as (
            charger, entry, car, evse):
        await wait_for(lambda: CHARGING in mode_ids(entry))
        charge = instruction(entry, CHARGING, factor_for(16, 3))
        await server.send_instruction(entry.rm_id or "", charge)
        await wait_for(lambda: charger.evses[1].state_told == "Charging")
        await wait_for(lambda: evse.session is not None and evse.session.energy_wh > 0)
        car.paused = True  # the car stops drawing: taken as full, and the CEM pauses it
        await wait_for(lambda: evse.session is not None and evse.session.ev_full)
        taken_full_at = evse.session.full_since
        assert taken_full_at is not None
        await wait_for(lambda: CHARGING not in mode_ids(entry))
        await server.send_instruction(entry.rm_id or "", instruction(entry, IDLE, 0.0))
        await wait_for(lambda: charger.evses[1].state_told == "SuspendedEVSE")
        car.paused = False  # ready again, but offered nothing: only the RM can change that
        await wait_for(lambda: CHARGING in mode_ids(entry), within_s=10)
        assert clock.now() - taken_full_at >= RETRY_FULL_AFTER
        assert evse.session is not None and not evse.session.ev_full
        charge = instruction(entry, CHARGING, factor_for(16, 3))
        await server.send_instruction(entry.rm_id or "", charge)
        await wait_for(lambda: charger.evses[1].state_told == "Charging")
        # now it is full and says so: taken as full for good
        car.soc = 100.0
        await wait_for(lambda: evse.session is not None and evse.session.ev_full)
        full_at = clock.now()
        await wait_for(lambda: clock.now() - full_at > RETRY_FULL_AFTER + timedelta(minutes=5),
                       within_s=10)
        assert evse.session is not None and evse.session.ev_full
        assert CHARGING not in mode_ids(entry)


async def test_a_car_that_stays_paused_is_offered_again_less_and_less_often(
        cem_and_csms: tuple[S2Server, OcppCentralSystem]) -> None:
    """Each offer a paused car turns down doubles the wait for the next: 30 min, then 1 h."""
    from resource_managers.ocpp_charger.csms import RETRY_FULL_AFTER

    server = cem_and_csms[0]
    async with a_car_on_a_simulated_clock(cem_and_csms, "CP302", 2400, 12) as (
            _charger, entry, car, evse):
        offers: list[datetime] = []
        fulls: list[datetime] = []
        for _ in range(2):  # charged a little, then paused; offered again; still paused
            await wait_for(lambda: CHARGING in mode_ids(entry), within_s=10)
            offers.append(clock.now())
            charge = instruction(entry, CHARGING, factor_for(16, 3))
            await server.send_instruction(entry.rm_id or "", charge)
            await wait_for(lambda: evse.session is not None and evse.session.energy_wh > 0)
            car.paused = True
            await wait_for(lambda: evse.session is not None and evse.session.ev_full)
            assert evse.session is not None and evse.session.full_since is not None
            fulls.append(evse.session.full_since)
            await wait_for(lambda: CHARGING not in mode_ids(entry))
            await server.send_instruction(entry.rm_id or "", instruction(entry, IDLE, 0.0))
        await wait_for(lambda: CHARGING in mode_ids(entry), within_s=10)
        offers.append(clock.now())
        assert offers[1] - fulls[0] >= RETRY_FULL_AFTER
        assert offers[2] - fulls[1] >= 2 * RETRY_FULL_AFTER  # turned down once: twice as long
        assert offers[2] - fulls[1] < 3 * RETRY_FULL_AFTER


async def test_an_ev_suspended_before_it_charged_is_not_taken_as_full(
        cem_and_csms: tuple[S2Server, OcppCentralSystem]) -> None:
    """Many EVs say SuspendedEV for a while after plug-in, before they draw: not full. But
    when the charger's meter reading comes after the state and shows the EV had charged, it is."""
    from ocpp.v16 import call as call16

    server, csms = cem_and_csms
    charger = SimulatedChargePoint("CP16", f"ws://127.0.0.1:{csms.port}", version="1.6",
                                   speed=1, meter_interval_s=3600)
    await charger.connect()
    try:
        await charger.plug_in(1, SimulatedEv(), "SOMEONE")
        await wait_for(lambda: live(server, "EV charger CP16/1") is not None
                       and CHARGING in mode_ids(live(server, "EV charger CP16/1")))
        entry = live(server, "EV charger CP16/1")
        assert entry is not None
        await charger.link.call(call16.StatusNotification(
            connector_id=1, error_code="NoError", status="SuspendedEV",
            timestamp=datetime.now(UTC).isoformat()))
        evse = next(e for e in csms.evses_of("CP16") if e.evse_id == 1)
        await wait_for(lambda: evse.status == "SuspendedEV")
        await asyncio.sleep(0.2)
        assert evse.session is not None and not evse.session.ev_full
        assert CHARGING in mode_ids(entry)
        # a reading after the state shows that it had charged after all: full
        sim = charger.evses[1]
        assert sim.transaction_id is not None
        await charger.link.call(call16.MeterValues(
            connector_id=1, transaction_id=int(sim.transaction_id), meter_value=[{
                "timestamp": datetime.now(UTC).isoformat(), "sampled_value": [{
                    "value": f"{sim.meter_start_wh + 40:.0f}", "measurand": ENERGY,
                    "unit": "Wh"}]}]))
        await wait_for(lambda: evse.session is not None and evse.session.ev_full)
        await wait_for(lambda: CHARGING not in mode_ids(entry))
    finally:
        await charger.close()


async def test_an_ev_still_plugged_in_after_its_departure_gets_a_new_target_each_hour(
        cem_and_csms: tuple[S2Server, OcppCentralSystem]) -> None:
    """The driver is late, not gone: when the departure target runs out, the RM tells the CEM
    the need again, for the next hour (and again after that hour)."""
    from resource_managers.ocpp_charger.frbc import OVERSTAY

    server, csms = cem_and_csms
    previous = clock.use(clock.ScaledClock(datetime.now(UTC), speed=1200))
    charger = SimulatedChargePoint("CP201", f"ws://127.0.0.1:{csms.port}", version="2.0.1",
                                   phases=1, phase="L2", speed=1200, meter_interval_s=60)
    await charger.connect()
    try:
        await charger.plug_in(1, SimulatedEv(capacity_kwh=75, soc=10, phases=1), "SOMEONE",
                              dwell_s=600, energy_kwh=50)  # leaves in 10 minutes, it says
        name = "EV charger CP201/1"
        await wait_for(lambda: live(server, name) is not None and
                       live(server, name).state.of("FRBC").fill_level_target_profile is not None)
        entry = live(server, name)
        assert entry is not None
        first = entry.state.of("FRBC").fill_level_target_profile
        departure = first.start_time + sum((e.duration.to_timedelta() for e in first.elements),
                                           timedelta())
        # 10 simulated minutes later the EV is still there: a target for the next hour
        await wait_for(lambda: entry.state.of("FRBC").fill_level_target_profile.start_time
                       >= departure - timedelta(minutes=2), within_s=10)
        second = entry.state.of("FRBC").fill_level_target_profile
        span = sum((e.duration.to_timedelta() for e in second.elements), timedelta())
        assert abs(span - OVERSTAY) < timedelta(minutes=2)
        assert second.elements[-1].fill_level_range.start_of_range > \
            entry.state.of("FRBC").storage_status.present_fill_level  # still the need, not met
        # and once that hour has run out, again
        await wait_for(lambda: entry.state.of("FRBC").fill_level_target_profile.start_time
                       >= second.start_time + OVERSTAY - timedelta(minutes=2), within_s=15)
    finally:
        await charger.close()
        clock.use(previous)


async def test_each_evse_says_in_s2_that_it_is_an_ev_charger(
        cem_and_csms: tuple[S2Server, OcppCentralSystem]) -> None:
    """ResourceManagerDetails of an EVSE: an electricity consumer offering FRBC, measuring the
    phases it is wired to, with the vendor and model its charger gave at boot (a charge point
    not in the config gets its EVSE at boot, so its first S2 session says so)."""
    from s2python.common import Commodity, CommodityQuantity, ControlType, RoleType

    server = cem_and_csms[0]
    async with described_charger(cem_and_csms, "CP-NEW", version="1.6"):
        entry = live(server, "EV charger CP-NEW/1")
        assert entry is not None and entry.state.details is not None
        details = entry.state.details
        assert [(r.role, r.commodity) for r in details.roles] == [
            (RoleType.ENERGY_CONSUMER, Commodity.ELECTRICITY)]
        assert details.available_control_types == [ControlType.FILL_RATE_BASED_CONTROL]
        assert set(details.provides_power_measurement_types) == {
            CommodityQuantity.ELECTRIC_POWER_L1, CommodityQuantity.ELECTRIC_POWER_L2,
            CommodityQuantity.ELECTRIC_POWER_L3}
        assert (details.manufacturer, details.model) == ("S2 CEM project", "SimCharger 16")
    one_phase = live(server, "EV charger CP201/1")  # configured: described before any boot
    assert one_phase is not None and one_phase.state.details is not None
    assert one_phase.state.details.provides_power_measurement_types == [
        CommodityQuantity.ELECTRIC_POWER_L2]
    assert one_phase.state.details.model == "OCPP charge point CP201"
