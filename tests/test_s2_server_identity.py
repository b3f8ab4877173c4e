"""The S2 server over real websockets: identities bound to credentials, connection limits, and
numbers that are none kept out of the store.

- a resource id belongs to the credential (bearer token) it first registered under: another
  token naming it is refused with PERMANENT_ERROR and a clear reason, its connection ends
  (1008), a security event is logged, and the real RM keeps its session; a reconnect with the
  same token still supersedes its own old connection; the binding survives a restart;
- at most `server.max_connections` connections (HTTP 503 beyond); an address with
  `server.max_failed_auth_per_minute` failed authentications is refused (HTTP 429) until they
  age out; refusals are counted and summarised in one line a minute;
- a measurement of "NaN" is refused and stored nowhere, while another RM's rows are written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cem.s2.server import S2Server
from cem.site.config import SiteConfig
from cem.store import Store

TOKEN_A = "token-of-the-real-charger-0001"
TOKEN_B = "token-of-another-device-00002"
FRBC = "FILL_RATE_BASED_CONTROL"


def site(tmp_path: Path, tokens: list[tuple[str, str]] | None = None,
         **server: Any) -> SiteConfig:
    return SiteConfig.model_validate({
        "server": {"host": "127.0.0.1", "port": 0, **server,
                   "tokens": [{"name": n, "token": t} for n, t in (tokens or [])]},
        "store": {"path": str(tmp_path / "cem.db")}})


@asynccontextmanager
async def running(config: SiteConfig, store: Store | None = None
                  ) -> AsyncIterator[tuple[S2Server, Store]]:
    own = store is None
    store = store or await Store.open(config.store.path, flush_interval_s=0.05)
    server = S2Server(config, store)
    await server.start()
    try:
        yield server, store
    finally:
        await server.stop()
        if own:
            await store.close()


class Rm:
    """A raw S2 RM: handshake, details with a chosen resource id, every CEM message OK."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.statuses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())
        self.closed = asyncio.Event()

    @classmethod
    async def open(cls, url: str, token: str | None, resource_id: str) -> tuple[Rm, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        rm = cls(await connect(url, additional_headers=headers))
        assert (await rm.request({"message_type": "Handshake", "message_id": "hs-1",
                                  "role": "RM",
                                  "supported_protocol_versions": ["0.0.2-beta"]}))["status"] == "OK"
        answer = await rm.request({
            "message_type": "ResourceManagerDetails", "message_id": "rmd-1",
            "resource_id": resource_id, "name": f"rm {token}",
            "roles": [{"role": "ENERGY_CONSUMER", "commodity": "ELECTRICITY"}],
            "instruction_processing_delay": 100, "available_control_types": [FRBC],
            "provides_forecast": False,
            "provides_power_measurement_types": ["ELECTRIC.POWER.L1"]})
        return rm, answer

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                message = json.loads(text)
                if message["message_type"] == "ReceptionStatus":
                    await self.statuses.put(message)
                elif "message_id" in message:
                    await self.ws.send(json.dumps({
                        "message_type": "ReceptionStatus", "status": "OK",
                        "subject_message_id": message["message_id"]}))
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def request(self, message: dict[str, Any] | str) -> dict[str, Any]:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))
        return await asyncio.wait_for(self.statuses.get(), 5)

    async def measure(self, value: Any, message_id: str = "pm-1") -> dict[str, Any]:
        text = json.dumps({"message_type": "PowerMeasurement", "message_id": message_id,
                           "measurement_timestamp": datetime.now(UTC).isoformat(),
                           "values": [{"commodity_quantity": "ELECTRIC.POWER.L1",
                                       "value": 1.0}]})
        return await self.request(text.replace('"value": 1.0', f'"value": {value}'))

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self.reader, return_exceptions=True)


async def test_another_token_cannot_take_over_a_resource_id(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    caplog.set_level(logging.WARNING, logger="cem.security")
    config = site(tmp_path, [("charger", TOKEN_A), ("intruder", TOKEN_B)])
    async with running(config) as (server, store):
        real, answer = await Rm.open(server.url, TOKEN_A, "evse-7")
        assert answer["status"] == "OK"
        intruder, answer = await Rm.open(server.url, TOKEN_B, "evse-7")
        assert answer["status"] == "PERMANENT_ERROR"
        assert answer["diagnostic_label"].startswith(
            "resource id evse-7 is registered under another credential")
        await asyncio.wait_for(intruder.closed.wait(), 5)
        assert intruder.ws.close_code == 1008
        # the real RM keeps its session and is still the one the CEM talks to
        entry = server.get("evse-7")
        assert entry is not None and entry.holder == "charger" and entry.open
        assert (await real.measure(1500))["status"] == "OK"
        assert len(server.rms()) == 1
        event = next(r for r in caplog.records if r.name == "cem.security")
        assert "SECURITY: token 'intruder'" in event.getMessage()
        assert "belongs to token 'charger'" in event.getMessage()
        await store.flush()
        assert await store.rm_owners() == {"evse-7": "charger"}
        # the intruder may still register a resource id of its own
        other, answer = await Rm.open(server.url, TOKEN_B, "heat-pump-1")
        assert answer["status"] == "OK"
        for rm in (real, other):
            await rm.close()


async def test_the_same_token_reconnecting_supersedes_its_old_connection(tmp_path: Path) -> None:
    config = site(tmp_path, [("charger", TOKEN_A)])
    async with running(config) as (server, _store):
        first, answer = await Rm.open(server.url, TOKEN_A, "evse-7")
        assert answer["status"] == "OK"
        second, answer = await Rm.open(server.url, TOKEN_A, "evse-7")
        assert answer["status"] == "OK"
        await asyncio.wait_for(first.closed.wait(), 5)  # superseded
        entry = server.get("evse-7")
        assert entry is not None and entry.open and len(server.rms()) == 1
        assert (await second.measure(900))["status"] == "OK"
        await second.close()


async def test_ownership_survives_a_restart_and_lapses_with_its_token(tmp_path: Path) -> None:
    config = site(tmp_path, [("charger", TOKEN_A), ("intruder", TOKEN_B)])
    async with running(config) as (server, _store):
        rm, answer = await Rm.open(server.url, TOKEN_A, "evse-7")
        assert answer["status"] == "OK"
        await rm.close()
    async with running(config) as (server, _store):  # a restarted CEM, same database
        intruder, answer = await Rm.open(server.url, TOKEN_B, "evse-7")
        assert answer["status"] == "PERMANENT_ERROR"
        await intruder.close()
    # the operator removed the charger's token: its resource ids are free for the new one
    config = site(tmp_path, [("new-charger", TOKEN_B)])
    async with running(config) as (server, store):
        rm, answer = await Rm.open(server.url, TOKEN_B, "evse-7")
        assert answer["status"] == "OK"
        await store.flush()
        assert await store.rm_owners() == {"evse-7": "new-charger"}
        await rm.close()


async def test_connections_beyond_the_cap_get_503(tmp_path: Path) -> None:
    async with running(site(tmp_path, max_connections=3)) as (server, _store):
        open_ = [await connect(server.url) for _ in range(3)]
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.url)
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"] == "30"
        assert b"connections are open" in refused.value.response.body
        await open_[0].close()
        for _ in range(50):
            if len(server.sessions()) < 3:
                break
            await asyncio.sleep(0.02)
        again = await connect(server.url)  # room again
        for ws in [*open_[1:], again]:
            await ws.close()
        assert server.admission.refused_total == 1


