"""A replan sends an RM instructions only where they change: real S2 RMs (s2-python, the
shared RM client) over websockets to the real S2 server, three EVs that do not share a limit.

A replan with nothing changed sends no RM anything; when one EV's driver asks for less, that
EV alone gets a new instruction, and the others keep theirs untouched.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from s2python.common import (
    CommodityQuantity,
    Duration,
    InstructionStatus,
    InstructionStatusUpdate,
    NumberRange,
    Role,
    RoleType,
)
from s2python.connection.asset_details import AssetDetails
from s2python.frbc import (
    FRBCActuatorDescription,
    FRBCFillLevelTargetProfile,
    FRBCFillLevelTargetProfileElement,
    FRBCInstruction,
    FRBCStorageDescription,
    FRBCStorageStatus,
    FRBCSystemDescription,
)
from s2python.generated.gen_s2 import Commodity
from test_control_end_to_end import frbc_mode

from cem.control.mpc import SiteController
from cem.planner.assets import StorageAsset
from cem.s2.server import S2Server
from cem.site.config import SiteConfig
from cem.store import Store
from resource_managers.base import FRBCControlType, S2ResourceManager

SYM = CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC
EVS = 3


class EvControl(FRBCControlType):
    """The RM side: accepts every FRBC.Instruction and keeps it."""

    def __init__(self) -> None:
        self.received: list[FRBCInstruction] = []

    async def handle_instruction(self, connection, msg, send_okay) -> None:  # type: ignore[no-untyped-def]
        await send_okay()
        self.received.append(msg)

    async def activate(self, connection) -> None:  # type: ignore[no-untyped-def]
        return None

    async def deactivate(self, connection) -> None:  # type: ignore[no-untyped-def]
        return None


def target(percent: float) -> FRBCFillLevelTargetProfile:
    """The driver's target: `percent` within two hours."""
    return FRBCFillLevelTargetProfile(
        message_id=uuid.uuid4(), start_time=datetime.now(UTC), elements=[
            FRBCFillLevelTargetProfileElement(
                duration=Duration(root=2 * 3600 * 1000),
                fill_level_range=NumberRange(start_of_range=percent, end_of_range=100))])


async def connect_ev(url: str, number: int, control: FRBCControlType, stop: asyncio.Event,
                     tasks: list[asyncio.Task[None]],
                     driver_target: FRBCFillLevelTargetProfile) -> tuple[S2ResourceManager, str]:
    """EV charger `number`'s RM (4.1-22 kW, a 60 kWh battery at 30 %) connected to the CEM at
    `url` (its task in `tasks`, until `stop`), its system description, status and the
    driver's target acknowledged; with the id of its charging mode."""
    rm = S2ResourceManager(
        cem_url=url, control_types=[control], backoff_s=(0.1, 1.0),
        asset_details=AssetDetails(
            resource_id=uuid.uuid4(), name=f"EV charger {number}", provides_forecast=False,
            provides_power_measurements=[SYM],
            instruction_processing_delay=Duration(root=100),
            roles=[Role(role=RoleType.ENERGY_STORAGE, commodity=Commodity.ELECTRICITY)]))
    tasks.append(asyncio.create_task(rm.run(stop)))
    await asyncio.wait_for(rm.connected.wait(), timeout=5)
    rate = 22080 / 60000 * 100 / 3600  # a 60 kWh battery, % per second at full power
    charging = frbc_mode((4140, 22080), (4140 / 22080 * rate, rate))
    actuator = FRBCActuatorDescription(
        id=uuid.uuid4(), supported_commodities=[Commodity.ELECTRICITY],
        operation_modes=[frbc_mode((0, 0), (0, 0)), charging], transitions=[], timers=[])
    for message in (
            FRBCSystemDescription(
                message_id=uuid.uuid4(), valid_from=datetime.now(UTC) - timedelta(seconds=1),
                actuators=[actuator], storage=FRBCStorageDescription(
                    diagnostic_label="EV", fill_level_label="SoC %",
                    provides_leakage_behaviour=False,
                    provides_fill_level_target_profile=True,
                    provides_usage_forecast=False,
                    fill_level_range=NumberRange(start_of_range=0, end_of_range=100))),
            FRBCStorageStatus(message_id=uuid.uuid4(), present_fill_level=30),
            driver_target):
        status = await rm.send(message)
        assert status is not None and status.status.value == "OK"
    return rm, str(charging.id)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[S2Server, SiteController,
                                                      list[S2ResourceManager], list[EvControl]]]:
    # a fuse far above three 22 kW EVs: each EV's plan is its own
    config = SiteConfig.model_validate({
        "server": {"host": "127.0.0.1", "port": 0},
        "grid": {"fuse_a": 400, "import_limit_kw": 250},
        "planner": {"horizon_ptus": 12, "time_limit_s": 1.0}})
    store = await Store.open(tmp_path / "cem.db")
    server = S2Server(config, store)
    await server.start()
    controller = SiteController(config, server, store)  # replans driven by the test
    stop = asyncio.Event()
    rms: list[S2ResourceManager] = []
    controls: list[EvControl] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for number in range(EVS):
            control = EvControl()
            # more than two hours at full power give: full power
            rm, _charging = await connect_ev(server.url, number, control, stop, tasks,
                                             target(90))
            rms.append(rm)
            controls.append(control)
        yield server, controller, rms, controls
    finally:
        stop.set()
        for task in tasks:
            await task
        await controller.stop()
        await server.stop()
        await store.close()


