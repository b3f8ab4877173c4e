"""The parts `cem run` supervises (`cem.app.supervisor.Part`), and which a site file asks for.

- `CemPart` ("cem", critical): the core: store, S2 server, control loop (`CemService`);
- `SignalsPart` ("signals"): the grid-signal sources (`cem.signals`), publishing to the loop;
- `S2ConnectPart` ("s2connect"): the S2 Connect pairing API and wss listener, when enabled;
- `OcppPart` ("ocpp"): the OCPP central system with one S2 RM per EVSE, when `[ocpp]` is set;
- `ModbusPart` ("modbus <name>"): one Modbus TCP device as an S2 RM per `[[modbus.devices]]`.

The RM parts talk S2 to the core over its real websocket, as they would from another host (`cem
run --only ocpp|modbus --cem URL`, or `cem rm ...`). When the S2 server asks for bearer tokens,
`cem run` adds one for its own in-process RMs (never written anywhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
import socket
from collections.abc import Callable
from typing import Any

from cem.app.service import CemService, ControllerFactory, ServiceError
from cem.app.site_file import SiteFile
from cem.app.supervisor import BasePart, Health, Part, TaskPart
from cem.site.config import RmToken
from resource_managers.modbus.config import ModbusDevice
from resource_managers.ocpp_charger.config import OcppRmConfig
from sitekit.lock import LockHeld
from sitekit.net import bind_tcp

ONLY = ("cem", "ocpp", "modbus")


class CemPart(BasePart):
    """The CEM core. Critical: every other part talks to it, so it is not restarted in
    process; its failure stops `cem run` (exit 1) for the init system to restart."""

    name = "cem"
    kind = "cem"
    critical = True

    def __init__(self, service: CemService) -> None:
        self.service = service

    async def bind(self) -> None:
        await self.service.bind()

    async def start(self) -> None:
        await self.service.start()

    async def stop(self) -> None:
        await self.service.stop()

    async def wait(self) -> None:
        await self.service.wait_failed()

    def health(self) -> Health:
        server = self.service.server
        if server is None:
            return Health(False, "not started")
        replans = getattr(self.service.controller, "replans", None)
        return Health(True, f"S2 on {server.url}, {len(server.rms())} RM(s) connected"
                            + (f", {replans} replan(s)" if replans is not None else ""))

    def url(self) -> str:
        """The S2 server's URL for RMs in this process (a wildcard address as loopback)."""
        server = self.service.server
        if server is None:
            raise RuntimeError("the CEM core is not running")
        return local_url(server.url)


def local_url(url: str) -> str:
    """ws://0.0.0.0:8765 -> ws://127.0.0.1:8765 (and [::] -> [::1]): where this host connects."""
    return url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")