async def test_failed_authentications_are_limited_and_summarised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cem.s2.server")
    config = site(tmp_path, [("charger", TOKEN_A)], max_failed_auth_per_minute=5)
    async with running(config) as (server, _store):
        now = [time.monotonic()]
        server.admission.clock = lambda: now[0]
        codes = []
        for _ in range(30):
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.url, additional_headers={"Authorization": "Bearer guess"})
            codes.append(refused.value.response.status_code)
        assert codes == [401] * 5 + [429] * 25
        # the right token from that address waits too, until the failures age out
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.url, additional_headers={"Authorization": f"Bearer {TOKEN_A}"})
        assert refused.value.response.status_code == 429
        lines = [r.getMessage() for r in caplog.records if r.name == "cem.s2.server"
                 and "refused" in r.getMessage()]
        assert len(lines) == 2, lines  # the first of each reason, not 31 lines
        assert "unknown bearer token" in lines[0]
        assert "5 failed authentications from 127.0.0.1" in lines[1]
        summary = server.admission.flush(now[0] + 61)
        assert summary is not None
        assert "31 connection attempt(s) refused in the last 1 min" in summary
        assert "26 too many failed authentications, 5 unknown bearer token" in summary
        assert "from 127.0.0.1 x31" in summary
        now[0] += 61
        ws = await connect(server.url, additional_headers={"Authorization": f"Bearer {TOKEN_A}"})
        await ws.close()


async def test_a_nan_measurement_is_refused_and_the_other_rms_rows_are_kept(
        tmp_path: Path) -> None:
    async with running(site(tmp_path)) as (server, store):
        broken, _ = await Rm.open(server.url, None, "broken-meter")
        good, _ = await Rm.open(server.url, None, "good-meter")
        for value in ('"NaN"', "1e400", '"-Infinity"'):
            answer = await broken.measure(value, message_id=f"pm-{len(value)}")
            assert answer["status"] == "INVALID_CONTENT"
            assert "values[0].value" in answer["diagnostic_label"]
        assert (await good.measure(2300, message_id="pm-good"))["status"] == "OK"
        await store.flush()
        rows = await store.query("SELECT rm_id, value FROM measurements")
        assert rows == [("good-meter", 2300.0)]
        assert all(math.isfinite(v) for _, v in rows)
        assert await store.quarantined_rows() == []
        logged = await store.query(
            "SELECT reception_status FROM s2_messages WHERE rm_id = 'broken-meter' AND "
            "message_type = 'PowerMeasurement'")
        assert sorted(logged) == [("INVALID_CONTENT",)] * 3
        for rm in (broken, good):
            await rm.close()


class PairingTokens:
    """Websocket tokens as S2 Connect hands them out: each belongs to one paired node."""

    describe = "S2 Connect pairings (test)"

    def authorize(self, request: Any, peer: str) -> Any:
        from cem.s2.server import AuthDecision

        node = {f"Bearer {TOKEN_A}": "node-a", f"Bearer {TOKEN_B}": "node-b"}.get(
            request.headers.get("Authorization", ""))
        if node is None:
            return AuthDecision(False, reason="unknown websocket token")
        return AuthDecision(True, holder=f"s2connect:{node}")


async def test_a_pairing_owns_its_resource_ids_too(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cem.security")
    config = site(tmp_path)
    store = await Store.open(config.store.path, flush_interval_s=0.05)
    server = S2Server(config, store, authorizer=PairingTokens())
    await server.start()
    try:
        paired, answer = await Rm.open(server.url, TOKEN_A, "battery-1")
        assert answer["status"] == "OK"
        other, answer = await Rm.open(server.url, TOKEN_B, "battery-1")
        assert answer["status"] == "PERMANENT_ERROR"
        assert "S2 Connect pairing node-b" in caplog.text
        assert "belongs to S2 Connect pairing node-a" in caplog.text
        await paired.close()
        await other.close()
    finally:
        await server.stop()
        await store.close()
