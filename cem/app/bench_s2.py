"""`cem bench s2`: how many RMs and messages the S2 server takes, and how fast it answers.

The CEM runs as it does in production: a `cem run` subprocess on a free port with a temporary
database (so its peak memory, VmHWM from /proc, and its CPU time are its own, not the bench's).
The RMs live in this process and must be cheap, since they share the CPUs with the CEM: each is
a minimal RFC 6455 client on an `asyncio.Protocol` (`BenchRm`: ~60 us of CPU per message,
mostly the kernel's socket work, against ~85 us with websockets' client; s2-python's
`S2AsyncConnection` costs ~1 MB and several tasks per RM) speaking valid S2 JSON: the full handshake (Handshake, HandshakeResponse,
ResourceManagerDetails, SelectControlType, every message answered with a ReceptionStatus),
then `messages` PowerMeasurements.

Messages are paced (open loop) at `rate` messages/s over all RMs, like a site whose RMs report
on their own clocks; latency is from sending a measurement to receiving its ReceptionStatus.
`rate=0` sends as fast as the CEM acknowledges (closed loop per RM: max throughput).

`cem_src` runs the CEM from another checkout (`cem bench s2 --cem-src DIR`: e.g. main beside a
branch), so a change is measured against its baseline in the same run, on the same machine
state; `busy_core` keeps one core busy with a CPU-bound process during the message phase (how
the CEM holds its latency when it shares the machine).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.frames import apply_mask

from cem.app.service import EVENT_LOOP_ENV, raise_open_file_limit

CLIENT_KIND = "raw websocket clients speaking S2 JSON (full handshake, every message acknowledged)"

_HANDSHAKE = ('{"message_type":"Handshake","message_id":"%s","role":"RM",'
              '"supported_protocol_versions":["0.0.2-beta"]}')
_DETAILS = ('{"message_type":"ResourceManagerDetails","message_id":"%s","resource_id":"%s",'
            '"name":"bench-rm-%d","roles":[{"role":"ENERGY_CONSUMER","commodity":"ELECTRICITY"}],'
            '"instruction_processing_delay":100,"available_control_types":["%s"],'
            '"provides_forecast":false,"provides_power_measurement_types":["ELECTRIC.POWER.L1"]}')
_STATUS = '{"message_type":"ReceptionStatus","subject_message_id":"%s","status":"OK"}'
_MEASUREMENT = ('{"message_type":"PowerMeasurement","message_id":"%s",'
                '"measurement_timestamp":"%s","values":[{"commodity_quantity":"ELECTRIC.POWER.L1",'
                '"value":%d}]}')


def json_field(text: str, name: str) -> str | None:
    """A string field's value from compact or spaced JSON text, by a search (no parse): what
    the bench's RMs and the floor server read of the messages they get."""
    marker = f'"{name}":"'
    at = text.find(marker)
    if at < 0:
        marker = f'"{name}": "'
        at = text.find(marker)
        if at < 0:
            return None
    start = at + len(marker)
    return text[start:text.find('"', start)]


def _event_loop_name() -> str:
    """"uvloop" when `CEM_EVENT_LOOP=uvloop` and uvloop imports (as `cem run` decides), else
    "asyncio"."""
    if os.environ.get(EVENT_LOOP_ENV, "").strip().lower() != "uvloop":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


@dataclass
class BenchResult:
    """The figures `cem bench s2` reports."""

    rms: int
    rms_connected: int
    messages_per_rm: int
    target_rate_per_s: float | None
    clients: str = CLIENT_KIND
    connect_s: float = 0.0
    handshakes_per_s: float = 0.0
    messages_sent: int = 0
    messages_acknowledged: int = 0
    not_ok: int = 0
    message_phase_s: float = 0.0
    acknowledged_per_s: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    latency_p99_ms_by_second: list[float | None] = field(default_factory=list)
    """The p99 latency of the measurements sent in each second of the message phase (None:
    none sent in it): a pause shows as one bad second, a CEM short of CPU as a climb."""
    cem_cpu_share_by_second: list[float] = field(default_factory=list)
    """The CEM's CPU seconds per wall second in each second of the message phase (the
    last one partial): what it got of a core while the latencies above were measured."""
    busy_core_cpu_share: float | None = None
    """`--busy-core`: the CPU-bound process's CPU seconds per wall second of the message
    phase (1.0: it had a core to itself)."""
    cem_peak_rss_mb: float | None = None
    cem_rss_idle_mb: float | None = None  # VmRSS when it serves, before any RM connected
    cem_kb_per_rm: float | None = None
    """(VmRSS after the message phase - VmRSS before the RMs connected) / RMs connected."""
    cem_kb_per_rm_connected: float | None = None
    """(VmRSS once every RM has connected, before any measurement - VmRSS before the RMs
    connected) / RMs connected: what a connection holds, without what the messages left."""
    cem_cpu_s_message_phase: float | None = None
    bench_cpu_s_message_phase: float | None = None
    cem_cpu_us_per_message: float | None = None
    """CEM CPU time (user + system) in the message phase per acknowledged message: the figure
    least disturbed by other load on the machine."""
    cem_cpu_share_message_phase: float | None = None
    """CEM CPU seconds per wall second of the message phase (1.0 = one core busy)."""
    cem_cpu_system_us_per_message: float | None = None
    """The kernel's part of `cem_cpu_us_per_message` (socket reads and writes, epoll)."""
    cem_src: str | None = None  # the checkout the CEM ran from (None: this one)
    measurement_log_interval_s: float | None = None
    """`--measurement-log-interval`: the CEM's `store.measurement_log_interval_s` (None: its
    default); it decides how many of the measurements are in `stored_messages`."""
    read_batch_ms: float | None = None
    """`--read-batch-ms`: the CEM's `server.read_batch_ms` (None: its default)."""
    soak_s: float | None = None
    """`--duration`: the message phase kept the RMs sending at the rate for this long."""
    rss_series: list[tuple[float, float]] = field(default_factory=list)
    """`--duration`: (seconds into the message phase, the CEM's VmRSS in MB), every
    `--sample-every` seconds."""
    rss_growth_kb_per_rm: float | None = None
    """`--duration`: VmRSS at the end less VmRSS after the warm-up (the first tenth of the
    duration, at least one sample), per connected RM."""
    rss_growth_kb_per_min: float | None = None
    """`--duration`: the least-squares slope of VmRSS over the samples after the warm-up."""
    busy_core: bool = False  # a CPU-bound process ran beside it in the message phase
    floor: bool = False
    """The figures are the floor server's (`cem.app.s2_floor`), not `cem run`'s."""
    event_loop: str = field(default_factory=lambda: _event_loop_name())
    """The event loop the CEM (and the floor) ran on: `CEM_EVENT_LOOP`, as `cem run` reads it."""
    http: bool = False  # the CEM served its dashboard and one page was open (SSE + reads)
    dashboard_events: int = 0
    dashboard_bytes: int = 0
    dashboard_reads: int = 0
    cem_exit_code: int | None = None
    cem_shutdown_s: float | None = None
    stored_messages: int | None = None
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    load_average_1m: float = field(default_factory=lambda: os.getloadavg()[0])
    errors: list[str] = field(default_factory=list)