class SignalsPart(TaskPart):
    """The grid-signal sources, each publishing to the control loop; one that fails or ends
    takes the part down and the supervisor restarts them (they keep their own state)."""

    def __init__(self, service: CemService) -> None:
        super().__init__("signals", "signals")
        self.service = service

    def _publish(self, update: Any) -> None:
        controller = self.service.controller
        if controller is not None and hasattr(controller, "publish"):
            controller.publish(update)

    async def main(self) -> None:
        sources = list(self.service.signals)
        if not sources:
            await asyncio.Event().wait()
        runs = [asyncio.create_task(s.run(self._publish), name=f"signal-{s.name}")
                for s in sources]
        try:
            done, _ = await asyncio.wait(runs, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the source's error
            ended = next(s.name for s, t in zip(sources, runs, strict=True) if t in done)
            raise RuntimeError(f"grid-signal source {ended} ended")
        finally:
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

    def health(self) -> Health:
        states = [s.state() for s in self.service.signals]
        if not states:
            return Health(True, "no grid-signal sources configured")
        bad = [st for st in states if not st.ok]
        text = "; ".join(f"{st.name}: {st.detail or ('ok' if st.ok else 'not ok')}"
                         for st in (bad or states))
        return Health(not bad, text)


class S2ConnectPart(BasePart):
    """S2 Connect's HTTPS pairing API and wss listener (on the core's store and S2 server)."""

    name = "s2connect"
    kind = "s2connect"

    def __init__(self, service: CemService) -> None:
        self.service = service
        self._held: list[socket.socket] = []

    async def bind(self) -> None:
        """Make sure both ports are free before the core opens its store (they are bound for
        good by `start`, an instant later)."""
        s2c = self.service.config.s2connect
        for port in (s2c.port, s2c.websocket_port):
            if port == 0:
                continue
            try:
                self._held.append(bind_tcp(s2c.host, port))
            except OSError as exc:
                self._release()
                if exc.errno == errno.EADDRINUSE:
                    raise ServiceError(f"cannot listen for S2 Connect on {s2c.host}:{port}: the "
                                       "address is already in use") from exc
                raise ServiceError(f"cannot listen for S2 Connect on {s2c.host}:{port}: "
                                   f"{exc.strerror or exc}") from exc

    def _release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held = []

    async def start(self) -> None:
        self._release()
        await self.service.start_s2connect()

    async def stop(self) -> None:
        self._release()
        await self.service.stop_s2connect()

    def health(self) -> Health:
        edge = self.service.s2connect
        if edge is None:
            return Health(False, "not started")
        return Health(True, f"pairing URL {edge.pairing_url}")


class OcppPart(BasePart):
    """The OCPP central system; each EVSE is an S2 RM of the CEM at `cem_url()`."""

    name = "ocpp"
    kind = "ocpp"

    def __init__(self, config: OcppRmConfig, cem_url: Callable[[], str],
                 token: str | None = None) -> None:
        self.config = config
        self.cem_url = cem_url
        self.token = token
        self.csms: Any = None

    async def bind(self) -> None:
        from resource_managers.ocpp_charger.csms import OcppCentralSystem

        if self.csms is None:
            self.csms = OcppCentralSystem(self.config, None, token=self.token)
            self.csms.lock_command = "cem run (its OCPP central system)"
        ocpp = self.config.ocpp
        try:
            await self.csms.bind()
        except LockHeld as exc:
            self.csms = None
            raise ServiceError(str(exc)) from exc
        except OSError as exc:  # ssl.SSLError too
            self.csms = None
            if exc.errno == errno.EADDRINUSE:
                raise ServiceError(f"cannot listen for chargers on {ocpp.host}:{ocpp.port}: the "
                                   "address is already in use (another central system "
                                   "running?)") from exc
            raise ServiceError(f"cannot start the OCPP central system on {ocpp.host}:"
                               f"{ocpp.port}: {exc.strerror or exc}") from exc

    async def start(self) -> None:
        await self.bind()
        self.csms.cem_url = self.cem_url()
        await self.csms.start()

    async def stop(self) -> None:
        csms, self.csms = self.csms, None
        if csms is not None:
            await csms.stop()

    def health(self) -> Health:
        csms = self.csms
        if csms is None:
            return Health(False, "not started")
        online = sum(1 for link in csms.links.values() if link is not None)
        sessions = sum(1 for e in csms.evses.values() if e.session is not None)
        return Health(True, f"chargers on {csms.scheme}://{csms.host}:{csms.port}: {online} "
                            f"online, {sessions} charging session(s)")


class ModbusPart(TaskPart):
    """One Modbus TCP device as an S2 RM. The RM retries the device itself (with back-off,
    its flexibility withdrawn meanwhile); the part is then up but not healthy."""

    def __init__(self, device: ModbusDevice, cem_url: Callable[[], str],
                 token: str | None = None) -> None:
        super().__init__(f"modbus {device.name}", "modbus")
        self.device = device
        self.cem_url = cem_url
        self.token = token
        self.rm: Any = None
        self._stop: asyncio.Event | None = None

    async def bind(self) -> None:
        from resource_managers.modbus.register_map import RegisterMapError, load_register_map

        try:
            regmap = load_register_map(self.device.map)
        except RegisterMapError as exc:
            raise ServiceError(str(exc)) from exc
        if regmap.device_class != self.device.device:
            raise ServiceError(f"{self.device.map} is a register map for a "
                               f"'{regmap.device_class}', not a '{self.device.device}'")
        self._regmap = regmap

    async def main(self) -> None:
        from resource_managers.modbus.rm import resource_manager_for

        d = self.device
        self.rm = resource_manager_for(self._regmap, cem_url=self.cem_url(), host=d.host,
                                       port=d.port, device_id=d.device_id, token=self.token,
                                       name=d.name)
        self._stop = asyncio.Event()
        await self.rm.run(self._stop)
        if not self._stop.is_set():
            raise RuntimeError("the RM stopped by itself")

    async def start(self) -> None:
        if not hasattr(self, "_regmap"):
            await self.bind()
        await super().start()

    async def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        task = self._task
        if task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 10)
        await super().stop()

    def health(self) -> Health:
        rm, d = self.rm, self.device
        where = f"{d.device} at {d.host}:{d.port}/{d.device_id}"
        if rm is None:
            return Health(False, f"{where}: not started")
        if not rm.device_ok:
            return Health(False, f"{where}: {rm.fault}; retrying with back-off")
        if not rm.s2.connected.is_set():
            return Health(False, f"{where} answers; waiting for the CEM's S2 session")
        return Health(True, f"{where} answers, S2 session up")


