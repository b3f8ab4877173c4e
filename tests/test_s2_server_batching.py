"""Many S2 messages in one read: each gets its ReceptionStatus, in order, and is stored.

The S2 server hands each message to its session straight from the read that brought it and
writes the answers once per read (docs/adr/0010-s2-server-cpu.md). These tests send bursts in
one TCP write through a real websocket (a raw RFC 6455 client, the bench's) to a real server
with its SQLite store, and check what an RM and an operator see: one answer per message, in
the order sent, with the right status; fragmented messages among them keep their place; a
message that ends the session ends it there; and every message is in the store after close.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from websockets.frames import apply_mask

from cem.app.bench_s2 import BenchRm
from cem.s2.server import S2Server
from cem.site.config import SiteConfig
from cem.store import Store

MEASUREMENT = ('{"message_type":"PowerMeasurement","message_id":"%s",'
               '"measurement_timestamp":"2026-12-07T00:00:00Z","values":[{"commodity_quantity":'
               '"ELECTRIC.POWER.L1","value":%s}]}')


class BurstRm(BenchRm):
    """The bench's raw RM, recording every ReceptionStatus (subject, status) and the close."""

    def __init__(self, url: str) -> None:
        super().__init__(0, url)
        self.statuses: list[tuple[str, str]] = []
        self.close_code: int | None = None
        self.pongs: list[bytes] = []
        self.answered = asyncio.Event()
        self.expected = 0

    def _on_text(self, text: str) -> None:
        import json

        message = json.loads(text)
        if message["message_type"] == "ReceptionStatus" and self.selected.is_set():
            self.statuses.append((message["subject_message_id"], message["status"]))
            if len(self.statuses) >= self.expected:
                self.answered.set()
            return
        super()._on_text(text)

    def _on_frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big")
        if opcode == 0xA:
            self.pongs.append(payload)
        super()._on_frame(fin, opcode, payload)

    def write_at_once(self, frames: list[bytes]) -> None:
        """All these frames in one socket write (so the server reads them together)."""
        assert self.transport is not None
        self.transport.write(b"".join(frames))