class BenchRm(asyncio.Protocol):
    """One raw S2 resource manager: a minimal RFC 6455 client on an `asyncio.Protocol`.

    The bench shares the CPUs with the CEM, so its RMs must cost little: websockets' asyncio
    client has a reader task per RM, an assembler and an await per send. This one frames its
    texts itself: messages are pre-serialised templates, ids are
    UUIDs made from a per-RM prefix and a counter, replies are written from `data_received`.
    Every frame is masked (random key), pings are answered, close frames are echoed.
    """

    def __init__(self, number: int, url: str) -> None:
        self.number = number
        self.url = url
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.resource_id = str(uuid.uuid4())
        self.transport: asyncio.Transport | None = None
        self.selected = asyncio.Event()
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.sent: list[float] = []   # when each acknowledged one was sent (perf_counter)
        self.not_ok = 0
        self.acked = asyncio.Event()
        self.on_ack: Callable[[BenchRm], None] | None = None
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._upgraded: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._id_prefix = str(uuid.uuid4())[:24]   # + 12 hex digits: a canonical UUID
        self._count = 0

    # --- connection ----------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._upgraded = loop.create_future()
        self._lost = loop.create_future()
        await loop.create_connection(lambda: self, self.host, self.port)
        key = base64.b64encode(os.urandom(16)).decode()
        assert self.transport is not None
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        await self._upgraded
        self.send_text(_HANDSHAKE % uuid.uuid4())
        await self.selected.wait()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._upgraded is not None and not self._upgraded.done():
            self._upgraded.set_exception(ConnectionError(f"connection lost: {exc}"))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        upgraded = self._upgraded
        if upgraded is not None and not upgraded.done():
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = bytes(self._buffer[:self._buffer.find(b"\r\n")])
            del self._buffer[:end + 4]
            if status_line.split(b" ")[1:2] != [b"101"]:
                upgraded.set_exception(ConnectionError(
                    f"no websocket upgrade: {status_line.decode(errors='replace')}"))
                return
            upgraded.set_result(None)
        self._read_frames()

    def _read_frames(self) -> None:
        buffer = self._buffer
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            length, at = second & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, at = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, at = int.from_bytes(buffer[2:10], "big"), 10
            mask = b""
            if second & 0x80:  # servers do not mask, but read it right if one does
                mask, at = bytes(buffer[at:at + 4]), at + 4
            if len(buffer) < at + length:
                return
            payload = bytes(buffer[at:at + length])
            del buffer[:at + length]
            if mask:
                payload = apply_mask(payload, mask)
            self._on_frame(first & 0x80 != 0, first & 0x0F, payload)

    def _on_frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode in (0x0, 0x1):
            self._fragments.append(payload)
            if fin:
                text = b"".join(self._fragments).decode()
                self._fragments = []
                self._on_text(text)
        elif opcode == 0x9:
            self._send_frame(0xA, payload)  # pong
        elif opcode == 0x8:
            self._send_frame(0x8, payload[:2])
            if self.transport is not None:
                self.transport.close()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        length = len(payload)
        if length < 126:
            header = bytes((0x80 | opcode, 0x80 | length))
        elif length < 65536:
            header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
        mask = random.getrandbits(32).to_bytes(4, "big")
        transport.write(header + mask + apply_mask(payload, mask))

    def send_text(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    # --- S2 ------------------------------------------------------------------------------

    def _on_text(self, text: str) -> None:
        now = time.perf_counter()
        kind = json_field(text, "message_type")
        if kind == "ReceptionStatus":
            subject = json_field(text, "subject_message_id")
            began = self.sent_at.pop(subject or "", None)
            if began is not None:
                self.latencies.append(now - began)
                self.sent.append(began)
                if json_field(text, "status") != "OK":
                    self.not_ok += 1
                self.acked.set()
                if self.on_ack is not None:
                    self.on_ack(self)
            return
        message_id = json_field(text, "message_id")
        if message_id:
            self.send_text(_STATUS % message_id)
        if kind == "HandshakeResponse":
            self.send_text(_DETAILS % (uuid.uuid4(), self.resource_id, self.number,
                                       "FILL_RATE_BASED_CONTROL"))
        elif kind == "SelectControlType":
            self.selected.set()

    def send_measurement(self, value: int, stamp: str) -> None:
        """One PowerMeasurement, timed from now until its ReceptionStatus."""
        self._count += 1
        message_id = f"{self._id_prefix}{self._count:012x}"
        self.sent_at[message_id] = time.perf_counter()
        self.send_text(_MEASUREMENT % (message_id, stamp, value))

    async def close(self) -> None:
        if self.transport is None:
            return
        self._send_frame(0x8, (1000).to_bytes(2, "big"))
        with contextlib.suppress(Exception):
            if self._lost is not None:
                await asyncio.wait_for(asyncio.shield(self._lost), 5)
        if self.transport is not None:
            self.transport.close()


class _Stamp:
    """measurement_timestamp text, made once per second rather than once per message."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        return self._text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_status(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0  # kB -> MB
    except OSError:
        return None
    return None


def _proc_cpu_s(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of process `pid`."""
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(parts[11]) / tick, int(parts[12]) / tick
    except (OSError, IndexError, ValueError):
        return None


class CemProcess:
    """`cem run` as a subprocess on a free port with a temporary store."""

    def __init__(self, workdir: Path, reception_timeout_s: float = 30.0,
                 http: bool = False, src: Path | None = None, floor: bool = False,
                 measurement_log_interval_s: float | None = None,
                 read_batch_ms: float | None = None) -> None:
        self.src = src
        self.floor = floor  # the floor server (cem.app.s2_floor) instead of `cem run`
        self.port = _free_port()
        self.http_port = _free_port() if http else 0
        self.db = workdir / "bench.db"
        self.config = workdir / "bench-site.toml"
        self.log = workdir / "cem.log"
        self.config.write_text(
            "[site]\nname = \"bench site\"\n"
            f"[server]\nhost = \"127.0.0.1\"\nport = {self.port}\n"
            f"reception_status_timeout_s = {reception_timeout_s}\n"
            "ping_interval_s = 60\nping_timeout_s = 60\n"
            + ("" if read_batch_ms is None else f"read_batch_ms = {read_batch_ms}\n")
            + f"[store]\npath = \"{self.db}\"\n"
            + ("" if measurement_log_interval_s is None else
               f"measurement_log_interval_s = {measurement_log_interval_s}\n")
            + "[grid]\nfuse_a = 25\nimport_limit_kw = 17\n"
            f"[http]\nenabled = {'true' if http else 'false'}\nport = {self.http_port}\n")
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 60.0) -> None:
        env, cwd = None, None
        if self.src is not None:
            # `python -m` puts the working directory first on sys.path, PYTHONPATH next
            cwd = str(self.src)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(self.src), *filter(None, [os.environ.get("PYTHONPATH")])])}
        command = ["-m", "cem.app.s2_floor", "--port", str(self.port)] if self.floor else \
            ["-m", "cem.app.cli", "run", "--config", str(self.config), "--log-level", "WARNING"]
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, *command, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=cwd)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"cem run exited with {self.process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError(f"cem run did not listen within {timeout_s:g} s")

    def peak_rss_mb(self) -> float | None:
        return None if self.process is None else _proc_status(self.process.pid, "VmHWM")

    def rss_mb(self) -> float | None:
        return None if self.process is None else _proc_status(self.process.pid, "VmRSS")

    def cpu_s(self) -> tuple[float, float] | None:
        """(user, system) CPU seconds so far."""
        return None if self.process is None else _proc_cpu_s(self.process.pid)

    async def stop(self, timeout_s: float = 30.0) -> tuple[int | None, float]:
        if self.process is None:
            return None, 0.0
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        return self.process.returncode, time.monotonic() - began


