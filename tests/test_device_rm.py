"""The device loop as a seam: a new device family is an adapter on `DeviceRM`, not a copy.

A smart plug with an HTTP JSON API (a real HTTP server on loopback, stdlib) gets an S2 RM of a
few dozen lines: protocol I/O (`connect_device`, `read_device`, ...) and its S2 mapping (OMBC
on/off). The CEM (the real S2 server) sees it describe itself, measure, carry out and reject
instructions, withdraw its flexibility when the device fails and offer it again when it is back:
all of that is the base's, none of it is in the adapter.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from s2python.common import (
    Commodity,
    CommodityQuantity,
    InstructionStatus,
    PowerMeasurement,
    PowerRange,
    PowerValue,
    RevokableObjects,
    Role,
    RoleType,
    Transition,
)
from s2python.message import S2Message
from s2python.ombc import OMBCInstruction, OMBCOperationMode, OMBCStatus, OMBCSystemDescription

from cem.s2.server import S2Server
from cem.site.config import SiteConfig
from resource_managers.base import S2ControlType
from resource_managers.device import (
    DeviceFault,
    DeviceRM,
    DeviceUnreachable,
    InstructionRejected,
    OmbcToDevice,
)

OFF, ON = uuid.UUID(int=1), uuid.UUID(int=2)
PLUG_W = 2000.0


class Plug:
    """The device: a smart plug's HTTP API. GET /status, POST /switch {"on": bool}."""

    def __init__(self) -> None:
        self.on = False
        self.locked = False  # the owner's child lock: it may not be switched on
        self.broken = False  # answers 503
        self.switches: list[bool] = []
        plug = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict[str, Any] | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if plug.broken:
                    return self._reply(503, {"error": "relay fault"})
                self._reply(200, {"power_w": PLUG_W if plug.on else 0.0,
                                  "locked": plug.locked})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                plug.on = bool(body["on"])
                plug.switches.append(plug.on)
                self._reply(200, {"on": plug.on})

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class PlugRM(DeviceRM):
    """The whole adapter: HTTP I/O plus the S2 mapping (OMBC: off 0 W, on 2 kW)."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.url = url
        self.linked = False
        self.description_id: uuid.UUID | None = None
        super().__init__(name="smart plug", resource_id=uuid.uuid5(uuid.NAMESPACE_URL, url),
                         manufacturer="Test", model="HTTP plug", **kwargs)

    # protocol I/O
    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
                    ) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(self.url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=1) as response:
                return dict(json.loads(response.read()))
        try:
            return await asyncio.to_thread(call)
        except urllib.error.HTTPError as exc:
            raise DeviceFault(f"HTTP {exc.code} from {path}") from None
        except OSError as exc:
            raise DeviceUnreachable(f"no answer from {self.url}: {exc}") from None

    async def connect_device(self) -> None:
        await self._call("GET", "/status")
        self.linked = True

    def device_connected(self) -> bool:
        return self.linked

    async def read_device(self) -> dict[str, float]:
        status = await self._call("GET", "/status")
        return {"power": float(status["power_w"]), "locked": float(status["locked"])}

    async def close_device(self) -> None:
        self.linked = False

    # what it is in S2
    def roles(self) -> list[Role]:
        return [Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY)]

    def measured_quantities(self) -> list[CommodityQuantity]:
        return [CommodityQuantity.ELECTRIC_POWER_L1]

    def control_types(self) -> list[S2ControlType]:
        return [OmbcToDevice(self)]

    # the S2 mapping
    def flexibility_messages(self, now: datetime) -> list[S2Message]:
        def mode(mode_id: uuid.UUID, watts: float) -> OMBCOperationMode:
            return OMBCOperationMode(id=mode_id, abnormal_condition_only=False, power_ranges=[
                PowerRange(start_of_range=watts, end_of_range=watts,
                           commodity_quantity=CommodityQuantity.ELECTRIC_POWER_L1)])

        def transition(a: uuid.UUID, b: uuid.UUID) -> Transition:
            return Transition(id=uuid.uuid4(), from_=a, to=b, start_timers=[],
                              blocking_timers=[], abnormal_condition_only=False)

        description = OMBCSystemDescription(
            message_id=uuid.uuid4(), valid_from=now, operation_modes=[mode(OFF, 0), mode(ON, PLUG_W)],
            transitions=[transition(OFF, ON), transition(ON, OFF)], timers=[])
        self.description_id = description.message_id
        active = ON if self.readings.get("power", 0) > 0 else OFF
        return [description, OMBCStatus(message_id=uuid.uuid4(),  # s2-python: a str here
                                        active_operation_mode_id=str(active),  # type: ignore[arg-type]
                                        operation_mode_factor=1.0)]

    def withdraw_messages(self) -> list[S2Message]:
        return self._revoke(RevokableObjects.OMBC_SystemDescription, self.description_id)

    def periodic_messages(self, now: datetime) -> list[S2Message]:
        return [PowerMeasurement(message_id=uuid.uuid4(), measurement_timestamp=now, values=[
            PowerValue(commodity_quantity=CommodityQuantity.ELECTRIC_POWER_L1,
                       value=self.readings["power"])])]

    def check(self, instruction: Any) -> None:
        if instruction.operation_mode_id == ON and self.readings.get("locked"):
            raise InstructionRejected("the plug's child lock is on")

    async def apply(self, instruction: Any) -> str:
        on = instruction.operation_mode_id == ON
        await self._call("POST", "/switch", {"on": on})
        return "switched on" if on else "switched off"


def now() -> datetime:
    return datetime.now(UTC)


async def eventually(check: Callable[[], Any], what: str, within: float = 5.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while not (result := check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return result


@pytest.fixture
def plug() -> Iterator[Plug]:
    device = Plug()
    yield device
    device.close()


@pytest.fixture
async def cem() -> AsyncIterator[S2Server]:
    config = SiteConfig()
    config.server.port = 0
    server = S2Server(config)
    await server.start()
    yield server
    await server.stop()


def switch(mode: uuid.UUID) -> OMBCInstruction:
    return OMBCInstruction(message_id=uuid.uuid4(), id=uuid.uuid4(), execution_time=now(),
                           operation_mode_id=mode, operation_mode_factor=1.0,
                           abnormal_condition=False)


async def test_an_http_device_is_an_adapter_on_the_device_loop(plug: Plug, cem: S2Server) -> None:
    rm = PlugRM(plug.url, cem_url=cem.url, poll_interval_s=0.1, backoff_s=(0.1, 0.4),
                s2_backoff_s=(0.1, 0.5))
    await rm.start()
    try:
        rm_id = str(rm.resource_id)
        live = await eventually(lambda: (entry := cem.get(rm_id)) is not None
                                and entry.state.of("OMBC").system_description(now()) is not None
                                and entry, "the plug's OMBC description at the CEM")
        details = live.state.details
        assert details.name == "smart plug" and details.model == "HTTP plug"
        assert [(r.role, r.commodity) for r in details.roles] == [
            (RoleType.ENERGY_CONSUMER, Commodity.ELECTRICITY)]

        turn_on = switch(ON)
        assert (await cem.send_instruction(rm_id, turn_on)).ok
        await eventually(lambda: live.state.instruction_status(turn_on.id)
                         == InstructionStatus.SUCCEEDED, "SUCCEEDED")
        assert plug.switches == [True]
        await eventually(lambda: (m := live.state.latest_measurement()) is not None
                         and m.values[0].value == PLUG_W, "2 kW measured")

        plug.locked = True  # the device's own state makes the RM refuse
        assert (await cem.send_instruction(rm_id, switch(OFF))).ok
        await eventually(lambda: plug.switches == [True, False], "switched off")
        await eventually(lambda: rm.readings.get("locked") == 1.0, "the lock polled")
        refused = switch(ON)
        assert (await cem.send_instruction(rm_id, refused)).ok
        await eventually(lambda: live.state.instruction_status(refused.id)
                         == InstructionStatus.REJECTED, "REJECTED")
        assert plug.switches == [True, False]

        plug.broken = True  # a fault: flexibility withdrawn, no more measurements
        await eventually(lambda: live.state.of("OMBC").system_description(now()) is None,
                         "the description revoked")
        assert not rm.device_ok and "HTTP 503" in (rm.fault or "")
        plug.broken = False
        await eventually(lambda: live.state.of("OMBC").system_description(now()) is not None,
                         "the flexibility offered again")
    finally:
        await rm.stop()
