"""`cem run`: the CEM as a long-running service, and the whole site as supervised parts.

`CemService` is the CEM core: it owns the store, the S2 server and the control loop and their
order. `bind()` takes the store's lock (`sitekit.lock`: a second CEM on the same store stops
here and changes nothing) and the S2 port, before anything is opened or recovered; `start()`
opens (and recovers) the store, serves S2 on the bound socket and starts the controller; `stop()`
goes in reverse (controller, then the server closes every session with code 1001 "CEM shutting
down", then the store flushes and closes, then the lock is released).

`cem run` runs it as the critical part of the whole site (`cem.app.run`).

The control loop (`cem.control`) plugs in with one call: pass a factory to `CemService(...,
controller_factory=...)` (`cem run` passes `cem.control.mpc.site_controller_for`) or call
`service.attach_controller(controller)` before `start()`.
A controller is any object with `async start()` and `async stop()`; it gets the session
registry (`service.server`: sessions(), send_instruction(), subscribe()), the store and the
grid-signal sources the config asks for (`service.signals`, from `cem.signals`). Under the
supervisor (`supervised=True`) the sources and S2 Connect are parts of their own, so the
controller does not run the sources itself and the service does not start S2 Connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import resource
import socket
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cem.site.config import SiteConfig
from sitekit.lock import InstanceLock, LockHeld
from sitekit.net import bind_tcp

logger = logging.getLogger("cem")
T = TypeVar("T")


class Controller(Protocol):
    """What the service needs from a control loop."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ControllerFactory = Callable[["CemService"], Controller]


class ServiceError(Exception):
    """A problem the operator can fix; the message says what and how."""