async def run_bench(*, rms: int, messages: int, rate: float = 5000.0,
                    url: str | None = None, progress: Any = None,
                    connect_concurrency: int = 200, http: bool = False,
                    cem_src: Path | None = None, busy_core: bool = False,
                    profile: Path | None = None, duration_s: float | None = None,
                    sample_every_s: float = 10.0, floor: bool = False,
                    measurement_log_interval_s: float | None = None,
                    read_batch_ms: float | None = None) -> BenchResult:
    """Run the benchmark against `url`, or against a fresh `cem run` subprocess if None.

    `floor`: against the floor server instead (`cem.app.s2_floor`: answers without any S2
    work, on the same event loop), so its "CEM" figures are the event loop's and the sockets'.

    `cem_src`: that `cem run` runs from this checkout's directory instead (a baseline).
    `measurement_log_interval_s`: the CEM's `store.measurement_log_interval_s` (None: its
    default). `read_batch_ms`: the CEM's `server.read_batch_ms` (None: its default).
    `busy_core`: a CPU-bound process runs during the message phase.
    `duration_s` (a soak): the RMs keep sending at `rate` for that many seconds instead of
    `messages` each, and the CEM's VmRSS is sampled every `sample_every_s` seconds.
    `profile`: py-spy (if installed) samples the CEM's threads during the message phase and
    writes their stacks to that file (collapsed: one stack and its count a line).

    `http`: the CEM serves its dashboard and, during the message phase, one open page reads
    it as the browser does (the page's files, /api/state and /api/plan, then the SSE stream;
    /metrics every 5 s as Prometheus would)."""
    raise_open_file_limit(max(4096, 2 * rms + 256))
    result = BenchResult(rms=rms, rms_connected=0, messages_per_rm=messages,
                         target_rate_per_s=rate or None, http=http,
                         cem_src=str(cem_src) if cem_src is not None else None,
                         busy_core=busy_core, soak_s=duration_s or None, floor=floor,
                         measurement_log_interval_s=measurement_log_interval_s,
                         read_batch_ms=read_batch_ms)
    with tempfile.TemporaryDirectory(prefix="cem-bench-") as tmp:
        cem = CemProcess(Path(tmp), http=http, src=cem_src, floor=floor,
                         measurement_log_interval_s=measurement_log_interval_s,
                         read_batch_ms=read_batch_ms) \
            if url is None else None
        if cem is not None:
            await cem.start()
            url = cem.url
            result.cem_rss_idle_mb = cem.rss_mb()
        assert url is not None
        clients = [BenchRm(n, url) for n in range(rms)]
        try:
            await _connect_all(clients, result, progress, connect_concurrency)
            live = [c for c in clients if c.selected.is_set()]
            if cem is not None and result.cem_rss_idle_mb is not None and live:
                await asyncio.sleep(0.5)   # the handshakes' last store writes and replans
                rss = cem.rss_mb()
                if rss is not None:
                    result.cem_kb_per_rm_connected = round(
                        (rss - result.cem_rss_idle_mb) * 1024 / len(live), 1)
            page = None
            if http and cem is not None:
                page = _PageProcess(f"http://127.0.0.1:{cem.http_port}", result)
                await page.start()
            hog = _BusyCore() if busy_core else None
            spy = _PySpy(cem.process.pid, profile) \
                if profile is not None and cem is not None and cem.process is not None else None
            if spy is not None:
                await asyncio.sleep(0.5)   # py-spy attached before the first message
            cpu_before = cem.cpu_s() if cem else None
            own_before = time.process_time()
            sampler = asyncio.get_running_loop().create_task(
                _sample_rss(cem, result, sample_every_s)) if duration_s and cem else None
            cpu_sampler = asyncio.get_running_loop().create_task(
                _sample_cpu_share(cem, result)) if cem else None
            hog_before = hog.cpu_s() if hog is not None else None
            began = time.perf_counter()
            try:
                await _message_phase(live, messages, rate, result, progress, duration_s)
                if duration_s:
                    result.messages_per_rm = max((c._count for c in live), default=0)
            finally:
                if sampler is not None:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                    _rss_growth(result, duration_s or 0.0)
                if cpu_sampler is not None:
                    cpu_sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await cpu_sampler
                if hog is not None:
                    hog_after = hog.cpu_s()
                    if hog_before is not None and hog_after is not None:
                        result.busy_core_cpu_share = round(
                            (hog_after - hog_before) / max(time.perf_counter() - began, 1e-9), 3)
                    hog.stop()
                if spy is not None:
                    spy.stop(result)
            result.bench_cpu_s_message_phase = round(time.process_time() - own_before, 2)
            cpu_after = cem.cpu_s() if cem else None
            rss = cem.rss_mb() if cem else None
            if rss is not None and result.cem_rss_idle_mb is not None and result.rms_connected:
                result.cem_kb_per_rm = round(
                    (rss - result.cem_rss_idle_mb) * 1024 / result.rms_connected, 1)
            if page is not None:
                await page.stop()
            if cpu_before is not None and cpu_after is not None:
                used = sum(cpu_after) - sum(cpu_before)
                result.cem_cpu_s_message_phase = round(used, 2)
                result.cem_cpu_share_message_phase = round(
                    used / max(result.message_phase_s, 1e-9), 3)
                if result.messages_acknowledged:
                    result.cem_cpu_us_per_message = round(
                        used / result.messages_acknowledged * 1e6, 1)
                    result.cem_cpu_system_us_per_message = round(
                        (cpu_after[1] - cpu_before[1]) / result.messages_acknowledged * 1e6, 1)
        finally:
            if cem is not None:
                result.cem_peak_rss_mb = cem.peak_rss_mb()
            await asyncio.gather(*(c.close() for c in clients))
            if cem is not None:
                result.cem_exit_code, shutdown = await cem.stop()
                result.cem_shutdown_s = round(shutdown, 2)
                with contextlib.suppress(Exception):
                    if floor:
                        raise FileNotFoundError("the floor server stores nothing")
                    import sqlite3
                    db = sqlite3.connect(cem.db)
                    result.stored_messages = db.execute(
                        "SELECT COUNT(*) FROM s2_messages").fetchone()[0]
                    db.close()
                if result.cem_exit_code != 0:
                    result.errors.append(f"cem run exited with {result.cem_exit_code}: "
                                         + cem.log.read_text()[-500:])
    return result


