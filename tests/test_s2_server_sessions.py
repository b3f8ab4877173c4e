"""The S2 server over real websockets: handshakes, statuses, instructions, auth, restarts."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from s2python.common import (
    Commodity,
    CommodityQuantity,
    ControlType,
    Duration,
    PowerMeasurement,
    PowerValue,
    RevokableObjects,
    RevokeObject,
    Role,
    RoleType,
)
from s2python.frbc import FRBCInstruction
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from cem.s2.server import S2Server
from cem.s2.session import S2Session
from cem.site.config import SiteConfig
from cem.store import Store
from resource_managers.base import (
    AssetDetails,
    DDBCControlType,
    FRBCControlType,
    NoControlControlType,
    OMBCControlType,
    PEBCControlType,
    PPBCControlType,
    S2ControlType,
    S2ResourceManager,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "s2"
TOKEN = "a-long-enough-token-for-tests"
FRBC = "FILL_RATE_BASED_CONTROL"


def site(tmp_path: Path, **server: Any) -> SiteConfig:
    return SiteConfig.model_validate({
        "site": {"name": "Test site"},
        "server": {"host": "127.0.0.1", "port": 0, **server},
        "store": {"path": str(tmp_path / "cem.db")},
    })


@asynccontextmanager
async def running_cem(config: SiteConfig, store: Store | None = None,
                      **kwargs: Any) -> AsyncIterator[tuple[S2Server, Store]]:
    own_store = store is None
    if store is None:
        store = await Store.open(config.store.path, flush_interval_s=0.05)
    server = S2Server(config, store, **kwargs)
    await server.start()
    try:
        yield server, store
    finally:
        await server.stop()
        if own_store:
            await store.close()


def asset(name: str, resource_id: uuid.UUID | None = None) -> AssetDetails:
    return AssetDetails(
        resource_id=resource_id or uuid.uuid4(), provides_forecast=False,
        provides_power_measurements=[CommodityQuantity.ELECTRIC_POWER_L1],
        instruction_processing_delay=Duration.from_milliseconds(100),
        roles=[Role(role=RoleType.ENERGY_CONSUMER, commodity=Commodity.ELECTRICITY)], name=name)


def implementation(base: type[S2ControlType]) -> Any:
    """A control type that records what happens to it."""

    class Recording(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.activations = 0
            self.deactivations = 0
            self.instructions: list[Any] = []

        async def handle_instruction(self, connection: Any, message: Any, send_okay: Any) -> None:
            self.instructions.append(message)
            await send_okay()

        async def activate(self, connection: Any) -> None:
            self.activations += 1

        async def deactivate(self, connection: Any) -> None:
            self.deactivations += 1

    return Recording()


@asynccontextmanager
async def running_rm(url: str, control_types: list[Any], name: str = "rm",
                     wait: bool = True, **kwargs: Any) -> AsyncIterator[S2ResourceManager]:
    rm = S2ResourceManager(cem_url=url, asset_details=asset(name), control_types=control_types,
                           backoff_s=(0.05, 0.3), **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(rm.run(stop))
    try:
        if wait:
            await asyncio.wait_for(rm.connected.wait(), 10)
        yield rm
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class RawRm:
    """An RM speaking raw S2 JSON, to provoke every answer the CEM can give."""

    def __init__(self) -> None:
        self.ws: ClientConnection | None = None
        self.statuses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.answer: Callable[[dict[str, Any]], str | None] = lambda message: "OK"
        self.selected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def open(self, url: str, control_types: tuple[str, ...] = (FRBC,)) -> RawRm:
        self.ws = await connect(url)
        self._reader = asyncio.create_task(self._read())
        await self.ws.send(json.dumps({"message_type": "Handshake", "message_id": "hs-1",
                                       "role": "RM",
                                       "supported_protocol_versions": ["0.0.2-beta"]}))
        assert (await self.next_status())["status"] == "OK"
        details = {"message_type": "ResourceManagerDetails", "message_id": "rmd-1",
                   "resource_id": "raw-rm-1", "name": "raw", "roles": [
                       {"role": "ENERGY_CONSUMER", "commodity": "ELECTRICITY"}],
                   "instruction_processing_delay": 100,
                   "available_control_types": list(control_types), "provides_forecast": False,
                   "provides_power_measurement_types": ["ELECTRIC.POWER.L1"]}
        await self.ws.send(json.dumps(details))
        assert (await self.next_status())["status"] == "OK"
        await asyncio.wait_for(self.selected.wait(), 5)
        return self

    async def _read(self) -> None:
        assert self.ws is not None
        async for text in self.ws:
            message = json.loads(text)
            if message["message_type"] == "ReceptionStatus":
                await self.statuses.put(message)
                continue
            await self.received.put(message)
            status = self.answer(message)
            if status is not None:
                await self.ws.send(json.dumps({"message_type": "ReceptionStatus",
                                               "subject_message_id": message["message_id"],
                                               "status": status}))
            if message["message_type"] == "SelectControlType":
                self.selected.set()

    async def next_status(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.statuses.get(), 5)

    async def request(self, data: str | bytes | dict[str, Any]) -> dict[str, Any]:
        assert self.ws is not None
        await self.ws.send(json.dumps(data) if isinstance(data, dict) else data)
        return await self.next_status()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / "hp_frbc_completed" / name).read_text())


def frbc_instruction(server: S2Server, rm_id: str, mode_index: int = 0) -> FRBCInstruction:
    description = server.get(rm_id).state.of("FRBC").system_description(datetime.now(UTC))
    actuator = description.actuators[0]
    return FRBCInstruction(message_id=uuid.uuid4(), id=uuid.uuid4(), actuator_id=actuator.id,
                           operation_mode=actuator.operation_modes[mode_index].id,
                           operation_mode_factor=0.5,
                           execution_time=datetime.now(UTC) + timedelta(minutes=5),
                           abnormal_condition=False)


# --- tests ----------------------------------------------------------------------------------------


async def test_an_rm_per_control_type_completes_the_handshake(tmp_path: Path) -> None:
    kinds = {
        "FILL_RATE_BASED_CONTROL": FRBCControlType,
        "POWER_PROFILE_BASED_CONTROL": PPBCControlType,
        "OPERATION_MODE_BASED_CONTROL": OMBCControlType,
        "DEMAND_DRIVEN_BASED_CONTROL": DDBCControlType,
        "POWER_ENVELOPE_BASED_CONTROL": PEBCControlType,
        "NOT_CONTROLABLE": NoControlControlType,
    }
    async with running_cem(site(tmp_path)) as (server, store):
        impls = {name: implementation(base) for name, base in kinds.items()}
        async with contextlib_all([running_rm(server.url, [impl], name=name)
                                   for name, impl in impls.items()]) as rms:
            for rm, (name, impl) in zip(rms, impls.items(), strict=True):
                assert rm.control_type == ControlType(name)
                assert impl.activations == 1
                entry = server.get(str(rm.asset_details.resource_id))
                assert entry is not None and entry.control_type == name and entry.name == name
            assert len(server.rms()) == 6
            await store.flush()
            stored = {r.name: (r.control_type, r.connected) for r in await store.list_rms()}
            assert stored == {name: (name, True) for name in kinds}


@asynccontextmanager
async def contextlib_all(managers: list[Any]) -> AsyncIterator[list[Any]]:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        yield list(await asyncio.gather(*(stack.enter_async_context(m) for m in managers)))


async def test_every_reception_status_the_cem_gives(tmp_path: Path) -> None:
    async with running_cem(site(tmp_path)) as (server, store):
        raw = await RawRm().open(server.url)
        try:
            assert (await raw.request(b"\xff\xfe\x00"))["status"] == "INVALID_DATA"
            assert (await raw.request("not json {"))["status"] == "INVALID_DATA"
            assert (await raw.request({"message_type": "PowerMeasurement"}))["status"] == \
                "INVALID_DATA"
            answer = await raw.request({"message_type": "NoSuchThing", "message_id": "m-1"})
            assert (answer["status"], answer["subject_message_id"]) == ("INVALID_MESSAGE", "m-1")
            answer = await raw.request({"message_type": "SelectControlType", "message_id": "m-2",
                                        "control_type": FRBC})
            assert answer["status"] == "INVALID_CONTENT"
            description = fixture("frbc_system_description.json")
            assert (await raw.request(description))["status"] == "OK"
            future = datetime.now(UTC) + timedelta(days=1)
            answers = []
            for n in range(101):
                later = dict(description, message_id=f"sd-future-{n}",
                             valid_from=(future + timedelta(minutes=n)).isoformat())
                answers.append((await raw.request(later))["status"])
            assert answers[:100] == ["OK"] * 100
            assert answers[100] == "TEMPORARY_ERROR"
            # a bad message never ended the session
            assert server.get("raw-rm-1") is not None
            await store.flush()
            logged = await store.query(
                "SELECT message_type, reception_status FROM s2_messages "
                "WHERE direction = 'in' AND message_id = 'm-1'")
            assert logged == [("NoSuchThing", "INVALID_MESSAGE")]
        finally:
            await raw.close()


async def test_instruction_results_carry_every_status_the_rm_gives(tmp_path: Path) -> None:
    config = site(tmp_path, reception_status_timeout_s=0.4)
    async with running_cem(config) as (server, store):
        raw = await RawRm().open(server.url)
        try:
            assert (await raw.request(fixture("frbc_system_description.json")))["status"] == "OK"
            for status in ("OK", "INVALID_DATA", "INVALID_MESSAGE", "INVALID_CONTENT",
                           "TEMPORARY_ERROR", "PERMANENT_ERROR"):
                raw.answer = lambda message, status=status: status
                result = await server.send_instruction("raw-rm-1", frbc_instruction(server,
                                                                                    "raw-rm-1"))
                assert result.status == status, result
                assert result.round_trip_s is not None and result.round_trip_s < 1
            raw.answer = lambda message: None
            silent = await server.send_instruction("raw-rm-1", frbc_instruction(server, "raw-rm-1"))
            assert silent.status == "TIMEOUT"
            missing = await server.send_instruction("nobody", frbc_instruction(server, "raw-rm-1"))
            assert missing.status == "NOT_CONNECTED"
            bad = frbc_instruction(server, "raw-rm-1").model_copy(
                update={"operation_mode": uuid.uuid4()})
            refused = await server.send_instruction("raw-rm-1", bad)
            assert refused.status == "NOT_SENT" and "unknown operation mode" in \
                (refused.diagnostic_label or "")
            await store.flush()
            rows = await store.query("SELECT reception_status FROM instructions ORDER BY 1")
            assert sorted(r[0] or "none" for r in rows) == sorted(
                ["OK", "INVALID_DATA", "INVALID_MESSAGE", "INVALID_CONTENT", "TEMPORARY_ERROR",
                 "PERMANENT_ERROR", "none"])
        finally:
            await raw.close()


async def test_revoke_both_ways(tmp_path: Path) -> None:
    async with running_cem(site(tmp_path)) as (server, _store):
        raw = await RawRm().open(server.url)
        try:
            assert (await raw.request(fixture("frbc_system_description.json")))["status"] == "OK"
            instruction = frbc_instruction(server, "raw-rm-1")
            assert (await server.send_instruction("raw-rm-1", instruction)).ok
            revoke = RevokeObject(message_id=uuid.uuid4(),
                                  object_type=RevokableObjects.FRBC_Instruction,
                                  object_id=instruction.id)
            assert (await server.send_instruction("raw-rm-1", revoke)).ok
            seen = [await raw.received.get() for _ in range(raw.received.qsize())]
            assert [m["message_type"] for m in seen][-2:] == ["FRBC.Instruction", "RevokeObject"]
            assert seen[-1]["object_id"] == str(instruction.id)
            # the RM revokes its system description; revoking it again is refused
            revoke_sd = {"message_type": "RevokeObject", "message_id": "rv-1",
                         "object_type": "FRBC.SystemDescription", "object_id": "hp-sd-1"}
            assert (await raw.request(revoke_sd))["status"] == "OK"
            assert server.get("raw-rm-1").state.of("FRBC").system_description(datetime.now(UTC)) is None
            again = await raw.request(dict(revoke_sd, message_id="rv-2"))
            assert again["status"] == "INVALID_CONTENT"
        finally:
            await raw.close()

    # an s2-python RM hears about a revoke through on_revoke
    async with running_cem(site(tmp_path)) as (server, _store):
        revoked: list[RevokeObject] = []
        async with running_rm(server.url, [implementation(FRBCControlType)],
                              on_revoke=revoked.append) as rm:
            rm_id = str(rm.asset_details.resource_id)
            object_id = uuid.uuid4()
            result = await server.send_instruction(rm_id, RevokeObject(
                message_id=uuid.uuid4(), object_type=RevokableObjects.FRBC_Instruction,
                object_id=object_id))
            assert result.ok
            assert [r.object_id for r in revoked] == [object_id]


async def test_no_selection_and_back(tmp_path: Path) -> None:
    async with running_cem(site(tmp_path)) as (server, _store):
        frbc = implementation(FRBCControlType)
        async with running_rm(server.url, [frbc]) as rm:
            rm_id = str(rm.asset_details.resource_id)
            assert await server.select_control_type(rm_id, "NO_SELECTION")
            await until(lambda: rm.control_type == ControlType.NO_SELECTION)
            assert frbc.deactivations == 1
            assert server.get(rm_id).control_type == "NO_SELECTION"
            assert await server.select_control_type(rm_id, "FRBC")
            await until(lambda: rm.control_type == ControlType.FILL_RATE_BASED_CONTROL)
            assert frbc.activations == 2
            with pytest.raises(ValueError, match="does not offer"):
                await server.select_control_type(rm_id, "PPBC")


async def test_reconnect_gives_a_fresh_session(tmp_path: Path) -> None:
    async with running_cem(site(tmp_path)) as (server, store):
        frbc = implementation(FRBCControlType)
        async with running_rm(server.url, [frbc]) as rm:
            rm_id = str(rm.asset_details.resource_id)
            first = server.get(rm_id)
            events = server.subscribe()
            assert await server.disconnect(rm_id, "maintenance")
            await until(lambda: rm.sessions_started == 2 and rm.connected.is_set())
            second = server.get(rm_id)
            assert second is not None and second is not first
            assert second.session is not first.session
            assert second.connection_id != first.connection_id
            assert frbc.activations == 2 and frbc.deactivations == 1
            kinds = []
            while not events.empty():
                event = events.get_nowait()
                kinds.append(type(event).__name__ if type(event).__name__ != "RmEvent"
                             else type(event.event).__name__)
            assert "Disconnected" in kinds and "ControlTypeSelected" in kinds
            await store.flush()
            sessions = await store.query(
                "SELECT reason FROM sessions WHERE rm_id = ? ORDER BY connected_at", (rm_id,))
            assert sessions[0] == ("maintenance",) and len(sessions) == 2


async def test_tokens_refused_with_401_and_accepted(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    config = site(tmp_path, tokens=[{"name": "ev-charger", "token": TOKEN}])
    caplog.set_level(logging.WARNING, logger="cem.s2.server")
    async with running_cem(config) as (server, _store):
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.url)
        assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            await connect(server.url, additional_headers={"Authorization": "Bearer wrong-token"})
        assert "refused RM connection" in caplog.text and "unknown bearer token" in caplog.text
        async with running_rm(server.url, [implementation(FRBCControlType)], token=TOKEN) as rm:
            entry = server.get(str(rm.asset_details.resource_id))
            assert entry is not None and entry.holder == "ev-charger"
        async with running_rm(server.url, [implementation(FRBCControlType)], token="nope" * 5,
                              wait=False) as rm:
            await until(lambda: rm.last_error is not None)
            assert "refused our token (HTTP 401)" in rm.last_error
            assert not rm.connected.is_set()


async def test_restart_keeps_the_store_and_the_rm_comes_back(tmp_path: Path) -> None:
    config = site(tmp_path)
    store = await Store.open(config.store.path, flush_interval_s=0.05)
    server = S2Server(config, store)
    await server.start()
    config.server.port = server.port  # the RM keeps its URL over the restart
    frbc = implementation(FRBCControlType)
    async with running_rm(server.url, [frbc], name="battery") as rm:
        rm_id = str(rm.asset_details.resource_id)
        status = await rm.send(PowerMeasurement(
            message_id=uuid.uuid4(), measurement_timestamp=datetime.now(UTC),
            values=[PowerValue(commodity_quantity=CommodityQuantity.ELECTRIC_POWER_L1,
                               value=1500.0)]))
        assert status is not None and status.status.value == "OK"
        await server.stop()
        await store.close()
        await until(lambda: not rm.connected.is_set())

        store = await Store.open(config.store.path, flush_interval_s=0.05, for_cem=True)
        [row] = await store.list_rms()
        assert (row.rm_id, row.name, row.connected, row.control_type) == (
            rm_id, "battery", False, FRBC)
        assert row.messages_in >= 3 and row.messages_out >= 3
        measured = await store.query("SELECT rm_id, commodity_quantity, value FROM measurements")
        assert measured == [(rm_id, "ELECTRIC.POWER.L1", 1500.0)]
        closed = await store.query("SELECT reason FROM sessions")
        assert closed == [("CEM shutting down",)]
        assert any(m["message_type"] == "PowerMeasurement" for m in await store.messages())

        server = S2Server(config, store)
        await server.start()
        try:
            await until(lambda: rm.connected.is_set() and server.get(rm_id) is not None, 10)
            assert rm.sessions_started == 2
        finally:
            await server.stop()
            await store.close()


async def test_a_failing_session_does_not_end_its_connection_or_others(tmp_path: Path) -> None:
    class Fragile(S2Session):
        def receive(self, data: str | bytes, now: datetime) -> list[Any]:
            if data == "boom":
                raise RuntimeError("bug in the session")
            return super().receive(data, now)

    config = site(tmp_path)
    async with running_cem(config, session_factory=lambda: Fragile(
            control_type_preference=["FRBC"])) as (server, _store):
        raw = await RawRm().open(server.url)
        async with running_rm(server.url, [implementation(FRBCControlType)]) as rm:
            try:
                assert raw.ws is not None
                await raw.ws.send("boom")
                answer = await raw.request({"message_type": "NoSuchThing", "message_id": "m-9"})
                assert answer["status"] == "INVALID_MESSAGE"
                assert rm.connected.is_set() and len(server.rms()) == 2
            finally:
                await raw.close()


async def test_wss_with_a_token(tmp_path: Path, self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    config = site(tmp_path, tls_cert=str(cert), tls_key=str(key),
                  tokens=[{"name": "battery", "token": TOKEN}])
    async with running_cem(config) as (server, _store):
        assert server.url.startswith("wss://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(cert))
        async with running_rm(server.url, [implementation(FRBCControlType)], token=TOKEN,
                              ssl_context=trust) as rm:
            assert rm.control_type == ControlType.FILL_RATE_BASED_CONTROL
            assert server.get(str(rm.asset_details.resource_id)).holder == "battery"


async def test_shutdown_tells_the_rm_why_and_closes_with_1001(tmp_path: Path) -> None:
    async with running_cem(site(tmp_path)) as (server, _store):
        raw = await RawRm().open(server.url)
        await server.stop()
        messages = [raw.received.get_nowait() for _ in range(raw.received.qsize())]
        assert messages[-1]["message_type"] == "SessionRequest"
        assert messages[-1]["request"] == "TERMINATE"
        assert messages[-1]["diagnostic_label"] == "CEM shutting down"
        assert raw.ws is not None
        await raw.close()
        assert (raw.ws.close_code, raw.ws.close_reason) == (1001, "CEM shutting down")


async def test_an_oversized_frame_closes_only_that_connection(tmp_path: Path) -> None:
    async with running_cem(site(tmp_path, max_message_bytes=1024)) as (server, _store):
        raw = await RawRm().open(server.url)
        async with running_rm(server.url, [implementation(FRBCControlType)]) as rm:
            assert raw.ws is not None
            await raw.ws.send("x" * 5000)
            await raw.close()
            assert raw.ws.close_code == 1009  # message too big
            await until(lambda: server.get("raw-rm-1") is None)
            assert rm.connected.is_set() and len(server.rms()) == 1