class CemService:
    """Store + S2 server (+ controller), started and stopped in the right order."""

    def __init__(self, config: SiteConfig, *,
                 controller_factory: ControllerFactory | None = None,
                 supervised: bool = False) -> None:
        self.config = config
        self._controller_factory = controller_factory
        self.supervised = supervised
        self.controller: Controller | None = None
        self.store: Any = None  # set in start(): cem.store.Store
        self.server: Any = None  # set in start(): cem.s2.server.S2Server
        self.s2connect: Any = None  # cem.app.s2connect_api.S2ConnectEdge when enabled
        self.signals: list[Any] = []  # grid-signal sources (cem.signals), built in start()
        self.web: Any = None  # the dashboard / API / metrics (cem.app.web), when [http] enabled
        self.lock: InstanceLock | None = None
        self._socket: socket.socket | None = None
        self._web_socket: Any = None
        self._started = False

    def attach_controller(self, controller: Controller) -> None:
        """Plug in the control loop (before start()); it is started after the server."""
        self.controller = controller

    async def bind(self) -> None:
        """Take the store's lock, check the TLS files and bind the S2 port; nothing is opened
        or written yet. Raises ServiceError (then nothing is held)."""
        cfg = self.config
        if self.lock is None and str(cfg.store.path) != ":memory:":
            lock = InstanceLock(Path(cfg.store.path), command="cem run")
            try:
                lock.acquire()
            except LockHeld as exc:
                raise ServiceError(str(exc)) from exc
            except OSError as exc:
                raise ServiceError(f"cannot lock the store {cfg.store.path}: "
                                   f"{exc.strerror or exc}") from exc
            self.lock = lock
        try:
            cfg.server.tls_context()
        except (ssl.SSLError, OSError) as exc:
            self._unbind()
            raise ServiceError(
                f"cannot use the TLS certificate {cfg.server.tls_cert} with key "
                f"{cfg.server.tls_key}: {exc} (both must be PEM files, the key matching the "
                "certificate)",
            ) from exc
        if cfg.http.enabled and self._web_socket is None:  # a busy port changes nothing
            from cem.app.web.server import WebServerError, bind_socket

            try:
                self._web_socket = bind_socket(cfg.http.host, cfg.http.port)
            except WebServerError as exc:
                self._unbind()
                raise ServiceError(str(exc)) from exc
        if self._socket is None:
            try:
                self._socket = bind_tcp(cfg.server.host, cfg.server.port)
            except OSError as exc:
                self._unbind()
                where = f"{cfg.server.host}:{cfg.server.port}"
                if exc.errno == errno.EADDRINUSE:
                    raise ServiceError(
                        f"cannot listen on {where}: the address is already in use (another "
                        "CEM running?); stop it or choose another port with --port") from exc
                raise ServiceError(f"cannot listen on {where}: {exc.strerror or exc}") from exc

    def _unbind(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._web_socket is not None:
            self._web_socket.close()
            self._web_socket = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    async def start(self) -> None:
        """Open the store, listen for RMs, start the controller. Raises ServiceError."""
        from cem.s2.server import S2Server
        from cem.store import Store

        cfg = self.config
        await self.bind()
        try:
            self.store = await Store.open(
                cfg.store.path, retention_days=cfg.store.retention_days, for_cem=True,
                measurement_log_interval_s=cfg.store.measurement_log_interval_s)
        except Exception as exc:
            self._unbind()
            raise ServiceError(f"cannot open the store {cfg.store.path}: {exc}") from exc
        plain_closed = cfg.s2connect.enabled and not cfg.s2connect.plain_mode
        self.server = S2Server(cfg, self.store, authorizer=_plain_closed() if plain_closed else None)
        sock, self._socket = self._socket, None
        try:
            await self.server.start(sock=sock)
        except OSError as exc:
            await self.store.close()
            self._unbind()
            where = f"{cfg.server.host}:{cfg.server.port}"
            raise ServiceError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
        # said as soon as it is true: RMs waiting in the bound socket's backlog come in now
        logger.info("S2 CEM listening on %s (%s)", self.server.url,
                    self.server.authorizer.describe)
        logger.info("store: %s (messages kept %d days; an RM's measurements logged %s)",
                    cfg.store.path, cfg.store.retention_days,
                    f"at most once per {cfg.store.measurement_log_interval_s:g} s"
                    if cfg.store.measurement_log_interval_s > 0 else "every one")
        if cfg.s2connect.enabled and not self.supervised:
            await self.start_s2connect()
        if not self.signals:
            try:
                self.signals = self.signal_sources()
            except Exception as exc:
                await self.server.stop("CEM could not start")
                await self.store.close()
                self._unbind()
                raise ServiceError(f"cannot set up the grid signals: {exc}") from exc
        if self.controller is None and self._controller_factory is not None:
            self.controller = self._controller_factory(self)
        if self.controller is not None:
            if self.supervised and hasattr(self.controller, "run_sources"):
                self.controller.run_sources = False  # the supervisor runs them as parts
            await self.controller.start()
        web_socket, self._web_socket = self._web_socket, None
        if web_socket is not None:
            await self._start_web(web_socket)
        self._started = True

    async def start_s2connect(self) -> None:
        """S2 Connect's HTTPS API and wss listener (cem/app/s2connect_api.py)."""
        from cem.app.s2connect_api import start_s2connect

        s2c = self.config.s2connect
        try:
            self.s2connect = await start_s2connect(self.config, self.store, self.server)
        except Exception as exc:
            if not self.supervised:
                await self.server.stop()
                await self.store.close()
                self._unbind()
            if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
                raise ServiceError(f"cannot listen for S2 Connect on {s2c.host}:{s2c.port} or "
                                   f"{s2c.websocket_port}: the address is already in use") from exc
            raise ServiceError(f"cannot start S2 Connect: {exc}") from exc

    async def _start_web(self, sock: Any) -> None:
        from cem.app.web.server import WebServer, WebServerError

        self.web = WebServer(self.config, self.server, self.store, self.controller, sock=sock)
        try:
            await self.web.start()
        except WebServerError as exc:
            self.web = None
            await self.stop("CEM could not start")
            raise ServiceError(str(exc)) from exc
        logger.info("dashboard and API on %s (API described at %sdocs)", self.web.url,
                    self.web.url)

    async def stop_s2connect(self) -> None:
        if self.s2connect is not None:
            try:
                await self.s2connect.stop()
            except Exception:
                logger.exception("S2 Connect did not stop cleanly")
            self.s2connect = None

    def signal_sources(self) -> list[Any]:
        """The grid-signal sources the config asks for (prices, congestion windows)."""
        from cem.signals import configured_sources

        return list(configured_sources(self.config, self.store))

    async def wait_failed(self) -> None:
        """Return (or raise its error) when the control loop ended without being stopped."""
        task: asyncio.Task[None] | None = getattr(self.controller, "task", None)
        if task is None:
            await asyncio.Event().wait()
            return
        await asyncio.shield(task)
        if self._started:
            raise RuntimeError("the control loop ended")

    async def stop(self, reason: str = "CEM shutting down") -> None:
        """Stop the controller, close every session with `reason`, flush and close the store."""
        if self.web is not None:
            await self.web.stop()
            self.web = None
        await self.stop_s2connect()
        if self.controller is not None:
            try:
                await self.controller.stop()
            except Exception:
                logger.exception("the controller did not stop cleanly")
        if self.server is not None:
            live = len(self.server.sessions())
            await self.server.stop(reason)
            if live:
                logger.info("closed %d RM session(s): %s", live, reason)
        if self.store is not None:
            await self.store.close()
            logger.info("store flushed and closed")
        self._unbind()
        self._started = False


def _plain_closed() -> Any:
    from cem.s2connect.service import PlainModeClosed

    return PlainModeClosed()


def raise_open_file_limit(wanted: int = 65536) -> int:
    """Every RM is a socket: lift the soft open-file limit towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def tune_garbage_collector() -> None:
    """Fewer, cheaper garbage collections for a process that keeps 1000 RM sessions.

    The CEM makes almost no cyclic garbage, so collections only cost time: with Python's
    default (a young collection every 700 allocations, full ones walking every object) they
    took ~0.8 s of CPU and paused the loop up to ~100 ms per 40 000 messages in
    `cem bench s2` (1000 RMs). Objects alive now (modules, schemas) are frozen, so full
    collections skip them, and young collections run every 5000 allocations: ~0.4 s, pauses
    up to ~30 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(5000, 5, 10)


async def tenure_long_lived(stop: asyncio.Event, every_s: float = 5.0,
                            reclaim_every: int = 720) -> None:
    """Freeze what has lived `every_s` (RM sessions, their states) out of full collections.

    A full collection walks every tracked object: with 1000 FRBC RM states alive it paused the
    event loop for 60-270 ms, longer than every ReceptionStatus should wait. Frozen objects are
    skipped; every `reclaim_every` rounds (an hour by default) they are thawed and collected
    once, so cycles left by closed sessions are still freed.
    """
    rounds = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        if stop.is_set():
            return
        rounds += 1
        if rounds % reclaim_every == 0:
            gc.unfreeze()
            freed = gc.collect()
            logger.debug("garbage collector: %d objects freed from closed sessions", freed)
        gc.freeze()


EVENT_LOOP_ENV = "CEM_EVENT_LOOP"
"""`uvloop` runs the CEM on uvloop (if installed); unset or `asyncio`: on asyncio's own event
loop (docs/adr/0010, round 2)."""


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop the CEM runs on: asyncio's own (None) unless `CEM_EVENT_LOOP=uvloop` and
    uvloop is installed. On a quiet machine uvloop gave the same CPU per S2 message and a
    higher p99 latency (docs/adr/0010, round 2); under heavy load it used less CPU."""
    wanted = os.environ.get(EVENT_LOOP_ENV, "asyncio").strip().lower()
    if wanted not in ("uvloop", "asyncio", ""):
        logger.warning("%s=%s: use uvloop or asyncio; running on asyncio's event loop",
                       EVENT_LOOP_ENV, wanted)
    if wanted != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        logger.warning("%s=uvloop but uvloop is not installed: running on asyncio's event loop",
                       EVENT_LOOP_ENV)
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_on_event_loop(main: Coroutine[Any, Any, T],
                      factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> T:
    """`asyncio.run(main)` on a loop made by `factory` (None: asyncio's default loop)."""
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def default_controller_factory() -> ControllerFactory | None:
    """The control loop (`cem.control.mpc.site_controller_for`), if it can be imported."""
    try:
        from cem.control.mpc import site_controller_for
    except ImportError as exc:
        logger.warning("running without the control loop (cannot import it: %s)", exc)
        return None
    return site_controller_for