async def _sample_cpu_share(cem: CemProcess, result: BenchResult) -> None:
    """The CEM's CPU share of each second into `result.cem_cpu_share_by_second` until
    cancelled (then the last, partial second's)."""
    before, at = cem.cpu_s(), time.perf_counter()
    try:
        while True:
            await asyncio.sleep(max(0.0, at + 1.0 - time.perf_counter()))
            before, at = _add_cpu_share(cem, result, before, at), at + 1.0
    finally:
        if time.perf_counter() - at > 0.05:
            _add_cpu_share(cem, result, before, at)


def _add_cpu_share(cem: CemProcess, result: BenchResult,
                   before: tuple[float, float] | None, at: float) -> tuple[float, float] | None:
    now, wall = cem.cpu_s(), time.perf_counter()
    if before is not None and now is not None:
        result.cem_cpu_share_by_second.append(
            round((sum(now) - sum(before)) / max(wall - at, 1e-9), 3))
    return now


async def _sample_rss(cem: CemProcess, result: BenchResult, every_s: float) -> None:
    """The CEM's VmRSS into `result.rss_series` every `every_s` seconds, from now."""
    began = time.perf_counter()
    while True:
        rss = cem.rss_mb()
        if rss is not None:
            result.rss_series.append((round(time.perf_counter() - began, 1), round(rss, 2)))
        await asyncio.sleep(every_s)