def frame(text: str, *, opcode: int = 0x1, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455)."""
    payload = text.encode()
    length = len(payload)
    head = bytes(((0x80 if fin else 0) | opcode,))
    if length < 126:
        head += bytes((0x80 | length,))
    else:
        head += bytes((0x80 | 126,)) + length.to_bytes(2, "big")
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


def site(tmp_path: Path) -> SiteConfig:
    return SiteConfig.model_validate({
        "site": {"name": "Test site"},
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {"path": str(tmp_path / "cem.db")},
    })


@asynccontextmanager
async def cem_and_rm(tmp_path: Path, **server_options: Any
                     ) -> AsyncIterator[tuple[S2Server, BurstRm]]:
    """A CEM (server + store) and one raw RM through its handshake; the store is closed (all
    of it written) when the block ends."""
    config = site(tmp_path)
    store = await Store.open(config.store.path)
    server = S2Server(config, store, **server_options)
    await server.start()
    rm = BurstRm(f"ws://127.0.0.1:{server.port}")
    try:
        await asyncio.wait_for(rm.open(), 10)
        yield server, rm
    finally:
        await rm.close()
        await server.stop()
        await store.close()


def stored(tmp_path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(tmp_path / "cem.db")
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


async def test_a_burst_in_one_write_gets_every_status_in_order_and_is_stored(
        tmp_path: Path) -> None:
    ids = [str(uuid.uuid4()) for _ in range(300)]
    ids[100] = "rm-own-id-100"     # not a UUID: translated, answered under the RM's own id
    values = [str(1000 + i) for i in range(300)]
    values[200] = '"NaN"'          # not a number: INVALID_CONTENT, and the others go on
    async with cem_and_rm(tmp_path) as (server, rm):
        rm.expected = len(ids)
        rm.write_at_once([frame(MEASUREMENT % (ids[i], values[i])) for i in range(len(ids))])
        await asyncio.wait_for(rm.answered.wait(), 20)
        await asyncio.sleep(0.1)    # nothing more comes
        assert [subject for subject, _ in rm.statuses] == ids
        assert [status for _, status in rm.statuses] == (
            ["OK"] * 200 + ["INVALID_CONTENT"] + ["OK"] * 99)
        live = server.get(rm.resource_id)
        assert live is not None
        latest = live.state.latest_measurement()
        assert latest is not None and latest.values[0].value == 1299
    rows = stored(tmp_path, "SELECT message_id, reception_status FROM s2_messages "
                            "WHERE message_type = 'PowerMeasurement' ORDER BY id")
    assert rows == [(ids[i], "INVALID_CONTENT" if i == 200 else "OK") for i in range(300)]
    assert stored(tmp_path, "SELECT COUNT(*) FROM measurements WHERE rm_id = ?",
                  rm.resource_id) == [(299,)]
    # the RM's counters (written at most once a second while busy) are complete after close
    counted = stored(tmp_path, "SELECT messages_in FROM rms WHERE rm_id = ?", rm.resource_id)
    logged = stored(tmp_path, "SELECT COUNT(*) FROM s2_messages WHERE rm_id = ? AND "
                              "direction = 'in'", rm.resource_id)
    assert counted == logged and logged[0][0] >= 302   # Handshake, details, 300 measurements


async def test_fragmented_messages_among_single_frames_keep_their_place(tmp_path: Path) -> None:
    ids = [str(uuid.uuid4()) for _ in range(8)]
    frames: list[bytes] = []
    for i, message_id in enumerate(ids):
        text = MEASUREMENT % (message_id, 500 + i)
        if i in (0, 3, 4):   # in two frames: a text frame without fin, then its continuation
            frames += [frame(text[:40], fin=False), frame(text[40:], opcode=0x0)]
        else:
            frames.append(frame(text))
        if i == 5:
            frames.append(frame("are you there", opcode=0x9))   # a ping among them
    async with cem_and_rm(tmp_path) as (_server, rm):
        rm.expected = len(ids)
        rm.write_at_once(frames)
        await asyncio.wait_for(rm.answered.wait(), 10)
        assert rm.statuses == [(message_id, "OK") for message_id in ids]
        assert rm.pongs == [b"are you there"]
        # and again, in a later read, after the fragmented ones were taken the slow way
        more = [str(uuid.uuid4()) for _ in range(3)]
        rm.expected += len(more)
        rm.answered.clear()
        rm.write_at_once([frame(MEASUREMENT % (m, 7)) for m in more])
        await asyncio.wait_for(rm.answered.wait(), 10)
        assert [subject for subject, _ in rm.statuses[-3:]] == more


async def test_a_session_request_in_a_burst_ends_the_session_there(tmp_path: Path) -> None:
    before = [str(uuid.uuid4()) for _ in range(5)]
    request = str(uuid.uuid4())
    after = [str(uuid.uuid4()) for _ in range(5)]
    terminate = ('{"message_type":"SessionRequest","message_id":"' + request
                 + '","request":"TERMINATE","diagnostic_label":"RM is going away"}')
    async with cem_and_rm(tmp_path) as (server, rm):
        rm.expected = len(before) + 1
        rm.write_at_once([frame(MEASUREMENT % (m, 1)) for m in before] + [frame(terminate)]
                         + [frame(MEASUREMENT % (m, 2)) for m in after])
        await asyncio.wait_for(rm.answered.wait(), 10)
        assert rm._lost is not None
        await asyncio.wait_for(asyncio.shield(rm._lost), 10)
        # answered up to and including the request; what came after it is not read
        assert rm.statuses == [(m, "OK") for m in before] + [(request, "OK")]
        assert rm.close_code == 1000
        await asyncio.sleep(0.1)
        assert server.get(rm.resource_id) is None
    marks = ",".join("?" * len(after))
    assert stored(tmp_path, f"SELECT COUNT(*) FROM s2_messages WHERE message_id IN ({marks})",
                  *after) == [(0,)]
    assert stored(tmp_path, "SELECT reason FROM sessions") == [
        ("resource manager terminated the session (RM is going away)",)]


async def test_messages_split_over_many_reads_are_answered_once_each(tmp_path: Path) -> None:
    ids = [str(uuid.uuid4()) for _ in range(6)]
    wire = b"".join(frame(MEASUREMENT % (m, 42)) for m in ids)
    cuts = [1, 2, 3, 5, 9, 150, 230, 231, 500, len(wire) - 1]   # inside headers, masks, texts
    async with cem_and_rm(tmp_path) as (_server, rm):
        rm.expected = len(ids)
        assert rm.transport is not None
        for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            rm.transport.write(wire[start:end])
            await asyncio.sleep(0.02)   # each piece is its own read
        await asyncio.wait_for(rm.answered.wait(), 10)
        assert rm.statuses == [(m, "OK") for m in ids]


async def test_a_subscriber_that_falls_behind_keeps_the_newest_events(tmp_path: Path) -> None:
    """A full subscriber queue drops its oldest event for each new one: what the control loop
    reads after a stall is the latest (here the refusal that ends the burst)."""
    ids = [str(uuid.uuid4()) for _ in range(10)]
    async with cem_and_rm(tmp_path) as (server, rm):
        queue = server.subscribe(maxsize=3)
        rm.expected = len(ids)
        rm.write_at_once([frame(MEASUREMENT % (m, '"NaN"' if i == 9 else 7))
                          for i, m in enumerate(ids)])
        await asyncio.wait_for(rm.answered.wait(), 10)
        events = [queue.get_nowait().event for _ in range(queue.qsize())]   # type: ignore[union-attr]
        assert [type(e).__name__ for e in events] == [
            "StateChanged", "StateChanged", "MessageRejected"]
        assert events[-1].message_id == ids[9] and events[-1].status == "INVALID_CONTENT"


async def test_the_stored_snapshot_follows_the_rms_details(tmp_path: Path) -> None:
    """An RM's row holds its state as JSON (every 5 s while it measures; here every message):
    its details as last sent, its control type's section and an empty one for the others."""
    from cem.app.bench_s2 import _DETAILS

    async with cem_and_rm(tmp_path, snapshot_interval_s=0) as (server, rm):
        assert server.store is not None
        rm.expected = 1
        rm.write_at_once([frame(MEASUREMENT % (uuid.uuid4(), 5))])
        await asyncio.wait_for(rm.answered.wait(), 10)
        await server.store.flush()
        first = stored(tmp_path, "SELECT snapshot FROM rms WHERE rm_id = ?", rm.resource_id)
        renamed = (_DETAILS % (uuid.uuid4(), rm.resource_id, 0, "FILL_RATE_BASED_CONTROL")
                   ).replace("bench-rm-0", "renamed RM")
        rm.expected, rm.answered = len(rm.statuses) + 2, asyncio.Event()
        rm.write_at_once([frame(renamed), frame(MEASUREMENT % (uuid.uuid4(), 6))])
        await asyncio.wait_for(rm.answered.wait(), 10)
        await server.store.flush()
        second = stored(tmp_path, "SELECT snapshot FROM rms WHERE rm_id = ?", rm.resource_id)
    import json

    before, after = json.loads(first[0][0]), json.loads(second[0][0])
    assert before["details"]["name"] == "bench-rm-0" and after["details"]["name"] == "renamed RM"
    assert after["details"]["resource_id"] == rm.resource_id
    assert after["control_type"] == "FILL_RATE_BASED_CONTROL"
    assert after["measurements"]["ELECTRIC.POWER.L1"]["value_w"] == 6
    assert after["frbc"]["system_descriptions"] == [] and "ombc" in after and "ddbc" in after


