"""The S2 client every resource manager shares: one S2 session to the CEM, reconnecting.

Built on s2-python's `S2AsyncConnection` + `WebsocketClientMedium` and its class-based control
types (`FRBCControlType`, `PPBCControlType`, ...): a device family implements those classes
(`activate`, `deactivate`, `handle_instruction`) and hands them to `S2ResourceManager`, which

- connects (with a bearer token in the `Authorization` header when given),
- runs the S2 handshake, sends `ResourceManagerDetails`, waits for `SelectControlType`,
- sets `connected` once the CEM has selected a control type, clears it when the session ends,
- reconnects with exponential back-off, building a *fresh* `S2AsyncConnection` every time
  (S2 state never survives a reconnect: the control type's `activate` runs again),
- answers CEM messages nobody handles with a ReceptionStatus (s2-python would stay silent and
  the CEM would time out): `SessionRequest` (ends the session, then reconnect), `RevokeObject`
  (passed to `on_revoke`), instructions of a control type that is not active (INVALID_CONTENT).

Use `await rm.send(message)` from anywhere in the RM (measurements, status updates, system
descriptions): it returns the CEM's `ReceptionStatus`, or None when there is no session or the
CEM did not answer in time (unlike s2-python's own helper, a late status does not end the
session).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import websockets
import websockets.asyncio.client
from s2python.common import (
    ControlType,
    ReceptionStatus,
    ReceptionStatusValues,
    ResourceManagerDetails,
    RevokeObject,
    SelectControlType,
    SessionRequest,
    SessionRequestType,
)
from s2python.connection.asset_details import AssetDetails
from s2python.connection.async_.connection import S2AsyncConnection
from s2python.connection.async_.control_type.class_based import (
    DDBCControlType,
    FRBCControlType,
    NoControlControlType,
    OMBCControlType,
    PEBCControlType,
    PPBCControlType,
    ResourceManagerHandler,
    S2ControlType,
)
from s2python.connection.async_.medium.s2_medium import (
    MediumClosedConnectionError,
    MediumCouldNotConnectError,
)
from s2python.connection.async_.medium.websocket import WebsocketClientMedium
from s2python.connection.types import S2ConnectionEventsAndMessages, SendOkayRunAsync
from s2python.ddbc import DDBCInstruction
from s2python.frbc import FRBCInstruction
from s2python.message import S2Message
from s2python.ombc import OMBCInstruction
from s2python.pebc import PEBCInstruction
from s2python.ppbc import (
    PPBCEndInterruptionInstruction,
    PPBCScheduleInstruction,
    PPBCStartInterruptionInstruction,
)

from sitekit.s2connect import reconnect_delay
from sitekit.s2connect_client import NoLongerPaired, NotPaired, S2ConnectError, S2ConnectLink

__all__ = [
    "AssetDetails",
    "DDBCControlType",
    "FRBCControlType",
    "NoControlControlType",
    "OMBCControlType",
    "PEBCControlType",
    "PPBCControlType",
    "S2ControlType",
    "S2ResourceManager",
    "reply_status",
]

logger = logging.getLogger("resource_managers.s2")

# Messages a CEM may send that need an answer even when the active control type has no handler.
_CEM_INSTRUCTIONS: tuple[type[FRBCInstruction | PPBCScheduleInstruction
                              | PPBCStartInterruptionInstruction | PPBCEndInterruptionInstruction
                              | OMBCInstruction | PEBCInstruction | DDBCInstruction], ...] = (
    FRBCInstruction,
    PPBCScheduleInstruction,
    PPBCStartInterruptionInstruction,
    PPBCEndInterruptionInstruction,
    OMBCInstruction,
    PEBCInstruction,
    DDBCInstruction,
)

RevokeCallback = Callable[[RevokeObject], Awaitable[None] | None]
ControlTypeCallback = Callable[[ControlType], Awaitable[None] | None]


class CemRefused(Exception):
    """The CEM answered the websocket upgrade with an HTTP error (e.g. 401: bad token)."""


async def reply_status(
    connection: S2AsyncConnection,
    send_okay: SendOkayRunAsync,
    subject_message_id: uuid.UUID,
    status: ReceptionStatusValues,
    diagnostic_label: str,
) -> None:
    """Answer a message from inside an s2-python handler with a status other than OK.

    s2-python sends OK after every handler that did not call `send_okay`; marking the handler's
    `SendOkay` as done stops that second, contradicting status.
    """
    owner = getattr(send_okay, "__self__", None)
    flag = getattr(owner, "_status_is_send", None)
    if isinstance(flag, asyncio.Event):
        flag.set()
    await connection.respond_with_reception_status(
        subject_message_id=subject_message_id, status=status, diagnostic_label=diagnostic_label
    )


class _CemMedium(WebsocketClientMedium):
    """WebsocketClientMedium with an own TLS context, message size limit and a clear 401."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        ssl_context: ssl.SSLContext | None,
        max_message_bytes: int,
        open_timeout_s: float,
    ) -> None:
        super().__init__(url, verify_certificate=True, bearer_token=token)
        self._ssl_context = ssl_context
        self._max_message_bytes = max_message_bytes
        self._open_timeout_s = open_timeout_s

    async def connect(self) -> None:
        kwargs: dict[str, Any] = {
            "max_size": self._max_message_bytes,
            "open_timeout": self._open_timeout_s,
        }
        if self._ssl_context is not None and self.url.startswith("wss://"):
            kwargs["ssl"] = self._ssl_context
        if self._bearer_token:
            kwargs["additional_headers"] = {"Authorization": f"Bearer {self._bearer_token}"}
        try:
            self._ws = await websockets.asyncio.client.connect(self.url, **kwargs)
        except websockets.InvalidStatus as exc:
            self._closed = True
            code = exc.response.status_code
            why = "the CEM refused our token" if code in (401, 403) else "the CEM refused us"
            raise CemRefused(f"{why} (HTTP {code})") from exc
        except (EOFError, OSError, TimeoutError, websockets.WebSocketException) as exc:
            self._closed = True
            raise MediumCouldNotConnectError(f"cannot reach the CEM at {self.url}: {exc}") from exc