def _rss_growth(result: BenchResult, duration_s: float) -> None:
    """Growth of the CEM's VmRSS after the warm-up (the first tenth of the soak)."""
    after = [(t, mb) for t, mb in result.rss_series if t >= duration_s / 10]
    if len(after) < 2:
        return
    if result.rms_connected:
        result.rss_growth_kb_per_rm = round(
            (after[-1][1] - after[0][1]) * 1024 / result.rms_connected, 2)
    mean_t = statistics.fmean(t for t, _ in after)
    mean_mb = statistics.fmean(mb for _, mb in after)
    spread = sum((t - mean_t) ** 2 for t, _ in after)
    if spread > 0:
        slope = sum((t - mean_t) * (mb - mean_mb) for t, mb in after) / spread   # MB/s
        result.rss_growth_kb_per_min = round(slope * 1024 * 60, 2)


class _PySpy:
    """py-spy sampling a process (all its threads) until stopped, stacks written collapsed."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = Path(sys.executable).with_name("py-spy")
        command = str(exe) if exe.exists() else "py-spy"
        self.out = out
        try:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [command, "record", "--pid", str(pid), "--format", "raw", "--threads",
                 "--rate", "250", "--nonblocking", "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError:
            self.process = None

    def stop(self, result: BenchResult) -> None:
        if self.process is None:
            result.errors.append("--profile: py-spy is not installed (pip install py-spy)")
            return
        self.process.send_signal(signal.SIGINT)
        _, err = self.process.communicate(timeout=30)
        if not self.out.exists():
            result.errors.append(f"--profile: py-spy wrote nothing: {err.decode()[-300:]}")


class _BusyCore:
    """A CPU-bound process (a busy loop) for as long as it is not stopped: other work on the
    machine, as a site's computer has."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def cpu_s(self) -> float | None:
        """Its CPU seconds so far (user + system)."""
        used = _proc_cpu_s(self.process.pid)
        return None if used is None else sum(used)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class _PageProcess:
    """`_open_page` in a process of its own (the bench's pacing loop must not starve it, nor
    its CPU count as the CEM's); its counts come back as JSON on stdout when it is stopped."""

    def __init__(self, base: str, result: BenchResult) -> None:
        self.base = base
        self.result = result
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from cem.app.bench_s2 import page_main; page_main()",
            self.base, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.process.stdout is not None
        # measured from when the page has loaded and its event stream is open
        await asyncio.wait_for(self.process.stdout.readline(), 60)

    async def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(self.process.communicate(), 20)
        try:
            counts = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.result.errors.append("the dashboard page reported nothing: "
                                      + err.decode()[-300:])
            return
        self.result.dashboard_events = counts["dashboard_events"]
        self.result.dashboard_reads = counts["dashboard_reads"]
        self.result.dashboard_bytes = counts["dashboard_bytes"]
        self.result.errors += counts["errors"]


def page_main() -> None:
    """The bench's open page: `python -c ... page_main()` BASE_URL; counts on SIGTERM."""
    result = BenchResult(rms=0, rms_connected=0, messages_per_rm=0, target_rate_per_s=None)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(_open_page(sys.argv[1], result,
                                           on_ready=lambda: print("ready", flush=True)))
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            result.errors.append(f"the dashboard page failed: {exc!r}")

    asyncio.run(run())
    print(json.dumps({"dashboard_events": result.dashboard_events,
                      "dashboard_reads": result.dashboard_reads,
                      "dashboard_bytes": result.dashboard_bytes, "errors": result.errors}))


async def _open_page(base: str, result: BenchResult,
                     on_ready: Callable[[], None] | None = None) -> None:
    """One open dashboard: what the browser loads, then its event stream until cancelled."""
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for path in ("/", "/static/app.js", "/static/style.css", "/api/state", "/api/plan"):
            response = await client.get(path)
            result.dashboard_reads += 1
            result.dashboard_bytes += len(response.content)

        async def scrape() -> None:
            while True:
                response = await client.get("/metrics")
                result.dashboard_reads += 1
                result.dashboard_bytes += len(response.content)
                await asyncio.sleep(5.0)

        scraper = asyncio.get_running_loop().create_task(scrape())
        try:
            async with client.stream("GET", "/api/events") as stream:
                if on_ready is not None:
                    on_ready()
                async for line in stream.aiter_lines():
                    result.dashboard_bytes += len(line) + 1
                    if line.startswith("event:"):
                        result.dashboard_events += 1
        finally:
            scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scraper