async def test_an_rm_that_does_not_read_its_answers_is_not_read_until_it_does(
        tmp_path: Path) -> None:
    ids = [str(uuid.uuid4()) for _ in range(2000)]
    async with cem_and_rm(tmp_path, write_limit_bytes=4096) as (server, rm):
        live = server.get(rm.resource_id)
        assert live is not None and live.ws is not None and rm.transport is not None
        # small socket buffers, so the answers back up after a few hundred
        live.ws.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        rm.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        rm.transport.pause_reading()   # the RM stops reading what the CEM sends
        read_before = server.messages_in
        rm.expected = len(ids)
        rm.write_at_once([frame(MEASUREMENT % (m, 3)) for m in ids])
        await asyncio.sleep(1.5)
        read = server.messages_in - read_before
        assert 0 < read < len(ids) // 2   # the CEM stopped reading from it
        assert not rm.statuses
        rm.transport.resume_reading()   # it reads again: everything is answered, in order
        await asyncio.wait_for(rm.answered.wait(), 30)
        assert [subject for subject, _ in rm.statuses] == ids
        assert {status for _, status in rm.statuses} == {"OK"}


async def _server_reading_in_batches(tmp_path: Path, read_batch_ms: int
                                     ) -> tuple[Store, S2Server]:
    """A started CEM server with `server.read_batch_ms` and its store in `tmp_path`."""
    config = SiteConfig.model_validate({
        "site": {"name": "Test site"},
        "server": {"host": "127.0.0.1", "port": 0, "read_batch_ms": read_batch_ms},
        "store": {"path": str(tmp_path / "cem.db")},
    })
    store = await Store.open(config.store.path)
    server = S2Server(config, store)
    await server.start()
    return store, server


async def test_reads_taken_in_batches_still_answer_every_rm_in_order(tmp_path: Path) -> None:
    """`server.read_batch_ms`: the CEM pauses between reads so that several RMs' messages are
    read in one wake-up; each RM still gets every answer, in order, and all is stored."""
    store, server = await _server_reading_in_batches(tmp_path, 30)
    rms = [BurstRm(f"ws://127.0.0.1:{server.port}") for _ in range(3)]
    ids = {rm: [str(uuid.uuid4()) for _ in range(20)] for rm in rms}
    try:
        await asyncio.gather(*(asyncio.wait_for(rm.open(), 10) for rm in rms))
        for rm in rms:
            rm.expected = 20
        for i in range(20):   # one message per write, the RMs interleaved
            for rm in rms:
                rm.write_at_once([frame(MEASUREMENT % (ids[rm][i], 1000 + i))])
            await asyncio.sleep(0.002)
        await asyncio.wait_for(asyncio.gather(*(rm.answered.wait() for rm in rms)), 20)
        for rm in rms:
            assert rm.statuses == [(message_id, "OK") for message_id in ids[rm]]
    finally:
        await asyncio.gather(*(rm.close() for rm in rms))
        await server.stop()
        await store.close()
    assert stored(tmp_path, "SELECT COUNT(*) FROM s2_messages WHERE message_type = "
                            "'PowerMeasurement'") == [(60,)]


