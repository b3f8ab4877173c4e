"""End to end: a real websocket S2 RM (s2-python, via the shared RM client) with an FRBC EV
connects to the real S2 server; the controller plans and the RM receives an FRBC.Instruction
whose power stays within the fuse."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from s2python.common import (
    CommodityQuantity,
    Duration,
    NumberRange,
    PowerRange,
    Role,
    RoleType,
)
from s2python.connection.asset_details import AssetDetails
from s2python.frbc import (
    FRBCActuatorDescription,
    FRBCFillLevelTargetProfile,
    FRBCFillLevelTargetProfileElement,
    FRBCInstruction,
    FRBCOperationMode,
    FRBCOperationModeElement,
    FRBCStorageDescription,
    FRBCStorageStatus,
    FRBCSystemDescription,
)
from s2python.generated.gen_s2 import Commodity

from cem.control.mpc import SiteController
from cem.s2.server import S2Server
from cem.site.config import SiteConfig
from cem.store import Store
from resource_managers.base import FRBCControlType, S2ResourceManager

SYM = CommodityQuantity.ELECTRIC_POWER_3_PHASE_SYMMETRIC


def frbc_mode(power: tuple[float, float], rate: tuple[float, float]) -> FRBCOperationMode:
    return FRBCOperationMode(id=uuid.uuid4(), abnormal_condition_only=False, elements=[
        FRBCOperationModeElement(
            fill_level_range=NumberRange(start_of_range=0, end_of_range=100),
            fill_rate=NumberRange(start_of_range=rate[0], end_of_range=rate[1]),
            power_ranges=[PowerRange(start_of_range=power[0], end_of_range=power[1],
                                     commodity_quantity=SYM)])])


class EvControl(FRBCControlType):
    """The RM side: records the instructions it gets and accepts them."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[FRBCInstruction] = asyncio.Queue()

    async def handle_instruction(self, connection, msg, send_okay) -> None:  # type: ignore[no-untyped-def]
        await send_okay()
        self.received.put_nowait(msg)

    async def activate(self, connection) -> None:  # type: ignore[no-untyped-def]
        return None

    async def deactivate(self, connection) -> None:  # type: ignore[no-untyped-def]
        return None


async def test_real_rm_gets_an_frbc_instruction_within_the_fuse(tmp_path: Path) -> None:
    # a 16 A fuse: 3 x 16 A x 230 V = 11040 W, so the 22 kW EV must be held back
    config = SiteConfig.model_validate({
        "server": {"host": "127.0.0.1", "port": 0},
        "grid": {"fuse_a": 16, "import_limit_kw": 25},
        "planner": {"horizon_ptus": 8, "replan_min_interval_s": 0.05, "time_limit_s": 0.5}})
    store = await Store.open(tmp_path / "cem.db")
    server = S2Server(config, store)
    await server.start()
    controller = SiteController(config, server, store)
    await controller.start()
    control = EvControl()
    rm = S2ResourceManager(
        cem_url=server.url, control_types=[control], backoff_s=(0.1, 1.0),
        asset_details=AssetDetails(resource_id=uuid.uuid4(), name="EV charger 1",
                                   provides_forecast=False, provides_power_measurements=[SYM],
                                   instruction_processing_delay=Duration(root=100),
                                   roles=[Role(role=RoleType.ENERGY_STORAGE,
                                               commodity=Commodity.ELECTRICITY)]))
    stop = asyncio.Event()
    rm_task = asyncio.create_task(rm.run(stop))
    try:
        await asyncio.wait_for(rm.connected.wait(), timeout=5)
        rate = 22080 / 60000 * 100 / 3600
        off = frbc_mode((0, 0), (0, 0))
        charge = frbc_mode((4140, 22080), (4140 / 22080 * rate, rate))
        actuator = FRBCActuatorDescription(id=uuid.uuid4(), supported_commodities=[
            Commodity.ELECTRICITY], operation_modes=[off, charge], transitions=[], timers=[])
        status = await rm.send(FRBCSystemDescription(
            message_id=uuid.uuid4(), valid_from=datetime.now(UTC) - timedelta(seconds=1),
            actuators=[actuator], storage=FRBCStorageDescription(
                diagnostic_label="EV", fill_level_label="SoC %",
                provides_leakage_behaviour=False, provides_fill_level_target_profile=True,
                provides_usage_forecast=False,
                fill_level_range=NumberRange(start_of_range=0, end_of_range=100))))
        assert status is not None and status.status.value == "OK"
        await rm.send(FRBCStorageStatus(message_id=uuid.uuid4(), present_fill_level=30))
        # the driver wants 80 % within 2 hours: more than the 16 A fuse allows
        await rm.send(FRBCFillLevelTargetProfile(
            message_id=uuid.uuid4(), start_time=datetime.now(UTC), elements=[
                FRBCFillLevelTargetProfileElement(
                    duration=Duration(root=2 * 3600 * 1000),
                    fill_level_range=NumberRange(start_of_range=80, end_of_range=100))]))
        instruction = await asyncio.wait_for(control.received.get(), timeout=10)
        while str(instruction.operation_mode) != str(charge.id):
            instruction = await asyncio.wait_for(control.received.get(), timeout=10)
        assert str(instruction.actuator_id) == str(actuator.id)
        power = 4140 + instruction.operation_mode_factor * (22080 - 4140)
        assert 4140 <= power <= 16 * 230 * 3
        await store.flush()
        rows = await store.query("SELECT message_type, plan_id FROM instructions")
        assert ("FRBC.Instruction", controller.plan_id) in [tuple(r) for r in rows]
    finally:
        stop.set()
        await rm_task
        await controller.stop()
        await server.stop()
        await store.close()