async def _connect_all(clients: list[BenchRm], result: BenchResult, progress: Any,
                       concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    task_id = progress.add_task("RMs connecting", total=len(clients)) if progress else None

    async def one(client: BenchRm) -> None:
        async with gate:
            try:
                await asyncio.wait_for(client.open(), timeout=120)
            except Exception as exc:
                if len(result.errors) < 5:
                    result.errors.append(f"RM {client.number} did not connect: {exc!r}")
        if progress is not None:
            progress.advance(task_id)

    began = time.perf_counter()
    await asyncio.gather(*(one(c) for c in clients))
    result.connect_s = round(time.perf_counter() - began, 3)
    result.rms_connected = sum(1 for c in clients if c.selected.is_set())
    result.handshakes_per_s = round(result.rms_connected / max(result.connect_s, 1e-9), 1)


async def _message_phase(clients: list[BenchRm], messages: int, rate: float,
                         result: BenchResult, progress: Any,
                         duration_s: float | None = None) -> None:
    """Each RM sends `messages` measurements, or, with `duration_s`, keeps sending until that
    many seconds have passed (`messages` is then not used)."""
    if not clients or (messages <= 0 and not duration_s):
        return
    total = None if duration_s else len(clients) * messages
    task_id = progress.add_task("messages acknowledged", total=total) if progress else None
    stamp = _Stamp()
    loop = asyncio.get_running_loop()
    all_acked = loop.create_future()
    acked = 0
    sending = True
    ends_at = time.perf_counter() + duration_s if duration_s else None

    def more(client: BenchRm) -> bool:
        if ends_at is not None:
            return time.perf_counter() < ends_at
        return client._count < messages

    def on_ack(client: BenchRm) -> None:
        nonlocal acked
        acked += 1
        if rate <= 0 and more(client):  # closed loop: the next one at once
            client.send_measurement(1000 + client._count, stamp.now())
            result.messages_sent += 1
        if all_in() and not all_acked.done():
            all_acked.set_result(None)

    def all_in() -> bool:
        if total is not None and rate <= 0:   # closed loop: each RM stops by itself
            return acked >= total
        return not sending and acked >= result.messages_sent

    for client in clients:
        client.on_ack = on_ack

    async def report() -> None:
        while progress is not None:
            await asyncio.sleep(0.25)
            progress.update(task_id, completed=acked)

    reporter = loop.create_task(report())
    began = time.perf_counter()
    try:
        if rate > 0:
            # open loop: RM i sends message k at offset_i + k * interval; one pacing loop for
            # all RMs (a timer per RM and message would cost the bench more than the CEM)
            # (RM i's offset is below the interval, so round k, RMs by offset, is time order)
            interval = len(clients) / rate
            by_offset = sorted((random.random() * interval, client) for client in clients)
            k = 0
            while k < messages or duration_s:
                for offset, client in by_offset:
                    at = offset + k * interval
                    if duration_s and at >= duration_s:
                        break
                    delay = began + at - time.perf_counter()
                    if delay > 0.0005:
                        await asyncio.sleep(delay)
                    client.send_measurement(1000 + k, stamp.now())
                    result.messages_sent += 1
                else:
                    k += 1
                    continue
                break
        else:
            for client in clients:
                client.send_measurement(1000, stamp.now())
                result.messages_sent += 1
            if ends_at is not None:
                await asyncio.sleep(max(0.0, ends_at - time.perf_counter()))
        sending = False
        if all_in() and not all_acked.done():
            all_acked.set_result(None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(all_acked), 60)
    finally:
        reporter.cancel()
        for client in clients:
            client.on_ack = None
    phase = time.perf_counter() - began
    latencies = sorted(x for c in clients for x in c.latencies)
    result.latency_p99_ms_by_second = _p99_by_second(clients, began, phase)
    result.message_phase_s = round(phase, 3)
    result.messages_acknowledged = len(latencies)
    result.not_ok = sum(c.not_ok for c in clients)
    result.acknowledged_per_s = round(len(latencies) / max(phase, 1e-9), 1)
    if latencies:
        result.latency_p50_ms = round(statistics.median(latencies) * 1000, 2)
        result.latency_p99_ms = round(latencies[min(len(latencies) - 1,
                                                    int(0.99 * len(latencies)))] * 1000, 2)
        result.latency_max_ms = round(latencies[-1] * 1000, 2)
    if progress is not None:
        progress.update(task_id, completed=len(latencies))


def _p99_by_second(clients: list[BenchRm], began: float, phase: float) -> list[float | None]:
    """The p99 latency (ms) of the measurements sent in each second from `began`."""
    seconds: list[list[float]] = [[] for _ in range(max(1, math.ceil(phase)))]
    for client in clients:
        for sent, latency in zip(client.sent, client.latencies, strict=True):
            seconds[min(len(seconds) - 1, max(0, int(sent - began)))].append(latency)
    p99s: list[float | None] = []
    for latencies in seconds:
        latencies.sort()
        p99s.append(round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
                          2) if latencies else None)
    return p99s