async def test_reads_taken_in_batches_leave_the_timers_of_the_event_loop_on_time(
        tmp_path: Path) -> None:
    """`server.read_batch_ms`: the loop waits before it reads again, but never past a timer
    that is due (the guard's, the control loop's, OCPP's run on time), and every message is
    still answered in order."""
    import statistics

    store, server = await _server_reading_in_batches(tmp_path, 40)
    rm = BurstRm(f"ws://127.0.0.1:{server.port}")
    lateness: list[float] = []

    async def timer() -> None:   # a 5 ms timer, again and again, as the guard's is
        loop = asyncio.get_running_loop()
        for _ in range(40):
            due = loop.time() + 0.005
            await asyncio.sleep(0.005)
            lateness.append(loop.time() - due)

    ids = [str(uuid.uuid4()) for _ in range(40)]
    try:
        await asyncio.wait_for(rm.open(), 10)
        rm.expected = len(ids)
        ticking = asyncio.get_running_loop().create_task(timer())
        for i, message_id in enumerate(ids):   # a message every 3 ms: reads all the time
            rm.write_at_once([frame(MEASUREMENT % (message_id, 1000 + i))])
            await asyncio.sleep(0.003)
        await asyncio.wait_for(asyncio.gather(ticking, rm.answered.wait()), 20)
        assert rm.statuses == [(message_id, "OK") for message_id in ids]
    finally:
        await rm.close()
        await server.stop()
        await store.close()
    # waiting for the next read must not hold a due timer (it would: up to 40 ms each)
    assert statistics.median(lateness) < 0.010, lateness


def test_a_read_batch_beyond_50_ms_is_refused() -> None:
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError, match="read_batch_ms"):
        SiteConfig.model_validate({"server": {"read_batch_ms": 200}})


async def test_measurements_between_logged_ones_are_counted_published_and_answered(
        tmp_path: Path) -> None:
    """With a log interval, an RM's first measurement is logged (with its measurement row) and
    the next ones within the interval only counted; each is answered OK, each reaches a
    subscriber as a measurement event of that RM, and the RM's row counts them all."""
    config = site(tmp_path)
    store = await Store.open(config.store.path, measurement_log_interval_s=3600)
    server = S2Server(config, store, snapshot_interval_s=0)
    await server.start()
    rm = BurstRm(f"ws://127.0.0.1:{server.port}")
    ids = [str(uuid.uuid4()) for _ in range(40)]
    try:
        await asyncio.wait_for(rm.open(), 10)
        queue = server.subscribe()
        rm.expected = len(ids)
        rm.write_at_once([frame(MEASUREMENT % (m, 100 + i)) for i, m in enumerate(ids[:20])])
        for i, m in enumerate(ids[20:]):   # and one a read
            rm.write_at_once([frame(MEASUREMENT % (m, 120 + i))])
            await asyncio.sleep(0.002)
        await asyncio.wait_for(rm.answered.wait(), 10)
        assert rm.statuses == [(m, "OK") for m in ids]
        events = [queue.get_nowait() for _ in range(queue.qsize())]
        measured = [e for e in events if getattr(e, "rm_id", None) == rm.resource_id
                    and getattr(getattr(e, "event", None), "kind", None) == "measurement"]
        assert len(measured) == len(ids)
        live = server.get(rm.resource_id)
        assert live is not None
        assert live.state.measured_power()[
            next(iter(live.state.measured_power()))].value_w == 139
    finally:
        await rm.close()
        await server.stop()
        await store.close()
    assert stored(tmp_path, "SELECT message_id FROM s2_messages WHERE message_type = "
                            "'PowerMeasurement'") == [(ids[0],)]
    assert stored(tmp_path, "SELECT rm_id, value FROM measurements") == [
        (rm.resource_id, 100.0)]
    [(counted, snapshot)] = stored(tmp_path, "SELECT messages_in, snapshot FROM rms")
    assert counted == len(ids) + 2   # with the Handshake and the details
    import json

    assert json.loads(snapshot)["measurements"]["ELECTRIC.POWER.L1"]["value_w"] == 139
