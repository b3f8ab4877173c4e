"""The whole chain on loopback: simulated chargers -> CSMS -> S2 -> CEM (plan) -> SetChargingProfile.

Two chargers (OCPP 1.6J and 2.0.1, 3 x 32 A each) behind a 3 x 16 A fuse: left alone their EVs
would draw 64 A per phase. The CEM plans with CP-SAT and the chargers end up within the fuse.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from cem.app.service import CemService
from cem.app.site_file import parse_site_file
from cem.control.mpc import site_controller_for
from resource_managers.ocpp_charger.csms import OcppCentralSystem
from resource_managers.ocpp_charger.simulator import SimulatedChargePoint, SimulatedEv

SITE = """
[server]
port = 0
[http]
port = 0
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
safe_limit_a = 6
[[ocpp.charge_points]]
id = "CP-A"
max_current_a = 32
[[ocpp.charge_points]]
id = "CP-B"
max_current_a = 32
"""


async def wait_for(condition: Callable[[], object], within_s: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while not condition():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_cem_plans_chargers_within_the_fuse(tmp_path: Path) -> None:
    site = parse_site_file(SITE)
    site.store.path = tmp_path / "cem.db"
    site.ocpp.database = tmp_path / "ocpp.db"
    cem = CemService(site, controller_factory=site_controller_for)
    await cem.start()
    assert cem.server is not None
    csms = OcppCentralSystem(site.ocpp_rm(), cem.server.url, port=0)
    await csms.start()
    url = f"ws://127.0.0.1:{csms.port}"
    chargers = [SimulatedChargePoint("CP-A", url, version="1.6", meter_interval_s=2),
                SimulatedChargePoint("CP-B", url, version="2.0.1", meter_interval_s=2)]
    try:
        for charger in chargers:
            await charger.connect()
            await charger.plug_in(1, SimulatedEv(capacity_kwh=75, soc=20, phases=3,
                                                 max_current_a=32), f"CARD-{charger.cp_id}",
                                  dwell_s=3 * 3600, energy_kwh=30)

        def planned() -> bool:
            limits = [c.limit_a(c.evses[1]) for c in chargers]
            tx_profiles = [p for c in chargers for p in c.profile_log if p["purpose"] == "TxProfile"]
            return len(tx_profiles) >= 2 and sum(limits) <= 16.0 + 1e-6 and max(limits) >= 6

        await wait_for(planned, within_s=30)
        # what the chargers were told, and what the EVs draw, fits the 16 A fuse on every phase
        limits = [c.limit_a(c.evses[1]) for c in chargers]
        assert sum(limits) <= 16.0 + 1e-6
        await asyncio.sleep(0.3)
        assert sum(c.evses[1].current_a for c in chargers) <= 16.0 + 1e-6
        for charger in chargers:
            for profile in charger.profile_log:
                amps = profile["limit"]
                assert amps == 0 or amps >= 6
                assert abs(amps * 10 - round(amps * 10)) < 1e-6
    finally:
        for charger in chargers:
            await charger.close()
        await csms.stop()
        await cem.stop()


@pytest.mark.parametrize("unused", [None])
def test_site_is_valid(unused: None) -> None:
    """The end-to-end site above is a valid config (a typo there would fail confusingly)."""
    assert parse_site_file(SITE).grid.fuse_a == 16


async def test_card_priority_decides_who_charges_when_the_fuse_binds(tmp_path: Path) -> None:
    """Both drivers need more than the fuse gives; the VIP card's EV is served first."""
    site = parse_site_file(SITE + """
[[charge_cards]]
id_tag = "VIP"
priority = 5
[[charge_cards]]
id_tag = "STAFF"
priority = 1
""")
    site.store.path = tmp_path / "cem.db"
    site.ocpp.database = tmp_path / "ocpp.db"
    cem = CemService(site, controller_factory=site_controller_for)
    await cem.start()
    assert cem.server is not None
    csms = OcppCentralSystem(site.ocpp_rm(), cem.server.url, port=0)
    await csms.start()
    url = f"ws://127.0.0.1:{csms.port}"
    staff = SimulatedChargePoint("CP-A", url, version="1.6", meter_interval_s=2)
    vip = SimulatedChargePoint("CP-B", url, version="2.0.1", meter_interval_s=2)
    try:
        for charger, card in ((staff, "STAFF"), (vip, "VIP")):
            await charger.connect()
            await charger.plug_in(1, SimulatedEv(capacity_kwh=75, soc=20, phases=3,
                                                 max_current_a=32), card,
                                  dwell_s=4 * 3600, energy_kwh=30)

        db = sqlite3.connect(site.store.path)

        def shortfalls() -> tuple[int, int] | None:
            """What the latest plan leaves the staff EV and the VIP's EV short of (Wh), both
            from that one plan; None before there is a plan for both chargers."""
            ids = [db.execute("SELECT rm_id FROM rms WHERE name LIKE ?",
                              (f"%{charger_id}/%",)).fetchone() for charger_id in ("CP-A", "CP-B")]
            plan = db.execute("SELECT payload FROM plans ORDER BY plan_id DESC LIMIT 1").fetchone()
            if None in ids or plan is None:
                return None
            shortfall = json.loads(plan[0])["shortfall"]
            staff_wh, vip_wh = (sum(s["energy_wh"] for k, s in shortfall.items() if k.startswith(rm[0]))
                                for rm in ids)
            return staff_wh, vip_wh

        found: list[tuple[int, int]] = []

        def competing() -> bool:
            """Whether a plan in which the two EVs compete (the staff EV left kWh short) is there;
            a plan made before the VIP's EV told its target may leave the staff EV a few hundred
            Wh short against its own window, which is not the competition this test is about."""
            latest = shortfalls()
            if latest is not None and latest[0] > 5000:
                found.append(latest)
            return bool(found)

        await wait_for(competing, within_s=30)
        staff_short_wh, vip_short_wh = found[0]
        # the fuse (16 A, 11 kW) cannot give both 30 kWh in 4 h: the staff EV takes the shortfall
        # (the VIP's 30 kWh take 2.8 h, whatever minute of its PTU the test starts in) and the
        # VIP gets its 30 kWh, but for what the planner's gap tolerance leaves: 70 Wh in a plan
        # made with the card's 3 h before its EV said 4 h, 99 Wh with both known at once (when
        # events come in one batch, no later plan follows within the test's time)
        assert vip_short_wh <= 0.01 * 30_000, (staff_short_wh, vip_short_wh)
        db.close()
        limits = [c.limit_a(c.evses[1]) for c in (staff, vip)]
        assert sum(limits) <= 16.0 + 1e-6
    finally:
        for charger in (staff, vip):
            await charger.close()
        await csms.stop()
        await cem.stop()
