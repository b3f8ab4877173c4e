"""Whatever frames a charger sends, the central system stays up and its records stay sane.

Frames (arbitrary text and bytes, mutated valid OCPP 1.6 calls with absurd numbers and
connector ids, deep and large frames) go to a real central system over a real websocket; after
each, the connection still answers a Heartbeat, no EVSE beyond the configured ones exists, no
EVSE has two open sessions, and every number in the session records is finite and plausible.
Bounded here (`OCPP_FUZZ_EXAMPLES`, default 60); a longer run:
``OCPP_FUZZ_EXAMPLES=5000 .venv/bin/pytest -q tests/test_ocpp_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection

from cem.app.site_file import parse_site_file
from resource_managers.ocpp_charger.csms import OcppCentralSystem
from resource_managers.ocpp_charger.plausibility import MAX_REGISTER_WH
from resource_managers.ocpp_charger.records import read_sessions

EXAMPLES = int(os.environ.get("OCPP_FUZZ_EXAMPLES", "60"))
SITE = """
[ocpp]
port = 0
[[ocpp.charge_points]]
id = "FUZZ"
evses = 2
max_current_a = 32
"""
NOW = datetime.now(UTC).isoformat().replace("+00:00", "Z")
VALID_CALLS: list[list[Any]] = [
    [2, "b", "BootNotification", {"chargePointVendor": "v", "chargePointModel": "m"}],
    [2, "s", "StatusNotification", {"connectorId": 1, "errorCode": "NoError",
                                    "status": "Charging"}],
    [2, "t", "StartTransaction", {"connectorId": 1, "idTag": "ANY", "meterStart": 1000,
                                  "timestamp": NOW}],
    [2, "m", "MeterValues", {"connectorId": 1, "transactionId": 1, "meterValue": [
        {"timestamp": NOW, "sampledValue": [
            {"value": "1200"}, {"value": "7000", "measurand": "Power.Active.Import"},
            {"value": "40", "measurand": "SoC"}]}]}],
    [2, "p", "StopTransaction", {"transactionId": 1, "meterStop": 1300, "timestamp": NOW}],
    [2, "h", "Heartbeat", {}],
    [2, "a", "Authorize", {"idTag": "ANY"}],
]
numbers = st.sampled_from([0, -1, 2, 3, 999, 2**31, -10**18, 10**30, 1e308]) | st.integers()
texts = st.sampled_from(["1e400", "NaN", "-Infinity", "-1e18", "1e30", "abc", ""]) | \
    st.text(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=6)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


@st.composite
def mutated_calls(draw: st.DrawFn) -> str:
    call = copy.deepcopy(draw(st.sampled_from(VALID_CALLS)))
    call[1] = draw(st.text(min_size=1, max_size=10))
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(call[3], (3,))]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = call
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = draw(json_values)
    text = json.dumps(call)
    if draw(st.booleans()):  # numbers JSON cannot hold, written into the text
        text = text.replace("1000", "1e400").replace("1300", "-1e999")
    return text


frames = (st.text(max_size=300) | st.binary(max_size=300) | mutated_calls()
          | st.integers(1, 60_000).map(lambda n: '[2,"deep","Heartbeat",' + "[" * n + "]" * n + "]")
          | st.integers(200_000, 400_000).map(
              lambda n: json.dumps([2, "big", "DataTransfer", {"vendorId": "x", "data": "y" * n}])))


class Station:
    """A central system and one raw charger connection, on a loop in a background thread."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        site = parse_site_file(SITE)
        site.ocpp.database = tmp_path / "ocpp.db"
        self.csms = OcppCentralSystem(site.ocpp_rm(), port=0)
        self.ws: ClientConnection | None = None
        self.count = 0
        self.run(self._open())

    def run(self, coroutine: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _open(self) -> None:
        await self.csms.start()
        self.ws = await websockets.connect(f"ws://127.0.0.1:{self.csms.port}/FUZZ",
                                           subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                                           max_size=None)

    async def _send_then_heartbeat(self, frame: str | bytes) -> bool:
        assert self.ws is not None
        await self.ws.send(frame)
        self.count += 1
        probe = f"probe-{self.count}"
        await self.ws.send(json.dumps([2, probe, "Heartbeat", {}]))
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
            if message[0] == 2:  # the central system's own calls
                await self.ws.send(json.dumps([3, message[1], {"status": "Accepted"}]))
            elif message[1] == probe:
                return bool(message[0] == 3)

    def exchange(self, frame: str | bytes) -> bool:
        return bool(self.run(self._send_then_heartbeat(frame)))

    def close(self) -> None:
        async def shut() -> None:
            if self.ws is not None:
                await self.ws.close()
            await self.csms.stop()

        self.run(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Station]:
    opened = Station(tmp_path_factory.mktemp("ocpp-fuzz"))
    try:
        yield opened
    finally:
        opened.close()


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(frame=frames)
def test_no_frame_breaks_the_connection_or_the_records(station: Station,
                                                      frame: str | bytes) -> None:
    assert station.exchange(frame), "the connection no longer answers a Heartbeat"
    assert set(station.csms.evses) <= {("FUZZ", 1), ("FUZZ", 2)}
    rows = read_sessions(station.csms.records.path)
    open_per_evse: dict[int, int] = {}
    for row in rows:
        if row.state == "open":
            open_per_evse[row.evse_id] = open_per_evse.get(row.evse_id, 0) + 1
        for value in (row.meter_start_wh, row.meter_last_wh, row.energy_wh, row.cost_eur,
                      row.peak_w, row.power_w):
            assert math.isfinite(value), row
        assert 0 <= row.meter_start_wh <= MAX_REGISTER_WH, row
        assert 0 <= row.energy_wh <= MAX_REGISTER_WH, row
    assert all(count <= 1 for count in open_per_evse.values()), open_per_evse