class _RmSessionHandler(ResourceManagerHandler):
    """s2-python's RM handshake logic, plus notice of the selected control type."""

    def __init__(self, owner: S2ResourceManager, control_types: list[S2ControlType],
                 asset_details: AssetDetails) -> None:
        super().__init__(control_types=control_types, asset_details=asset_details)
        self._owner = owner

    async def _on_select_control_type(
        self,
        connection: S2AsyncConnection,
        event: S2ConnectionEventsAndMessages,
        send_okay: SendOkayRunAsync,
    ) -> None:
        await super()._on_select_control_type(connection, event, send_okay)
        if isinstance(event, SelectControlType):
            await self._owner._control_type_selected(event.control_type)


class _S2ConnectRmHandler(_RmSessionHandler):
    """S2 Connect mode: no Handshake; the session starts with ResourceManagerDetails."""

    async def _on_connection_started(self, connection: S2AsyncConnection,
                                     _: S2ConnectionEventsAndMessages,
                                     __: SendOkayRunAsync) -> None:
        details: ResourceManagerDetails = self.asset_details.to_resource_manager_details(
            self._control_types)
        await connection.send_msg_and_await_reception_status(details)


class S2ResourceManager:
    """One S2 RM session to the CEM, reconnecting with back-off; a fresh session after every reconnect.

    `connected` is set while a session is ready (handshake done, control type selected);
    `control_type` is the control type the CEM selected for the current session.
    """

    def __init__(
        self,
        *,
        cem_url: str,
        asset_details: AssetDetails,
        control_types: Sequence[S2ControlType],
        token: str | None = None,
        backoff_s: tuple[float, float] = (0.5, 30.0),
        reception_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        max_message_bytes: int = 1_048_576,
        on_revoke: RevokeCallback | None = None,
        on_control_type: ControlTypeCallback | None = None,
        s2connect: S2ConnectLink | None = None,
    ) -> None:
        if not control_types:
            raise ValueError("an RM needs at least one control type (NoControlControlType if none)")
        self.cem_url = cem_url
        self.asset_details = asset_details
        self.control_types = list(control_types)
        self.token = token
        self.backoff_s = backoff_s
        self.reception_timeout_s = reception_timeout_s
        self.ssl_context = ssl_context
        self.max_message_bytes = max_message_bytes
        self.on_revoke = on_revoke
        self.on_control_type = on_control_type
        self.connected = asyncio.Event()
        self.control_type: ControlType | None = None
        self.sessions_started = 0
        self.last_error: str | None = None
        self._connection: S2AsyncConnection | None = None
        self._session_over: asyncio.Event | None = None
        self._reconnect_at_once = False
        self.s2connect = s2connect   # S2 Connect: each session initiated over HTTPS, no Handshake

    @property
    def name(self) -> str:
        return self.asset_details.name or str(self.asset_details.resource_id)

    # --- public API ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep one session to the CEM alive until `stop` is set."""
        if self.s2connect is not None:
            await self._run_s2connect(stop)
            return
        low, high = self.backoff_s
        delay = low
        while not stop.is_set():
            began = time.monotonic()
            try:
                await self._one_session(stop)
            except CemRefused as exc:
                self.last_error = str(exc)
                logger.error("RM '%s': %s; retrying in %.0f s", self.name, exc, high)
                delay = high
            except MediumCouldNotConnectError as exc:
                self.last_error = str(exc)
                logger.warning("RM '%s': %s; retrying in %.1f s", self.name, exc, delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken session must not end the RM
                self.last_error = repr(exc)
                logger.warning("RM '%s': session ended by error %r; reconnecting in %.1f s",
                               self.name, exc, delay)
            if stop.is_set():
                break
            if self._reconnect_at_once:
                self._reconnect_at_once = False
                delay = low
            elif time.monotonic() - began > 2 * high:
                delay = low  # the last session lived long: start the back-off afresh
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(high, max(low, delay * 2))

    async def _run_s2connect(self, stop: asyncio.Event) -> None:
        """S2 Connect: initiate every session over HTTPS; the spec's randomized back-off
        (random(0, min(600, 2 * 2^n)) s after the n-th failure in a row); stop for good when
        the CEM unpaired us or accepts none of our tokens."""
        failures = 0
        while not stop.is_set():
            began = time.monotonic()
            try:
                await self._one_session(stop)
            except (NoLongerPaired, NotPaired) as exc:
                self.last_error = str(exc)
                logger.error("RM '%s': %s; not reconnecting (pair again)", self.name, exc)
                return
            except (S2ConnectError, CemRefused, MediumCouldNotConnectError) as exc:
                self.last_error = str(exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken session must not end the RM
                self.last_error = repr(exc)
            if stop.is_set():
                break
            if self._reconnect_at_once or time.monotonic() - began > 60:
                self._reconnect_at_once = False
                failures = 0
            delay = reconnect_delay(failures)
            failures += 1
            logger.warning("RM '%s': %s; reconnecting in %.1f s", self.name,
                           self.last_error or "session ended", delay)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def send(self, message: S2Message, timeout_s: float | None = None) -> ReceptionStatus | None:
        """Send a message to the CEM and return its ReceptionStatus (None: no session / no answer)."""
        connection = self._connection
        over = self._session_over
        if connection is None or over is None or not self.connected.is_set():
            return None
        try:
            await connection.send_and_forget(message)
        except (MediumClosedConnectionError, RuntimeError):
            return None
        message_id = getattr(message, "message_id", None)
        if message_id is None or isinstance(message, ReceptionStatus):
            return None
        awaiter = connection._reception_status_awaiter  # s2-python exposes no public one
        waiting = asyncio.ensure_future(awaiter.wait_for_reception_status(
            message_id, timeout_s or self.reception_timeout_s))
        ended = asyncio.ensure_future(over.wait())
        try:
            await asyncio.wait({waiting, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not waiting.done():
                waiting.cancel()
        if waiting.cancelled():
            return None
        if waiting.exception() is not None:
            logger.warning("RM '%s': no ReceptionStatus from the CEM for %s %s in time",
                           self.name, message.message_type, message_id)
            return None
        return waiting.result()

    async def send_and_forget(self, message: S2Message) -> bool:
        """Send a message without waiting for its status; False when there is no session."""
        connection = self._connection
        if connection is None or not self.connected.is_set():
            return False
        try:
            await connection.send_and_forget(message)
        except (MediumClosedConnectionError, RuntimeError):
            return False
        return True

    # --- one session -----------------------------------------------------------------------

    async def _one_session(self, stop: asyncio.Event) -> None:
        handler_class = _RmSessionHandler
        if self.s2connect is not None:
            ticket = await self.s2connect.open_session()
            handler_class = _S2ConnectRmHandler
            medium = _CemMedium(ticket.websocket_url, token=ticket.websocket_token,
                                ssl_context=ticket.ssl_context,
                                max_message_bytes=self.max_message_bytes,
                                open_timeout_s=max(5.0, self.reception_timeout_s))
        else:
            medium = _CemMedium(self.cem_url, token=self.token, ssl_context=self.ssl_context,
                                max_message_bytes=self.max_message_bytes,
                                open_timeout_s=max(5.0, self.reception_timeout_s))
        await medium.connect()
        loop = asyncio.get_running_loop()
        connection = S2AsyncConnection(medium, eventloop=loop)
        self._register_fallbacks(connection)
        handler = handler_class(self, self.control_types, self.asset_details)
        handler.register_handlers(connection)
        self._connection = connection
        self._session_over = asyncio.Event()
        self.sessions_started += 1
        logger.info("RM '%s': connected to %s, starting S2 session #%d",
                    self.name, self.cem_url, self.sessions_started)
        running = loop.create_task(connection.run())
        stopping = loop.create_task(stop.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                await connection.stop()
                try:
                    await asyncio.wait_for(asyncio.shield(running), timeout=2.0)
                except TimeoutError:
                    running.cancel()
            elif running.exception() is not None:
                raise running.exception()  # type: ignore[misc]
        finally:
            self.connected.clear()
            self.control_type = None
            self._session_over.set()
            self._connection = None
            stopping.cancel()
            if not running.done():
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
            try:
                await asyncio.wait_for(medium.disconnect(), timeout=2.0)
            except Exception:  # closing a dead socket may fail
                pass
            logger.info("RM '%s': S2 session #%d ended", self.name, self.sessions_started)

    async def _control_type_selected(self, control_type: ControlType) -> None:
        self.control_type = control_type
        logger.info("RM '%s': CEM selected control type %s", self.name, control_type.value)
        self.connected.set()
        if self.on_control_type is not None:
            result = self.on_control_type(control_type)
            if asyncio.iscoroutine(result):
                await result

    def _register_fallbacks(self, connection: S2AsyncConnection) -> None:
        """Answer CEM messages the active control type does not handle (never stay silent)."""

        async def on_instruction(conn: S2AsyncConnection, msg: S2ConnectionEventsAndMessages,
                                 send_okay: SendOkayRunAsync) -> None:
            assert isinstance(msg, _CEM_INSTRUCTIONS)
            logger.warning("RM '%s': CEM sent %s, which the active control type %s does not take",
                           self.name, msg.message_type,
                           self.control_type.value if self.control_type else "(none)")
            await reply_status(conn, send_okay, msg.message_id,
                               ReceptionStatusValues.INVALID_CONTENT,
                               f"{msg.message_type} does not fit the active control type")

        async def on_revoke(conn: S2AsyncConnection, msg: S2ConnectionEventsAndMessages,
                            send_okay: SendOkayRunAsync) -> None:
            assert isinstance(msg, RevokeObject) and send_okay is not None
            await send_okay()
            if self.on_revoke is not None:
                result = self.on_revoke(msg)
                if asyncio.iscoroutine(result):
                    await result

        async def on_session_request(conn: S2AsyncConnection, msg: S2ConnectionEventsAndMessages,
                                     send_okay: SendOkayRunAsync) -> None:
            assert isinstance(msg, SessionRequest) and send_okay is not None
            await send_okay()
            logger.info("RM '%s': CEM asked to %s the session (%s)", self.name,
                        msg.request.value.lower(), msg.diagnostic_label or "no reason given")
            self._reconnect_at_once = msg.request == SessionRequestType.RECONNECT
            await conn.stop()

        for message_type in _CEM_INSTRUCTIONS:
            connection.register_handler(message_type, on_instruction)
        connection.register_handler(RevokeObject, on_revoke)
        connection.register_handler(SessionRequest, on_session_request)
