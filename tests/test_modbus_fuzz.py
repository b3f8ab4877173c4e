"""Whatever a Modbus device holds in its registers, nothing implausible reaches the CEM.

Random register words go into a real pymodbus server (the simulator, on loopback) and are
read through the RM's `ModbusLink`: each read either fails as a device fault
(`ReadingOutOfRange`, which makes the RM withdraw the device) or yields values that are finite
and inside the map's declared valid range. Bounded here (`MODBUS_FUZZ_EXAMPLES`, default 60);
a longer run: ``MODBUS_FUZZ_EXAMPLES=5000 .venv/bin/pytest -q tests/test_modbus_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resource_managers.modbus.link import ModbusLink, ReadingOutOfRange
from resource_managers.modbus.register_map import RegisterMap, load_register_map
from resource_managers.modbus.simulator import ModbusSimulator, simulator_for
from sitekit.plausible import MAX_MAGNITUDE

SPECS = Path(__file__).parent.parent / "specs" / "modbus"
EXAMPLES = int(os.environ.get("MODBUS_FUZZ_EXAMPLES", "60"))
MAPS = ("grid_meter.toml", "battery_vendor_b.toml", "battery_generic.toml",
        "sunspec_storage.toml")


class Devices:
    """One simulator + link per map, on an event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sims: dict[str, ModbusSimulator] = {}
        self.links: dict[str, ModbusLink] = {}
        self.maps: dict[str, RegisterMap] = {}
        self.run(self._open())

    def run(self, coroutine: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _open(self) -> None:
        for name in MAPS:
            regmap = load_register_map(SPECS / name)
            sim = simulator_for(regmap, tick_s=3600.0)  # no physics between our writes
            await sim.start()
            link = ModbusLink(regmap, "127.0.0.1", sim.port, device_id=1, timeout_s=1.0)
            await link.connect()
            self.sims[name], self.links[name], self.maps[name] = sim, link, regmap

    def close(self) -> None:
        async def shut() -> None:
            for link in self.links.values():
                await link.close()
            for sim in self.sims.values():
                await sim.stop()

        self.run(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def devices() -> Iterator[Devices]:
    opened = Devices()
    try:
        yield opened
    finally:
        opened.close()


# NaN, infinities and their neighbours as float32 words, beside any word at all
SPECIAL_WORDS = [0x7FC0, 0x7F80, 0xFF80, 0xFFFF, 0x8000, 0x7FFF, 0x0000, 0x0001]
words = st.integers(0, 0xFFFF) | st.sampled_from(SPECIAL_WORDS)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_register_contents_are_a_fault_or_a_plausible_reading(devices: Devices,
                                                                  data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(MAPS))
    regmap, sim, link = devices.maps[name], devices.sims[name], devices.links[name]
    readable = [p for p in regmap.points.values() if p.type != "bool"
                and not p.name.endswith("_sf") and p.scale_register is None]
    point = data.draw(st.sampled_from(readable))
    raw = data.draw(st.lists(words, min_size=point.count, max_size=point.count))
    devices.run(sim.set_raw(point.name, raw))
    try:
        value = devices.run(link.read(point.name))
    except ReadingOutOfRange as fault:
        assert point.name in str(fault)
        return
    assert math.isfinite(value), (point.name, raw, value)
    assert abs(value) <= MAX_MAGNITUDE
    if point.valid_min is not None:
        assert value >= point.valid_min
    if point.valid_max is not None:
        assert value <= point.valid_max
