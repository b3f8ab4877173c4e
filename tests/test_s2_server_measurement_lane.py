"""A PowerMeasurement's frame goes from the connection's read straight to the session's text
judgment (`S2Server._measurement_now`); everything that path does not take goes the full way.

Through a real websocket (the bench's raw RFC 6455 client) to a real server, with and without
its SQLite store: each case the measurement lane hands to the full path gets the full path's
status, once, in order, logged once and counted once (docs/adr/0010, round 10).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from test_s2_server_batching import MEASUREMENT, BurstRm, cem_and_rm, frame, site, stored

from cem.ports import RmEvent, StateChanged
from cem.s2.server import S2Server
from cem.s2.session import S2Session

PLAIN = MEASUREMENT


async def test_measurements_the_lane_refuses_get_the_full_paths_status_once(
        tmp_path: Path) -> None:
    canonical = [str(uuid.uuid4()) for _ in range(6)]
    upper = str(uuid.uuid4()).upper()
    cases = [
        (canonical[0], "1500", "OK"),
        ("rm-own-id-7", "1500", "OK"),                 # not a UUID: translated
        (upper, "1500", "OK"),                         # not canonical: translated
        (canonical[1], '"1500"', "OK"),                # a number as a string: its reading
        (canonical[2], "1e13", "INVALID_CONTENT"),     # beyond the plausible range
        (canonical[3], "NaN", "INVALID_DATA"),         # not JSON (answered for no id)
        (canonical[4], "1600", "OK"),
    ]
    texts = [PLAIN % (message_id, value) for message_id, value, _ in cases]
    texts.append(PLAIN.replace("ELECTRIC.POWER.L1", "ELECTRIC.POWER.L2") % (canonical[5], 1))
    expected = [status for _, _, status in cases] + ["INVALID_CONTENT"]   # not advertised
    async with cem_and_rm(tmp_path) as (server, rm):
        before = server.messages_in
        rm.expected = len(texts)
        rm.write_at_once([frame(text) for text in texts])
        await asyncio.wait_for(rm.answered.wait(), 10)
        await asyncio.sleep(0.1)   # nothing more comes
        subjects = [message_id for message_id, _, _ in cases] + [canonical[5]]
        subjects[5] = "00000000-0000-0000-0000-000000000000"
        assert rm.statuses == list(zip(subjects, expected, strict=True))
        assert server.messages_in - before == len(texts)   # each counted once
        live = server.get(rm.resource_id)
        assert live is not None
        latest = live.state.latest_measurement()
        assert latest is not None and latest.values[0].value == 1600
    # refused ones are logged with their status, once each (the RM's first is logged too)
    rows = stored(tmp_path, "SELECT reception_status FROM s2_messages WHERE direction = 'in' "
                            "AND message_type = 'PowerMeasurement' AND reception_status != 'OK'")
    assert sorted(status for (status,) in rows) == [
        "INVALID_CONTENT", "INVALID_CONTENT", "INVALID_DATA"]
    counted = stored(tmp_path, "SELECT messages_in FROM rms WHERE rm_id = ?", rm.resource_id)
    assert counted == [(2 + len(texts),)]   # Handshake, details and every measurement


class _Recording(S2Session):
    """A session of its own (S2Server's session_factory) that sees every message it gets."""

    seen: ClassVar[list[str]] = []

    def receive(self, data: str | bytes, now: datetime) -> list[Any]:
        if isinstance(data, str):
            self.seen.append(data)
        return super().receive(data, now)


async def test_a_session_of_its_own_receives_every_measurement(tmp_path: Path) -> None:
    _Recording.seen = []
    ids = [str(uuid.uuid4()) for _ in range(5)]
    async with cem_and_rm(tmp_path, session_factory=lambda: _Recording(
            control_type_preference=["FRBC"])) as (_server, rm):
        rm.expected = len(ids)
        rm.write_at_once([frame(PLAIN % (m, 100 + i)) for i, m in enumerate(ids)])
        await asyncio.wait_for(rm.answered.wait(), 10)
        assert rm.statuses == [(m, "OK") for m in ids]
    measured = [json.loads(text)["message_id"] for text in _Recording.seen
                if '"PowerMeasurement"' in text]
    assert measured == ids


async def test_without_a_store_measurements_are_answered_and_published(tmp_path: Path) -> None:
    server = S2Server(site(tmp_path), None)
    await server.start()
    events = server.subscribe()
    rm = BurstRm(f"ws://127.0.0.1:{server.port}")
    ids = [str(uuid.uuid4()) for _ in range(4)]
    try:
        await asyncio.wait_for(rm.open(), 10)
        while not events.empty():
            events.get_nowait()
        rm.expected = len(ids)
        rm.write_at_once([frame(PLAIN % (m, 200 + i)) for i, m in enumerate(ids)])
        await asyncio.wait_for(rm.answered.wait(), 10)
        assert rm.statuses == [(m, "OK") for m in ids]
        published = [events.get_nowait() for _ in range(events.qsize())]
        measured = [e for e in published if isinstance(e, RmEvent)
                    and isinstance(e.event, StateChanged) and e.event.kind == "measurement"]
        assert len(measured) == len(ids)
        assert {e.rm_id for e in measured} == {rm.resource_id}
    finally:
        await rm.close()
        await server.stop()


class _EarlyRm(BurstRm):
    """Sends a PowerMeasurement after the Handshake, before its ResourceManagerDetails."""

    early: tuple[str, str, str] | None = None
    early_id = str(uuid.uuid4())

    def _on_text(self, text: str) -> None:
        message = json.loads(text)
        if message["message_type"] == "HandshakeResponse":
            self.send_text(PLAIN % (self.early_id, 5))
        if message["message_type"] == "ReceptionStatus" \
                and message["subject_message_id"] == self.early_id:
            self.early = (message["subject_message_id"], message["status"],
                          message.get("diagnostic_label") or "")
            return
        super()._on_text(text)


async def test_a_measurement_before_the_rms_details_gets_the_full_paths_answer(
        tmp_path: Path) -> None:
    config = site(tmp_path)
    server = S2Server(config, None)
    await server.start()
    rm = _EarlyRm(f"ws://127.0.0.1:{server.port}")
    try:
        await asyncio.wait_for(rm.open(), 10)
        assert rm.early is not None
        subject, status, label = rm.early
        assert (subject, status) == (rm.early_id, "INVALID_CONTENT")
        assert "before ResourceManagerDetails" in label
        # and the RM goes on as usual once its details are in
        later = str(uuid.uuid4())
        rm.expected = 1
        rm.write_at_once([frame(PLAIN % (later, 7))])
        await asyncio.wait_for(rm.answered.wait(), 10)
        assert rm.statuses == [(later, "OK")]
    finally:
        await rm.close()
        await server.stop()


class _Broken(S2Session):
    """A session whose text judgment fails (a bug): the full path still answers."""

    def measurement_text(self, text: str) -> str | None:
        raise RuntimeError("bug in the text path")


async def test_a_failing_text_path_still_gets_an_answer_and_keeps_the_connection(
        tmp_path: Path) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    async with cem_and_rm(tmp_path, session_factory=lambda: _Broken(
            control_type_preference=["FRBC"])) as (server, rm):
        rm.expected = len(ids)
        rm.write_at_once([frame(PLAIN % (m, 1)) for m in ids])
        await asyncio.wait_for(rm.answered.wait(), 10)
        # the session's answer to its own failure (before it read the id: the nil subject)
        assert [status for _, status in rm.statuses] == ["TEMPORARY_ERROR"] * len(ids)
        assert server.get(rm.resource_id) is not None   # the connection stays