async def test_a_replan_sends_only_to_the_rms_whose_instructions_change(
        site: tuple[S2Server, SiteController, list[S2ResourceManager], list[EvControl]],
        caplog: pytest.LogCaptureFixture) -> None:
    _server, controller, rms, controls = site
    caplog.set_level(logging.INFO, logger="cem.control")
    await controller.replan(["the CEM started"])
    # every EV charges at full power now: each got its instruction over its websocket
    assert all(len(c.received) >= 1 for c in controls)
    charging = [c.received[-1].operation_mode_factor for c in controls]
    assert charging == [1.0] * EVS

    # nothing changed: nothing new reaches any RM
    before = [len(c.received) for c in controls]
    await controller.replan(["a PTU timer"])
    await asyncio.sleep(0.3)
    assert [len(c.received) for c in controls] == before
    assert f"{EVS} RM(s) as before" in caplog.records[-1].getMessage()

    # the first driver's EV is where she wants it (a target it already has): that EV alone gets
    # a new instruction (a need of a few hundred Wh would move within PTU 0 as its minutes run
    # out, and with a flat price to any PTU: a new instruction each replan, rightly)
    status = await rms[0].send(target(30))
    assert status is not None and status.status.value == "OK"
    await controller.replan(["RM EV charger 0 sent a new target"])
    await asyncio.sleep(0.3)
    after = [len(c.received) for c in controls]
    assert after[0] > before[0] and after[1:] == before[1:]
    first, new = controls[0].received[0], controls[0].received[before[0]]
    assert (str(new.operation_mode), new.operation_mode_factor) != \
        (str(first.operation_mode), first.operation_mode_factor)  # no longer full power now
    assert f"{EVS - 1} RM(s) as before" in caplog.records[-1].getMessage()

    # and a replan after that sends nothing again
    await controller.replan(["a PTU timer"])
    await asyncio.sleep(0.3)
    assert [len(c.received) for c in controls] == after


async def test_an_rm_that_carried_out_its_new_instruction_is_not_planned_for_again(
        site: tuple[S2Server, SiteController, list[S2ResourceManager], list[EvControl]],
        caplog: pytest.LogCaptureFixture) -> None:
    """An RM that reports it STARTED its new instruction has that mode active at the next
    replan; with nothing else new, that replan builds none of its instructions again (the
    dispatcher knows the key it settles on), and sends it nothing."""
    _server, controller, rms, controls = site
    caplog.set_level(logging.INFO, logger="cem.control")
    await controller.replan(["the CEM started"])
    status = await rms[0].send(target(30))  # EV 0 need not charge now: a new instruction
    assert status is not None and status.status.value == "OK"
    before = [len(c.received) for c in controls]
    await controller.replan(["RM EV charger 0 sent a new target"])
    await asyncio.sleep(0.3)
    assert len(controls[0].received) > before[0]
    for charger, control in zip(rms, controls, strict=True):  # each EV does what it was told
        for instruction in control.received:
            status = await charger.send(InstructionStatusUpdate(
                message_id=uuid.uuid4(), instruction_id=instruction.id,
                status_type=InstructionStatus.STARTED, timestamp=datetime.now(UTC)))
            assert status is not None and status.status.value == "OK"
    after = [len(c.received) for c in controls]
    await controller.replan(["a PTU timer"])
    await asyncio.sleep(0.3)
    assert [len(c.received) for c in controls] == after
    assert f"{EVS} RM(s) as before" in caplog.records[-1].getMessage()


async def test_a_replan_plans_on_what_an_rm_said_last(
        site: tuple[S2Server, SiteController, list[S2ResourceManager], list[EvControl]]) -> None:
    """An RM's asset is made again only when its state changed (`FrbcState.version`): a new
    fill level or an earlier departure sent through S2 reaches the very next plan, and the
    RMs that said nothing keep their asset as it was."""
    _server, controller, rms, _controls = site
    await controller.replan(["the CEM started"])
    assert controller.problem is not None and controller.mapping is not None

    def ev(number: int) -> tuple[StorageAsset, list[int]]:
        assert controller.problem is not None and controller.mapping is not None \
            and controller.plan is not None
        asset_id = controller.mapping.rm_assets[str(rms[number].asset_details.resource_id)][0]
        asset = next(s for s in controller.problem.storage if s.id == asset_id)
        return asset, [int(x) for x in controller.plan.power_w[asset_id]]

    before = [ev(n)[0] for n in range(EVS)]
    assert all(a.level_wh == before[0].level_wh for a in before)
    # EV 0 is at 95 % now, above its driver's 90 %: the next plan charges it no more
    status = await rms[0].send(FRBCStorageStatus(message_id=uuid.uuid4(), present_fill_level=95))
    assert status is not None and status.status.value == "OK"
    await controller.replan(["RM EV charger 0 sent a new storage status"])
    fuller, power = ev(0)
    assert fuller.level_wh > before[0].level_wh
    assert power == [0] * len(power)
    assert ev(1)[0].level_wh == before[1].level_wh and ev(1)[1][0] > 0
    # EV 1's driver leaves in 30 minutes, not two hours: the next plan knows it
    late = max(ptu for ptu, _lo, _hi in ev(1)[0].target_profile)
    status = await rms[1].send(target(90).model_copy(update={
        "elements": [FRBCFillLevelTargetProfileElement(
            duration=Duration(root=30 * 60 * 1000),
            fill_level_range=NumberRange(start_of_range=90, end_of_range=100))]}))
    assert status is not None and status.status.value == "OK"
    await controller.replan(["RM EV charger 1 sent a new target"])
    assert max(ptu for ptu, _lo, _hi in ev(1)[0].target_profile) < late
    assert ev(0)[0].level_wh == fuller.level_wh and ev(0)[1] == power  # as it said last
    assert max(ptu for ptu, _lo, _hi in ev(2)[0].target_profile) == late
