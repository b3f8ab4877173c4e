"""The S2 websocket server: one sans-I/O `S2Session` per connection, and the live-RM registry.

Thin on purpose: every S2 rule lives in `cem.s2.session`; this module only moves text between
sockets and sessions, and keeps the books:

- **auth** at the HTTP upgrade (`process_request`): with `server.tokens` configured, a request
  without a known `Authorization: Bearer <token>` gets HTTP 401. The decision is made by an
  `RmAuthorizer` (see below); S2 Connect pairing plugs in there.
- **limits** before auth (`sitekit.admission`): at most `server.max_connections` connections
  (more: HTTP 503), and an address with `server.max_failed_auth_per_minute` failed
  authentications in the last minute is refused (HTTP 429) until they age out; refusals are
  counted, the first of each reason a minute logged, the rest in one summary line a minute.
- **identity bound to credentials**: the first credential (a token's name, or an S2 Connect
  pairing) under which a resource id registers owns it (kept in the store's `rm_owners`);
  ResourceManagerDetails from another credential naming it are refused (PERMANENT_ERROR, the
  session ends with 1008), logged on `cem.security` and counted as a failed authentication. A
  reconnect with the same credential supersedes its own old connection, as before; a token
  removed from the config no longer holds its resource ids. Without tokens nothing is bound.
- **wss** when `tls_cert`/`tls_key` are set; **pings** with `ping_interval_s`/`ping_timeout_s`;
  **back-pressure**: frames above `max_message_bytes` close the connection (1009), websockets'
  incoming queue is bounded (`max_queue`), and so is each connection's send buffer
  (`write_limit_bytes`): when an RM does not read, the CEM stops reading from it too, and an
  instruction waits (up to its timeout) for room. Sends happen in the task that produced them
  (no writer task per connection: one task switch less per message, 1000 tasks fewer).
- **one wake-up per read, not per message** (`S2Connection`, docs/adr/0010): a whole text or
  binary frame is handed to its session straight from websockets' `data_received`, in the
  order read, with no task switch; the answers (ReceptionStatus, HandshakeResponse, ...) are
  framed into the connection's buffer and written once per read, one socket write however many
  messages that read held. Fragmented messages, and any that arrive while one is still queued,
  take websockets' own path (the connection's task), in order. When an RM does not read its
  answers (the send buffer above `write_limit_bytes`), the CEM stops reading from it until it
  does.
- **isolation**: a message the session cannot handle is logged and answered by the session; an
  exception inside one connection's code is logged and ends at most that connection.
- **registry** of live sessions, keyed by the RM's `resource_id` once its
  ResourceManagerDetails arrived (by a connection id before that), with the API the control
  loop uses: `sessions()`, `get()`, `send_instruction()` (resolves when the RM's
  ReceptionStatus arrives, or times out), `subscribe()` / `add_listener()` for session events.
- **store**: every message is logged (incoming ones with the status the CEM answered), but an
  RM's accepted PowerMeasurements at most one per `store.measurement_log_interval_s`
  (`Store.measurement_due`; the others only count); RMs and sessions are kept up to date; all
  of it through `Store`'s non-blocking batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import itertools
import logging
import math
import socket
import ssl
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, Protocol

from s2python.common import SessionRequest, SessionRequestType
from s2python.message import S2Message
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode, apply_mask
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from cem.control_types import PLUGINS
from cem.ports import (
    Connected,
    Disconnected,
    InstructionResult,
    RegistryEvent,
    RmEvent,
    StateChanged,
)
from cem.s2.session import MEASUREMENT_MARK, OK_STATUS, CloseRequest, Outgoing, S2Session
from cem.site.config import ServerConfig, SiteConfig
from cem.store import Store
from sitekit import clock
from sitekit.admission import Admission

logger = logging.getLogger("cem.s2.server")
security = logging.getLogger("cem.security")

SHUTDOWN_CODE = 1001
SHUTDOWN_REASON = "CEM shutting down"
SHORT_CONTROL_TYPE = {p.control_type.value: p.name for p in PLUGINS} | {
    "NO_SELECTION": "NO_SELECTION"}


HANDSHAKE_TIMEOUT_S = 30.0  # wall-clock seconds an RM has for its Handshake


def utc_now() -> datetime:
    """The process clock (`sitekit.clock`: real time, or the demo's simulated time)."""
    return clock.now()


# --- auth: the seam for S2 Connect pairing ------------------------------------------------------


@dataclass(frozen=True)
class AuthDecision:
    """Whether an RM may open a websocket, and who it is (shown in logs and the store)."""

    allowed: bool
    holder: str | None = None
    reason: str = ""
    setup: Callable[[S2Session], None] | None = None  # prepares the new session (S2 Connect)


class RmAuthorizer(Protocol):
    """Decides at the HTTP upgrade whether a connecting RM may speak S2.

    The hook for S2 Connect pairing: a pairing authorizer would look the bearer token up among
    tokens issued during pairing (and could answer 403 for a revoked one). Give one to
    `S2Server(authorizer=...)`.
    """

    def authorize(self, request: Request, peer: str) -> AuthDecision: ...

    @property
    def describe(self) -> str: ...


class TokenAuthorizer:
    """Bearer tokens from `server.tokens`; with no tokens configured, any RM may connect."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self._tokens = [(name, token.encode()) for name, token in tokens]

    @classmethod
    def from_config(cls, server: ServerConfig) -> TokenAuthorizer:
        return cls([(t.name, t.token) for t in server.tokens])

    @property
    def token_names(self) -> set[str]:
        return {name for name, _ in self._tokens}

    @property
    def describe(self) -> str:
        if not self._tokens:
            return "no tokens: any RM may connect"
        return f"{len(self._tokens)} bearer token(s) required"

    def authorize(self, request: Request, peer: str) -> AuthDecision:
        if not self._tokens:
            return AuthDecision(True)
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return AuthDecision(False, reason="no bearer token in the Authorization header")
        candidate = presented.strip().encode()
        for name, token in self._tokens:
            if hmac.compare_digest(candidate, token):
                return AuthDecision(True, holder=name)
        return AuthDecision(False, reason="unknown bearer token")


# --- the connection: messages handled as they are read ----------------------------------------

# what S2Connection reads of websockets' protocol to cut and frame frames itself (websockets
# 17; with an older one without them, websockets parses and frames every frame itself)
_CUTS_FRAMES = all(hasattr(ServerProtocol(), name)
                   for name in ("current_size", "max_message_size", "reader", "writes",
                                "extensions", "expect_continuation_frame"))


class ReadPacer:
    """Reads in batches rather than one wake-up per RM message.

    Paced, 1000 RMs sending 5 messages a second each arrive alone, and the CEM woke, read,
    answered and went back to sleep for every one of them, each time with cold caches (at
    1000 messages/s ~120 µs of CPU per read, against ~25 µs for the same work done back to
    back: docs/adr/0010, round 8). The pacer has the event loop look at its sockets at most
    every `period_s` while it has nothing else to do: whatever the RMs send meanwhile waits
    in the sockets and is read at the next wake-up, together. A loop busier than that never
    pauses; an idle one never wakes for it. A message is read at most `period_s` later.

    On asyncio's selector loop (`install`) the pause is taken in the selector, only when the
    loop has no callback ready and no timer due before the pause ends: timers (the guard, the
    control loop's bursts, OCPP's) and the work a read hands on run on time. On another loop
    (uvloop) the loop sleeps after a round of reads, which delays everything on it.
    """

    __slots__ = ("_last", "_restore", "_scheduled", "period_s")

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._last = -math.inf
        self._scheduled = False
        self._restore: Callable[[], None] | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Pace `loop`'s selector (asyncio's selector loop); False for a loop without one
        (then `read` pauses the loop after reads). `uninstall` undoes it."""
        if self._restore is not None:
            return True
        selector = getattr(loop, "_selector", None)
        select = getattr(selector, "select", None)
        if selector is None or select is None:
            return False
        pacer = self

        def paced_select(timeout: float | None = None) -> Any:
            wait = pacer.period_s - (time.monotonic() - pacer._last)
            if wait > 0.0002 and (timeout is None or timeout > 0):
                if timeout is not None:
                    wait = min(wait, timeout)
                    timeout -= wait
                time.sleep(wait)
            events = select(timeout)
            if events:
                pacer._last = time.monotonic()
            return events

        selector.select = paced_select

        def restore() -> None:
            with contextlib.suppress(AttributeError):
                del selector.select   # the class's own again

        self._restore = restore
        return True

    def uninstall(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    def read(self) -> None:
        """A read happened: pause once this round of callbacks is done (without `install`)."""
        if self._restore is None and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._pause)

    def _pause(self) -> None:
        self._scheduled = False
        wait = self.period_s - (time.monotonic() - self._last)
        if wait > 0.0002:
            time.sleep(wait)
        self._last = time.monotonic()


class S2Connection(ServerConnection):
    """websockets' server connection, handing whole messages to `on_message` as they are read.

    `data_received` parses what one read brought; each complete text or binary frame goes to
    `on_message` at once (no task switch, no queue), unless websockets' queue still holds an
    earlier message (then it queues behind it: order is kept) or it is a fragment or not UTF-8
    text (websockets' own path decides); a text with a PowerMeasurement in it goes to
    `on_measurement` instead, when one is set. Whatever the handlers framed (`send_now`) is
    written after the read in one socket write.
    """

    # slots: new attributes in the instance dict would grow it by ~1.5 kB per connection
    __slots__ = ("_batching", "_framing", "_partial", "_reading_paused", "on_measurement",
                 "on_message", "pacer")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.on_message: Callable[[str | bytes], None] | None = None
        #: a text frame with a PowerMeasurement in it goes here instead of `on_message`
        self.on_measurement: Callable[[str], None] | None = None
        self.pacer: ReadPacer | None = None
        self._batching = False
        self._reading_paused = False
        self._framing = False     # frames are cut here (see `_frames_in`)
        self._partial = b""       # the start of a frame not complete yet
        super().__init__(*args, **kwargs)

    def process_event(self, event: Any) -> None:
        handler = self.on_message
        if (handler is not None and isinstance(event, Frame) and event.fin
                and not len(self.recv_messages.frames)):
            if event.opcode is Opcode.TEXT:
                try:
                    text = bytes(event.data).decode()
                except UnicodeDecodeError:
                    super().process_event(event)
                    return
                handler(text)
                return
            if event.opcode is Opcode.BINARY:
                handler(bytes(event.data))
                return
        super().process_event(event)

    def data_received(self, data: bytes) -> None:
        if self.pacer is not None:
            self.pacer.read()
        self._batching = True
        try:
            if self._framing or (self.on_message is not None and self._parser_idle()):
                self._framing = True
                self._frames_in(data)
            else:
                super().data_received(data)
        finally:
            self._batching = False
        self.flush()

    def _parser_idle(self) -> bool:
        """websockets' parser is open and between frames (so whole frames may be cut here)."""
        protocol = self.protocol
        if not _CUTS_FRAMES or protocol.state is not State.OPEN \
                or protocol.current_size is not None or protocol.reader.buffer:
            return False
        generator = protocol.parser
        while (inner := getattr(generator, "gi_yieldfrom", None)) is not None:
            generator = inner
        return getattr(getattr(generator, "gi_code", None), "co_name", "") == "at_eof"

    def _frames_in(self, data: bytes) -> None:
        """Cut what was read into frames (RFC 6455); a whole masked text or binary frame goes
        to `on_message` at once; any other frame (control, fragment, not UTF-8 text, one
        queued behind an earlier message) is fed whole to websockets' own parser, so that
        parser always stands between frames. A frame above the size limit, or the connection
        closing: from there on websockets reads everything itself."""
        view = self._partial + data if self._partial else data
        self._partial = b""
        protocol = self.protocol
        limit = protocol.max_message_size
        handler = self.on_message
        measured = self.on_measurement
        # an earlier message still in websockets' queue (or a fragmented one under way): this
        # one queues behind it; only websockets' parser, fed below, changes that
        queued = protocol.current_size is not None or len(self.recv_messages.frames) > 0
        # (only websockets' parser, fed below, closes the protocol while this loop runs)
        is_open = protocol.state is State.OPEN
        size = len(view)
        at = 0
        while size - at >= 2:
            if not is_open:
                break
            first, second = view[at], view[at + 1]
            length, head = second & 0x7F, at + 2
            if length == 126:
                if size - at < 4:
                    self._partial = view[at:]
                    return
                length, head = view[at + 2] << 8 | view[at + 3], at + 4
            elif length == 127:
                if size - at < 10:
                    self._partial = view[at:]
                    return
                length, head = int.from_bytes(view[at + 2:at + 10], "big"), at + 10
            if not second & 0x80 or (limit is not None and length > limit):
                break   # unmasked or too big: websockets refuses it (and closes)
            end = head + 4 + length
            if end > size:
                self._partial = view[at:]
                return
            if (first == 0x81 or first == 0x82) and handler is not None and not queued:
                payload = apply_mask(view[head + 4:end], view[head:head + 4])
                if first == 0x82:
                    handler(payload)
                    at = end
                    continue
                try:
                    text = payload.decode()
                except UnicodeDecodeError:
                    pass
                else:
                    if measured is not None and MEASUREMENT_MARK in text:
                        measured(text)
                    else:
                        handler(text)
                    at = end
                    continue
            super().data_received(view[at:end])
            queued = protocol.current_size is not None or len(self.recv_messages.frames) > 0
            is_open = protocol.state is State.OPEN
            at = end
        else:
            if at < size:
                self._partial = view[at:]
            return
        self._framing = False   # websockets' parser takes the rest from here
        super().data_received(view[at:])

    def send_now(self, text: str) -> bool:
        """Frame `text` into the send buffer (written after this read, or now outside one);
        False when the connection is no longer open."""
        protocol = self.protocol
        if protocol.state is not State.OPEN:
            return False
        if not _CUTS_FRAMES or protocol.extensions or protocol.expect_continuation_frame:
            protocol.send_text(text.encode())   # websockets' own framing (and its checks)
        else:   # an unmasked, final text frame (RFC 6455 5.2), as websockets frames it
            payload = text.encode()
            length = len(payload)
            if length < 126:
                head = bytes((0x81, length))
            elif length < 65536:
                head = b"\x81\x7e" + length.to_bytes(2, "big")
            else:
                head = b"\x81\x7f" + length.to_bytes(8, "big")
            protocol.writes.append(head + payload)
        if not self._batching:
            self.flush()
        return True

    def flush(self) -> None:
        """Write what is framed, in one socket write; when the RM does not read its answers
        (more than the write limit buffered), stop reading from it until it does."""
        if not self.protocol.writes:
            return
        try:
            self.send_data()
        except Exception as exc:
            self.set_connection_exc(exc)
            self.transport.abort()
            return
        if self.paused and not self._reading_paused and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def send_data(self) -> None:
        protocol = self.protocol
        writes = protocol.writes
        if writes and all(writes):   # (websockets' `data_to_send` is this swap)
            protocol.writes = []
            self.transport.write(writes[0] if len(writes) == 1 else b"".join(writes))
            return
        super().send_data()   # an end-of-stream marker: websockets' own way

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._reading_paused:
            self._reading_paused = False
            if not self.transport.is_closing() and not self.recv_messages.paused:
                self.transport.resume_reading()


def _forget_handshake_headers(ws: ServerConnection) -> None:
    """Keep the upgrade's path and status but not its headers (~2 kB a connection, read only
    while authorising, in `process_request`). websockets tells the handshake from the frames
    by `request is None`, so the request stays, without headers."""
    if ws.request is not None:
        ws.request = dataclasses.replace(ws.request, headers=Headers())
    if ws.response is not None:
        ws.response = dataclasses.replace(ws.response, headers=Headers(), body=b"")


# --- what the control loop sees ------------------------------------------------------------------


@dataclass
class LiveSession:
    """One open connection and its S2 session (read-only for the control loop)."""

    connection_id: str
    session: S2Session
    peer: str
    holder: str | None
    connected_at: datetime
    rm_id: str | None = None
    name: str | None = None
    control_type: str | None = None
    details: Any = None
    ws: ServerConnection | None = field(default=None, repr=False)
    open: bool = True
    waiting: dict[str, tuple[asyncio.Future[InstructionResult], float]] = field(
        default_factory=dict, repr=False)
    last_snapshot_at: float = 0.0
    unlogged_measurement: bool = False   # the message just handled is a measurement not logged
    closing_reason: str | None = None
    close_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return self.rm_id or self.connection_id

    @property
    def label(self) -> str:
        return f"'{self.name}'" if self.name else (self.rm_id or self.connection_id)

    @property
    def state(self) -> Any:
        return self.session.state


EventCallback = Callable[[RegistryEvent], Awaitable[None] | None]


# --- the server ---------------------------------------------------------------------------------


class S2Server:
    """The CEM's S2 endpoint and registry of live RM sessions."""

    def __init__(
        self,
        config: SiteConfig,
        store: Store | None = None,
        *,
        authorizer: RmAuthorizer | None = None,
        session_factory: Callable[[], S2Session] | None = None,
        write_limit_bytes: int = 65536,
        snapshot_interval_s: float = 5.0,
        tick_s: float = 0.5,
    ) -> None:
        self.config = config
        self.server_config = config.server
        self.store = store
        self.authorizer: RmAuthorizer = authorizer or TokenAuthorizer.from_config(config.server)
        self._session_factory = session_factory or self._new_session
        self.write_limit_bytes = write_limit_bytes
        self.snapshot_interval_s = snapshot_interval_s
        self.tick_s = tick_s
        batch_ms = config.server.read_batch_ms
        self._pacer = ReadPacer(batch_ms / 1000) if batch_ms > 0 else None
        self._live: dict[str, LiveSession] = {}
        self._rms: dict[str, LiveSession] = {}
        self._rms_view = MappingProxyType(self._rms)
        self._by_connection: dict[str, LiveSession] = {}
        self._subscribers: list[asyncio.Queue[RegistryEvent]] = []
        self._listeners: list[EventCallback] = []
        self._server: Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._holders: weakref.WeakKeyDictionary[ServerConnection, AuthDecision] = (
            weakref.WeakKeyDictionary())
        self._listeners_extra: list[Server] = []
        self._stopping = False
        self.messages_in = 0
        self.messages_out = 0
        self.admission = Admission(
            "S2 server", logger, max_connections=self.server_config.max_connections,
            max_failed_auth_per_minute=self.server_config.max_failed_auth_per_minute)
        self._owners: dict[str, str] = {}   # resource id -> the credential that owns it

    # --- lifecycle ---------------------------------------------------------------------------

    def _new_session(self) -> S2Session:
        # the session compares its protocol timeouts with the process clock's `now`: on a
        # simulated clock (cem demo) they keep their wall-clock length (docs/adr/0001-demo-clock.md)
        speed = clock.speed()
        return S2Session(
            control_type_preference=list(self.config.s2.control_type_preference),
            cem_name=self.config.site.name,
            reception_timeout_s=self.server_config.reception_status_timeout_s * speed,
            handshake_timeout_s=HANDSHAKE_TIMEOUT_S * speed,
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        return self.server_config.tls_context()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind and listen (raises OSError when the address is taken); with `sock`, serve that
        socket, bound and listening already (`cem run` binds before it opens the store)."""
        cfg = self.server_config
        if self.store is not None:
            self._owners.update(await self.store.rm_owners())
        self._server = await self._serve(cfg.host, cfg.port, self._ssl_context(), None, sock)
        if self._pacer is not None:
            self._pacer.install(asyncio.get_running_loop())
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="s2-timers")

    async def listen(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                     authorizer: RmAuthorizer) -> int:
        """Accept RMs on one more address, with its own TLS and authorizer (the S2 Connect
        wss listener); same sessions and registry. Returns the port bound."""
        server = await self._serve(host, port, ssl_context, authorizer)
        self._listeners_extra.append(server)
        return int(next(iter(server.sockets)).getsockname()[1])

    async def _serve(self, host: str, port: int, ssl_context: ssl.SSLContext | None,
                     authorizer: RmAuthorizer | None,
                     sock: socket.socket | None = None) -> Server:
        cfg = self.server_config
        return await serve(
            self._handle_connection,
            None if sock is not None else host,
            None if sock is not None else port,
            sock=sock,
            ssl=ssl_context,
            process_request=functools.partial(self._process_request, authorizer=authorizer),
            ping_interval=cfg.ping_interval_s,
            ping_timeout=cfg.ping_timeout_s,
            close_timeout=5,
            max_size=cfg.max_message_bytes,
            max_queue=32,
            write_limit=self.write_limit_bytes,
            compression=None,  # S2 messages are small; deflate would cost CPU on every message
            server_header="S2-CEM",
            logger=logging.getLogger("cem.s2.websockets"),
            create_connection=S2Connection,
        )

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.server_config.tls_cert else "ws"
        host = self.server_config.host
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"

    async def stop(self, reason: str = SHUTDOWN_REASON, code: int = SHUTDOWN_CODE) -> None:
        """Stop accepting, tell every RM why (close code 1001), wait for the connections."""
        if self._stopping:
            return
        self._stopping = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for extra in self._listeners_extra:
            extra.close(close_connections=False)
        if self._server is None:
            return
        self._server.close(close_connections=False)
        live = list(self._by_connection.values())
        for entry in live:
            entry.closing_reason = reason
        # S2 first (SessionRequest TERMINATE with the reason), then the websocket close code
        await asyncio.gather(*(self._terminate_session(entry, reason, code) for entry in live),
                             return_exceptions=True)
        await asyncio.gather(*(self._close_ws(entry, code, reason) for entry in live),
                             return_exceptions=True)
        await self._server.wait_closed()
        for extra in self._listeners_extra:
            await extra.wait_closed()
        self._server = None
        if self._pacer is not None:
            self._pacer.uninstall()

    @staticmethod
    async def _close_ws(entry: LiveSession, code: int, reason: str) -> None:
        """Close the websocket with `code` (the S2 messages before it are sent first)."""
        if entry.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(entry.ws.close(code, _close_text(reason)), timeout=5)

    # --- registry API for the control loop ------------------------------------------------------

    def sessions(self) -> list[LiveSession]:
        """Every live connection (identified RMs and those still in their handshake)."""
        return list(self._by_connection.values())

    def rms(self) -> Mapping[str, LiveSession]:
        """Live RMs by resource id (those whose ResourceManagerDetails arrived); a read-only view.

        O(1): the view is kept up to date, not rebuilt; use `get(rm_id)` for one RM.
        """
        return self._rms_view

    def get(self, rm_id: str) -> LiveSession | None:
        return self._live.get(rm_id)

    def subscribe(self, maxsize: int = 10_000) -> asyncio.Queue[RegistryEvent]:
        """A queue that receives every server event from now on (oldest dropped when full)."""
        queue: asyncio.Queue[RegistryEvent] = asyncio.Queue(maxsize=maxsize)
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[RegistryEvent]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    def add_listener(self, callback: EventCallback) -> None:
        """Call `callback(event)` for every server event (sync or async; errors are logged)."""
        self._listeners.append(callback)

    async def send_instruction(self, rm_id: str, message: S2Message, *,
                               timeout_s: float | None = None,
                               plan_id: int | None = None) -> InstructionResult:
        """Send a message to a live RM; resolves with its ReceptionStatus (or TIMEOUT/CLOSED).

        Instructions (message types ending in "Instruction") are also written to the store's
        `instructions` table with `plan_id`, and their status is filled in when it arrives.
        """
        entry = self._live.get(rm_id)
        timeout = timeout_s or self.server_config.reception_status_timeout_s
        message_id = str(getattr(message, "message_id", "") or "") or None
        if entry is None or not entry.open:
            return InstructionResult(rm_id, message_id, "NOT_CONNECTED",
                                     "no live session for this RM")
        try:
            out = entry.session.send(message, utc_now())
        except Exception as exc:
            logger.warning("CEM did not send %s to RM %s: %s", message.message_type,
                           entry.label, exc)
            return InstructionResult(rm_id, message_id, "NOT_SENT", str(exc))
        message_id = out.message_id or message_id
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InstructionResult] | None = None
        began = time.monotonic()
        if out.awaits_status and message_id is not None:
            future = loop.create_future()
            entry.waiting[message_id] = (future, began)
        if self.store is not None and out.message_type.endswith("Instruction"):
            execution_time = getattr(message, "execution_time", None)
            await self.store.record_instruction(
                rm_id=rm_id, message_id=message_id or "", message_type=out.message_type,
                text=out.text, plan_id=plan_id,
                execution_time=execution_time if isinstance(execution_time, datetime) else None)
        try:
            await asyncio.wait_for(self._send(entry, [out]), timeout=timeout)
        except TimeoutError:
            if message_id:
                entry.waiting.pop(message_id, None)
            return InstructionResult(rm_id, message_id, "TIMEOUT",
                                     "the RM did not read its messages in time")
        if future is None:
            return InstructionResult(rm_id, message_id, "OK", "sent (no status expected)")
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout)
        except TimeoutError:
            return InstructionResult(rm_id, message_id, "TIMEOUT",
                                     f"no ReceptionStatus within {timeout:g} s")
        finally:
            if message_id:
                entry.waiting.pop(message_id, None)

    async def select_control_type(self, rm_id: str, control_type: str) -> bool:
        """Ask an RM to switch control type (FRBC/..., NO_SELECTION); False if not live.

        Raises ValueError if the RM does not offer that control type.
        """
        entry = self._live.get(rm_id)
        if entry is None:
            return False
        outs = entry.session.select_control_type(control_type, utc_now())
        await self._after_session_call(entry, outs)
        return True

    async def reconnect(self, key: str, reason: str) -> bool:
        """Ask an RM (by resource id or connection id) to reconnect (S2 SessionRequest
        RECONNECT), then close its websocket: how an unpaired S2 Connect session ends."""
        entry = self._live.get(key) or self._by_connection.get(key)
        if entry is None:
            return False
        entry.closing_reason = reason
        items: list[Outgoing | CloseRequest] = []
        with contextlib.suppress(Exception):
            items.append(entry.session.send(SessionRequest(
                message_id=uuid.uuid4(), request=SessionRequestType.RECONNECT,
                diagnostic_label=reason[:200]), utc_now()))
        items.append(CloseRequest(1000, reason[:120]))
        try:
            await asyncio.wait_for(self._send(entry, items), timeout=2)
        except TimeoutError:
            if entry.ws is not None:
                await entry.ws.close(1000, reason[:120])
        return True

    async def disconnect(self, rm_id: str, reason: str) -> bool:
        """End an RM's session (S2 SessionRequest TERMINATE, then close the websocket)."""
        entry = self._live.get(rm_id)
        if entry is None:
            return False
        entry.closing_reason = reason
        await self._terminate_session(entry, reason)
        return True

    # --- HTTP upgrade ----------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request, *,
                         authorizer: RmAuthorizer | None = None) -> Response | None:
        peer = _peer(connection)
        host = _host(connection)
        refusal = self.admission.check(host, len(self._by_connection) + len(self._holders))
        if refusal is not None:
            self.admission.refused(host, "too many connections" if refusal.status == 503
                                   else "too many failed authentications",
                                   f"refused RM connection from {peer}: {refusal.reason} "
                                   f"(HTTP {refusal.status})")
            response = connection.respond(HTTPStatus(refusal.status),
                                          f"S2 CEM: {refusal.reason}\n")
            response.headers["Retry-After"] = str(refusal.retry_after_s)
            return response
        try:
            decision = (authorizer or self.authorizer).authorize(request, peer)
        except Exception:
            logger.exception("authorizer failed; refusing %s", peer)
            decision = AuthDecision(False, reason="authorizer error")
        if not decision.allowed:
            self.admission.failed(host)
            self.admission.refused(host, decision.reason,
                                   f"refused RM connection from {peer}: {decision.reason} "
                                   "(HTTP 401)")
            response = connection.respond(HTTPStatus.UNAUTHORIZED,
                                          f"S2 CEM: {decision.reason}\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="S2 CEM"'
            return response
        self._holders[connection] = decision
        return None

    # --- identity: resource ids belong to credentials --------------------------------------------

    def _claim(self, entry: LiveSession, rm_id: str) -> str | None:
        """May `entry`'s credential use resource id `rm_id`? None: yes (and it is bound to it
        if it was free); else the reason it may not."""
        holder = entry.holder
        if holder is None:
            return None  # no credentials here: nothing to bind a resource id to
        owner = self._owners.get(rm_id)
        if owner is not None and owner != holder and not self._holder_current(owner):
            security.warning("resource id %s was bound to %s, which is no longer configured; "
                             "%s takes it over", rm_id, _describe_holder(owner),
                             _describe_holder(holder))
            owner = None
        if owner is None:
            self._owners[rm_id] = holder
            if self.store is not None:
                self.store.bind_rm(rm_id, holder)
            logger.info("resource id %s is bound to %s", rm_id, _describe_holder(holder))
            return None
        if owner == holder:
            return None
        host = entry.peer.rpartition(":")[0] or entry.peer
        security.warning("SECURITY: %s from %s (connection %s) claimed resource id %s, which "
                         "belongs to %s: refused, the RM registered under it keeps its session",
                         _describe_holder(holder), entry.peer, entry.connection_id, rm_id,
                         _describe_holder(owner))
        self.admission.failed(host)
        return (f"resource id {rm_id} is registered under another credential; this "
                "connection may not use it (use the RM's own token, or ask the operator)")

    def _holder_current(self, holder: str) -> bool:
        """Whether a credential can still connect (a token removed from the config cannot)."""
        tokens = getattr(self.authorizer, "token_names", None)
        if tokens is None or holder.startswith("s2connect:"):
            return True
        return holder in tokens

    # --- one connection ---------------------------------------------------------------------------

    async def _handle_connection(self, ws: ServerConnection) -> None:
        connection_id = f"conn-{next(self._ids)}"
        peer = _peer(ws)
        decision = self._holders.pop(ws, None)
        holder = decision.holder if decision is not None else None
        _forget_handshake_headers(ws)
        if self._stopping:
            await ws.close(SHUTDOWN_CODE, SHUTDOWN_REASON)
            return
        try:
            session = self._session_factory()
            if decision is not None and decision.setup is not None:
                decision.setup(session)
        except Exception:
            logger.exception("could not create an S2 session for %s", peer)
            await ws.close(1011, "CEM error")
            return
        entry = LiveSession(connection_id=connection_id, session=session, peer=peer,
                            holder=holder, connected_at=utc_now(), ws=ws)
        session.claim = functools.partial(self._claim, entry)
        self._by_connection[connection_id] = entry
        self._live[connection_id] = entry
        if self.store is not None:
            self.store.session_opened(connection_id, peer=peer, token_name=holder)
        logger.info("RM connection %s from %s%s", connection_id, peer,
                    f" (token '{holder}')" if holder else "")
        self._publish(Connected(connection_id, peer, holder))
        reason = "connection closed"
        try:
            await self._after_session_call(entry, session.start(utc_now()))
            if isinstance(ws, S2Connection):
                ws.on_message = functools.partial(self._receive_now, entry)
                if type(session).receive is S2Session.receive:   # (not a session of its own)
                    ws.on_measurement = functools.partial(self._measurement_now, entry)
                ws.pacer = self._pacer
            # what the connection could not hand over at once (see S2Connection) comes here
            async for data in ws:
                if entry.session.close is None:
                    self._receive_now(entry, data)
                if entry.session.close is not None:
                    break
            if entry.close_task is not None:
                await asyncio.shield(entry.close_task)
            reason = _close_reason(ws, entry)
        except ConnectionClosed:
            reason = _close_reason(ws, entry)
        except Exception:
            logger.exception("S2 connection %s (%s) failed; closing only this one",
                             connection_id, entry.label)
            reason = "CEM error in this connection"
            with contextlib.suppress(Exception):
                await ws.close(1011, "CEM error")
        finally:
            self._forget(entry, reason)

    def _receive_now(self, entry: LiveSession, data: str | bytes) -> None:
        """One received message: the session judges it, its answers are framed for sending
        (written after the read), its events handled, the store told. Synchronous: called from
        the connection's `data_received` (see `S2Connection`) or from its task."""
        session = entry.session
        if session.close is not None or not entry.open:
            return  # the session ends: what the RM still sends is not read
        try:
            now = clock.now()   # (utc_now, one call less: once per message)
            self.messages_in += 1
            try:
                outs = session.receive(data, now)
            except Exception:
                logger.exception("S2 session of %s could not handle a message; it stays open",
                                 entry.label)
                outs = []
            accepted = session.accepted
            if accepted is not None and accepted[0] == "PowerMeasurement" \
                    and self._measured(entry, data, outs, now, accepted[1]):
                return
            # first: ResourceManagerDetails names the RM for the log
            self._handle_events(entry, now)
            if self.store is not None:
                self._log_incoming(entry, data, outs, now)
                for out in outs:
                    if out.message_type != "ReceptionStatus":
                        self._log_out(entry, out)
            self._send_now(entry, outs)
            close = entry.session.close
            if close is not None and entry.close_task is None:
                entry.closing_reason = entry.closing_reason or close.reason
                entry.close_task = asyncio.get_running_loop().create_task(
                    self._close_ws(entry, close.code, close.reason))
        except Exception:
            logger.exception("S2 connection %s (%s) failed; closing only this one",
                             entry.connection_id, entry.label)
            entry.closing_reason = entry.closing_reason or "CEM error in this connection"
            if entry.close_task is None:
                entry.close_task = asyncio.get_running_loop().create_task(
                    self._close_ws(entry, 1011, "CEM error"))

    def _measurement_now(self, entry: LiveSession, text: str) -> None:
        """A text frame with a PowerMeasurement in it, straight from the connection's read
        (`S2Connection.on_measurement`): when the session accepts it from its text
        (`S2Session.measurement_text`), its books in one step, as `_measured` keeps them (the
        store's count or rows, the RM's snapshot now and then, the event published, the OK
        framed). Anything else goes the full way (`_receive_now`): a session not past its
        RM's details, with events not handed on yet, ending, or without a store, and every
        text the session refuses here (judged from the start there, with its status)."""
        store = self.store
        rm_id = entry.rm_id
        session = entry.session
        ws = entry.ws
        if store is None or rm_id is None or session.events or session.close is not None \
                or not entry.open or type(ws) is not S2Connection:
            self._receive_now(entry, text)
            return
        try:
            message_id = session.measurement_text(text)
        except Exception:
            logger.exception("S2 session of %s could not judge a measurement; the full path "
                             "judges it", entry.label)
            message_id = None
        if message_id is None:
            self._receive_now(entry, text)   # (the session does not try its text again)
            return
        self.messages_in += 1
        now = clock.now()
        self._book_measurement(store, entry, rm_id, text, message_id, now.timestamp())
        self._publish(RmEvent(rm_id, entry.connection_id,
                              StateChanged("measurement", "PowerMeasurement"), now))
        if ws.send_now(OK_STATUS % message_id):
            self.messages_out += 1

    def _measured(self, entry: LiveSession, data: str | bytes, outs: list[Outgoing],
                  now: datetime, message_id: str) -> bool:
        """An accepted PowerMeasurement, most of what RMs send, in one step: what
        `_handle_events`, `_log_incoming` and `_send_now` do for it (the store's count or
        rows, the RM's snapshot now and then, the event published, the OK framed), in their
        order. False, with nothing done, unless it is that plain case (a store, a known RM,
        the session's one measurement event, one answer, an `S2Connection`)."""
        store = self.store
        rm_id = entry.rm_id
        session = entry.session
        events = session.events
        ws = entry.ws
        if store is None or rm_id is None or len(events) != 1 or len(outs) != 1 \
                or type(ws) is not S2Connection:
            return False
        event = events[0]
        if type(event) is not StateChanged or event.kind != "measurement":
            return False
        session.events = []
        self._book_measurement(store, entry, rm_id, data, message_id, now.timestamp())
        self._publish(RmEvent(rm_id, entry.connection_id, event, now))
        if entry.open and ws.send_now(outs[0].text):
            self.messages_out += 1
        return True

    def _book_measurement(self, store: Store, entry: LiveSession, rm_id: str,
                          data: str | bytes, message_id: str, at: float) -> None:
        """An accepted PowerMeasurement's books: the store's count (between logged ones) or
        its rows and log row, and the RM's snapshot now and then."""
        try:
            if not store.measurement_due(rm_id, at):
                store.count_message(rm_id, at)   # between logged ones
            else:
                _store_measurement(store, entry, rm_id)
                _log_accepted(store, entry, data, "PowerMeasurement", message_id, at)
            self._snapshot_now_and_then(store, entry, rm_id)
        except Exception:
            logger.exception("handling StateChanged of %s failed", entry.label)

    def _send_now(self, entry: LiveSession, outs: Sequence[Outgoing]) -> None:
        """Frame texts for sending, in order, without waiting: answers to what the RM sent.

        Back-pressure is the connection's (`S2Connection.flush`): the CEM stops reading from an
        RM that does not read. A connection of another kind (tests) sends in a task, in order.
        """
        ws = entry.ws
        if ws is None or not entry.open or not outs:
            return
        if isinstance(ws, S2Connection):
            for out in outs:
                if not ws.send_now(out.text):
                    return
                self.messages_out += 1
            return
        task = asyncio.get_running_loop().create_task(self._send(entry, outs))
        task.add_done_callback(_log_task_error)

    def _log_out(self, entry: LiveSession, out: Outgoing) -> None:
        assert self.store is not None
        self.store.log_message(direction="out", message_type=out.message_type,
                               message_id=out.message_id, text=out.text,
                               session_id=entry.connection_id, rm_id=entry.rm_id)

    async def _after_session_call(self, entry: LiveSession, outs: list[Outgoing],
                                  *, log_reception_statuses: bool = True) -> None:
        """Send what the session produced, then act on its events."""
        if self.store is not None:
            for out in outs:
                if log_reception_statuses or out.message_type != "ReceptionStatus":
                    self._log_out(entry, out)
        self._handle_events(entry)
        if entry.session.close is not None:
            await self._send(entry, [*outs, entry.session.close])
        elif outs:
            await self._send(entry, outs)

    async def _send(self, entry: LiveSession, items: Sequence[Outgoing | CloseRequest]) -> None:
        """Send texts in order, straight from the caller's task; a CloseRequest closes.

        Back-pressure: `ws.send` waits while more than `write_limit_bytes` are buffered for
        this RM, so an RM that does not read stops the CEM reading from it, and an instruction
        to it waits (up to its timeout). websockets allows concurrent sends of whole messages,
        so the control loop and the connection's reader never interleave frames.
        """
        ws = entry.ws
        if ws is None or not entry.open:
            return
        for item in items:
            if isinstance(item, CloseRequest):
                entry.closing_reason = entry.closing_reason or item.reason
                await ws.close(item.code, _close_text(item.reason))
                return
            try:
                await ws.send(item.text)
            except ConnectionClosed:
                return
            self.messages_out += 1

    def _log_incoming(self, entry: LiveSession, data: str | bytes, outs: list[Outgoing],
                      now: datetime) -> None:
        assert self.store is not None
        accepted = entry.session.accepted
        unlogged, entry.unlogged_measurement = entry.unlogged_measurement, False
        if unlogged and accepted is not None and entry.rm_id is not None:
            self.store.count_message(entry.rm_id, now.timestamp())  # between logged ones
            return
        if accepted is not None:  # answered OK: the session read its type and id already
            _log_accepted(self.store, entry, data, accepted[0], accepted[1], now.timestamp())
            return
        text = data if isinstance(data, str) else data.decode("utf-8", "replace")
        message_type, message_id, status = _peek(text, outs)
        if message_type == "ReceptionStatus" and message_id is None:
            return  # logged on the CEM message it answers (ReceptionConfirmed/Failed events)
        self.store.log_message(direction="in", message_type=message_type,
                               message_id=message_id, text=text,
                               session_id=entry.connection_id, rm_id=entry.rm_id,
                               reception_status=status, at=now.timestamp())

    # --- session events ---------------------------------------------------------------------------

    def _handle_events(self, entry: LiveSession, now: datetime | None = None) -> None:
        """Act on the session's events and publish them (stamped `now`, default: now)."""
        try:
            events = entry.session.drain_events()
        except Exception:
            logger.exception("could not read events of %s", entry.label)
            return
        if not events:
            return
        if now is None:
            now = utc_now()
        for event in events:
            try:
                self._on_event(entry, event, now)
            except Exception:
                logger.exception("handling %s of %s failed", type(event).__name__, entry.label)
            self._publish(RmEvent(entry.rm_id, entry.connection_id, event, now))

    def _snapshot_now_and_then(self, store: Store, entry: LiveSession, rm_id: str) -> None:
        """The RM's snapshot into the store, at most every `snapshot_interval_s`."""
        moment = time.monotonic()
        if moment - entry.last_snapshot_at >= self.snapshot_interval_s:
            entry.last_snapshot_at = moment
            store.touch_rm(rm_id, snapshot=entry.session.state.snapshot)

    def _on_event(self, entry: LiveSession, event: Any, now: datetime) -> None:
        kind = type(event).__name__
        store = self.store
        if kind == "StateChanged":  # first: nearly every event (a measurement)
            rm_id = entry.rm_id
            if store is not None and rm_id is not None:
                if event.kind == "measurement":
                    if not store.measurement_due(rm_id, now.timestamp()):
                        entry.unlogged_measurement = True   # counted, not logged (_log_incoming)
                    else:
                        _store_measurement(store, entry, rm_id)
                self._snapshot_now_and_then(store, entry, rm_id)
        elif kind == "RmDetails":
            entry.details = event.details
            entry.name = event.name or event.details.name
            self._identify(entry, event.resource_id or str(event.details.resource_id))
        elif kind == "ControlTypeSelected":
            control_type = str(event.control_type)
            entry.control_type = control_type
            logger.info("RM %s connected, control type %s selected", entry.label,
                        SHORT_CONTROL_TYPE.get(control_type or "", control_type))
            if store is not None and entry.rm_id is not None:
                store.touch_rm(entry.rm_id, control_type=control_type,
                               snapshot=entry.session.state.snapshot)
        elif kind == "HandshakeDone":
            logger.debug("%s: handshake done (%s)", entry.label, event.version)
        elif kind in ("ReceptionConfirmed", "ReceptionFailed"):
            subject = str(event.message_id)
            status = "OK" if kind == "ReceptionConfirmed" else str(event.status)
            label = None if kind == "ReceptionConfirmed" else event.diagnostic
            if store is not None and status != "TIMEOUT":
                store.log_reception_status(subject, status)
            waiting = entry.waiting.pop(subject, None)
            if waiting is not None and not waiting[0].done():
                waiting[0].set_result(InstructionResult(
                    entry.key, subject, status, label, time.monotonic() - waiting[1]))
        elif kind == "SessionClosed":
            entry.closing_reason = entry.closing_reason or event.reason
        elif kind == "ReconnectRequested":
            logger.info("RM %s asked to reconnect", entry.label)

    def _identify(self, entry: LiveSession, rm_id: str) -> None:
        """The RM told us who it is: key the registry by its resource id from now on."""
        old = self._live.get(rm_id)
        if old is not None and old is not entry:
            logger.warning("RM %s connected again while its old connection %s was open; "
                           "closing the old one", entry.label, old.connection_id)
            old.closing_reason = "superseded by a new connection of the same RM"
            self._live.pop(rm_id, None)
            self._rms.pop(rm_id, None)
            old.rm_id = None
            asyncio.get_running_loop().create_task(
                self._terminate_session(old, "superseded by a new connection"))
        self._live.pop(entry.key, None)
        entry.rm_id = rm_id
        self._live[rm_id] = entry
        self._rms[rm_id] = entry
        if self.store is not None:
            self.store.session_identified(entry.connection_id, rm_id)  # and its earlier messages
            self.store.touch_rm(rm_id, name=entry.name, connected=True, clear_control_type=True)

    async def _terminate_session(self, entry: LiveSession, reason: str,
                                 code: int | None = None) -> None:
        """S2 SessionRequest TERMINATE with `reason`, then close the websocket with `code`.

        `code` None: the session's own close code (1000, a normal end).
        """
        try:
            outs = entry.session.terminate(reason, utc_now())
        except Exception:
            logger.exception("terminating the session of %s failed", entry.label)
            outs = []
        if self.store is not None:
            for out in outs:
                self.store.log_message(direction="out", message_type=out.message_type,
                                       message_id=out.message_id, text=out.text,
                                       session_id=entry.connection_id, rm_id=entry.rm_id)
        self._handle_events(entry)
        close = entry.session.close
        close_code = code or (close.code if close is not None else 1000)
        try:
            await asyncio.wait_for(self._send(entry, [*outs, CloseRequest(close_code, reason)]),
                                   timeout=2)
        except TimeoutError:
            if entry.ws is not None:
                await entry.ws.close(close_code, _close_text(reason))

    def _forget(self, entry: LiveSession, reason: str) -> None:
        self._by_connection.pop(entry.connection_id, None)
        if self._live.get(entry.key) is entry:
            self._live.pop(entry.key, None)
        if entry.rm_id is not None and self._rms.get(entry.rm_id) is entry:
            self._rms.pop(entry.rm_id, None)
        for future, _ in entry.waiting.values():
            if not future.done():
                future.set_result(InstructionResult(entry.key, None, "CLOSED",
                                                    f"connection ended: {reason}"))
        entry.waiting.clear()
        entry.open = False
        if self.store is not None:
            self.store.session_closed(entry.connection_id, reason)
            if entry.rm_id is not None:
                self.store.touch_rm(entry.rm_id, connected=False,
                                    snapshot=entry.session.state.snapshot)
        logger.info("RM %s disconnected: %s", entry.label, reason)
        self._publish(Disconnected(entry.connection_id, entry.rm_id, reason))

    def _publish(self, event: RegistryEvent) -> None:
        for queue in self._subscribers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:   # the oldest goes
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(event)
        for callback in self._listeners:
            try:
                result = callback(event)
                if asyncio.iscoroutine(result):
                    task = asyncio.get_running_loop().create_task(result)
                    task.add_done_callback(_log_task_error)
            except Exception:
                logger.exception("an S2 event listener failed")

    async def _tick(self) -> None:
        """Drive the sessions' timers (ReceptionStatus timeouts) for all connections at once."""
        while True:
            await asyncio.sleep(self.tick_s)
            self.admission.flush()
            now = utc_now()
            for entry in list(self._by_connection.values()):
                session = entry.session
                if not (session.timers_running or session.events or session.close is not None):
                    continue   # most of 1000 sessions, most ticks: nothing to do
                try:
                    entry.session.expire(now)
                    self._handle_events(entry)
                    if entry.session.close is not None and entry.open:
                        task = asyncio.get_running_loop().create_task(
                            self._send(entry, [entry.session.close]))
                        task.add_done_callback(_log_task_error)
                except Exception:
                    logger.exception("timers of %s failed", entry.label)


# --- small helpers ----------------------------------------------------------------------------------


def _peer(connection: ServerConnection) -> str:
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "unknown peer"


def _close_text(reason: str) -> str:
    """A close reason as a websocket close frame can carry it (at most 123 bytes of UTF-8)."""
    data = reason.encode("utf-8")
    return reason if len(data) <= 123 else data[:120].decode("utf-8", "ignore") + "..."


def _host(connection: ServerConnection) -> str:
    try:
        return str(connection.remote_address[0])
    except Exception:
        return "unknown peer"


def _describe_holder(holder: str) -> str:
    if holder.startswith("s2connect:"):
        return f"S2 Connect pairing {holder.removeprefix('s2connect:')}"
    return f"token '{holder}'"


def _close_reason(ws: ServerConnection, entry: LiveSession) -> str:
    if entry.closing_reason:
        return entry.closing_reason
    if entry.session.close is not None:
        return entry.session.close.reason or f"closed by the CEM ({entry.session.close.code})"
    received = ws.protocol.close_rcvd
    if received is not None:
        return f"RM closed the connection ({received.code}{': ' + received.reason if received.reason else ''})"
    sent = ws.protocol.close_sent
    if sent is not None:
        return f"CEM closed the connection ({sent.code}{': ' + sent.reason if sent.reason else ''})"
    return "connection lost"


def _json_field(text: str, name: str) -> str | None:
    """A top-level string field of a small JSON object, without parsing it all."""
    marker = f'"{name}"'
    at = text.find(marker)
    if at < 0:
        return None
    colon = text.find(":", at + len(marker))
    if colon < 0:
        return None
    start = text.find('"', colon + 1)
    if start < 0 or text[colon + 1:start].strip():
        return None
    end = text.find('"', start + 1)
    return text[start + 1:end] if end > start else None


def _peek(text: str, outs: list[Outgoing]) -> tuple[str | None, str | None, str | None]:
    """Message type and id of an incoming text, and the ReceptionStatus the CEM answered."""
    status = None
    for out in outs:
        if out.message_type == "ReceptionStatus":
            at = out.text.rfind(_STATUS_MARK)  # the session writes compact JSON
            if at >= 0:
                start = at + len(_STATUS_MARK)
                status = out.text[start:out.text.find('"', start)]
            else:
                status = _json_field(out.text, "status")
            break
    return _json_field(text, "message_type"), _json_field(text, "message_id"), status


_STATUS_MARK = '"status":"'


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("an S2 event listener failed", exc_info=task.exception())


def _store_measurement(store: Store, entry: LiveSession, rm_id: str) -> None:
    """The RM's latest PowerMeasurement into the store's measurement rows."""
    measurement = entry.session.state.latest_measurement()
    if measurement is not None:
        store.record_measurements(
            rm_id, measurement.measurement_timestamp.timestamp(),
            [(v.commodity_quantity.value, v.value) for v in measurement.values])


def _log_accepted(store: Store, entry: LiveSession, data: str | bytes, message_type: str,
                  message_id: str, at: float) -> None:
    """An RM message the session answered OK into the message log (its type and id as the
    session read them)."""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    store.log_message(direction="in", message_type=message_type, message_id=message_id,
                      text=text, session_id=entry.connection_id, rm_id=entry.rm_id,
                      reception_status="OK", at=at)
