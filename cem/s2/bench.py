"""`cem bench s2`: how many RMs and messages the S2 server takes, and how fast it answers.

The CEM runs as it does in production: a `cem run` subprocess on a free port with a temporary
database (so its peak memory, VmHWM from /proc, is its own and not the bench's). The RMs are
lightweight raw websocket clients in this process that speak valid S2 JSON (s2-python's
`S2AsyncConnection` costs ~1 MB and several tasks per RM, which would make the *bench* the
bottleneck at 1000 RMs): each does the full handshake (Handshake, HandshakeResponse,
ResourceManagerDetails, SelectControlType, every message answered with a ReceptionStatus) and
then sends `messages` PowerMeasurements.

Messages are paced (open loop) at `rate` messages/s over all RMs, like a site whose RMs report
on their own clocks; latency is from sending a measurement to receiving its ReceptionStatus.
`rate=0` sends as fast as the CEM acknowledges (closed loop per RM: max throughput).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

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


def _field(text: str, name: str) -> str | None:
    marker = f'"{name}":"'
    at = text.find(marker)
    if at < 0:
        marker = f'"{name}": "'
        at = text.find(marker)
        if at < 0:
            return None
    start = at + len(marker)
    return text[start:text.find('"', start)]


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
    cem_peak_rss_mb: float | None = None
    cem_cpu_s_message_phase: float | None = None
    bench_cpu_s_message_phase: float | None = None
    cem_exit_code: int | None = None
    cem_shutdown_s: float | None = None
    stored_messages: int | None = None
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    load_average_1m: float = field(default_factory=lambda: os.getloadavg()[0])
    errors: list[str] = field(default_factory=list)


class BenchRm:
    """One raw S2 resource manager."""

    def __init__(self, number: int, url: str) -> None:
        self.number = number
        self.url = url
        self.resource_id = str(uuid.uuid4())
        self.ws: ClientConnection | None = None
        self.selected = asyncio.Event()
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.not_ok = 0
        self.acked = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.ws = await connect(self.url, ping_interval=None, compression=None, open_timeout=120,
                                max_queue=None, close_timeout=5)
        self.reader = asyncio.get_running_loop().create_task(self._read())
        await self.ws.send(_HANDSHAKE % uuid.uuid4())
        await self.selected.wait()

    async def _read(self) -> None:
        assert self.ws is not None
        ws = self.ws
        with contextlib.suppress(Exception):
            async for text in ws:
                assert isinstance(text, str)
                now = time.perf_counter()
                kind = _field(text, "message_type")
                if kind == "ReceptionStatus":
                    subject = _field(text, "subject_message_id")
                    began = self.sent_at.pop(subject or "", None)
                    if began is not None:
                        self.latencies.append(now - began)
                        if _field(text, "status") != "OK":
                            self.not_ok += 1
                        self.acked.set()
                    continue
                message_id = _field(text, "message_id")
                if message_id:
                    await ws.send(_STATUS % message_id)
                if kind == "HandshakeResponse":
                    await ws.send(_DETAILS % (uuid.uuid4(), self.resource_id, self.number,
                                              "FILL_RATE_BASED_CONTROL"))
                elif kind == "SelectControlType":
                    self.selected.set()

    async def send_measurement(self, value: int) -> None:
        assert self.ws is not None
        message_id = str(uuid.uuid4())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.acked.clear()
        self.sent_at[message_id] = time.perf_counter()
        await self.ws.send(_MEASUREMENT % (message_id, stamp, value))

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5)
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


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


def _proc_cpu_s(pid: int) -> float | None:
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CemProcess:
    """`cem run` as a subprocess on a free port with a temporary store."""

    def __init__(self, workdir: Path, reception_timeout_s: float = 30.0) -> None:
        self.port = _free_port()
        self.db = workdir / "bench.db"
        self.config = workdir / "bench-site.toml"
        self.log = workdir / "cem.log"
        self.config.write_text(
            "[site]\nname = \"bench site\"\n"
            f"[server]\nhost = \"127.0.0.1\"\nport = {self.port}\n"
            f"reception_status_timeout_s = {reception_timeout_s}\n"
            "ping_interval_s = 60\nping_timeout_s = 60\n"
            f"[store]\npath = \"{self.db}\"\n")
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 60.0) -> None:
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cem.cli", "run", "--config", str(self.config),
                "--log-level", "WARNING", stdout=log, stderr=subprocess.STDOUT)
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

    def cpu_s(self) -> float | None:
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
                    connect_concurrency: int = 200) -> BenchResult:
    """Run the benchmark against `url`, or against a fresh `cem run` subprocess if None."""
    raise_open_file_limit(max(4096, 2 * rms + 256))
    result = BenchResult(rms=rms, rms_connected=0, messages_per_rm=messages,
                         target_rate_per_s=rate or None)
    with tempfile.TemporaryDirectory(prefix="cem-bench-") as tmp:
        cem = CemProcess(Path(tmp)) if url is None else None
        if cem is not None:
            await cem.start()
            url = cem.url
        assert url is not None
        clients = [BenchRm(n, url) for n in range(rms)]
        try:
            await _connect_all(clients, result, progress, connect_concurrency)
            live = [c for c in clients if c.selected.is_set()]
            cpu_before = cem.cpu_s() if cem else None
            own_before = time.process_time()
            await _message_phase(live, messages, rate, result, progress)
            result.bench_cpu_s_message_phase = round(time.process_time() - own_before, 2)
            cpu_after = cem.cpu_s() if cem else None
            if cpu_before is not None and cpu_after is not None:
                result.cem_cpu_s_message_phase = round(cpu_after - cpu_before, 2)
        finally:
            if cem is not None:
                result.cem_peak_rss_mb = cem.peak_rss_mb()
            await asyncio.gather(*(c.close() for c in clients))
            if cem is not None:
                result.cem_exit_code, shutdown = await cem.stop()
                result.cem_shutdown_s = round(shutdown, 2)
                with contextlib.suppress(Exception):
                    import sqlite3
                    db = sqlite3.connect(cem.db)
                    result.stored_messages = db.execute(
                        "SELECT COUNT(*) FROM s2_messages").fetchone()[0]
                    db.close()
                if result.cem_exit_code != 0:
                    result.errors.append(f"cem run exited with {result.cem_exit_code}: "
                                         + cem.log.read_text()[-500:])
    return result


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
                         result: BenchResult, progress: Any) -> None:
    if not clients or messages <= 0:
        return
    total = len(clients) * messages
    task_id = progress.add_task("messages acknowledged", total=total) if progress else None
    interval = len(clients) / rate if rate > 0 else 0.0
    began = time.perf_counter()
    done_count = 0

    async def paced(client: BenchRm) -> None:
        nonlocal done_count
        start = began + random.random() * interval
        for k in range(messages):
            delay = start + k * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await client.send_measurement(1000 + k)
            result.messages_sent += 1
        deadline = time.perf_counter() + 60
        while client.sent_at and time.perf_counter() < deadline:
            client.acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.acked.wait(), 1.0)
        done_count += messages

    async def closed_loop(client: BenchRm) -> None:
        for k in range(messages):
            await client.send_measurement(1000 + k)
            result.messages_sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.acked.wait(), 30)
            if progress is not None:
                progress.advance(task_id)

    async def report() -> None:
        while progress is not None:
            await asyncio.sleep(0.25)
            acked = sum(len(c.latencies) for c in clients)
            progress.update(task_id, completed=acked)

    reporter = asyncio.get_running_loop().create_task(report())
    try:
        await asyncio.gather(*((paced if rate > 0 else closed_loop)(c) for c in clients))
    finally:
        reporter.cancel()
    phase = time.perf_counter() - began
    latencies = sorted(x for c in clients for x in c.latencies)
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


def bench_command(rms: int, messages: int, json_out: bool, rate: float = 5000.0) -> None:
    """Run the S2 benchmark and print the figures (one JSON object with --json)."""
    from rich.console import Console

    console = Console(stderr=True)
    if rms < 1 or messages < 0:
        console.print("[bold red]error:[/] --rms must be at least 1 and --messages at least 0")
        raise SystemExit(2)
    if json_out:
        result = asyncio.run(run_bench(rms=rms, messages=messages, rate=rate))
        print(json.dumps(asdict(result)))
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        result = asyncio.run(run_bench(rms=rms, messages=messages, rate=rate,
                                       progress=progress))
    table = Table(title=f"S2 server: {result.rms_connected}/{rms} RMs, "
                        f"{messages} PowerMeasurements each")
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
        ("CEM peak memory (VmHWM)", f"{result.cem_peak_rss_mb:.0f} MB"
         if result.cem_peak_rss_mb else "-"),
        ("CEM CPU in message phase", f"{result.cem_cpu_s_message_phase} s"),
        ("messages in the store", str(result.stored_messages)),
        ("CEM exit on SIGTERM", f"{result.cem_exit_code} after {result.cem_shutdown_s} s"),
        ("machine", f"{result.cpu_count} CPUs, load {result.load_average_1m:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    Console().print(f"[dim]clients: {CLIENT_KIND}[/]")
    for error in result.errors:
        console.print(f"[yellow]warning:[/] {error}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"
