"""The HTTP server of `cem run` and `cem demo`: uvicorn in the CEM's own event loop.

`WebServer.start()` binds the socket itself first, so a busy port is a `ServiceError` with a
clear message before anything is served; then uvicorn serves the app as a task of the same
loop (no thread: the page reads the control loop's objects directly). Uvicorn's own signal
handling is switched off: SIGINT/SIGTERM stay with `cem run`, which stops this server as one
of its parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from cem.app.web.api import create_app
from cem.app.web.view import SiteView
from sitekit.net import bind_tcp

logger = logging.getLogger("cem.web")


class WebServerError(Exception):
    """The server cannot start; the message says why and what to do."""


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers (the CEM owns SIGINT and SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    """Page, API, SSE, /metrics and /healthz for one running CEM."""

    def __init__(self, config: Any, server: Any, store: Any, controller: Any, *,
                 sock: socket.socket | None = None) -> None:
        self.config = config
        self.view = SiteView(config, server, store, controller)
        self.app = create_app(self.view)
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = sock  # bound already (`bind_socket`), or in start()

    @property
    def port(self) -> int:
        assert self._socket is not None, "start() first"
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.http.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        """Bind, start the view, serve. Raises WebServerError (port in use, bad host)."""
        http = self.config.http
        if self._socket is None:
            self._socket = bind_socket(http.host, http.port)
        await self.view.start()
        # log_config None: uvicorn's own dictConfig would close every logging handler the
        # process has (the demo's log file stopped at that line)
        config = uvicorn.Config(self.app, lifespan="off", log_config=None,
                                log_level="warning", access_log=False,
                                timeout_graceful_shutdown=3, server_header=False,
                                proxy_headers=False)
        self._server = _QuietServer(config)
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._socket]), name="cem-http")
        for _ in range(200):
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            await self._task  # raises what stopped it

    async def stop(self) -> None:
        """Close the SSE streams, stop serving, release the port."""
        await self.view.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 6)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception:
                logger.exception("the HTTP server did not stop cleanly")
        if self._socket is not None:
            self._socket.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket for the dashboard; WebServerError when the port is taken."""
    try:
        return bind_tcp(host, port, backlog=128)
    except OSError as exc:
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise WebServerError(
                f"cannot serve the dashboard on {where}: the address is already in use; "
                "choose another [http] port in the site config (or enabled = false)") from exc
        raise WebServerError(f"cannot serve the dashboard on {where}: "
                             f"{exc.strerror or exc}") from exc
