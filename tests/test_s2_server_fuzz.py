"""Arbitrary bytes and text over the wire never crash the server; each gets a ReceptionStatus.
Numbers that are none are never answered OK; no other credential takes a resource id over.

Bounded in `make test`; a longer run:
``S2_SERVER_FUZZ_EXAMPLES=1000 .venv/bin/pytest -q tests/test_s2_server_fuzz.py``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

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


@settings(max_examples=int(os.environ.get("S2_SERVER_FUZZ_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(max_size=300) | st.text(max_size=300) | s2ish)
def test_anything_on_the_wire_gets_a_reception_status(wire: Wire, data: str | bytes) -> None:
    answer = wire.exchange(data)
    assert answer["status"] in STATUSES
    assert wire.server is not None and len(wire.server.sessions()) == 1


# --- numbers that are none, over the wire ---------------------------------------------------------

NOT_NUMBERS = ['"NaN"', '"-Infinity"', '"Infinity"', "1e400", "-1e999", "3e15", '"1e400"']


@settings(max_examples=int(os.environ.get("S2_SERVER_FUZZ_EXAMPLES", "20")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=st.sampled_from(NOT_NUMBERS), field=st.sampled_from(["value", "present_fill_level"]))
def test_a_number_that_is_none_is_never_ok_on_the_wire(wire: Wire, value: str,
                                                        field: str) -> None:
    if field == "value":
        text = ('{"message_type":"PowerMeasurement","message_id":"pm-x","measurement_timestamp":'
                '"2026-03-01T12:00:00Z","values":[{"commodity_quantity":"ELECTRIC.POWER.L1",'
                f'"value":{value}}}]}}')
    else:
        text = f'{{"message_type":"FRBC.StorageStatus","message_id":"ss-x","{field}":{value}}}'
    answer = wire.exchange(text)
    assert answer["status"] != "OK", (text, answer)
    assert wire.server is not None and len(wire.server.sessions()) == 1


# --- identity takeover ------------------------------------------------------------------------

TOKENS = {"owner": "fuzz-token-of-the-owner-000001", "other": "fuzz-token-of-someone-else-02"}


class Site:
    """A CEM with two tokens; the owner's RM holds resource id "owned-rm" all along."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tmp_path = tmp_path
        self.server: S2Server | None = None
        self.store: Store | None = None
        self.owner: ClientConnection | None = None
        self.run(self._open())

    def run(self, coroutine: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _open(self) -> None:
        config = SiteConfig.model_validate({
            "server": {"host": "127.0.0.1", "port": 0, "max_failed_auth_per_minute": 10_000,
                       "tokens": [{"name": n, "token": t} for n, t in TOKENS.items()]},
            "store": {"path": str(self.tmp_path / "cem.db")}})
        self.store = await Store.open(config.store.path)
        self.server = S2Server(config, self.store)
        await self.server.start()
        self.owner, status = await self._register("owner", "owned-rm")
        assert status["status"] == "OK"

    async def _register(self, token: str, resource_id: str
                        ) -> tuple[ClientConnection, dict[str, Any]]:
        assert self.server is not None
        ws = await connect(self.server.url, max_size=None,
                           additional_headers={"Authorization": f"Bearer {TOKENS[token]}"})
        for message in ({"message_type": "Handshake", "message_id": "hs-1", "role": "RM",
                         "supported_protocol_versions": ["0.0.2-beta"]},
                        {"message_type": "ResourceManagerDetails", "message_id": "rmd-1",
                         "resource_id": resource_id, "name": "fuzz",
                         "roles": [{"role": "ENERGY_CONSUMER", "commodity": "ELECTRICITY"}],
                         "instruction_processing_delay": 100,
                         "available_control_types": ["NOT_CONTROLABLE"],
                         "provides_forecast": False,
                         "provides_power_measurement_types": ["ELECTRIC.POWER.L1"]}):
            await ws.send(json.dumps(message))
            while True:
                answer = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if answer.get("message_type") == "ReceptionStatus":
                    break
                await ws.send(json.dumps({"message_type": "ReceptionStatus", "status": "OK",
                                          "subject_message_id": answer["message_id"]}))
        return ws, answer

    async def _claim(self, token: str, resource_id: str) -> tuple[str, int | None]:
        ws, answer = await self._register(token, resource_id)
        code = None
        if answer["status"] != "OK":
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            code = ws.close_code
        await ws.close()
        return answer["status"], code

    def claim(self, token: str, resource_id: str) -> tuple[str, int | None]:
        return self.run(self._claim(token, resource_id))

    def close(self) -> None:
        async def shut() -> None:
            if self.owner is not None:
                await self.owner.close()
            if self.server is not None:
                await self.server.stop()
            if self.store is not None:
                await self.store.close()

        self.run(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    opened = Site(tmp_path)
    try:
        yield opened
    finally:
        opened.close()


@settings(max_examples=int(os.environ.get("S2_SERVER_FUZZ_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(claims=st.lists(st.tuples(
    st.just("other"),
    st.sampled_from(["owned-rm"]) | st.from_regex(r"[a-z0-9\-]{2,12}", fullmatch=True)),
    min_size=1, max_size=4))
def test_no_other_credential_ever_takes_a_resource_id_over(site: Site,
                                                           claims: list[tuple[str, str]]) -> None:
    assert site.server is not None
    for token, resource_id in claims:
        status, code = site.claim(token, resource_id)
        owned = resource_id == "owned-rm" or site.server._owners.get(resource_id) == "owner"
        if owned:
            assert (status, code) == ("PERMANENT_ERROR", 1008)
        else:
            assert status == "OK"
        entry = site.server.get("owned-rm")
        assert entry is not None and entry.holder == "owner" and entry.open
