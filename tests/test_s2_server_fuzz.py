"""Arbitrary bytes and text over the wire never crash the server; each gets a ReceptionStatus."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from cem.s2.server import S2Server
from cem.site.config import SiteConfig
from cem.store import Store

STATUSES = {"OK", "INVALID_DATA", "INVALID_MESSAGE", "INVALID_CONTENT", "TEMPORARY_ERROR"}


class Wire:
    """A CEM and one handshaken raw RM connection, on an event loop in a background thread."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tmp_path = tmp_path
        self.server: S2Server | None = None
        self.store: Store | None = None
        self.ws: ClientConnection | None = None
        self.run(self._open())

    def run(self, coroutine: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _open(self) -> None:
        config = SiteConfig.model_validate({
            "server": {"host": "127.0.0.1", "port": 0},
            "store": {"path": str(self.tmp_path / "cem.db")}})
        self.store = await Store.open(config.store.path)
        self.server = S2Server(config, self.store)
        await self.server.start()
        self.ws = await connect(self.server.url, max_size=None)
        await self._next("Handshake")
        await self.ws.send(json.dumps({"message_type": "Handshake", "message_id": "hs-1",
                                       "role": "RM",
                                       "supported_protocol_versions": ["0.0.2-beta"]}))
        await self._next("HandshakeResponse")

    async def _next(self, message_type: str) -> dict[str, Any]:
        """Skip to the next message of a type, answering CEM messages with OK."""
        assert self.ws is not None
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
            if message.get("message_type") != "ReceptionStatus" and "message_id" in message:
                await self.ws.send(json.dumps({"message_type": "ReceptionStatus", "status": "OK",
                                               "subject_message_id": message["message_id"]}))
            if message.get("message_type") == message_type:
                return message

    async def _exchange(self, data: str | bytes) -> dict[str, Any]:
        assert self.ws is not None
        await self.ws.send(data)
        return await self._next("ReceptionStatus")

    def exchange(self, data: str | bytes) -> dict[str, Any]:
        return self.run(self._exchange(data))

    def close(self) -> None:
        async def shut() -> None:
            if self.ws is not None:
                await self.ws.close()
            if self.server is not None:
                await self.server.stop()
            if self.store is not None:
                await self.store.close()

        self.run(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[Wire]:
    opened = Wire(tmp_path)
    try:
        yield opened
    finally:
        opened.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
s2ish = st.fixed_dictionaries(
    {"message_type": st.sampled_from(["PowerMeasurement", "FRBC.StorageStatus", "Handshake",
                                      "ResourceManagerDetails", "RevokeObject", "Bogus"]),
     "message_id": st.text(max_size=70)},
    optional={"values": json_values, "present_fill_level": json_values, "role": json_values},
).map(json.dumps)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(max_size=300) | st.text(max_size=300) | s2ish)
def test_anything_on_the_wire_gets_a_reception_status(wire: Wire, data: str | bytes) -> None:
    answer = wire.exchange(data)
    assert answer["status"] in STATUSES
    assert wire.server is not None and len(wire.server.sessions()) == 1