def bench_command(rms: int, messages: int, json_out: bool, rate: float = 5000.0,
                  http: bool = False, cem_src: Path | None = None, rounds: int = 1,
                  busy_core: bool = False, profile: Path | None = None,
                  duration_s: float | None = None, sample_every_s: float = 10.0,
                  floor: bool = False, measurement_log_interval_s: float | None = None,
                  read_batch_ms: float | None = None) -> None:
    """Run the S2 benchmark and print the figures (one JSON object with --json).

    `measurement_log_interval_s`: the CEM's `store.measurement_log_interval_s` (every CEM
    run, a baseline's too; None: the CEM's default).

    `floor`: `rounds` times, the floor server (`cem.app.s2_floor`) and then the CEM, on the
    same event loop and clients, and report both and what the CEM costs above the floor.

    `http`: run it twice in a row, the CEM without and then with its dashboard served and one
    page open, and report both and the difference. `cem_src`: `rounds` times, the CEM of that
    checkout (the baseline) and then this one's, and report both. `busy_core`: a CPU-bound
    process beside the CEM in every message phase. `duration_s`: a soak, the RMs send at
    `rate` for that long and the CEM's memory is sampled every `sample_every_s` seconds."""
    from rich.console import Console

    console = Console(stderr=True)
    if rms < 1 or messages < 0 or rounds < 1:
        console.print("[bold red]error:[/] --rms and --rounds must be at least 1 and "
                      "--messages at least 0")
        raise SystemExit(2)
    if duration_s is not None and (duration_s <= 0 or sample_every_s <= 0):
        console.print("[bold red]error:[/] --duration and --sample-every must be above 0")
        raise SystemExit(2)
    if duration_s is not None and (cem_src is not None or http):
        console.print("[bold red]error:[/] --duration runs one CEM: not with --cem-src or "
                      "--http")
        raise SystemExit(2)
    if floor and (cem_src is not None or http or duration_s is not None):
        console.print("[bold red]error:[/] --floor compares the CEM with the floor server: "
                      "not with --cem-src, --http or --duration")
        raise SystemExit(2)
    extra: dict[str, Any] = {} if measurement_log_interval_s is None else {
        "measurement_log_interval_s": measurement_log_interval_s}
    if read_batch_ms is not None:
        extra["read_batch_ms"] = read_batch_ms
    if floor:
        _compare_floor(rms, messages, rate, rounds, busy_core, json_out, **extra)
        return
    if cem_src is not None:
        if not (cem_src / "cem" / "app" / "cli.py").is_file():
            console.print(f"[bold red]error:[/] --cem-src {cem_src}: not a checkout of this "
                          "project (no cem/app/cli.py in it)", soft_wrap=True)
            raise SystemExit(2)
        _compare_src(rms, messages, rate, cem_src.resolve(), rounds, busy_core, json_out,
                     **extra)
        return
    if http:
        _compare_http(rms, messages, rate, json_out, console, **extra)
        return
    if json_out:
        result = asyncio.run(run_bench(rms=rms, messages=messages, rate=rate, **extra,
                                       busy_core=busy_core, profile=profile,
                                       duration_s=duration_s, sample_every_s=sample_every_s))
        print(json.dumps(asdict(result)))
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        result = asyncio.run(run_bench(rms=rms, messages=messages, rate=rate, **extra,
                                       progress=progress, busy_core=busy_core,
                                       profile=profile, duration_s=duration_s,
                                       sample_every_s=sample_every_s))
    table = Table(title=f"S2 server: {result.rms_connected}/{rms} RMs, "
                        + (f"sending for {duration_s:g} s" if duration_s
                           else f"{messages} PowerMeasurements each"))
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("connect + handshake, all RMs", f"{result.connect_s:.2f} s "
                                         f"({result.handshakes_per_s:.0f}/s)"),
        ("target rate", f"{rate:.0f} msg/s" if rate else "as fast as acknowledged"),
        ("acknowledged", f"{result.messages_acknowledged}/{result.messages_sent} "
                         f"({result.not_ok} not OK)"),
        ("messages/s acknowledged", f"{result.acknowledged_per_s:.0f}"),
        ("ReceptionStatus latency p50", _ms(result.latency_p50_ms)),
        ("ReceptionStatus latency p99", _ms(result.latency_p99_ms)),
        ("ReceptionStatus latency max", _ms(result.latency_max_ms)),
        ("  p99 by second sent", ", ".join(_ms(p) for p in result.latency_p99_ms_by_second)),
        ("CEM CPU share by second", ", ".join(f"{x:.2f}" for x in result.cem_cpu_share_by_second)),
        ("CEM peak memory (VmHWM)", f"{result.cem_peak_rss_mb:.0f} MB"
         if result.cem_peak_rss_mb else "-"),
        ("CEM memory per connected RM", f"{result.cem_kb_per_rm:.0f} kB"
         if result.cem_kb_per_rm is not None else "-"),
        ("  of it before any measurement", f"{result.cem_kb_per_rm_connected:.0f} kB"
         if result.cem_kb_per_rm_connected is not None else "-"),
        ("CEM CPU in message phase", f"{result.cem_cpu_s_message_phase} s"
                                     + (f" ({result.cem_cpu_us_per_message:.0f} us/message, "
                                        f"{result.cem_cpu_system_us_per_message:.0f} in the "
                                        "kernel)" if result.cem_cpu_us_per_message
                                        and result.cem_cpu_system_us_per_message is not None
                                        else "")),
        ("messages in the store", str(result.stored_messages)),
        *([("soak: VmRSS growth after warm-up", f"{result.rss_growth_kb_per_rm} kB per RM, "
                                                f"{result.rss_growth_kb_per_min} kB/min")]
          if result.soak_s else []),
        ("CEM exit on SIGTERM", f"{result.cem_exit_code} after {result.cem_shutdown_s} s"),
        ("machine", f"{result.cpu_count} CPUs, load {result.load_average_1m:.1f}"
                    + (", one core kept busy" if busy_core else "")),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    Console().print(f"[dim]clients: {CLIENT_KIND}[/]")
    for error in result.errors:
        console.print(f"[yellow]warning:[/] {error}")


_COMPARED = ("acknowledged_per_s", "latency_p50_ms", "latency_p99_ms", "cem_cpu_us_per_message",
             "cem_cpu_system_us_per_message", "cem_peak_rss_mb", "cem_kb_per_rm",
             "cem_kb_per_rm_connected")