def site_parts(config: SiteFile, *, only: str | None = None, cem_url: str | None = None,
               token: str | None = None,
               controller_factory: ControllerFactory | None = None) -> list[Part]:
    """The parts the site file asks for: the core (with its signal sources and S2 Connect),
    the OCPP central system if the file has `[ocpp]`, one RM per `[[modbus.devices]]`.

    `only` runs one group alone ("cem", "ocpp" or "modbus"); RMs without the core connect to
    `cem_url` (default: the file's `[server]`). Raises ServiceError for an impossible choice.
    """
    if only is not None and only not in ONLY:
        raise ServiceError(f"--only {only!r}: use one of {', '.join(ONLY)}")
    has_ocpp = "ocpp" in config.model_fields_set
    devices = list(config.modbus.devices)
    if only == "ocpp" and not has_ocpp:
        raise ServiceError("--only ocpp: the site file has no [ocpp] section")
    if only == "modbus" and not devices:
        raise ServiceError("--only modbus: the site file has no [[modbus.devices]]")
    parts: list[Part] = []
    url: Callable[[], str]
    if only in (None, "cem"):
        if cem_url is not None:
            raise ServiceError("--cem is for RMs run without the CEM (--only ocpp or modbus)")
        rms_here = only is None and (has_ocpp or bool(devices))
        if rms_here and config.server.tokens and token is None:
            token = secrets.token_urlsafe(32)  # for our own RMs; accepted for this run only
            config.server.tokens.append(RmToken(name="cem run's own RMs", token=token))
        service = CemService(config, controller_factory=controller_factory, supervised=True)
        core = CemPart(service)
        parts += [core, SignalsPart(service)]
        if config.s2connect.enabled:
            parts.append(S2ConnectPart(service))
        url = core.url
    else:
        server = config.server
        fixed = cem_url or local_url(f"{'wss' if server.tls_cert else 'ws'}://"
                                     f"{_bracket(server.host)}:{server.port}")
        if not fixed.startswith(("ws://", "wss://")):
            raise ServiceError(f"--cem {fixed!r} is not a websocket URL (ws://host:port)")

        def url() -> str:
            return fixed
    if only in (None, "ocpp") and has_ocpp:
        parts.append(OcppPart(config.ocpp_rm(), url, token))
    if only in (None, "modbus"):
        parts += [ModbusPart(device, url, token) for device in devices]
    return parts


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
