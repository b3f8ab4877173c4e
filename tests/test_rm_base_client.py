"""The shared RM client against a scripted CEM: back-off, token, fallbacks, session requests."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from s2python.common import (
    Commodity,
    CommodityQuantity,
    ControlType,
    Duration,
    PowerMeasurement,
    PowerValue,
    Role,
    RoleType,
)
from websockets.asyncio.server import ServerConnection, serve

from resource_managers.base import AssetDetails, FRBCControlType, S2ResourceManager


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ScriptedCem:
    """A minimal CEM: handshake, FRBC selection, OK to everything unless told otherwise."""

    def __init__(self) -> None:
        self.headers: list[str | None] = []
        self.received: list[dict[str, Any]] = []
        self.statuses: dict[str, str] = {}
        self.connections: list[ServerConnection] = []
        self.silent_types: set[str] = set()

    async def handler(self, ws: ServerConnection) -> None:
        self.headers.append(ws.request.headers.get("Authorization") if ws.request else None)
        self.connections.append(ws)
        async for text in ws:
            message = json.loads(text)
            self.received.append(message)
            kind = message["message_type"]
            if kind == "ReceptionStatus":
                self.statuses[message["subject_message_id"]] = message["status"]
                continue
            if kind in self.silent_types:
                continue
            await self.status(ws, message["message_id"])
            if kind == "Handshake":
                await self.send(ws, {"message_type": "Handshake", "role": "CEM",
                                     "supported_protocol_versions": ["0.0.2-beta"]})
                await self.send(ws, {"message_type": "HandshakeResponse",
                                     "selected_protocol_version": "0.0.2-beta"})
            elif kind == "ResourceManagerDetails":
                await self.send(ws, {"message_type": "SelectControlType",
                                     "control_type": "FILL_RATE_BASED_CONTROL"})

    @staticmethod
    async def status(ws: ServerConnection, subject: str, status: str = "OK") -> None:
        await ws.send(json.dumps({"message_type": "ReceptionStatus",
                                  "subject_message_id": subject, "status": status}))

    @staticmethod
    async def send(ws: ServerConnection, message: dict[str, Any]) -> str:
        message_id = str(uuid.uuid4())
        await ws.send(json.dumps({**message, "message_id": message_id}))
        return message_id


class Frbc(FRBCControlType):
    def __init__(self) -> None:
        self.activations = 0

    async def handle_instruction(self, connection: Any, message: Any, send_okay: Any) -> None:
        await send_okay()

    async def activate(self, connection: Any) -> None:
        self.activations += 1

    async def deactivate(self, connection: Any) -> None:
        pass


def make_rm(url: str, **kwargs: Any) -> S2ResourceManager:
    return S2ResourceManager(
        cem_url=url, control_types=[kwargs.pop("control_type", None) or Frbc()],
        backoff_s=(0.05, 0.3),
        asset_details=AssetDetails(
            resource_id=uuid.uuid4(), provides_forecast=False,
            provides_power_measurements=[CommodityQuantity.ELECTRIC_POWER_L1],
            instruction_processing_delay=Duration.from_milliseconds(100),
            roles=[Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY)],
            name="test rm"), **kwargs)


@asynccontextmanager
async def running(rm: S2ResourceManager) -> AsyncIterator[S2ResourceManager]:
    stop = asyncio.Event()
    task = asyncio.create_task(rm.run(stop))
    try:
        yield rm
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    for _ in range(int(within_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def measurement() -> PowerMeasurement:
    return PowerMeasurement(message_id=uuid.uuid4(), measurement_timestamp=datetime.now(UTC),
                            values=[PowerValue(commodity_quantity=CommodityQuantity.ELECTRIC_POWER_L1,
                                               value=230.0)])


async def test_waits_for_a_late_cem_and_sends_its_token() -> None:
    port = free_port()
    cem = ScriptedCem()
    rm = make_rm(f"ws://127.0.0.1:{port}", token="secret-token-of-this-rm")
    async with running(rm):
        assert await rm.send(measurement()) is None  # no session yet: None, no exception
        await until(lambda: rm.last_error is not None)  # tried, and said why it failed
        assert "cannot reach the CEM" in (rm.last_error or "")
        async with serve(cem.handler, "127.0.0.1", port):
            await asyncio.wait_for(rm.connected.wait(), 5)
            assert rm.control_type == ControlType.FILL_RATE_BASED_CONTROL
            assert cem.headers == ["Bearer secret-token-of-this-rm"]
            status = await rm.send(measurement())
            assert status is not None and status.status.value == "OK"


async def test_unanswered_message_returns_none_and_keeps_the_session() -> None:
    cem = ScriptedCem()
    async with serve(cem.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        rm = make_rm(f"ws://127.0.0.1:{port}", reception_timeout_s=0.3)
        async with running(rm):
            await asyncio.wait_for(rm.connected.wait(), 5)
            cem.silent_types.add("PowerMeasurement")
            assert await rm.send(measurement()) is None
            assert rm.connected.is_set() and rm.sessions_started == 1


async def test_unexpected_instruction_gets_invalid_content_and_reconnect_request_is_obeyed() -> None:
    cem = ScriptedCem()
    frbc = Frbc()
    async with serve(cem.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        rm = make_rm(f"ws://127.0.0.1:{port}", control_type=frbc)
        async with running(rm):
            await asyncio.wait_for(rm.connected.wait(), 5)
            ws = cem.connections[0]
            wrong = await cem.send(ws, {
                "message_type": "OMBC.Instruction", "id": str(uuid.uuid4()),
                "operation_mode_id": str(uuid.uuid4()), "operation_mode_factor": 1.0,
                "execution_time": "2026-01-01T00:00:00Z", "abnormal_condition": False})
            await until(lambda: wrong in cem.statuses)
            assert cem.statuses[wrong] == "INVALID_CONTENT"
            answers = [m for m in cem.received if m.get("subject_message_id") == wrong]
            assert len(answers) == 1  # exactly one status, not INVALID_CONTENT and then OK

            request = await cem.send(ws, {"message_type": "SessionRequest",
                                          "request": "RECONNECT"})
            await until(lambda: rm.sessions_started == 2 and rm.connected.is_set())
            assert cem.statuses[request] == "OK"
            assert frbc.activations == 2
            assert len(cem.connections) == 2