def _alternate(rounds: int, sides: dict[str, dict[str, Any]], **common: Any
               ) -> tuple[dict[str, list[BenchResult]], dict[str, dict[str, float | None]]]:
    """The bench `rounds` times, each side (its own `run_bench` arguments) in turn, so all
    see the same machine state; the runs and each figure's median per side."""
    runs: dict[str, list[BenchResult]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, kwargs in sides.items():
            runs[side].append(asyncio.run(run_bench(**common, **kwargs)))
    medians = {side: {name: _median([getattr(r, name) for r in results])
                      for name in _COMPARED} for side, results in runs.items()}
    return runs, medians


def _print_sides(title: str, columns: dict[str, str], medians: dict[str, dict[str, Any]],
                 runs: dict[str, list[BenchResult]], summary: str) -> None:
    """The medians side by side (`columns`: side -> heading), a summary line, any warnings."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    for heading in columns.values():
        table.add_column(heading, justify="right")
    for name in _COMPARED:
        table.add_row(name, *(str(medians[side][name]) for side in columns))
    Console().print(table)
    Console().print(summary)
    for results in runs.values():
        for result in results:
            for error in result.errors:
                Console(stderr=True).print(f"[yellow]warning:[/] {error}")


def _title(rms: int, messages: int, rate: float, rounds: int, busy_core: bool) -> str:
    return (f"{rms} RMs x {messages} messages at "
            + (f"{rate:.0f}/s" if rate else "full speed")
            + f", median of {rounds} round(s)" + (", one core kept busy" if busy_core else ""))


def _compare_src(rms: int, messages: int, rate: float, cem_src: Path, rounds: int,
                 busy_core: bool, json_out: bool, **extra: Any) -> None:
    """The bench `rounds` times with the baseline CEM (`cem_src`) and then this checkout's,
    alternating, so both see the same machine state; each figure's median per side."""
    runs, medians = _alternate(rounds, {"baseline": {"cem_src": cem_src}, "this": {}},
                               rms=rms, messages=messages, rate=rate, busy_core=busy_core,
                               **extra)
    base_cpu = medians["baseline"]["cem_cpu_us_per_message"]
    this_cpu = medians["this"]["cem_cpu_us_per_message"]
    report = {"baseline_src": str(cem_src), "rounds": rounds, "busy_core": busy_core,
              "median": medians,
              "cpu_per_message_ratio": round(this_cpu / base_cpu, 3)
              if base_cpu and this_cpu else None,
              "baseline": [asdict(r) for r in runs["baseline"]],
              "this": [asdict(r) for r in runs["this"]]}
    if json_out:
        print(json.dumps(report))
        return
    _print_sides(f"S2 server: {_title(rms, messages, rate, rounds, busy_core)}",
                 {"baseline": f"baseline ({cem_src})", "this": "this checkout"}, medians, runs,
                 f"CPU per message, this / baseline: {report['cpu_per_message_ratio']}")


def _compare_floor(rms: int, messages: int, rate: float, rounds: int, busy_core: bool,
                   json_out: bool, **extra: Any) -> None:
    """The bench `rounds` times against the floor server and then the CEM, alternating; each
    figure's median per side, and the CEM's CPU per message above the floor's."""
    runs, medians = _alternate(rounds, {"floor": {"floor": True}, "cem": {}},
                               rms=rms, messages=messages, rate=rate, busy_core=busy_core,
                               **extra)
    floor_cpu = medians["floor"]["cem_cpu_us_per_message"]
    cem_cpu = medians["cem"]["cem_cpu_us_per_message"]
    report = {"event_loop": _event_loop_name(), "rounds": rounds, "busy_core": busy_core,
              "median": medians,
              "floor_cpu_us_per_message": floor_cpu,
              "cem_cpu_us_per_message": cem_cpu,
              "cem_cpu_us_over_floor": round(cem_cpu - floor_cpu, 1)
              if floor_cpu is not None and cem_cpu is not None else None,
              "floor": [asdict(r) for r in runs["floor"]],
              "cem": [asdict(r) for r in runs["cem"]]}
    if json_out:
        print(json.dumps(report))
        return
    _print_sides(f"S2 server against its floor ({report['event_loop']} event loop): "
                 + _title(rms, messages, rate, rounds, busy_core),
                 {"floor": "floor (answers only)", "cem": "cem run"}, medians, runs,
                 f"CEM CPU per message above the floor: {report['cem_cpu_us_over_floor']} us")


def _median(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


def _compare_http(rms: int, messages: int, rate: float, json_out: bool, console: Any,
                  **extra: Any) -> None:
    """The S2 bench without and with the dashboard, in one run (the same machine load)."""
    without = asyncio.run(run_bench(rms=rms, messages=messages, rate=rate, http=False, **extra))
    with_page = asyncio.run(run_bench(rms=rms, messages=messages, rate=rate, http=True,
                                      **extra))
    added = None
    if without.cem_cpu_share_message_phase is not None and \
            with_page.cem_cpu_share_message_phase is not None:
        added = round((with_page.cem_cpu_share_message_phase
                       - without.cem_cpu_share_message_phase) * 100, 2)
    relative = None
    if without.cem_cpu_us_per_message and with_page.cem_cpu_us_per_message:
        relative = round((with_page.cem_cpu_us_per_message / without.cem_cpu_us_per_message
                          - 1) * 100, 1)
    report = {"without_http": asdict(without), "with_http": asdict(with_page),
              "cpu_added_percent_of_a_core": added, "cpu_per_message_added_percent": relative,
              "latency_p99_ms": [without.latency_p99_ms, with_page.latency_p99_ms]}
    if json_out:
        print(json.dumps(report))
        return
    from rich.table import Table

    table = Table(title=f"S2 server with and without the dashboard: {rms} RMs x {messages} "
                        f"messages at {rate:.0f}/s")
    table.add_column("figure")
    table.add_column("without", justify="right")
    table.add_column("with page open", justify="right")
    for name, a, b in (
            ("acknowledged / s", without.acknowledged_per_s, with_page.acknowledged_per_s),
            ("ReceptionStatus p50", _ms(without.latency_p50_ms), _ms(with_page.latency_p50_ms)),
            ("ReceptionStatus p99", _ms(without.latency_p99_ms), _ms(with_page.latency_p99_ms)),
            ("CEM CPU (share of a core)", without.cem_cpu_share_message_phase,
             with_page.cem_cpu_share_message_phase),
            ("CEM CPU per message", f"{without.cem_cpu_us_per_message} us",
             f"{with_page.cem_cpu_us_per_message} us"),
            ("dashboard events / reads", "-",
             f"{with_page.dashboard_events} / {with_page.dashboard_reads}")):
        table.add_row(name, str(a), str(b))
    from rich.console import Console

    Console().print(table)
    Console().print(f"CPU added by the dashboard: {added} % of a core ({relative} % per message)")
    for error in without.errors + with_page.errors:
        console.print(f"[yellow]warning:[/] {error}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"
